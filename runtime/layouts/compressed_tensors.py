"""The compressed-tensors layout (llm-compressor's checkpoints), which transformers (through
compressed-tensors) and vLLM load.

Per quantized linear (N outputs, K inputs, G groups along K), by the format of its group:
- `pack-quantized` (integer weights of 2 to 8 bits, float inputs): `weight_packed` int32
  [N, ceil(K*b/32)], codes made unsigned (compressed-tensors keeps signed codes and adds 2**(b-1)
  when it packs) and packed densely along K, lowest bits first, a code straddling two words split
  between them; `weight_shape` int64 [2]. Symmetric only: compressed-tensors packs
  asymmetric zero points along N, which its transformers loader cannot read back (format_problem);
- `int-quantized` (int8 weights and inputs) and `float-quantized` (FP8): `weight` in its code
  dtype (signed int8; FP8 as E4M3FN), `weight_zero_point` int8 when asymmetric;
- every one: `weight_scale` float32 [N, G], [N, 1] per channel or [1] per tensor, and for static
  inputs `input_scale` [1] (and `input_zero_point` int8 when asymmetric);
- `mxfp4-pack-quantized`, `mxfp6-pack-quantized` (OCP MX weights, with or without dynamic MX
  inputs of the same format): `weight_packed` uint8, Quark's bytes (FP4 two codes a byte, the first
  in the low nibble; FP6 four codes in three bytes); `mxfp8-quantized`: `weight` E4M3FN; each with
  `weight_scale` uint8 [N, K/32], E8M0 exponent bytes.
compressed-tensors' integer codes are always signed: an unsigned qfx format (uint4, uint8) is the
same grid moved by 2**(b-1), codes and zero points alike. The config's scales are float32
(`scale_dtype`), so a float16 or bfloat16 model reads the scales qfx built.
"""
from __future__ import annotations

import collections

import torch

from qfx.runtime import numerics
from qfx.runtime.errors import ArtifactError
from qfx.runtime.formats import Granularity, LayerFormat, TensorFormat
from qfx.runtime.layouts import NOT_ONE_BUILD, Layout
from qfx.runtime.layouts.packing import pack_dense, unpack_dense
from qfx.runtime.layouts.quark import mx_stored, pack_mx, unpack_mx

STRATEGY = {Granularity.per_tensor: "tensor", Granularity.per_channel: "channel", Granularity.per_group: "group",
            Granularity.per_token: "token"}


def _shift(tf: TensorFormat) -> int:
    """What moves qfx's codes of `tf` onto compressed-tensors' signed ones (subtracted)."""
    return 0 if tf.dtype.is_signed or tf.dtype.is_float else 2 ** (tf.dtype.bits - 1)


def compression_format(fmt: LayerFormat) -> str:
    if fmt.weight.dtype.is_mx:
        return f"mxfp{fmt.weight.dtype.bits}-{'quantized' if fmt.weight.dtype.is_float else 'pack-quantized'}"
    if fmt.weight.dtype.is_float:
        return "float-quantized"
    return "pack-quantized" if fmt.input is None else "int-quantized"


def _stored_scale(scale: torch.Tensor, tf: TensorFormat) -> torch.Tensor:
    """[N, G] per group, [N, 1] per channel, [1] per tensor (qfx's are [N, G], [N] and 0-d)."""
    if tf.granularity is Granularity.per_tensor:
        return scale.reshape(1)
    return scale.reshape(scale.shape[0], -1)


def _graph_shaped(t: torch.Tensor, tf: TensorFormat) -> torch.Tensor:
    """The inverse of `_stored_scale`."""
    if tf.granularity is Granularity.per_tensor:
        return t.reshape(())
    return t if tf.granularity is Granularity.per_group else t.reshape(-1)


