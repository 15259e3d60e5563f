"""Reference quantization arithmetic: the oracle every kernel and artifact is checked against.

Conventions (the same as ONNX QuantizeLinear / DequantizeLinear, so an ONNX emitter maps
one-to-one): q = saturate(round_half_even(x / scale) + zero_point); x' = (q - zero_point) * scale.
`scale` is per tensor (0-d), per axis (1-d along `axis`), blocked (same rank as x with
`axis` shrunk by `group_size`), or already broadcastable (per-token, same rank, last dim 1).
Scales are fp32. FP8 is clamped before the cast: torch saturates e4m3fn but turns
out-of-range values into NaN for e4m3fnuz.
"""
from __future__ import annotations

import functools
import math

import torch

from qfx.runtime.formats import NESTED_SCALES, Granularity, ObserverKind, QDType, TensorFormat

# Smallest scale we emit: keeps all-zero tensors finite without changing any real range.
MIN_SCALE = 1e-12


def broadcast_scale(scale: torch.Tensor, ndim: int, axis: int, group_size: int) -> torch.Tensor:
    if scale.ndim == 0:
        return scale
    if group_size:
        return scale.repeat_interleave(group_size, dim=axis)
    if scale.ndim == 1 and ndim > 1:
        shape = [1] * ndim
        shape[axis] = -1
        return scale.view(shape)
    return scale


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
             qdtype: QDType, axis: int = 0, group_size: int = 0) -> torch.Tensor:
    s = broadcast_scale(scale, x.ndim, axis, group_size)
    if qdtype.is_mx:
        return mx_codes(round_to_element(x.float() / s, qdtype), qdtype)
    if qdtype.table is not None:
        return nearest_entries(x.float() * (1 / s), code_table(qdtype, x.device)).to(qdtype.storage)
    y = x.float() / s  # the one temporary; everything after works in place
    if qdtype.is_float:
        return y.clamp_(-qdtype.qmax, qdtype.qmax).to(qdtype.storage)
    y.round_()
    if zero_point is not None:
        y.add_(broadcast_scale(zero_point, x.ndim, axis, group_size))
    return y.clamp_(qdtype.qmin, qdtype.qmax).to(qdtype.storage)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               qdtype: QDType, axis: int = 0, group_size: int = 0,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    s = broadcast_scale(scale, codes.ndim, axis, group_size)
    if qdtype.table is not None:
        return (code_table(qdtype, codes.device)[codes.long()] * s).to(out_dtype)
    y = codes.to(torch.float32, copy=True)  # the one temporary; everything after works in place
    if zero_point is not None:
        y.sub_(broadcast_scale(zero_point, codes.ndim, axis, group_size).float())
    return y.mul_(s).to(out_dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                  qdtype: QDType, axis: int = 0, group_size: int = 0) -> torch.Tensor:
    """dequantize(quantize(x)) in float32, bit for bit, without the codes' storage round trip
    for integer formats (their codes are small integers, exact in float32): for searches that
    quantize many candidates."""
    if not qdtype.is_integer:  # the cast to FP8, or the table lookup, is the rounding
        return dequantize(quantize(x, scale, zero_point, qdtype, axis, group_size), scale, zero_point, qdtype,
                          axis, group_size)
    return code_offsets(x, scale, zero_point, qdtype, axis, group_size).mul_(
        broadcast_scale(scale, x.ndim, axis, group_size))


def nearest_entries(normalized: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Indices (int32) of the nearest entries of the float32 `table` to `normalized`
    (x * (1 / scale)), clamped to the table's range, a tie going to the lower entry (of equal
    entries, the lower index): bitsandbytes' rounding (`bucketize` on the float32 midpoints of the
    sorted table), so that its quantize_4bit and qfx choose the same codes."""
    order = torch.argsort(table, stable=True)
    ascending = table[order]
    midpoints = (ascending[:-1] + ascending[1:]) / 2
    clamped = normalized.clamp_(float(ascending[0]), float(ascending[-1]))
    codes = torch.bucketize(clamped, midpoints, out_int32=True)
    return codes if torch.equal(order.cpu(), torch.arange(len(table))) else order.to(torch.int32)[codes]


@functools.lru_cache(maxsize=None)
def code_table(qdtype: QDType, device: torch.device) -> torch.Tensor:
    """qdtype's code table (float32) on `device`, built once: dynamic MX inputs read it on every call.
    Callers must not modify it."""
    return qdtype.table.to(device)


def round_to_element(y: torch.Tensor, qdtype: QDType) -> torch.Tensor:
    """float32 `y` rounded to the nearest value of an MX format's element, a tie going to the even
    mantissa (subnormals too), beyond the largest value saturating to it, NaN kept: Quark's and the
    OCP MX specification's rounding."""
    ebits, mbits = qdtype.spec.mx_element
    _, exponent = torch.frexp(y)  # y = m * 2**exponent, 0.5 <= |m| < 1
    binade = (exponent - 1).clamp_(min=2 - 2 ** (ebits - 1))  # subnormals share the smallest normal's step
    step = torch.ldexp(torch.ones_like(y), binade - mbits)
    return (y / step).round_().mul_(step).clamp_(qdtype.qmin, qdtype.qmax)


