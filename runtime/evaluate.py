"""Accuracy figures: perplexity on a token stream, and how far quantized outputs are from float."""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qfx.runtime.numerics import sum_squares

Logits = Callable[[torch.Tensor], torch.Tensor]  # [1, L] ids -> [1, L, vocab] logits


def windows(ids: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Non-overlapping windows of `size` tokens (the last may be shorter; 1-token tails dropped)."""
    return [ids[i:i + size] for i in range(0, ids.numel(), size) if ids[i:i + size].numel() > 1]


@torch.no_grad()
def perplexity(logits_fn: Logits, ids: torch.Tensor, window: int = 256) -> dict:
    """exp(mean NLL) over every predicted token of `ids` cut into non-overlapping windows (each
    window's first token is not predicted): the figure of this project's accuracy tests and
    benches. `qfx eval` and budgets score as lm-evaluation-harness does (rolling_perplexity)."""
    total, count = 0.0, 0
    for chunk in windows(ids, window):
        logits = logits_fn(chunk.unsqueeze(0))[0, :-1].double()
        total += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}


def rolling_windows(n: int, size: int) -> list[tuple[int, int, int]]:
    """How a stream of n tokens is scored by lm-evaluation-harness's rolling loglikelihood (its
    disjoint windows): every token after the first is predicted once, in groups of at most `size`;
    a group's input is the `size` tokens before its last predicted token (fewer at the start), and
    its predictions are the input's last logits. (start, end, scored): the input is
    ids[start:end], and its last `scored` logits predict ids[end - scored + 1 : end + 1]."""
    groups, first = [], 1
    while first < n:
        last = min(first + size, n) - 1
        groups.append((max(0, last - size), last, last - first + 1))
        first = last + 1
    return groups


def rolling_logits(logits_fn: Logits, ids: torch.Tensor, size: int):
    """(scored logits [scored, vocab] float32, their targets) of each rolling window of `ids`."""
    for start, end, scored in rolling_windows(ids.numel(), size):
        logits = logits_fn(ids[start:end].unsqueeze(0))[0, -scored:].float()
        yield logits, ids[end - scored + 1:end + 1]


@torch.no_grad()
def rolling_perplexity(logits_fn: Logits, ids: torch.Tensor, window: int = 256) -> dict:
    """exp(mean NLL) of every token after the first, scored as rolling_windows says."""
    total, count = 0.0, 0
    for logits, targets in rolling_logits(logits_fn, ids, window):
        total += float(F.cross_entropy(logits.double(), targets, reduction="sum"))
        count += targets.numel()
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}


@torch.no_grad()
def compare_lm(reference: Logits, quantized: Logits, ids: torch.Tensor, window: int = 256,
               progress: Callable[[int], None] | None = None) -> dict:
    """A quantized causal LM against its float reference over `ids`, both scored as lm-evaluation-
    harness's rolling loglikelihood scores a document (rolling_windows): their perplexities, the
    relative increase, and over every predicted position the logits' relative error and the top-1
    agreement. `progress(tokens)` is called after each window."""
    nll = {"float": 0.0, "quantized": 0.0}
    count, diff_sq, ref_sq, agree = 0, 0.0, 0.0, 0
    for (ref, targets), (q, _) in zip(rolling_logits(reference, ids, window), rolling_logits(quantized, ids, window)):
        nll["float"] += float(F.cross_entropy(ref.double(), targets, reduction="sum"))
        nll["quantized"] += float(F.cross_entropy(q.double(), targets, reduction="sum"))
        diff_sq += sum_squares(q - ref)
        ref_sq += sum_squares(ref)
        agree += int((q.argmax(-1) == ref.argmax(-1)).sum())
        count += targets.numel()
        if progress is not None:
            progress(targets.numel())
    fp, qp = math.exp(nll["float"] / count), math.exp(nll["quantized"] / count)
    return {"tokens": count, "float_perplexity": fp, "quantized_perplexity": qp, "perplexity_increase": qp / fp - 1,
            "logits_rel_error": math.sqrt(diff_sq / max(ref_sq, 1e-300)), "top1_agreement": agree / count}


def first_tensor(out):
    """A model's output tensor: Hugging Face wrappers return one, plain modules may nest it."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def compare_outputs(reference: torch.Tensor, quantized: torch.Tensor, top1: bool) -> dict:
    ref, q = reference.float(), quantized.float()
    out = {"rel_error": math.sqrt(sum_squares(q - ref) / max(sum_squares(ref), 1e-300))}
    if top1:
        out["top1_agreement"] = float((q.argmax(-1) == ref.argmax(-1)).float().mean())
    return out


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


class _Float64Matmuls(TorchDispatchMode):
    WIDENED = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.WIDENED and all(a.dtype == torch.float32 for a in args if isinstance(a, torch.Tensor)):
            wide = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
            return func(*wide, **kwargs).float()
        return func(*args, **kwargs)


@contextlib.contextmanager
def float64_matmuls():
    """Inside, the float32 matrix products that linear layers run (aten.mm, aten.addmm) sum in
    float64: the QDQ graph with (nearly) exact sums, the reference of the fused integer ops,
    which sum exactly. The graph's own float32 sums can move a value across a code boundary of
    a later quantizer, and a flipped code moves every layer after it: that difference is the
    QDQ graph's rounding, not the fused ops'."""
    with torch.no_grad(), _Float64Matmuls():
        yield


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - reference|| / ||reference||, the norms summed in float64."""
    diff = approx - reference if approx.dtype == reference.dtype else approx.double() - reference.double()
    return float(torch.linalg.vector_norm(diff, dtype=torch.float64) /
                 torch.linalg.vector_norm(reference, dtype=torch.float64).clamp_min(1e-300))
