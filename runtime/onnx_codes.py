"""Graph codes as the ONNX artifact stores them: int8 re-encoded as uint8 where CPU kernels need
it, and weights transposed so that DequantizeLinear feeds MatMul directly."""
from __future__ import annotations

import torch

# int8 codes re-encoded as uint8 (the ONNX artifact for the cpu target): q + 128 with the zero
# point moved by 128 holds the same real values, and a symmetric int8 zero point (0) becomes this.
UINT8_ZERO = 128


# uint8 x int8 products summed in pairs fit int16 (VPMADDUBSW) when |code| <= 64: such weights
# stay int8 in ONNX, the fast exact path (see the spec's reduce_range).
U8S8_EXACT_LIMIT = 64


def weight_codes_as_uint8(codes: torch.Tensor) -> bool:
    """Whether int8 weight codes go to the cpu-target ONNX artifact re-encoded as uint8."""
    return codes.dtype == torch.int8 and int(codes.to(torch.int16).abs().max()) > U8S8_EXACT_LIMIT


def int8_as_uint8(t: torch.Tensor) -> torch.Tensor:
    return (t.to(torch.int16) + UINT8_ZERO).to(torch.uint8)


def uint8_zero_point(scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """The uint8 zero point beside re-encoded codes: the int8 one shifted, or 128 where symmetric."""
    if zero_point is None:
        return torch.full_like(scale, UINT8_ZERO, dtype=torch.uint8)
    return int8_as_uint8(zero_point)


def weight_to_onnx(tensors: dict[str, torch.Tensor | None], group_size: int) -> tuple[dict[str, torch.Tensor | None], int]:
    """A graph weight's codes, scale and zero point ([out, in]) as the ONNX artifact stores them:
    transposed to [in, out], so DequantizeLinear feeds MatMul directly. Returns the tensors and
    DequantizeLinear's new axis: 1 for per-channel scales, 0 for blocks along K (and per tensor)."""
    out = {k: None if t is None else (t.t().contiguous() if t.ndim == 2 else t) for k, t in tensors.items()}
    scale = tensors["scale"]
    return out, (1 if scale.ndim == 1 and not group_size else 0)
