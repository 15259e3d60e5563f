"""The Quark layout: tensors and `quantization_config` as amd-quark's own exporter writes them,
which transformers (with amd-quark) and vLLM (`quantization='quark'`) load.

In the graph a layer's codes sit unpacked in their compute dtype (FNUZ on gfx942), symmetric
formats carry no zero point, and group scales are [out, in/group]. The checkpoint follows Quark:
FP8 as OCP e4m3fn (FNUZ codes convert exactly, scales halve), an int8 zero point beside every
int scale, int4/uint4 packed eight to an int32 as Quark packs them; MX weights with their codes
packed into bytes (FP4 two, FP6 four to three; MXFP8 as E4M3FN) and their scales as E8M0 exponent
bytes (uint8, exponent + 127), MX inputs with nothing stored (dynamic).
"""
from __future__ import annotations

import collections
import fnmatch

import torch

from qfx.runtime import numerics
from qfx.runtime.errors import ArtifactError
from qfx.runtime.formats import Granularity, LayerFormat, LayerQuant, ObserverKind, QDType, TensorFormat
from qfx.runtime.layouts import Layout
from qfx.runtime.layouts.packing import pack_bytes, unpack_bytes
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
        if tf.dtype.stored_as_twin:
            if role == "weight":
                out["weight"], out[scale_key] = numerics.fnuz_to_fn(out["weight"], out[scale_key])
            else:
                out[scale_key] = out[scale_key] / 2
        elif tf.dtype.is_integer and zp_key not in out:
            out[zp_key] = torch.zeros_like(out[scale_key], dtype=tf.dtype.storage)
        if tf.dtype.is_mx:  # weights only: MX inputs are dynamic
            out["weight"], out[scale_key] = pack_mx(out["weight"], out[scale_key], tf.dtype)
        elif role == "weight" and tf.dtype.bits == 4:
            out["weight"], out[scale_key], out[zp_key] = pack_quark_int4(
                out["weight"], out[scale_key], out[zp_key])
    return out


