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
from qfx.runtime.errors import ArtifactError
from qfx.runtime.formats import Granularity, LayerFormat, QDType, TensorFormat
from qfx.runtime.quant_linear import PRE_QUANT_SCALE, SCALE_TRANSFORM

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


def format_problem(fmt: LayerFormat) -> str | None:
    """Why the loader cannot run `fmt` (a manifest's layer format), or None. The spec refuses these
    at build time; a manifest is read back from disk, so they are checked again."""
    if not fmt.tensors:
        return "it quantizes nothing"
    for role, tf in fmt.tensors.items():
        per_group = tf.granularity is Granularity.per_group
        if tf.group_size < 0 or per_group != (tf.group_size > 0):
            return f"{role} has group_size {tf.group_size} with granularity {tf.granularity.value}"
        if role == "weight":
            if tf.dynamic:
                return "weight is per_token, which is for activations"
            if tf.dtype.bits == 4 and not per_group:
                return f"weight is {tf.dtype.value} {tf.granularity.value}; 4-bit weights are stored per_group"
        elif tf.dtype.bits == 4 or tf.granularity in (Granularity.per_channel, Granularity.per_group):
            return f"{role} is {tf.dtype.value} {tf.granularity.value}; activations are 8-bit per_tensor or per_token"
        if tf.reduce_range and (role != "weight" or tf.dtype is not QDType.int8):
            return f"{role} has reduce_range, which applies to int8 weights only"
    return None


# The dtype each code type has in the artifact: FP8 codes are stored as OCP E4M3FN whatever the
# target, 4-bit codes and their zero points packed eight to an int32.
ARTIFACT_CODE_DTYPE = {QDType.int8: torch.int8, QDType.uint8: torch.uint8, QDType.int4: torch.int32,
                       QDType.uint4: torch.int32, QDType.fp8_e4m3fn: torch.float8_e4m3fn,
                       QDType.fp8_e4m3fnuz: torch.float8_e4m3fn}


def expected_artifact_layer(fmt: LayerFormat, in_features: int, out_features: int, bias: bool,
                            float_dtype: torch.dtype, transforms: tuple[str, ...] = ()
                            ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor one layer has in the artifact, as
    `layer_to_artifact` writes them (with `transforms`, the layer's input transforms). Raises
    ArtifactError if the format cannot fit the layer."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    w = fmt.weight
    if w is None:
        out["weight"] = (float_dtype, (out_features, in_features))
    else:
        if w.group_size and in_features % w.group_size:
            raise ArtifactError(f"group_size {w.group_size} does not divide the layer's in_features {in_features}")
        groups = in_features // w.group_size if w.group_size else 0
        scale = {Granularity.per_tensor: (), Granularity.per_channel: (out_features,),
                 Granularity.per_group: (out_features, groups)}[w.granularity]
        code = ARTIFACT_CODE_DTYPE[w.dtype]
        if w.dtype.bits == 4:  # Quark's transposed, packed layout
            if out_features % 8:
                raise ArtifactError(f"{w.dtype.value} weights pack eight codes per int32 along out_features, "
                                    f"which is {out_features}")
            out["weight"] = (code, (in_features, out_features // 8))
            out["weight_scale"] = (torch.float32, (groups, out_features))
            out["weight_zero_point"] = (code, (groups, out_features // 8))
        else:
            out["weight"] = (code, (out_features, in_features))
            out["weight_scale"] = (torch.float32, scale)
            if not w.dtype.is_fp8:
                out["weight_zero_point"] = (code, scale)
    for role in ("input", "output"):
        tf = getattr(fmt, role)
        if tf is not None and not tf.dynamic:
            out[f"{role}_scale"] = (torch.float32, ())
            if not tf.dtype.is_fp8:
                out[f"{role}_zero_point"] = (ARTIFACT_CODE_DTYPE[tf.dtype], ())
    if bias:
        out["bias"] = (float_dtype, (out_features,))
    if SCALE_TRANSFORM in transforms:
        out[PRE_QUANT_SCALE] = (float_dtype, (in_features,))
    return out


def check_artifact_layer(tensors: dict[str, torch.Tensor], fmt: LayerFormat, in_features: int,
                         out_features: int, bias: bool, float_dtype: torch.dtype, where: str,
                         transforms: tuple[str, ...] = ()) -> None:
    """Raise ArtifactError naming the first of a layer's artifact tensors (keys 'weight',
    'weight_scale', ...) that is missing, extra, of the wrong dtype or shape for `fmt` and the
    layer's features, or a scale that is not finite and positive. Unpacking and running a layer
    with such tensors fails deep inside torch, or silently computes garbage."""
    expected = expected_artifact_layer(fmt, in_features, out_features, bias, float_dtype, transforms)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ArtifactError(f"layer {where} has {'no ' + ', '.join(missing) if missing else ''}"
                            f"{' and ' if missing and extra else ''}"
                            f"{'unexpected ' + ', '.join(extra) if extra else ''} for its format "
                            f"({', '.join(f'{r} {tf.describe()}' for r, tf in fmt.tensors.items())})",
                            hint="the checkpoint and manifest.json do not describe one build; rebuild the artifact")
    for name, (dtype, shape) in expected.items():
        t = tensors[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ArtifactError(f"tensor {where}.{name} is {str(t.dtype).removeprefix('torch.')} "
                                f"{list(t.shape)}, but its format and the layer's {in_features} -> {out_features} "
                                f"features need {str(dtype).removeprefix('torch.')} {list(shape)}",
                                hint="the checkpoint was edited or belongs to another model; rebuild the artifact")
        if name.endswith("_scale") and not bool(torch.isfinite(t).all() and (t > 0).all()):
            raise ArtifactError(f"tensor {where}.{name} holds a scale that is not finite and positive",
                                hint="a quantization scale divides the values; rebuild the artifact")


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
QUARK_INT4_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_int4_words(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] 4-bit codes -> [rows, cols/8] int32, packed along the last axis."""
    rows, cols = codes.shape
    nib = (codes.to(torch.int64) & 0xF).reshape(rows, cols // 8, 8)[..., list(QUARK_INT4_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    word = (nib << shifts).sum(dim=-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_int4_words(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    rows, words = packed.shape
    wide = packed.to(torch.int64) & 0xFFFFFFFF
    nib = (wide.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int64)) & 0xF
    inverse = [0] * 8
    for position, source in enumerate(QUARK_INT4_ORDER):
        inverse[source] = position
    nib = nib[..., inverse].reshape(rows, words * 8)
    if signed:
        return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)
    return nib.to(torch.uint8)


def pack_quark_int4(codes, scale, zero_point):
    """Graph [out, in] codes, [out, in/g] scale and zero point -> Quark's transposed int32 layout."""
    return pack_int4_words(codes.t().contiguous()), scale.t().contiguous(), pack_int4_words(zero_point.t().contiguous())


def unpack_quark_int4(packed, scale, zero_point, dtype: QDType):
    codes = unpack_int4_words(packed, dtype.is_signed).t().contiguous()
    zp = unpack_int4_words(zero_point, dtype.is_signed).t().contiguous()
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
