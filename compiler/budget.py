"""Accuracy budgets: the evaluation data of a build, the quantized model's figures against the
float model on it, and the verdict that keeps an over-budget artifact from being published.

The evaluation data must be held out: a budget judged on the calibration data says how well the
observers fit what they saw, not how the model does. So data that shares a run of
OVERLAP_TOKENS tokens (causal LMs) or a whole line (encoders) with the calibration samples is
refused.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import torch
from pydantic import ValidationError

from qfx.calib_data import CalibrationSet, read_text, read_token_file, tokenizer_of
from qfx.capture import ModelBundle
from qfx.errors import UserError
from qfx.runtime.evaluate import compare_lm, first_tensor, mean_cosine, mean_pooled
from qfx.runtime.numerics import sum_squares
from qfx.spec import Budget, Evaluate

OVERLAP_TOKENS = 32
# How each figure is judged: at most its budget, or at least it.
AT_MOST, AT_LEAST = "at most", "at least"
JUDGED = {"perplexity_increase": AT_MOST, "logits_rel_error": AT_MOST, "top1_agreement": AT_LEAST,
          "mean_cosine": AT_LEAST}
MEASURED = {"causal_lm": ("perplexity_increase", "logits_rel_error", "top1_agreement"),
            "encoder": ("mean_cosine", "logits_rel_error")}
ENCODER_BATCH = 8


def show(name: str, value: float) -> str:
    """A figure as the budget is written: shares in percent."""
    if name == "perplexity_increase":
        return f"{100 * value:+.3g}%"
    if name == "top1_agreement":
        return f"{100 * value:.4g}%"
    return f"{value:.4g}"


def over_budget(figures: dict, limits: dict[str, float]) -> list[str]:
    """Each figure outside its budget, as 'name value (budget: at most / at least limit)'; a figure
    that is not a number (NaN) is outside any budget."""
    failures = []
    for name, limit in limits.items():
        value = figures[name]
        inside = value <= limit if JUDGED[name] == AT_MOST else value >= limit
        if not inside or math.isnan(value):
            failures.append(f"{name} {show(name, value)} (budget: {JUDGED[name]} {show(name, limit)})")
    return failures


def parse_budget(entries: list[str]) -> dict[str, float]:
    """NAME=VALUE entries (each may hold several, comma-separated) as budget limits, validated as
    the spec's `evaluate.budget` is."""
    pairs = {}
    for entry in entries:
        for part in filter(None, (p.strip() for p in entry.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise UserError(f"--budget {part!r} is not NAME=VALUE",
                                hint=f"e.g. --budget perplexity_increase=2%,top1_agreement=0.95; names: "
                                     f"{', '.join(JUDGED)}")
            pairs[name.strip()] = value.strip()
    try:
        return Budget(**pairs).limits()
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"--budget: {reasons}", hint=f"names: {', '.join(JUDGED)}; shares as '2%' or 0.02") from None


def check_measurable(limits: dict[str, float], kind: str) -> None:
    """A budget may only name figures that the model's kind has."""
    if kind not in MEASURED:
        raise UserError(f"evaluate: budgets are measured on causal LMs and encoders, not on a {kind} model",
                        hint="remove the evaluate section for this model")
    if unknown := [name for name in limits if name not in MEASURED[kind]]:
        raise UserError(f"evaluate.budget names {', '.join(unknown)}, which a {kind.replace('_', ' ')} does not "
                        f"have", hint=f"a {kind.replace('_', ' ')}'s figures: {', '.join(MEASURED[kind])}")


def evaluation_inputs(cfg: Evaluate, bundle: ModelBundle) -> tuple[tuple[torch.Tensor, ...], str]:
    """(inputs, description): a 1-D token stream for a causal LM; (ids, mask) rows for an encoder."""
    if cfg.text is not None:
        path = Path(cfg.text)
        text = read_text(path, "evaluation", UserError)
        tok = tokenizer_of(bundle, "evaluate", UserError)
        if bundle.kind == "causal_lm":
            ids = tok(text, return_tensors="pt", verbose=False)["input_ids"][0][:cfg.max_tokens]
            return (ids,), f"{path.name} ({ids.numel()} tokens, windows of {cfg.seq_len})"
        lines = [line.strip() for line in text.splitlines() if line.strip()][:cfg.max_lines]
        enc = tok(lines, padding="longest", truncation=True, max_length=cfg.seq_len, return_tensors="pt")
        return (enc["input_ids"], enc["attention_mask"]), f"{path.name} ({len(lines)} lines)"
    path = Path(cfg.tokens)
    ids = read_token_file(path, bundle, "evaluate", UserError)
    if bundle.kind == "causal_lm":
        ids = ids.reshape(-1)[:cfg.max_tokens]
        return (ids,), f"{path.name} ({ids.numel()} tokens, windows of {cfg.seq_len})"
    rows = (ids if ids.ndim == 2 else ids.reshape(1, -1))[:cfg.max_lines, :cfg.seq_len]
    return (rows, torch.ones_like(rows)), f"{path.name} ({rows.shape[0]} rows)"


def _rows(inputs: tuple[torch.Tensor, ...]) -> list[list[int]]:
    """Each sample's token ids, padding left out."""
    ids = inputs[0].reshape(-1, inputs[0].shape[-1])
    if len(inputs) > 1:
        return [row[mask.bool()].tolist() for row, mask in zip(ids, inputs[1].reshape(ids.shape))]
    return ids.tolist()


def check_held_out(inputs: tuple[torch.Tensor, ...], calibration: CalibrationSet, kind: str) -> None:
    """Refuse evaluation data that overlaps the calibration data (see the module docstring)."""
    seen = _rows(calibration.inputs)
    if kind == "encoder":
        lines = {tuple(row) for row in seen}
        for i, row in enumerate(_rows(inputs)):
            if tuple(row) in lines:
                raise UserError(f"evaluation line {i + 1} is also a calibration sample: the budget would be judged "
                                "on data the observers saw", hint="evaluate on held-out lines (another file)")
        return
    n = min(OVERLAP_TOKENS, *(len(row) for row in seen))
    runs = {tuple(row[i:i + n]) for row in seen for i in range(len(row) - n + 1)}
    stream = inputs[0].tolist()
    for i in range(len(stream) - n + 1):
        if tuple(stream[i:i + n]) in runs:
            raise UserError(f"the evaluation data overlaps the calibration data: its tokens {i}..{i + n - 1} are a "
                            f"run of the calibration samples, so the budget would be judged on data the observers "
                            "saw", hint="evaluate on held-out text: another file, or another part of the corpus "
                                        "than calibration.text")


def _bar(total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(), leave=False)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Evaluation data read and checked before the build's work, and the budget to judge."""

    inputs: tuple[torch.Tensor, ...]
    description: str
    limits: dict[str, float]
    seq_len: int


def prepare(cfg: Evaluate, bundle: ModelBundle, calibration: CalibrationSet) -> Evaluation:
    """Read the evaluation data and check it (measurable budget, held out), so that a bad section
    fails before calibration, not after it."""
    limits = cfg.budget.limits()
    check_measurable(limits, bundle.kind)
    inputs, description = evaluation_inputs(cfg, bundle)
    if bundle.kind == "causal_lm" and inputs[0].numel() < 2:
        raise UserError(f"the evaluation data gives {inputs[0].numel()} token(s); at least 2 are needed")
    check_held_out(inputs, calibration, bundle.kind)
    return Evaluation(inputs, description, limits, cfg.seq_len)


@torch.no_grad()
def evaluate(evaluation: Evaluation, bundle: ModelBundle, quantized) -> dict:
    """The quantized model (a callable on the model's inputs, e.g. the QDQ graph) against the float
    one on the evaluation data, and the budget's verdict: the manifest's `evaluate` record."""
    if bundle.kind == "causal_lm":
        (ids,) = evaluation.inputs
        with _bar(ids.numel(), "evaluating", "tok") as bar:
            figures = compare_lm(lambda x: first_tensor(bundle.module(x)), lambda x: first_tensor(quantized(x)),
                                 ids, evaluation.seq_len, progress=bar.update)
    else:
        figures = _compare_encoder(bundle, quantized, evaluation.inputs)
    failures = over_budget(figures, evaluation.limits)
    return {"data": evaluation.description, "figures": figures, "budget": evaluation.limits, "failures": failures,
            "passed": not failures}


def _compare_encoder(bundle: ModelBundle, quantized, inputs: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Mean cosine of the mean-pooled outputs, and the outputs' relative error, over the lines."""
    ids, mask = inputs
    cosines, diff_sq, ref_sq = [], 0.0, 0.0
    with _bar(ids.shape[0], "evaluating", "line") as bar:
        for start in range(0, ids.shape[0], ENCODER_BATCH):
            batch = (ids[start:start + ENCODER_BATCH], mask[start:start + ENCODER_BATCH])
            ref, q = first_tensor(bundle.module(*batch)).float(), first_tensor(quantized(*batch)).float()
            cosines.append(mean_cosine(mean_pooled(ref, batch[1]), mean_pooled(q, batch[1])) * batch[0].shape[0])
            diff_sq += sum_squares(q - ref)
            ref_sq += sum_squares(ref)
            bar.update(batch[0].shape[0])
    return {"lines": int(ids.shape[0]), "mean_cosine": sum(cosines) / ids.shape[0],
            "logits_rel_error": math.sqrt(diff_sq / max(ref_sq, 1e-300))}
