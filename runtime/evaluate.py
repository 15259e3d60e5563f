"""Accuracy figures: perplexity on a token stream, and how far quantized outputs are from float."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from qfx.runtime.numerics import sum_squares

Logits = Callable[[torch.Tensor], torch.Tensor]  # [1, L] ids -> [1, L, vocab] logits


def windows(ids: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Non-overlapping windows of `size` tokens (the last may be shorter; 1-token tails dropped)."""
    return [ids[i:i + size] for i in range(0, ids.numel(), size) if ids[i:i + size].numel() > 1]


@torch.no_grad()
def perplexity(logits_fn: Logits, ids: torch.Tensor, window: int = 256) -> dict:
    """exp(mean NLL) over every predicted token of `ids` cut into non-overlapping windows."""
    total, count = 0.0, 0
    for chunk in windows(ids, window):
        logits = logits_fn(chunk.unsqueeze(0))[0, :-1].double()
        total += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}


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
