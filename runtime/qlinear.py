"""Fused quantized linears: what a lowered program runs instead of dequantize -> linear.

`qfx::qlinear_w4a16` reads 4-bit weight codes packed as the Quark artifact packs them and
dequantizes them group by group (in registers, on a GPU) for a float matmul.

`qfx::qlinear_fp8` quantizes its input to FP8 (E4M3FN or E4M3FNUZ; static per tensor, or dynamic
per token) and multiplies it by FP8 weight codes, per tensor or per channel. On CPU it runs the
QDQ graph's own arithmetic (dequantized float32 operands: every product of two FP8 values is
exact in float32, the sums round alike); on a GPU, the Triton kernel on the FP8 matrix units.

`qfx::qlinear_w8a8` quantizes its input (static per tensor, or dynamic per token), multiplies
the int8 codes by the int8 weight codes with an exact integer accumulation, and applies the
scales and the bias to the sum. It is a torch custom op with a fake implementation, so a
lowered program exports, saves and reloads; on a GPU it runs the Triton kernel of
`qfx.runtime.triton_kernels`. On CPU:
- weight codes within -64..63 (`reduce_range: true`) run FBGEMM's int8 GEMM (torch's quantized
  linear), which is exact for such codes on every x86 vector unit: without VNNI it adds pairs of
  uint8 x int8 products in int16, and 2 x 255 x 64 still fits;
- full 8-bit codes run it twice, split as w = 16 hi + lo with |hi|, |lo| <= 8 (both exact), packed
  with unit scales over K blocks short enough that FBGEMM's float32 output is the exact integer
  sum; the halves are added and scaled in float64, which gives exact_integer_matmul's result bit
  for bit. At decode many times faster than converting the codes to float, at prefill about as fast;
- without FBGEMM (e.g. ARM), `exact_integer_matmul`: float32 GEMMs no faster than the float layer.

Against the QDQ graph, which multiplies the dequantized float values, the only difference is
where the float rounding happens: here the integer sum is exact and the scales are applied
once to it, there every product and partial sum is rounded in float32.
"""
from __future__ import annotations

import dataclasses
import warnings
import weakref

import torch

from qfx.runtime import numerics
from qfx.runtime.errors import UserError
from qfx.runtime.formats import QDType
from qfx.runtime.layouts.quark import unpack_int4_words

# float32 holds every integer up to 2^24: a dot product of integers whose partial sums stay
# below it is exact whatever order a GEMM adds them in.
FLOAT32_EXACT_INTEGERS = 2 ** 24
FLOAT32_WEIGHT_CODE_MAX = 128  # |int8 code| <= 128
# FBGEMM without VNNI sums two uint8 x int8 products in int16: exact while 2 x 255 x |w| <= 32767.
FBGEMM_EXACT_WEIGHT_MAX = 64
# Full int8 codes are split as w = SPLIT_BASE * hi + lo, hi = round(w / 16): |hi|, |lo| <= 8. A
# half's sums stay below 2^24, so FBGEMM's float32 output holds them exactly, over K blocks of at
# most 2^24 / (255 x 8) inputs.
SPLIT_BASE = 16
HALVES_BLOCK = 8192
# id(weight codes) -> (weak reference to them, their version, FBGEMM's packed forms or None); an
# entry goes with its tensor. (A WeakKeyDictionary would compare tensors with ==.)
_PACKED: dict[int, tuple] = {}