def mx_codes(values: torch.Tensor, qdtype: QDType) -> torch.Tensor:
    """Element values (round_to_element's) as their codes: E4M3FN values for MXFP8 (a zero keeps its
    sign, as Quark's cast keeps it); for the table formats the index of the value's magnitude in code
    order, with the sign bit above it for negative values (a zero is +0, as Quark codes it). FP4 and
    FP6 have no NaN: a NaN takes code 2**(bits - 1), -0."""
    if qdtype.table is None:
        return values.to(qdtype.storage)
    half = len(qdtype.spec.table) // 2
    magnitudes = code_table(qdtype, values.device)[:half]  # ascending from +0 in MX code order
    index = torch.bucketize(values.abs(), magnitudes)
    return (index + half * (values < 0)).to(qdtype.storage)


def mx_scale(amax: torch.Tensor, qdtype: QDType) -> torch.Tensor:
    """The E8M0 scale (a float32 power of two) of blocks whose absmax is `amax`, by Quark's `even`
    rule: amax rounded to the element's mantissa width (half up, on its float32 bits), its
    exponent less the element's emax, within E8M0's 2**-127 .. 2**127."""
    _, mbits = qdtype.spec.mx_element
    bits = amax.float().view(torch.int32) + (1 << (22 - mbits))
    exponent = ((bits >> 23) & 0xFF) - 127 - qdtype.spec.mx_emax
    return e8m0_scale(exponent.clamp_(-127, 127))


def e8m0_scale(exponent: torch.Tensor) -> torch.Tensor:
    """2.0 ** exponent as float32, exactly (2**-127 is a float32 subnormal)."""
    normal = ((exponent.clamp(min=-126) + 127).to(torch.int32) << 23).view(torch.float32)
    return torch.where(exponent < -126, torch.full_like(normal, 2.0**-127), normal)


def e8m0_exponent(scale: torch.Tensor) -> torch.Tensor:
    """The exponent of a power-of-two float32 scale (e8m0_scale's inverse), as int32."""
    _, exponent = torch.frexp(scale)
    return exponent - 1


def quantize_blocks(x: torch.Tensor, qdtype: QDType, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic MX quantization along the last axis: (codes, one scale per `block` elements)."""
    amax = x.float().unflatten(-1, (-1, block)).abs().amax(dim=-1)
    scale = mx_scale(amax, qdtype)
    return quantize(x, scale, None, qdtype, -1, block), scale


def double_quantize(scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """A weight's per-group scales coded as NESTED_SCALES: `codes` (uint8, scale's shape), `absmax`
    (float32, one per block of the flattened scales, the last block possibly short) and `offset`
    (float32, 0-d: their mean). bitsandbytes' quantize_4bit(compress_statistics=True) arithmetic."""
    flat = scale.reshape(-1).float()
    offset = flat.mean()
    centered = flat - offset
    block = NESTED_SCALES.block
    blocks = -(-flat.numel() // block)
    padded = torch.nn.functional.pad(centered, (0, blocks * block - flat.numel())).reshape(blocks, block)
    absmax = padded.abs().amax(dim=1)
    normalized = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)[:flat.numel()]
    codes = nearest_entries(normalized, torch.tensor(NESTED_SCALES.table)).to(torch.uint8)
    return {"codes": codes.reshape(scale.shape), "absmax": absmax, "offset": offset}


