"""Integer codes packed into int32 words, the way GPTQ and compressed-tensors store them."""
from __future__ import annotations

import torch


def pack_along(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-bit values packed 32/bits to an int32 along `dim`, lowest bits first."""
    per_word = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // per_word, per_word)
    word = (v << (torch.arange(per_word, dtype=torch.int64) * bits)).sum(dim=-1)
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.movedim(-1, dim).contiguous()


def unpack_along(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of `pack_along`, as int64."""
    per_word = 32 // bits
    w = (words.to(torch.int64) & 0xFFFFFFFF).movedim(dim, -1)
    v = (w.unsqueeze(-1) >> (torch.arange(per_word, dtype=torch.int64) * bits)) & (2**bits - 1)
    return v.reshape(*w.shape[:-1], w.shape[-1] * per_word).movedim(-1, dim).contiguous()
