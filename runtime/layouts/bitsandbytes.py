"""bitsandbytes' layouts, as transformers saves and loads `load_in_4bit` and `load_in_8bit` models.

8-bit (LLM.int8): `weight` int8 [N, K], `SCB` float32 [N] (each row's absmax: the scale x 127)
and `weight_format` (uint8 0: row-major); the config's `llm_int8_threshold` is the inputs'
outlier threshold (0: no outlier columns). 4-bit:

Per layer: `weight` uint8 [N*K/2, 1], two codes a byte with the first in the HIGH nibble, in
the row-major order of the [N, K] weight; `weight.absmax` float32, one scale per block of
`blocksize` consecutive elements (qfx's groups of one row, since K is a multiple of the group
size); `weight.quant_map`, the 16-entry code table; `weight.quant_state.bitsandbytes__nf4` (or
`__fp4`), the JSON of the rest (quant_type, blocksize, dtype, shape) as uint8 bytes. With double
quantization (`bnb_4bit_use_double_quant`) `weight.absmax` holds the scales' uint8 codes instead,
`weight.nested_absmax` (float32, one per block of 256 scales) and `weight.nested_quant_map` (the
dynamic map) decode them, and the JSON adds nested_blocksize, nested_dtype and nested_offset (the
scales' mean).

Both: the config's `llm_int8_skip_modules` names, by full path, the linears that stay in float.
"""
from __future__ import annotations

import json

import torch

from qfx.runtime import numerics
from qfx.runtime.errors import ArtifactError
from qfx.runtime.formats import NESTED_SCALES, Granularity, LayerFormat, LayerQuant, QDType, ScaleDType, TensorFormat
from qfx.runtime.layouts import NOT_ONE_BUILD, Layout

# The float dtype bitsandbytes dequantizes to: qfx's runtime computes in float32.
DEQUANT_DTYPE = "float32"
# bitsandbytes' quant_type for each code-table format it decodes (its kernels hard-code the tables,
# in the code order qfx's registry gives them), by qfx's format name.
QUANT_TYPE = {"nf4": "nf4", "bnb_fp4": "fp4"}


def _is_int8(tf: TensorFormat | None) -> bool:
    return tf is not None and tf.dtype.is_integer and tf.dtype.bits == 8 and tf.dtype.is_signed


def _eight_bit(fmt: LayerFormat) -> bool:
    """LLM.int8's format: int8 weights per channel, per-token int8 inputs."""
    return _is_int8(fmt.weight) and _is_int8(fmt.input)


def _config_key(fmt: LayerFormat) -> tuple:
    """What the one config.json says of every layer."""
    return ("8-bit", fmt.input.outlier_threshold) if _eight_bit(fmt) else (fmt.weight.dtype, fmt.weight.double_quant)