def double_dequantize(codes: torch.Tensor, absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The float32 scales that double_quantize's `codes`, `absmax` and `offset` stand for, as
    bitsandbytes decodes them: table[code] * absmax of its block, then + offset."""
    flat = torch.tensor(NESTED_SCALES.table)[codes.reshape(-1).long()]
    per_code = absmax.repeat_interleave(NESTED_SCALES.block)[:flat.numel()]
    return (flat * per_code + offset).reshape(codes.shape)


def code_offsets(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 qdtype: QDType, axis: int = 0, group_size: int = 0) -> torch.Tensor:
    """quantize(x) - zero_point as float32 for an integer format, without the codes' storage
    round trip: what an integer matmul multiplies."""
    s = broadcast_scale(scale, x.ndim, axis, group_size)
    y = (x.float() / s).round_()
    if zero_point is None:
        return y.clamp_(qdtype.qmin, qdtype.qmax)
    zp = broadcast_scale(zero_point, x.ndim, axis, group_size).float()
    return y.add_(zp).clamp_(qdtype.qmin, qdtype.qmax).sub_(zp)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, fmt: TensorFormat
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (fp32) and zero point (in the code's storage dtype, or None when symmetric)."""
    lo = torch.clamp(lo.float(), max=0.0)  # the range always holds 0, so 0 is exact
    hi = torch.clamp(hi.float(), min=0.0)
    if fmt.dtype.is_mx:
        return mx_scale(torch.maximum(-lo, hi), fmt.dtype), None
    if fmt.symmetric:
        amax = torch.maximum(-lo, hi)
        return fmt.representable_scale(torch.clamp(amax / fmt.qmax, min=MIN_SCALE)), None
    scale = fmt.representable_scale(torch.clamp((hi - lo) / (fmt.qmax - fmt.qmin), min=MIN_SCALE))
    zero_point = torch.clamp(torch.round(fmt.qmin - lo / scale), fmt.qmin, fmt.qmax)
    return scale, zero_point.to(fmt.dtype.storage)


def weight_range(w: torch.Tensor, fmt: TensorFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of a [out, in] weight at the format's granularity (shapes as the scale's)."""
    if fmt.granularity is Granularity.per_tensor:
        return torch.aminmax(w.float())
    if fmt.granularity is Granularity.per_channel:
        return torch.aminmax(w.float(), dim=1)
    if fmt.granularity is Granularity.per_group:
        out_features, in_features = w.shape
        grouped = w.float().reshape(out_features, in_features // fmt.group_size, fmt.group_size)
        return torch.aminmax(grouped, dim=2)
    raise ValueError(f"{fmt.granularity.value} is not a weight granularity")


# `observer: mse` for weights: the range of each channel (or group) shrunk by the ratio of this
# grid that minimizes that channel's quantization MSE; 1.0 (min-max) is a candidate, so no
# channel gets a larger error than min-max gives it.
MSE_CLIP_RATIOS = tuple(round(1.0 - 0.01 * i, 2) for i in range(51))  # 1.00, 0.99, ..., 0.50


def weight_qparams(w: torch.Tensor, fmt: TensorFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RTN's scale and zero point of a [out, in] weight: its min-max range at fmt's granularity,
    clipped per channel or group to the least squared error for `observer: mse`."""
    lo, hi = weight_range(w, fmt)
    if fmt.observer is ObserverKind.mse:
        lo, hi = _mse_range(w, lo, hi, fmt)
    return qparams_from_range(lo, hi, fmt)


def _mse_range(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, fmt: TensorFormat
               ) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    axis = weight_axis(fmt)

    def cost(scale, zero_point):
        error = (fake_quantize(w, scale, zero_point, fmt.dtype, axis, fmt.group_size) - w).square_()
        if fmt.granularity is Granularity.per_group:
            return error.reshape(*lo.shape, fmt.group_size).sum(dim=-1)
        return error.sum(dim=1) if fmt.granularity is Granularity.per_channel else error.sum()

    return best_clip(lo, hi, fmt, MSE_CLIP_RATIOS, cost)


def best_clip(lo: torch.Tensor, hi: torch.Tensor, fmt: TensorFormat, ratios, cost
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The range lo..hi shrunk, per element of lo (channel or group), by the ratio of `ratios` whose
    qparams `cost(scale, zero_point)` (shaped as lo) finds least; earlier ratios win ties."""
    best = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for ratio in ratios:
        error = cost(*qparams_from_range(lo * ratio, hi * ratio, fmt))
        better = error < best
        best = torch.where(better, error, best)
        best_lo, best_hi = torch.where(better, lo * ratio, best_lo), torch.where(better, hi * ratio, best_hi)
    return best_lo, best_hi


def quantize_weight(w: torch.Tensor, fmt: TensorFormat):
    """RTN: (codes, scale, zero_point) of a [out, in] weight; codes keep w's shape."""
    scale, zero_point = weight_qparams(w, fmt)
    codes = quantize(w, scale, zero_point, fmt.dtype, axis=weight_axis(fmt), group_size=fmt.group_size)
    return codes, scale, zero_point


def weight_axis(fmt: TensorFormat) -> int:
    """The axis along which a weight's scale varies ([out, in] layout)."""
    return 1 if fmt.granularity is Granularity.per_group else 0


def per_token_scale(x: torch.Tensor, qdtype: QDType) -> torch.Tensor:
    """The scale of dynamic symmetric quantization, one per row of the last axis."""
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    return torch.clamp(amax / qdtype.qmax, min=MIN_SCALE)


def quantize_per_token(x: torch.Tensor, qdtype: QDType) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric quantization with one scale per row of the last axis."""
    scale = per_token_scale(x, qdtype)
    return quantize(x, scale, None, qdtype), scale


def quantize_per_token_outliers(x: torch.Tensor, qdtype: QDType, threshold: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8's input quantization, bitsandbytes' arithmetic (int8_vectorwise_quant on the input
    rounded to float16): (codes, scale per row, outlier columns). A column holding a value of
    magnitude >= `threshold` in any row is an outlier column: it stays in float, its codes 0. Each
    row's codes are round(x * (qmax / absmax)), absmax over its values below the threshold (in
    every column); its scale is absmax / qmax."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.float16)
    big = rows.abs() >= threshold
    inliers = rows.masked_fill(big, 0.0)
    outliers = big.any(dim=0)
    amax = inliers.abs().amax(dim=-1, keepdim=True).float()
    codes = (inliers * torch.where(amax > 0, qdtype.qmax / amax, 0.0)).round_().to(qdtype.storage)
    codes.masked_fill_(outliers, 0)
    scale = torch.clamp(amax / qdtype.qmax, min=MIN_SCALE)
    return codes.reshape(x.shape), scale.reshape(*x.shape[:-1], 1), outliers


def fake_quantize_dynamic(x: torch.Tensor, fmt: TensorFormat) -> torch.Tensor:
    """A dynamic activation format's dequantize(quantize(x)) in float32, as the graph's ops compute
    it: MX blocks, per-token rows, LLM.int8's outlier columns passed through."""
    if fmt.group_size:
        codes, scale = quantize_blocks(x, fmt.dtype, fmt.group_size)
        return dequantize(codes, scale, None, fmt.dtype, -1, fmt.group_size)
    if fmt.outlier_threshold:
        codes, scale, outliers = quantize_per_token_outliers(x, fmt.dtype, fmt.outlier_threshold)
        return torch.where(outliers, x.float(), dequantize(codes, scale, None, fmt.dtype))
    codes, scale = quantize_per_token(x, fmt.dtype)
    return dequantize(codes, scale, None, fmt.dtype)


def fn_to_fnuz(codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP e4m3fn codes as e4m3fnuz: same bits, value halved, so the scale doubles.

    0x80 is -0 in FN but NaN in FNUZ, so it becomes 0."""
    bits = codes.view(torch.uint8)
    bits = torch.where(bits == 0x80, torch.zeros_like(bits), bits)
    return bits.view(torch.float8_e4m3fnuz), scale * 2


def fnuz_to_fn(codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of fn_to_fnuz. FNUZ's NaN (0x80) has no FN twin and is refused."""
    bits = codes.view(torch.uint8)
    if bool((bits == 0x80).any()):
        raise ValueError("e4m3fnuz codes hold NaN (0x80); they cannot be stored as e4m3fn")
    return bits.view(torch.float8_e4m3fn), scale / 2


def sum_squares(x: torch.Tensor) -> float:
    """Σx² accumulated in float64, without a float64 copy of x."""
    return float(torch.sum(x * x, dtype=torch.float64))


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    noise = sum_squares(reference.float() - approx.float())
    if noise == 0:
        return float("inf")
    return 10 * math.log10(sum_squares(reference.float()) / noise)
