"""bitsandbytes' 4-bit layout, as transformers saves and loads `load_in_4bit` models.

Per layer: `weight` uint8 [N*K/2, 1], two codes a byte with the first in the HIGH nibble, in
the row-major order of the [N, K] weight; `weight.absmax` float32, one scale per block of
`blocksize` consecutive elements (qfx's groups of one row, since K is a multiple of the group
size); `weight.quant_map`, the 16-entry code table; `weight.quant_state.bitsandbytes__nf4`, the
JSON of the rest (quant_type, blocksize, dtype, shape) as uint8 bytes. The config's
`llm_int8_skip_modules` names, by full path, the linears that stay in float.
"""
from __future__ import annotations

import json

import torch

from qfx.runtime.errors import ArtifactError
from qfx.runtime.formats import Granularity, LayerFormat, LayerQuant, QDType
from qfx.runtime.layouts import NOT_ONE_BUILD, Layout

# The float dtype bitsandbytes dequantizes to: qfx's runtime computes in float32.
DEQUANT_DTYPE = "float32"


class BitsAndBytesLayout(Layout):
    name = "bitsandbytes"
    holds_input_transforms = False

    def format_problem(self, fmt: LayerFormat) -> str | None:
        w = fmt.weight
        if fmt.input is not None or fmt.output is not None:
            return "bitsandbytes 4-bit checkpoints are weight-only: the input and output must stay in float (null)"
        if w is None or not _four_bit_table(w.dtype):
            return (f"bitsandbytes stores 4-bit code-table weights (nf4) here, not "
                    f"{w.dtype.value if w else 'float'}")
        if w.granularity is not Granularity.per_group:
            return f"bitsandbytes scales blocks of consecutive weights: use per_group, not {w.granularity.value}"
        return None

    def plan_problem(self, plan: dict[str, LayerQuant], linear_paths: list[str]) -> tuple[str, str] | None:
        """One config: one quant_type for every quantized linear."""
        first = next(iter(plan.values()), None)
        for path, quant in plan.items():
            if quant.fmt.weight.dtype != first.fmt.weight.dtype:
                return path, (f"it is {quant.fmt.weight.dtype.value} and {first.module} is "
                              f"{first.fmt.weight.dtype.value}; a bitsandbytes config has one quant_type")
        return None

    def to_artifact(self, tensors, fmt):
        w = fmt.weight
        codes = tensors["weight"]
        n, k = codes.shape
        flat = codes.reshape(-1).to(torch.uint8)
        out = {key: v for key, v in tensors.items() if not key.startswith("weight")}
        out["weight"] = ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)
        out["weight.absmax"] = tensors["weight_scale"].reshape(-1).float()
        out["weight.quant_map"] = w.dtype.table
        out[_state_key(w.dtype)] = _state_bytes(w.dtype, w.group_size, n, k)
        return out

    def from_artifact(self, tensors, fmt):
        w = fmt.weight
        state = json.loads(bytes(tensors[_state_key(w.dtype)].tolist()).decode("utf-8"))
        n, k = state["shape"]
        if state.get("quant_type") != w.dtype.value or state.get("blocksize") != w.group_size:
            raise ArtifactError(f"the quant_state says {state.get('quant_type')} in blocks of {state.get('blocksize')}, "
                                f"and the manifest {w.dtype.value} in groups of {w.group_size}", hint=NOT_ONE_BUILD)
        if not torch.equal(tensors["weight.quant_map"], w.dtype.table):
            raise ArtifactError(f"weight.quant_map is not the {w.dtype.value} code table", hint=NOT_ONE_BUILD)
        packed = tensors["weight"].reshape(-1)
        codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(n, k)
        out = {key: v for key, v in tensors.items() if not key.startswith("weight")}
        out["weight"] = codes.to(w.dtype.storage)
        out["weight_scale"] = tensors["weight.absmax"].reshape(n, k // w.group_size)
        return out

    def expected(self, fmt, in_features, out_features, bias, float_dtype, transforms=()):
        w = fmt.weight
        n, k = out_features, in_features
        out = {"weight": (torch.uint8, (n * k // 2, 1)),
               "weight.absmax": (torch.float32, (n * k // w.group_size,)),
               "weight.quant_map": (torch.float32, (len(w.dtype.spec.table),)),
               _state_key(w.dtype): (torch.uint8, (len(_state_bytes(w.dtype, w.group_size, n, k)),))}
        if bias:
            out["bias"] = (float_dtype, (out_features,))
        return out

    def config(self, plan, linear_paths):
        w = next(iter(plan.values())).fmt.weight
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": w.dtype.value, "bnb_4bit_use_double_quant": False,
                "bnb_4bit_compute_dtype": DEQUANT_DTYPE, "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": [p for p in linear_paths if p not in plan] or None}


def _four_bit_table(qdtype: QDType) -> bool:
    """Formats bitsandbytes' 4-bit loaders decode: 16-entry code tables, named as qfx names them."""
    return qdtype.table is not None and qdtype.bits == 4


def _state_key(qdtype: QDType) -> str:
    return f"weight.quant_state.bitsandbytes__{qdtype.value}"


def _state_bytes(qdtype: QDType, blocksize: int, n: int, k: int) -> torch.Tensor:
    """The quant_state's non-tensor items as bitsandbytes packs them (JSON in uint8)."""
    state = {"quant_type": qdtype.value, "blocksize": blocksize, "dtype": DEQUANT_DTYPE, "shape": [n, k]}
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
