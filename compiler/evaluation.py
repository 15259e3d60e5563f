"""`qfx eval`: the artifact against the float model it came from, on a text."""
from __future__ import annotations

from pathlib import Path

import torch

from qfx.calib_data import read_text
from qfx.capture import load_factory, load_hf
from qfx.errors import ModelLoadError, UserError
from qfx.runtime import load
from qfx.runtime.evaluate import compare_outputs, perplexity, windows
from qfx.runtime.loader import read_manifest


def float_model(folder: Path, manifest: dict) -> torch.nn.Module | None:
    """The float model the artifact was built from, if it can still be found."""
    source = manifest["model"]
    try:
        if "path" in source:
            return load_hf((folder / source["path"]).resolve()).hf_model
        if "factory" in source:
            return load_factory(source["factory"]).hf_model
    except ModelLoadError:
        return None
    return None


def token_stream(folder: Path, text_path: Path) -> torch.Tensor:
    import transformers

    text = read_text(text_path, "evaluation", UserError)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        raise UserError(f"{folder} has no tokenizer files, so it cannot tokenize {text_path.name}",
                        hint="build from a model directory that has tokenizer.json") from None
    return tok(text, return_tensors="pt", verbose=False)["input_ids"][0]


def evaluate_artifact(folder: Path, text_path: Path, window: int = 256, max_tokens: int | None = None) -> dict:
    manifest = read_manifest(folder)
    if manifest["model"]["kind"] != "causal_lm":
        raise UserError("qfx eval measures perplexity, so it needs a causal LM artifact")
    if window < 2:
        raise UserError(f"--window must be at least 2 tokens, got {window}")
    ids = token_stream(folder, text_path)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise UserError(f"{text_path.name} gives {ids.numel()} token(s); perplexity needs at least 2")
    quantized = load(folder)
    figures: dict = {"tokens": None}
    q = perplexity(lambda x: quantized(x).logits, ids, window)
    figures["tokens"] = q["tokens"]
    figures["quantized_perplexity"] = q["perplexity"]
    reference = float_model(folder, manifest)
    if reference is None:
        figures["float_perplexity"] = None
        figures["note"] = ("no float reference: the artifact was built from a model in memory, or its source "
                           f"({manifest['model'].get('path') or manifest['model'].get('factory')}) cannot be loaded")
        return figures
    fp = perplexity(lambda x: reference(input_ids=x, use_cache=False).logits, ids, window)
    figures["float_perplexity"] = fp["perplexity"]
    figures["perplexity_change_pct"] = 100 * (q["perplexity"] / fp["perplexity"] - 1)
    first = windows(ids, window)[0].unsqueeze(0)
    with torch.no_grad():
        cmp = compare_outputs(reference(input_ids=first, use_cache=False).logits, quantized(first).logits, top1=True)
    figures["logits_rel_error_first_window"] = cmp["rel_error"]
    figures["top1_agreement_first_window"] = cmp["top1_agreement"]
    return figures
