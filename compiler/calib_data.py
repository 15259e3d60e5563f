"""Calibration inputs from text, a token file, or a seeded random generator."""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import torch

from qfx.capture import ModelBundle
from qfx.errors import CalibrationError, UserError
from qfx.passes.observe import calibration_graph
from qfx.runtime.hashing import sha256_tensors
from qfx.spec import Calibration


@dataclasses.dataclass
class CalibrationSet:
    inputs: tuple[torch.Tensor, ...]  # each [samples, ...], positionally the model's inputs
    description: str

    @property
    def samples(self) -> int:
        return self.inputs[0].shape[0]

    def batches(self, batch_size: int):
        for start in range(0, self.samples, batch_size):
            yield tuple(t[start:start + batch_size] for t in self.inputs)

    def sha256(self) -> str:
        return sha256_tensors((str((t.dtype, tuple(t.shape))), t) for t in self.inputs)


def read_text(path: Path, what: str = "calibration", error: type[UserError] = CalibrationError) -> str:
    """A non-empty UTF-8 text file, or an `error` that says which file is wrong and how."""
    if not path.is_file():
        raise error(f"{what} text not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} text {path} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise error(f"{what} text {path} is empty", hint="give a file with text in the model's domain")
    return text


def tokenizer_of(bundle: ModelBundle, what: str = "calibration", error: type[UserError] = CalibrationError):
    """The model's own tokenizer, or an `error` that says which data needed it."""
    import transformers

    if bundle.model_dir is None:
        raise error(f"{what} text needs the model's tokenizer, and this model has no directory",
                    hint=f"use {what}.tokens (a file of token ids)")
    try:
        return transformers.AutoTokenizer.from_pretrained(bundle.model_dir)
    except (OSError, ValueError) as exc:
        raise error(f"cannot load the tokenizer of {bundle.model_dir}: {str(exc).splitlines()[0]}") from None


def from_text(cfg: Calibration, bundle: ModelBundle) -> CalibrationSet:
    path = Path(cfg.text)
    text = read_text(path)
    tok = tokenizer_of(bundle)
    split = cfg.split or ("document" if bundle.kind == "causal_lm" else "lines")
    if split == "document":
        ids = tok(text, return_tensors="pt", verbose=False)["input_ids"][0]  # whole file, BOS once
        need = cfg.samples * cfg.seq_len
        if ids.numel() < need:
            raise CalibrationError(
                f"calibration text {path} gives {ids.numel()} tokens, fewer than samples × seq_len = "
                f"{cfg.samples} × {cfg.seq_len} = {need}",
                hint="lower calibration.samples or seq_len, or give a longer text")
        inputs = (ids[:need].reshape(cfg.samples, cfg.seq_len),)
    else:
        if bundle.kind == "causal_lm":
            raise CalibrationError("calibration.split: lines pads samples, which is for encoders; a causal LM "
                                   "calibrates on the text as one token stream", hint="use split: document")
        if tok.pad_token is None:
            raise CalibrationError(f"the tokenizer of {bundle.model_dir} has no pad token, so lines cannot be padded",
                                   hint="use split: document")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) < cfg.samples:
            raise CalibrationError(f"calibration text {path} has {len(lines)} non-empty lines, fewer than "
                                   f"samples = {cfg.samples}", hint="lower calibration.samples or add lines")
        enc = tok(lines[:cfg.samples], padding="longest", truncation=True, max_length=cfg.seq_len,
                  return_tensors="pt")
        inputs = (enc["input_ids"], enc["attention_mask"])
    if bundle.kind == "encoder" and len(inputs) == 1:
        inputs = (inputs[0], torch.ones_like(inputs[0]))
    return CalibrationSet(inputs, f"{path.name} ({split}, {cfg.samples} × {cfg.seq_len})")


def read_token_file(path: Path, bundle: ModelBundle, what: str = "calibration",
                    error: type[UserError] = CalibrationError) -> torch.Tensor:
    """The integer token ids of a .npy or .safetensors file (its single tensor or 'input_ids'),
    within the model's vocabulary, as int64."""
    if not path.is_file():
        raise error(f"{what} token file not found: {path}")
    if path.suffix == ".npy":
        try:
            ids = torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as exc:
            raise error(f"cannot read {path} as a .npy array of token ids: {exc}") from None
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        if len(tensors) != 1 and "input_ids" not in tensors:
            raise error(f"{path} holds {sorted(tensors)}; qfx reads its single tensor or 'input_ids'")
        ids = tensors.get("input_ids", next(iter(tensors.values())))
    else:
        raise error(f"{what}.tokens must be a .npy or .safetensors file, got {path.name}")
    if ids.is_floating_point() or ids.numel() == 0:
        raise error(f"{path} must hold integer token ids (got {ids.dtype}, {tuple(ids.shape)})")
    if bundle.vocab_size and (ids.min() < 0 or ids.max() >= bundle.vocab_size):
        raise error(f"{path} has token ids outside [0, {bundle.vocab_size}) of this model's vocabulary")
    return ids.long()