def artifact_code_dtype(dtype: QDType) -> torch.dtype:
    """The dtype a code type has in the artifact: 4-bit codes and their zero points are packed
    eight to an int32; the others as the registry stores them (FP8 as OCP E4M3FN)."""
    return dtype.spec.checkpoint_dtype or torch.int32


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
        code = artifact_code_dtype(w.dtype)
        if w.dtype.is_mx:  # codes packed into bytes along K, E8M0 exponent bytes per block
            out["weight"] = mx_stored(w.dtype, in_features, out_features)
            out["weight_scale"] = (torch.uint8, scale)
        elif w.dtype.bits == 4:  # Quark's transposed, packed layout
            if out_features % 8:
                raise ArtifactError(f"{w.dtype.value} weights pack eight codes per int32 along out_features, "
                                    f"which is {out_features}")
            out["weight"] = (code, (in_features, out_features // 8))
            out["weight_scale"] = (torch.float32, (groups, out_features))
            out["weight_zero_point"] = (code, (groups, out_features // 8))
        else:
            out["weight"] = (code, (out_features, in_features))
            out["weight_scale"] = (torch.float32, scale)
            if not w.dtype.is_float:
                out["weight_zero_point"] = (code, scale)
    for role in ("input", "output"):
        tf = getattr(fmt, role)
        if tf is not None and not tf.dynamic:
            out[f"{role}_scale"] = (torch.float32, ())
            if not tf.dtype.is_float:
                out[f"{role}_zero_point"] = (artifact_code_dtype(tf.dtype), ())
    if bias:
        out["bias"] = (float_dtype, (out_features,))
    if SCALE_TRANSFORM in transforms:
        out[PRE_QUANT_SCALE] = (float_dtype, (in_features,))
    return out


def layer_from_artifact(tensors: dict[str, torch.Tensor], fmt: LayerFormat) -> dict[str, torch.Tensor]:
    """The inverse of `layer_to_artifact`."""
    out = dict(tensors)
    for role, tf, scale_key, zp_key in _stored_tensors(fmt):
        if tf.dtype.is_mx:
            out["weight"], out[scale_key] = unpack_mx(out["weight"], out[scale_key], tf.dtype)
        elif role == "weight" and tf.dtype.bits == 4:
            out["weight"], out[scale_key], out[zp_key] = unpack_quark_int4(
                out["weight"], out[scale_key], out[zp_key], tf.dtype)
        if tf.dtype.stored_as_twin:
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


def pack_mx(codes: torch.Tensor, scale: torch.Tensor, dtype: QDType) -> tuple[torch.Tensor, torch.Tensor]:
    """Graph MX codes and float32 power-of-two scales -> Quark's bytes and E8M0 exponent bytes."""
    stored = codes if dtype.is_float else pack_bytes(codes, dtype.bits)
    return stored, (numerics.e8m0_exponent(scale) + 127).to(torch.uint8)


def mx_stored(dtype: QDType, in_features: int, out_features: int) -> tuple[torch.dtype, tuple[int, int]]:
    """(dtype, shape) of the stored MX codes `pack_mx` writes: MXFP8 as E4M3FN, others as bytes."""
    if dtype.is_float:
        return dtype.spec.checkpoint_dtype, (out_features, in_features)
    return torch.uint8, (out_features, in_features * dtype.bits // 8)


def unpack_mx(stored: torch.Tensor, scale_bytes: torch.Tensor, dtype: QDType) -> tuple[torch.Tensor, torch.Tensor]:
    codes = stored if dtype.is_float else unpack_bytes(stored, dtype.bits)
    return codes, numerics.e8m0_scale(scale_bytes.to(torch.int32) - 127)


QUARK_VERSION = "0.13"
KV_PATTERNS = ("*k_proj", "*v_proj")

_OBSERVER_CLS = {Granularity.per_tensor: "PerTensorMinMaxObserver",
                 Granularity.per_channel: "PerChannelMinMaxObserver",
                 Granularity.per_group: "PerGroupMinMaxObserver",
                 Granularity.per_token: "PerChannelMinMaxObserver"}


def quark_mx_dtype(dtype: QDType) -> str:
    """Quark's name of an MX element: fp4 (E2M1), fp6_e2m3, fp6_e3m2, fp8_e4m3."""
    ebits, mbits = dtype.spec.mx_element
    return "fp4" if dtype.bits == 4 else f"fp{dtype.bits}_e{ebits}m{mbits}"


def quark_tensor_config(fmt: TensorFormat | None, role: str) -> dict | None:
    if fmt is None:
        return None
    if fmt.dtype.is_mx:  # vLLM and amd-quark detect MX by scale_format e8m0 and this observer
        return {"dtype": quark_mx_dtype(fmt.dtype), "qscheme": "per_group", "ch_axis": -1,
                "group_size": fmt.group_size, "symmetric": None, "is_dynamic": fmt.dynamic,
                "round_method": "half_even", "scale_type": "float", "zero_point_type": None,
                "observer_cls": "PerBlockMXObserver", "block_size": None, "enable_buffer_reuse": False,
                "is_scale_quant": False, "mx_element_dtype": None, "scale_calculation_mode": "even",
                "scale_format": "e8m0"}
    dynamic = fmt.dynamic
    if role == "weight":
        ch_axis = {Granularity.per_channel: 0, Granularity.per_group: -1}.get(fmt.granularity)
    else:
        ch_axis = 1 if dynamic else None
    observer = _OBSERVER_CLS[fmt.granularity]
    if fmt.observer is ObserverKind.percentile:
        observer = "PerTensorPercentileObserver"
    return {
        "dtype": "fp8_e4m3" if fmt.dtype.is_float else fmt.dtype.value,
        "qscheme": "per_channel" if dynamic else fmt.granularity.value,
        "ch_axis": ch_axis,
        "group_size": fmt.group_size or None,
        "symmetric": fmt.symmetric,
        "is_dynamic": dynamic,
        "round_method": "half_even",
        "scale_type": "float",
        "zero_point_type": "int32",
        "observer_cls": observer,
        "block_size": None, "enable_buffer_reuse": False, "is_scale_quant": False,
        "mx_element_dtype": None, "scale_calculation_mode": None, "scale_format": None,
    }


def quark_layer_config(fmt: LayerFormat) -> dict:
    return {"weight": quark_tensor_config(fmt.weight, "weight"),
            "input_tensors": quark_tensor_config(fmt.input, "input"),
            "output_tensors": quark_tensor_config(fmt.output, "output"),
            "bias": None, "target_device": None}


def quantization_config(plan: dict[str, LayerQuant], linear_paths: list[str]) -> dict:
    """Quark's config: the most common layer format is global; other layers are listed by name."""
    counts = collections.Counter(q.fmt for q in plan.values())
    common = counts.most_common(1)[0][0] if counts else LayerFormat()
    kv_layers = sorted(p for p, q in plan.items() if q.fmt.output is not None)
    # vLLM looks the KV cache up by the kv_cache_group keys in layer_quant_config, so when every
    # k_proj (v_proj) shares one format the config says so under Quark's own pattern.
    by_pattern = {pat: {plan[p].fmt for p in plan if fnmatch.fnmatchcase(p, pat)} for pat in KV_PATTERNS}
    patterned = bool(kv_layers) and all(any(fnmatch.fnmatchcase(p, pat) for pat in KV_PATTERNS) for p in kv_layers) \
        and all(len(fmts) == 1 for fmts in by_pattern.values())
    if patterned:
        kv_config = {pat: quark_layer_config(next(iter(by_pattern[pat]))) for pat in KV_PATTERNS}
        covered = {p for p in plan if any(fnmatch.fnmatchcase(p, pat) for pat in KV_PATTERNS)}
    else:
        kv_config = {p: quark_layer_config(plan[p].fmt) for p in kv_layers}
        covered = set()
    layer_config = {p: quark_layer_config(q.fmt) for p, q in plan.items() if q.fmt != common and p not in covered}
    layer_config.update(kv_config)
    kv_group = list(kv_config)
    return {
        "quant_method": "quark",
        "quant_mode": "eager_mode",
        "version": QUARK_VERSION,
        "global_quant_config": quark_layer_config(common),
        "layer_quant_config": layer_config,
        "layer_type_quant_config": {},
        "kv_cache_quant_config": kv_config,
        "kv_cache_post_rope": False,
        "softmax_quant_spec": None,
        "algo_config": None,
        "exclude": [p for p in linear_paths if p not in plan],
        "export": {"kv_cache_group": kv_group, "min_kv_scale": 0.0, "pack_method": "reorder",
                   "weight_format": "real_quantized", "weight_merge_groups": None},
    }


class QuarkLayout(Layout):
    name = "quark"
    holds_mx = True

    def format_problem(self, fmt: LayerFormat) -> str | None:
        for role, tf in fmt.tensors.items():
            if tf.dtype.table is not None and not tf.dtype.is_mx:  # Quark's integer, FP8 and MX formats
                return f"Quark has no {tf.dtype.value} ({role}); write it with output.layout: bitsandbytes"
            if tf.dtype.is_integer and tf.dtype.bits not in (4, 8):
                return (f"Quark stores 4- and 8-bit integers, not {tf.dtype.value} ({role}); write it with "
                        "output.layout: compressed-tensors")
        return None

    def consumer_gap(self, fmt: LayerFormat) -> str | None:
        w, x = fmt.weight, fmt.input
        if w is not None and w.dtype.is_mx and w.dtype.is_float:
            return (f"{w.dtype.value} weights: amd-quark 0.13 (transformers) cannot dequantize a per_group "
                    "fp8_e4m3 weight, and vLLM's Quark loader takes MX fp4 and fp6 only")
        mx = [tf for tf in (w, x) if tf is not None and tf.dtype.is_mx]
        if mx and not (len(mx) == 2 and not x.dtype.is_float):
            described = ", ".join(f"{role} {'float' if tf is None else tf.dtype.value}"
                                  for role, tf in (("weight", w), ("input", x)))
            return (f"{described}: vLLM's Quark loader runs MX only where weight and input are both MX fp4 / fp6 "
                    "(amd-quark loads such layers)")
        return None

    def shape_problem(self, fmt: LayerFormat, in_features: int, out_features: int) -> str | None:
        if fmt.weight is not None and fmt.weight.dtype.is_integer and fmt.weight.dtype.bits == 4 and out_features % 8:
            return (f"{fmt.weight.dtype.value} weights are packed eight to an int32 along the output axis, "
                    f"and out_features is {out_features}, not a multiple of 8")
        return None

    def to_artifact(self, tensors, fmt):
        return layer_to_artifact(tensors, fmt)

    def from_artifact(self, tensors, fmt):
        return layer_from_artifact(tensors, fmt)

    def expected(self, fmt, in_features, out_features, bias, float_dtype, transforms=()):
        return expected_artifact_layer(fmt, in_features, out_features, bias, float_dtype, transforms)

    def config(self, plan, linear_paths):
        return quantization_config(plan, linear_paths)