class CompressedTensorsLayout(Layout):
    name = "compressed-tensors"
    holds_input_transforms = False
    holds_mx = True

    def format_problem(self, fmt: LayerFormat) -> str | None:
        w, x = fmt.weight, fmt.input
        if w is None:
            return "compressed-tensors stores quantized weights: the weight must be quantized"
        if fmt.output is not None:
            return "the KV cache (output quantization) is not written to compressed-tensors' kv_cache_scheme yet"
        if w.dtype.is_mx or (x is not None and x.dtype.is_mx):
            return _mx_problem(fmt)
        if w.dtype.table is not None:
            return f"compressed-tensors has no {w.dtype.value} weights"
        if w.reduce_range:
            return "compressed-tensors has no 7-bit (reduce_range) int8 weights"
        if x is not None and x.dtype.is_float != w.dtype.is_float:
            return "compressed-tensors quantizes weights and inputs alike: both integer or both FP8"
        if x is None and w.dtype.is_float:
            return "FP8 weights with float inputs (W8A16 FP8) are not written in this layout yet"
        if x is not None and w.dtype.bits != 8:
            return f"{w.dtype.value} weights with quantized inputs: compressed-tensors' int-quantized format is int8"
        if x is None and not w.symmetric:
            # transformers builds the layer with an unpacked [N, G] zero point, then reads the packed
            # one the checkpoint holds: a size mismatch, and the zero points are reinitialized
            return ("asymmetric weight-only weights (packed zero points) do not load through transformers + "
                    "compressed-tensors 0.20; use symmetric weights (int4 / int8) in this layout")
        return None

    def to_artifact(self, tensors, fmt):
        w, x = fmt.weight, fmt.input
        out = {k: v for k, v in tensors.items() if not k.startswith(("weight", "input"))}
        if w.dtype.is_mx:
            stored, out["weight_scale"] = pack_mx(tensors["weight"], tensors["weight_scale"], w.dtype)
            out["weight" if w.dtype.is_float else "weight_packed"] = stored
            return out
        codes, scale, zero = tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero_point")
        if w.dtype.is_float:
            if w.dtype.stored_as_twin:  # E4M3FNUZ as its E4M3FN twin
                codes, scale = numerics.fnuz_to_fn(codes, scale)
        else:
            codes = codes.to(torch.int16) - _shift(w)
        if compression_format(fmt) == "pack-quantized":
            bits = w.dtype.bits
            out["weight_packed"] = pack_dense(codes.to(torch.int64) + 2 ** (bits - 1), bits)
            out["weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
        else:
            out["weight"] = codes if w.dtype.is_float else codes.to(torch.int8)
        out["weight_scale"] = _stored_scale(scale, w).float().contiguous()
        if zero is not None:
            out["weight_zero_point"] = _stored_scale(zero.to(torch.int16) - _shift(w), w).to(torch.int8).contiguous()
        if x is not None and not x.dynamic:
            input_scale = tensors["input_scale"]
            if x.dtype.stored_as_twin:
                input_scale = input_scale / 2  # the input's codes are read as E4M3FN too: worth twice
            out["input_scale"] = input_scale.reshape(1).float()
            if not x.symmetric:
                out["input_zero_point"] = (tensors["input_zero_point"].to(torch.int16) - _shift(x)).reshape(1).to(torch.int8)
        return out

    def from_artifact(self, tensors, fmt):
        w, x = fmt.weight, fmt.input
        out = {k: v for k, v in tensors.items() if not k.startswith(("weight", "input"))}
        if w.dtype.is_mx:
            stored = tensors["weight" if w.dtype.is_float else "weight_packed"]
            out["weight"], out["weight_scale"] = unpack_mx(stored, tensors["weight_scale"], w.dtype)
            return out
        scale = _graph_shaped(tensors["weight_scale"], w)
        if compression_format(fmt) == "pack-quantized":
            bits = w.dtype.bits
            packed = tensors["weight_packed"]
            n, k = tensors["weight_shape"].tolist()
            if n != packed.shape[0] or -(-k * bits // 32) != packed.shape[1] or k % max(w.group_size, 1):
                raise ArtifactError(f"weight_shape {[n, k]} does not fit weight_packed {list(packed.shape)} of "
                                    f"{w.describe()} codes", hint=NOT_ONE_BUILD)
            codes = unpack_dense(packed, bits, k) - 2 ** (bits - 1)
        else:
            codes = tensors["weight"]
        if w.dtype.is_float:
            if w.dtype.stored_as_twin:
                codes, scale = numerics.fn_to_fnuz(codes, scale)
        else:
            codes = (codes.to(torch.int16) + _shift(w)).to(w.dtype.storage)
        out["weight"], out["weight_scale"] = codes.contiguous(), scale.contiguous()
        if not w.symmetric:
            z = (tensors["weight_zero_point"].to(torch.int16) + _shift(w)).to(w.dtype.storage)
            out["weight_zero_point"] = _graph_shaped(z, w).contiguous()
        if x is not None and not x.dynamic:
            input_scale = tensors["input_scale"].reshape(())
            if x.dtype.stored_as_twin:
                input_scale = input_scale * 2
            out["input_scale"] = input_scale
            if not x.symmetric:
                out["input_zero_point"] = (tensors["input_zero_point"].reshape(()).to(torch.int16)
                                           + _shift(x)).to(x.dtype.storage)
        return out

    def expected(self, fmt, in_features, out_features, bias, float_dtype, transforms=()):
        w, x = fmt.weight, fmt.input
        if w.dtype.is_mx:
            return {"weight" if w.dtype.is_float else "weight_packed": mx_stored(w.dtype, in_features, out_features),
                    "weight_scale": (torch.uint8, (out_features, in_features // w.group_size)),
                    **({"bias": (float_dtype, (out_features,))} if bias else {})}
        groups = in_features // w.group_size if w.group_size else 1
        scale_shape = {Granularity.per_tensor: (1,), Granularity.per_channel: (out_features, 1),
                       Granularity.per_group: (out_features, groups)}[w.granularity]
        out = {"weight_scale": (torch.float32, scale_shape)}
        if compression_format(fmt) == "pack-quantized":
            out["weight_packed"] = (torch.int32, (out_features, -(-in_features * w.dtype.bits // 32)))
            out["weight_shape"] = (torch.int64, (2,))
        else:
            code = w.dtype.spec.checkpoint_dtype if w.dtype.is_float else torch.int8
            out["weight"] = (code, (out_features, in_features))
            if not w.symmetric:
                out["weight_zero_point"] = (torch.int8, scale_shape)
        if x is not None and not x.dynamic:
            out["input_scale"] = (torch.float32, (1,))
            if not x.symmetric:
                out["input_zero_point"] = (torch.int8, (1,))
        if bias:
            out["bias"] = (float_dtype, (out_features,))
        return out

    def config(self, plan, linear_paths):
        by_format = collections.defaultdict(list)
        for path, quant in plan.items():
            by_format[quant.fmt].append(path)
        one = len(by_format) == 1
        groups = {}
        for i, (fmt, paths) in enumerate(by_format.items()):
            groups[f"group_{i}"] = {"targets": ["Linear"] if one else sorted(paths),
                                    "weights": _args(fmt.weight), "input_activations": _args(fmt.input),
                                    "output_activations": None, "format": compression_format(fmt)}
        formats = {g["format"] for g in groups.values()}
        return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
                "quantization_status": "compressed", "config_groups": groups, "kv_cache_scheme": None,
                "global_compression_ratio": None, "ignore": [p for p in linear_paths if p not in plan]}


def _mx_problem(fmt: LayerFormat) -> str | None:
    """Why compressed-tensors 0.20 cannot hold this MX layer, or None. Its MX formats are FP4 (E2M1),
    FP6 E2M3 and FP8 (E4M3) weights; its run-time MX input scales follow amd-quark's rule for FP4
    and FP6 but take FP8's with FP4's mantissa width, so MXFP8 inputs would compute other scales."""
    w, x = fmt.weight, fmt.input
    if not w.dtype.is_mx or (x is not None and x.dtype != w.dtype):
        return ("compressed-tensors' MX formats quantize weights and inputs alike: give both the same MX dtype, or "
                "leave the inputs in float")
    if w.dtype.spec.mx_element == (3, 2):
        return f"compressed-tensors' FP6 is E2M3, not {w.dtype.value}: write output.layout: quark"
    if x is not None and w.dtype.is_float:
        return (f"compressed-tensors computes {x.dtype.value} input scales with FP4's mantissa width, not by the OCP "
                "rule qfx (and amd-quark) use: quantize only the weights here, or write output.layout: quark")
    return None


def _args(tf: TensorFormat | None) -> dict | None:
    """compressed-tensors' QuantizationArgs of one tensor."""
    if tf is None:
        return None
    if tf.dtype.is_mx:  # the E8M0 scale dtype is what tells compressed-tensors to compute MX scales
        return {"num_bits": tf.dtype.bits, "type": "float", "symmetric": True, "group_size": tf.group_size,
                "strategy": "group", "dynamic": tf.dynamic, "actorder": None, "block_structure": None,
                "scale_dtype": "torch.uint8", "zp_dtype": None, "observer": None if tf.dynamic else "minmax",
                "observer_kwargs": {}}
    return {"num_bits": tf.dtype.bits, "type": "float" if tf.dtype.is_float else "int", "symmetric": tf.symmetric,
            "group_size": tf.group_size or None, "strategy": STRATEGY[tf.granularity], "dynamic": tf.dynamic,
            "actorder": None, "block_structure": None, "scale_dtype": "torch.float32", "zp_dtype": None,
            "observer": None if tf.dynamic else "minmax", "observer_kwargs": {}}