def exact_integer_matmul(a: torch.Tensor, b: torch.Tensor, a_max: int, b_max: int) -> torch.Tensor:
    """a @ b.T for float tensors holding integers with |a| <= a_max and |b| <= b_max, exactly, as
    float64: float32 GEMMs over column blocks short enough that no partial sum passes 2^24, the
    blocks summed in float64. torch._int_mm's CPU kernel is exact too, but several times slower
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
        scale = numerics.per_token_scale(x, qdtype)
    values = numerics.code_offsets(x, scale, zero_point, qdtype)
    largest = max(abs(qdtype.qmin), abs(qdtype.qmax))
    if zero_point is not None:
        largest += int(zero_point.abs().max())
    return values, scale, int(largest)


def _fbgemm_pack(codes: torch.Tensor, scale: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice that quantized tensors are deprecated
        if scale.numel() == 1:
            qweight = torch._make_per_tensor_quantized_tensor(codes, float(scale), 0)
        else:
            qweight = torch._make_per_channel_quantized_tensor(
                codes, scale.double().reshape(-1), torch.zeros(codes.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


@dataclasses.dataclass(frozen=True)
class FbgemmWeight:
    """int8 weight codes packed for FBGEMM: `codes` (within -64..63, packed with their scales), or
    `halves`, (k0, k1, hi, lo) per K block of full 8-bit codes, packed with unit scales."""

    codes: object | None = None
    halves: tuple = ()


def fbgemm_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> FbgemmWeight | None:
    """FBGEMM's packed forms of int8 weight codes (packed once per weight tensor and kept while
    the tensor lives; see the module docstring), or None where this torch has no FBGEMM."""
    cached = _PACKED.get(id(weight))
    if cached is not None and cached[0]() is weight and cached[1] == weight._version:
        return cached[2]
    packed = None
    if weight.device.type == "cpu":
        try:
            if int(weight.abs().max()) <= FBGEMM_EXACT_WEIGHT_MAX:
                packed = FbgemmWeight(codes=_fbgemm_pack(weight, weight_scale))
            else:
                hi = torch.round(weight.float() / SPLIT_BASE)
                lo = (weight.float() - SPLIT_BASE * hi).to(torch.int8)
                hi, ones = hi.to(torch.int8), torch.ones(weight.shape[0])
                packed = FbgemmWeight(halves=tuple(
                    (k0, k0 + HALVES_BLOCK, _fbgemm_pack(hi[:, k0:k0 + HALVES_BLOCK].contiguous(), ones),
                     _fbgemm_pack(lo[:, k0:k0 + HALVES_BLOCK].contiguous(), ones))
                    for k0 in range(0, weight.shape[1], HALVES_BLOCK)))
        except (RuntimeError, AttributeError):  # no FBGEMM (e.g. ARM) or no quantized tensors any more
            packed = None
    key = id(weight)
    _PACKED[key] = (weakref.ref(weight, lambda _: _PACKED.pop(key, None)), weight._version, packed)
    return packed


def _fbgemm(values: torch.Tensor, zero_point: int, packed) -> torch.Tensor:
    """sum_k values[:, k] * codes[n, k] * scale[n] on FBGEMM, the sum exact. FBGEMM quantizes its
    float input to uint8 itself (round(x / scale) + zero point): handed the integer `values` with
    scale 1 and a zero point that lands them in 0..255, it takes them as they are."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(values, 1.0, zero_point, packed)


def _halves_matmul(values: torch.Tensor, zero_point: int, halves: tuple) -> torch.Tensor:
    """values @ codes^T, exactly, as float64, from the packed halves of full 8-bit codes."""
    total = None
    for k0, k1, hi, lo in halves:
        part = values[:, k0:k1].contiguous()
        acc = _fbgemm(part, zero_point, hi).double().mul_(SPLIT_BASE).add_(_fbgemm(part, zero_point, lo))
        total = acc if total is None else total.add_(acc)
    return total


@torch.library.custom_op("qfx::qlinear_w8a8", mutates_args=())
def qlinear_w8a8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: torch.Tensor | None, input_zero_point: torch.Tensor | None,
                 input_qdtype: str) -> torch.Tensor:
    """linear(dequantize(quantize(x)), dequantize(weight)) with int8 weight codes [out, in] and
    per-channel (or per-tensor) weight scales; `input_scale` None quantizes x per token."""
    qdtype = QDType(input_qdtype)
    values, scale, largest = quantized_input(x, input_scale, input_zero_point, qdtype)
    packed = fbgemm_weight(weight, weight_scale)
    # codes minus zero point, moved into 0..255: int8 codes by 128, uint8 ones back by their zero point
    shift = (0 if input_zero_point is None else int(input_zero_point)) + (128 if qdtype.is_signed else 0)
    rows = values.reshape(-1, values.shape[-1])
    if packed is not None and packed.codes is not None:
        out = _fbgemm(rows, shift, packed.codes).reshape(*values.shape[:-1], -1) * scale
    else:
        acc = exact_integer_matmul(values, weight.float(), largest, FLOAT32_WEIGHT_CODE_MAX) if packed is None \
            else _halves_matmul(rows, shift, packed.halves).reshape(*values.shape[:-1], -1)
        out = (acc * scale.double() * weight_scale.double().reshape(-1)).float()
    if bias is not None:
        out += bias
    return out.to(x.dtype)