def from_tokens(cfg: Calibration, bundle: ModelBundle) -> CalibrationSet:
    path = Path(cfg.tokens)
    ids = read_token_file(path, bundle)
    samples, seq_len = _token_shape(cfg, ids, path)
    need = samples * seq_len
    if ids.ndim == 1:
        if ids.numel() < need:
            raise CalibrationError(f"{path} has {ids.numel()} tokens, fewer than samples × seq_len = {need}")
        ids = ids[:need].reshape(samples, seq_len)
    elif ids.ndim == 2:
        if ids.shape[0] < samples or ids.shape[1] < seq_len:
            raise CalibrationError(f"{path} is {tuple(ids.shape)}; samples × seq_len needs at least "
                                   f"{samples} × {seq_len}", hint="lower calibration.samples or seq_len "
                                   "(left out, they are the file's own shape)")
        ids = ids[:samples, :seq_len]
    else:
        raise CalibrationError(f"{path} must be 1-D or 2-D token ids, got shape {tuple(ids.shape)}")
    inputs = (ids, torch.ones_like(ids)) if bundle.kind == "encoder" else (ids,)
    return CalibrationSet(inputs, f"{path.name} ({samples} × {seq_len})")


def _token_shape(cfg: Calibration, ids: torch.Tensor, path: Path) -> tuple[int, int]:
    """samples and seq_len for a token file: a 2-D file is already cut into samples, so what the
    spec leaves out comes from its shape (the defaults, 16 × 128, would reject a smaller file
    that the user meant whole); what the spec sets wins and is checked against the file."""
    given = cfg.model_fields_set
    samples, seq_len = cfg.samples, cfg.seq_len
    if ids.ndim == 2:
        samples = samples if "samples" in given else ids.shape[0]
        seq_len = seq_len if "seq_len" in given else ids.shape[1]
        if seq_len < 2:
            raise CalibrationError(f"{path} is {tuple(ids.shape)}: samples of {seq_len} token, and calibration "
                                   "needs at least 2 per sample", hint="give rows of at least 2 token ids")
    return samples, seq_len


# Synthetic calibration draws at most this many values (1 GiB of int64 ids): a typo such as
# samples: 1000000000 must be an error, not a failed allocation deep in torch.
MAX_SYNTHETIC_VALUES = 2**27


def synthetic(cfg: Calibration, bundle: ModelBundle) -> CalibrationSet:
    gen = torch.Generator().manual_seed(cfg.seed)
    if bundle.kind == "module":
        shapes = [(cfg.samples, *t.shape[1:]) for t in bundle.example_inputs]
        _check_synthetic_size(cfg, sum(math.prod(shape) for shape in shapes))
        inputs = []
        for t, shape in zip(bundle.example_inputs, shapes):
            if t.is_floating_point():
                inputs.append(torch.randn(shape, generator=gen, dtype=t.dtype))
            else:
                inputs.append(torch.randint(0, int(t.max()) + 1, shape, generator=gen, dtype=t.dtype))
        return CalibrationSet(tuple(inputs), f"synthetic (seed {cfg.seed}, {cfg.samples} samples)")
    _check_synthetic_size(cfg, cfg.samples * cfg.seq_len)
    ids = torch.randint(0, bundle.vocab_size, (cfg.samples, cfg.seq_len), generator=gen)
    inputs = (ids, torch.ones_like(ids)) if bundle.kind == "encoder" else (ids,)
    return CalibrationSet(inputs, f"synthetic (seed {cfg.seed}, {cfg.samples} × {cfg.seq_len})")


def _check_synthetic_size(cfg: Calibration, values: int) -> None:
    if values > MAX_SYNTHETIC_VALUES:
        raise CalibrationError(f"synthetic calibration of {cfg.samples} samples (seq_len {cfg.seq_len}) is "
                               f"{values} values, more than the {MAX_SYNTHETIC_VALUES} qfx draws",
                               hint="lower calibration.samples or seq_len (a few hundred samples calibrate well)")


def checkpoint_source(bundle: ModelBundle) -> str | None:
    """Where a model's trained weights came from (its directory, or the name that from_pretrained
    recorded in its config), or None for a model built from a config or by a plain module."""
    if bundle.model_dir is not None:
        return str(bundle.model_dir)
    config = getattr(bundle.hf_model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def calibration_set(cfg: Calibration, bundle: ModelBundle, *, given: bool = True) -> CalibrationSet:
    """The calibration inputs `cfg` describes for `bundle`.

    given: whether the spec has a `calibration` section; without one, cfg is the synthetic
    default, which a trained checkpoint must not get silently: random ids give it activation
    ranges unlike its real inputs, and a build that looks fine quantizes badly."""
    if not given and (source := checkpoint_source(bundle)):
        raise CalibrationError(
            f"no calibration data given for the trained model {source}: without a `calibration` section "
            "qfx would calibrate it on random token ids",
            hint="add calibration: {text: FILE} (UTF-8 text like the model's inputs) or "
                 "{tokens: ids.npy or .safetensors}; or calibration: {synthetic: true} to accept random ids")
    if cfg.synthetic:
        return synthetic(cfg, bundle)
    if bundle.kind == "module" and cfg.text:
        raise CalibrationError("text calibration needs a Hugging Face model (for its tokenizer)",
                               hint="use calibration.tokens or synthetic: true for factory models")
    return from_text(cfg, bundle) if cfg.text else from_tokens(cfg, bundle)


def run_calibration(gm: torch.fx.GraphModule, data: CalibrationSet, batch_size: int) -> dict:
    """Run every batch through the part of `gm` that feeds its observers, which record ranges.

    The phase between observe and convert."""
    from tqdm import tqdm

    sliced = calibration_graph(gm)
    n_batches = (data.samples + batch_size - 1) // batch_size
    with torch.no_grad():
        for batch in tqdm(data.batches(batch_size), total=n_batches, desc="calibrating", unit="batch",
                          disable=not sys.stderr.isatty(), leave=False):
            sliced(*batch)
    return {"batches": n_batches, "samples": data.samples, "nodes_run": len(sliced.graph.nodes),
            "nodes_in_graph": len(gm.graph.nodes)}