class BitsAndBytesLayout(Layout):
    name = "bitsandbytes"
    holds_input_transforms = False
    holds_double_quant = True
    weight_scale_dtype = ScaleDType.float32_absmax

    def format_problem(self, fmt: LayerFormat) -> str | None:
        w, x = fmt.weight, fmt.input
        if fmt.output is not None:
            return "bitsandbytes keeps layer outputs in float: output must be null"
        if _eight_bit(fmt):
            if w.granularity is not Granularity.per_channel or not w.symmetric or not x.dynamic:
                return (f"bitsandbytes 8-bit checkpoints (LLM.int8) hold int8 per_channel symmetric weights and "
                        f"per_token int8 inputs (preset llm-int8), not weight {w.describe()}, input {x.describe()}")
            return None
        if w is None or w.dtype.value not in QUANT_TYPE:
            return (f"bitsandbytes stores 4-bit code-table weights ({' or '.join(QUANT_TYPE)}) or LLM.int8 "
                    f"(preset llm-int8) here, not {w.dtype.value if w else 'float'} weights")
        if x is not None:
            return "bitsandbytes 4-bit checkpoints are weight-only: the input must stay in float (null)"
        if w.granularity is not Granularity.per_group:
            return f"bitsandbytes scales blocks of consecutive weights: use per_group, not {w.granularity.value}"
        return None

    def plan_problem(self, plan: dict[str, LayerQuant], linear_paths: list[str]) -> tuple[str, str] | None:
        """One config: one quant_type (or 8 bits and one threshold) for every quantized linear."""
        first = next(iter(plan.values()), None)
        for path, quant in plan.items():
            if _config_key(quant.fmt) != _config_key(first.fmt):
                return path, (f"it is {', '.join(f'{r} {t.describe()}' for r, t in quant.fmt.tensors.items())} and "
                              f"{first.module} {', '.join(f'{r} {t.describe()}' for r, t in first.fmt.tensors.items())}; "
                              "a bitsandbytes config has one quant_type and bnb_4bit_use_double_quant, or one "
                              "llm_int8_threshold")
        return None

    def to_artifact(self, tensors, fmt):
        w = fmt.weight
        if _eight_bit(fmt):
            out = {key: v for key, v in tensors.items() if not key.startswith("weight")}
            out["weight"] = tensors["weight"].to(torch.int8)
            out["SCB"] = (tensors["weight_scale"].reshape(-1) * w.qmax).float()
            out["weight_format"] = torch.tensor(0, dtype=torch.uint8)
            return out
        codes = tensors["weight"]
        n, k = codes.shape
        flat = codes.reshape(-1).to(torch.uint8)
        out = {key: v for key, v in tensors.items() if not key.startswith("weight")}
        out["weight"] = ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)
        out["weight.quant_map"] = w.dtype.table
        if w.double_quant:
            out["weight.absmax"] = tensors["weight_scale_codes"].reshape(-1)
            out["weight.nested_absmax"] = tensors["weight_scale_absmax"]
            out["weight.nested_quant_map"] = torch.tensor(NESTED_SCALES.table)
            out[_state_key(w.dtype)] = _state_bytes(w, n, k, float(tensors["weight_scale_offset"]))
        else:
            out["weight.absmax"] = tensors["weight_scale"].reshape(-1).float()
            out[_state_key(w.dtype)] = _state_bytes(w, n, k)
        return out

    def from_artifact(self, tensors, fmt):
        w = fmt.weight
        if _eight_bit(fmt):
            if int(tensors["weight_format"]) != 0:
                raise ArtifactError(f"weight_format is {int(tensors['weight_format'])}, not 0 (row-major)",
                                    hint=NOT_ONE_BUILD)
            out = {key: v for key, v in tensors.items() if key not in ("SCB", "weight_format")}
            out["weight_scale"] = tensors["SCB"] / w.qmax
            return out
        state = json.loads(bytes(tensors[_state_key(w.dtype)].tolist()).decode("utf-8"))
        n, k = state["shape"]
        said = (state.get("quant_type"), state.get("blocksize"), state.get("nested_blocksize"),
                state.get("nested_dtype"))
        nested = (NESTED_SCALES.block, DEQUANT_DTYPE) if w.double_quant else (None, None)
        if said != (QUANT_TYPE[w.dtype.value], w.group_size, *nested):
            raise ArtifactError(f"the quant_state says {said[0]} in blocks of {said[1]}, nested blocks {said[2]} of "
                                f"{said[3]}, and the manifest {w.describe()}", hint=NOT_ONE_BUILD)
        if not torch.equal(tensors["weight.quant_map"], w.dtype.table):
            raise ArtifactError(f"weight.quant_map is not the {w.dtype.value} code table", hint=NOT_ONE_BUILD)
        packed = tensors["weight"].reshape(-1)
        codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(n, k)
        out = {key: v for key, v in tensors.items() if not key.startswith("weight")}
        out["weight"] = codes.to(w.dtype.storage)
        groups = (n, k // w.group_size)
        if w.double_quant:
            if not torch.equal(tensors["weight.nested_quant_map"], torch.tensor(NESTED_SCALES.table)):
                raise ArtifactError("weight.nested_quant_map is not the 8-bit dynamic map", hint=NOT_ONE_BUILD)
            nested = {"codes": tensors["weight.absmax"].reshape(groups), "absmax": tensors["weight.nested_absmax"],
                      "offset": torch.tensor(float(state["nested_offset"]), dtype=torch.float32)}
            out.update({f"weight_scale_{key}": value for key, value in nested.items()})
            out["weight_scale"] = numerics.double_dequantize(**nested)
        else:
            out["weight_scale"] = tensors["weight.absmax"].reshape(groups)
        return out

    def expected(self, fmt, in_features, out_features, bias, float_dtype, transforms=()):
        w = fmt.weight
        n, k = out_features, in_features
        if _eight_bit(fmt):
            out = {"weight": (torch.int8, (n, k)), "SCB": (torch.float32, (n,)), "weight_format": (torch.uint8, ())}
            return {**out, **({"bias": (float_dtype, (n,))} if bias else {})}
        groups = n * k // w.group_size
        out = {"weight": (torch.uint8, (n * k // 2, 1)),
               "weight.absmax": (torch.uint8 if w.double_quant else torch.float32, (groups,)),
               "weight.quant_map": (torch.float32, (len(w.dtype.spec.table),)),
               _state_key(w.dtype): (torch.uint8, (len(_state_bytes(w, n, k, 1.0)),))}
        if w.double_quant:
            out["weight.nested_absmax"] = (torch.float32, (-(-groups // NESTED_SCALES.block),))
            out["weight.nested_quant_map"] = (torch.float32, (len(NESTED_SCALES.table),))
        if bias:
            out["bias"] = (float_dtype, (out_features,))
        return out

    def config(self, plan, linear_paths):
        fmt = next(iter(plan.values())).fmt
        skip = [p for p in linear_paths if p not in plan] or None
        if _eight_bit(fmt):
            return {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True,
                    "llm_int8_threshold": fmt.input.outlier_threshold, "llm_int8_has_fp16_weight": False,
                    "llm_int8_skip_modules": skip}
        w = fmt.weight
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": QUANT_TYPE[w.dtype.value], "bnb_4bit_use_double_quant": w.double_quant,
                "bnb_4bit_compute_dtype": DEQUANT_DTYPE, "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": skip}


def _state_key(qdtype: QDType) -> str:
    return f"weight.quant_state.bitsandbytes__{QUANT_TYPE[qdtype.value]}"


def _state_bytes(w: TensorFormat, n: int, k: int, offset: float | None = None) -> torch.Tensor:
    """The quant_state's non-tensor items as bitsandbytes packs them (JSON in uint8). The offset
    is written with 9 significant digits, enough to give back its float32 exactly, in a fixed
    width, so that the tensor's length follows from the format alone."""
    state = {"quant_type": QUANT_TYPE[w.dtype.value], "blocksize": w.group_size, "dtype": DEQUANT_DTYPE, "shape": [n, k]}
    text = json.dumps(state)
    if w.double_quant:
        text = text[:-1] + (f', "nested_blocksize": {NESTED_SCALES.block}, "nested_dtype": "{DEQUANT_DTYPE}", '
                            f'"nested_offset": {offset:.8e}}}')
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
