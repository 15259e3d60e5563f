"""Graph tensors <-> artifact tensors (the Quark layout that transformers + amd-quark and vLLM load).

In the graph a layer's codes sit unpacked in their compute dtype (FNUZ on gfx942), symmetric
formats carry no zero point, and group scales are [out, in/group]. The artifact follows Quark:
FP8 as OCP e4m3fn (FNUZ codes convert exactly, scales halve), an int8 zero point beside every
int scale, int4/uint4 packed eight to an int32 as Quark packs them. Both directions live
here so they cannot drift apart.
"""
from __future__ import annotations

import torch

from qfx.runtime import numerics
from qfx.runtime.formats import LayerFormat, QDType, TensorFormat

ROLES = ("weight", "input", "output")


def _stored_tensors(fmt: LayerFormat):
    """(role, format, scale key, zero-point key) of each tensor whose qparams are stored."""
    for role in ROLES:
        tf: TensorFormat | None = getattr(fmt, role)
        if tf is not None and not tf.dynamic:
            yield role, tf, f"{role}_scale", f"{role}_zero_point"


def layer_to_artifact(tensors: dict[str, torch.Tensor], fmt: LayerFormat) -> dict[str, torch.Tensor]:
    """One layer's graph buffers (keys 'weight', 'weight_scale', ...) in artifact form."""
    out = dict(tensors)
    for role, tf, scale_key, zp_key in _stored_tensors(fmt):
        if tf.dtype is QDType.fp8_e4m3fnuz:
            if role == "weight":
                out["weight"], out[scale_key] = numerics.fnuz_to_fn(out["weight"], out[scale_key])
            else:
                out[scale_key] = out[scale_key] / 2
        elif not tf.dtype.is_fp8 and zp_key not in out:
            out[zp_key] = torch.zeros_like(out[scale_key], dtype=tf.dtype.storage)
        if role == "weight" and tf.dtype.bits == 4:
            out["weight"], out[scale_key], out[zp_key] = pack_quark_int4(
                out["weight"], out[scale_key], out[zp_key])
    return out


def layer_from_artifact(tensors: dict[str, torch.Tensor], fmt: LayerFormat) -> dict[str, torch.Tensor]:
    """The inverse of `layer_to_artifact`."""
    out = dict(tensors)
    for role, tf, scale_key, zp_key in _stored_tensors(fmt):
        if role == "weight" and tf.dtype.bits == 4:
            out["weight"], out[scale_key], out[zp_key] = unpack_quark_int4(
                out["weight"], out[scale_key], out[zp_key], tf.dtype)
        if tf.dtype is QDType.fp8_e4m3fnuz:
            if role == "weight":
                out["weight"], out[scale_key] = numerics.fn_to_fnuz(out["weight"], out[scale_key])
            else:
                out[scale_key] = out[scale_key] * 2
        elif tf.symmetric:
            out.pop(zp_key, None)
    return out


# Quark's "reorder" int4 packing: eight 4-bit codes per int32, the nibbles of each group of
# eight taken in this order (so that a reordered unpack yields consecutive values).
_QUARK_INT4_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _pack8(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] 4-bit codes -> [rows, cols/8] int32, packed along the last axis."""
    rows, cols = codes.shape
    nib = (codes.to(torch.int64) & 0xF).reshape(rows, cols // 8, 8)[..., list(_QUARK_INT4_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    word = (nib << shifts).sum(dim=-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _unpack8(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    rows, words = packed.shape
    wide = packed.to(torch.int64) & 0xFFFFFFFF
    nib = (wide.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int64)) & 0xF
    inverse = [0] * 8
    for position, source in enumerate(_QUARK_INT4_ORDER):
        inverse[source] = position
    nib = nib[..., inverse].reshape(rows, words * 8)
    if signed:
        return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)
    return nib.to(torch.uint8)


def pack_quark_int4(codes, scale, zero_point):
    """Graph [out, in] codes, [out, in/g] scale and zero point -> Quark's transposed int32 layout."""
    return _pack8(codes.t().contiguous()), scale.t().contiguous(), _pack8(zero_point.t().contiguous())


def unpack_quark_int4(packed, scale, zero_point, dtype: QDType):
    codes = _unpack8(packed, dtype.is_signed).t().contiguous()
    zp = _unpack8(zero_point, dtype.is_signed).t().contiguous()
    return codes, scale.t().contiguous(), zp



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
