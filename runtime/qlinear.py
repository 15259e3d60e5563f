"""Fused quantized linears: what a lowered program runs instead of dequantize -> linear.

`qfx::qlinear_w8a8` quantizes its input (static per tensor, or dynamic per token), multiplies
the int8 codes by the int8 weight codes with an exact integer accumulation, and applies the
scales and the bias to the sum. It is a torch custom op with a fake implementation, so a
lowered program exports, saves and reloads; on CPU it runs `exact_integer_matmul`, on a GPU
the Triton kernel of `qfx.runtime.triton_kernels`.

Against the QDQ graph, which multiplies the dequantized float values, the only difference is
where the float rounding happens: here the integer sum is exact and the scales are applied
once to it, there every product and partial sum is rounded in float32.
"""
from __future__ import annotations

import torch

from qfx.runtime import numerics
from qfx.runtime.formats import QDType

# float32 holds every integer up to 2^24: a dot product of integers whose partial sums stay
# below it is exact whatever order a GEMM adds them in.
FLOAT32_EXACT_INTEGERS = 2 ** 24
FLOAT32_WEIGHT_CODE_MAX = 128  # |int8 code| <= 128


def exact_integer_matmul(a: torch.Tensor, b: torch.Tensor, a_max: int, b_max: int) -> torch.Tensor:
    """a @ b.T for float tensors holding integers with |a| <= a_max and |b| <= b_max, exactly, as
    float64: float32 GEMMs over column blocks short enough that no partial sum passes 2^24, the
    blocks summed in float64. torch._int_mm's CPU kernel is exact too, but measured 30x slower
    than a float32 GEMM of the same shape (bench/kernels.py)."""
    block = max(1, FLOAT32_EXACT_INTEGERS // (a_max * b_max))
    k = a.shape[-1]
    if k <= block:
        return (a @ b.T).double()
    total = None
    for start in range(0, k, block):
        part = (a[..., start:start + block] @ b[:, start:start + block].T).double()
        total = part if total is None else total.add_(part)
    return total


def quantized_input(x: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                    qdtype: QDType) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(codes minus zero point as float32, the scale per row or per tensor, largest |value|) of
    x quantized as the QDQ graph quantizes it: statically with (scale, zero_point), or per token
    (symmetric) when scale is None."""
    if scale is None:
        codes, scale = numerics.quantize_per_token(x, qdtype)
    else:
        codes = numerics.quantize(x, scale, zero_point, qdtype)
    values = codes.float()
    largest = max(abs(qdtype.qmin), abs(qdtype.qmax))
    if zero_point is not None:
        values -= zero_point.float()
        largest += int(zero_point.abs().max())
    return values, scale, int(largest)


@torch.library.custom_op("qfx::qlinear_w8a8", mutates_args=())
def qlinear_w8a8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: torch.Tensor | None, input_zero_point: torch.Tensor | None,
                 input_qdtype: str) -> torch.Tensor:
    """linear(dequantize(quantize(x)), dequantize(weight)) with int8 weight codes [out, in] and
    per-channel (or per-tensor) weight scales; `input_scale` None quantizes x per token."""
    values, scale, largest = quantized_input(x, input_scale, input_zero_point, QDType(input_qdtype))
    acc = exact_integer_matmul(values, weight.float(), largest, FLOAT32_WEIGHT_CODE_MAX)
    out = acc * scale.double() * weight_scale.double().reshape(-1)
    if bias is not None:
        out += bias.double()
    return out.to(x.dtype)


@qlinear_w8a8.register_fake
def _(x, weight, weight_scale, bias, input_scale, input_zero_point, input_qdtype):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@qlinear_w8a8.register_kernel("cuda")
def _(x, weight, weight_scale, bias, input_scale, input_zero_point, input_qdtype):
    from qfx.runtime.triton_kernels import w8a8_linear

    return w8a8_linear(x, weight, weight_scale, bias, input_scale, input_zero_point, QDType(input_qdtype))


QLINEAR_W8A8 = torch.ops.qfx.qlinear_w8a8.default
