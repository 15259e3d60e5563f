"""Codes packed into int32 words, the way GPTQ and compressed-tensors store them, or into bytes,
the way Quark stores MX codes."""
from __future__ import annotations

import math

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


def pack_dense(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit values of each row packed without padding into int32 words, lowest bits
    first, a value that straddles two words split between them (compressed-tensors' packing): a
    row of K values takes ceil(K * bits / 32) words. For widths dividing 32 it is `pack_along`."""
    rows, k = values.shape
    v = values.to(torch.int64)
    start = torch.arange(k, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    words = torch.zeros(rows, -(-k * bits // 32) + 1, dtype=torch.int64)  # one spare word for the last spill
    words.scatter_add_(1, word.expand(rows, k), (v << offset) & 0xFFFFFFFF)
    words.scatter_add_(1, (word + 1).expand(rows, k), v >> (32 - offset))  # the spill (0 where none)
    words = words[:, :-1]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_dense(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The inverse of `pack_dense` for rows of `k` values, as int64."""
    w = torch.cat([words.to(torch.int64) & 0xFFFFFFFF, torch.zeros(words.shape[0], 1, dtype=torch.int64)], dim=1)
    start = torch.arange(k, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    low = w[:, word] >> offset
    high = w[:, word + 1] << (32 - offset)
    return (low | high) & (2**bits - 1)


def pack_bytes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit values of each row packed into uint8 as one little-endian bit stream,
    the first value in the lowest bits (Quark's MX packing: FP4 two to a byte, element 0 in the low
    nibble; FP6 four to three bytes). Rows hold a multiple of 8 / gcd(bits, 8) values."""
    per_unit = 8 // math.gcd(bits, 8)  # values in the smallest whole number of bytes
    unit_bytes = per_unit * bits // 8
    rows, k = values.shape
    v = values.to(torch.int64).reshape(rows, k // per_unit, per_unit)
    unit = (v << (torch.arange(per_unit, dtype=torch.int64) * bits)).sum(dim=-1)
    out = (unit.unsqueeze(-1) >> (torch.arange(unit_bytes, dtype=torch.int64) * 8)) & 0xFF
    return out.reshape(rows, -1).to(torch.uint8)


def unpack_bytes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_bytes`, as uint8."""
    per_unit = 8 // math.gcd(bits, 8)
    unit_bytes = per_unit * bits // 8
    rows, n = packed.shape
    b = packed.to(torch.int64).reshape(rows, n // unit_bytes, unit_bytes)
    unit = (b << (torch.arange(unit_bytes, dtype=torch.int64) * 8)).sum(dim=-1)
    v = (unit.unsqueeze(-1) >> (torch.arange(per_unit, dtype=torch.int64) * bits)) & (2**bits - 1)
    return v.reshape(rows, -1).to(torch.uint8)
