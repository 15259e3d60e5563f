"""`qfx eval`: the artifact against the float model it came from, on a text."""
from __future__ import annotations

from pathlib import Path

import torch

from qfx.budget import check_measurable, over_budget
from qfx.calib_data import read_text
from qfx.capture import load_factory, load_hf
from qfx.errors import ArtifactError, BudgetError, ModelLoadError, UserError
from qfx.runtime import load
from qfx.runtime.artifact_files import read_manifest
from qfx.runtime.evaluate import compare_lm, rolling_perplexity
from qfx.runtime.loader import check_factory_trusted


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


def artifact_tokenizer(folder: Path, manifest: dict):
    """The artifact's own tokenizer, from files the manifest hashes (load them only after the
    artifact's hashes were checked)."""
    import transformers

    from qfx.lowering.emit import TOKENIZER_FILES

    _check_tokenizer_hashed(folder, manifest)
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # transformers and tokenizers raise many types on a missing or corrupted file
        if not any((folder / f).is_file() for f in TOKENIZER_FILES if f != "generation_config.json"):
            raise UserError(f"{folder} has no tokenizer files, so it cannot tokenize text",
                            hint="build from a model directory that has tokenizer.json") from None
        raise ArtifactError(f"the artifact's tokenizer files cannot be loaded: {type(exc).__name__}: "
                            f"{str(exc)[:200]}", where=str(folder), hint="rebuild the artifact") from None


def _check_tokenizer_hashed(folder: Path, manifest: dict) -> None:
    """The tokenizer files eval reads must be among those the manifest hashes (`load` checked
    those hashes): a file added after the build is not the build's."""
    from qfx.lowering.emit import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if (folder / name).is_file() and name not in manifest["artifact"]:
            raise ArtifactError(f"{name} is not among the files manifest.json hashes, so it was added after the build",
                                where=str(folder), hint="remove it, or rebuild the artifact from a model directory "
                                                        "that has it")


def evaluate_artifact(folder: Path, text_path: Path, window: int = 256, max_tokens: int | None = None,
                      trust_factory: bool = False, budget: dict[str, float] | None = None) -> dict:
    """The artifact against its float source on a text (qfx.runtime.evaluate.compare_lm), judged
    against `budget` (limits as qfx.budget.parse_budget gives them: a BudgetError when over). The
    float source is rebuilt from the recorded factory only if it is qfx's own or `trust_factory`
    (it is code the artifact names); the artifact is loaded, its files checked, before its
    tokenizer is read."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["model"]["kind"] != "causal_lm":
        raise UserError("qfx eval measures perplexity, so it needs a causal LM artifact")
    if window < 2:
        raise UserError(f"--window must be at least 2 tokens, got {window}")
    if budget:
        check_measurable(budget, "causal_lm")
    if "factory" in manifest["model"]:
        check_factory_trusted(folder, manifest["model"]["factory"], trust_factory)
    text = read_text(text_path, "evaluation", UserError)
    quantized = load(folder, trust_factory=trust_factory)
    ids = artifact_tokenizer(folder, manifest)(text, return_tensors="pt", verbose=False)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise UserError(f"{text_path.name} gives {ids.numel()} token(s); perplexity needs at least 2")
    vocab = quantized.get_input_embeddings().num_embeddings
    if int(ids.max()) >= vocab:
        raise ArtifactError(f"the artifact's tokenizer gives token id {int(ids.max())}, but its model has {vocab} "
                            "embeddings: the tokenizer files belong to another model", where=str(folder),
                            hint="rebuild the artifact from a model directory whose tokenizer matches it")
    reference = float_model(folder, manifest)
    if reference is None:
        if budget:
            raise UserError("--budget compares the artifact with its float model, which cannot be found: the "
                            "artifact was built from a model in memory, or its source "
                            f"({manifest['model'].get('path') or manifest['model'].get('factory')}) cannot be loaded",
                            hint="evaluate where the source model is, or build with an evaluate section instead")
        q = rolling_perplexity(lambda x: quantized(x).logits, ids, window)
        return {"tokens": q["tokens"], "quantized_perplexity": q["perplexity"], "float_perplexity": None,
                "note": "no float reference: the artifact was built from a model in memory, or its source "
                        f"({manifest['model'].get('path') or manifest['model'].get('factory')}) cannot be loaded"}
    figures = compare_lm(lambda x: reference(input_ids=x, use_cache=False).logits, lambda x: quantized(x).logits,
                         ids, window)
    if budget:
        figures["budget"] = budget
        if failures := over_budget(figures, budget):
            raise BudgetError(f"{folder} is over the accuracy budget on {text_path.name}: " + "; ".join(failures),
                              figures=figures, hint="the figures are the artifact's against its float model "
                                                    f"over {figures['tokens']} predicted tokens")
    return figures