@qlinear_w8a8.register_fake
def _(x, weight, weight_scale, bias, input_scale, input_zero_point, input_qdtype):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("qfx::qlinear_fp8", mutates_args=())
def qlinear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                input_scale: torch.Tensor | None, input_qdtype: str) -> torch.Tensor:
    """linear(dequantize(quantize(x)), dequantize(weight)) with FP8 weight codes [out, in] and
    per-channel (or per-tensor) weight scales; `input_scale` None quantizes x per token."""
    qdtype = QDType(input_qdtype)
    if input_scale is None:
        codes, scale = numerics.quantize_per_token(x, qdtype)
        x_dq = numerics.dequantize(codes, scale, None, qdtype, -1, 0, x.dtype)
    else:
        x_dq = numerics.dequantize(numerics.quantize(x, input_scale, None, qdtype), input_scale, None, qdtype,
                                   0, 0, x.dtype)
    w_dq = numerics.dequantize(weight, weight_scale, None, qdtype, 0, 0, x.dtype)
    return torch.nn.functional.linear(x_dq, w_dq, bias)


@qlinear_fp8.register_fake
def _(x, weight, weight_scale, bias, input_scale, input_qdtype):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def triton_kernels():
    """qfx.runtime.triton_kernels, or a clear error where Triton is missing (a GPU runs the fused
    ops with it; CPUs do not need it)."""
    try:
        from qfx.runtime import triton_kernels
    except ImportError as exc:
        raise UserError(f"the fused ops run on this GPU with Triton, which cannot be imported ({exc})",
                        hint="pip install 'qfx[kernels]' (or triton), or run the program on CPU") from None
    return triton_kernels


@qlinear_w8a8.register_kernel("cuda")
def _(x, weight, weight_scale, bias, input_scale, input_zero_point, input_qdtype):
    return triton_kernels().w8a8_linear(x, weight, weight_scale, bias, input_scale, input_zero_point, QDType(input_qdtype))


@qlinear_fp8.register_kernel("cuda")
def _(x, weight, weight_scale, bias, input_scale, input_qdtype):
    return triton_kernels().fp8_linear(x, weight, weight_scale, bias, input_scale, QDType(input_qdtype))


@torch.library.custom_op("qfx::qlinear_w4a16", mutates_args=())
def qlinear_w4a16(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  weight_zero_point: torch.Tensor | None, bias: torch.Tensor | None, qdtype: str,
                  group_size: int) -> torch.Tensor:
    """linear(x, dequantize(weight)) for 4-bit codes grouped along the input, stored as the Quark
    artifact stores them: `weight` int32 [in, out / 8] (eight codes of consecutive outputs per
    word, in QUARK_INT4_ORDER), `weight_scale` [in / group_size, out], `weight_zero_point` packed
    like the weight or None. On CPU: unpacked and dequantized, the QDQ graph's own arithmetic."""
    q = QDType(qdtype)
    codes = unpack_int4_words(weight, q.is_signed).t()
    zero_point = None if weight_zero_point is None else unpack_int4_words(weight_zero_point, q.is_signed).t()
    w = numerics.dequantize(codes, weight_scale.t(), zero_point, q, 1, group_size, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@qlinear_w4a16.register_fake
def _(x, weight, weight_scale, weight_zero_point, bias, qdtype, group_size):
    return x.new_empty((*x.shape[:-1], weight_scale.shape[1]))


@qlinear_w4a16.register_kernel("cuda")
def _(x, weight, weight_scale, weight_zero_point, bias, qdtype, group_size):
    return triton_kernels().w4a16_linear(x, weight, weight_scale, weight_zero_point, bias, QDType(qdtype), group_size)


QLINEAR_W8A8 = torch.ops.qfx.qlinear_w8a8.default
QLINEAR_W4A16 = torch.ops.qfx.qlinear_w4a16.default
QLINEAR_FP8 = torch.ops.qfx.qlinear_fp8.default
