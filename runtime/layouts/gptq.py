"""The GPTQ layout (AutoGPTQ / GPTQModel), which transformers (through optimum and gptqmodel),
vLLM and most GPTQ kernels load.

Per quantized linear (K inputs, N outputs, b bits, G groups along K):
- `qweight` int32 [K*b/32, N]: codes as unsigned integers (signed ones offset by 2**(b-1)),
  packed along K, lowest bits first;
- `qzeros` int32 [G, N*b/32]: the unsigned zero points, packed along N the same way. Format
  `gptq` (v1) stores zero - 1, `gptq_v2` the zero itself; a symmetric b-bit format's zero is
  2**(b-1), so a v1 symmetric 4-bit checkpoint holds 0x77777777 words. v1 cannot hold a zero of
  0, which asymmetric formats produce, so they need `gptq_v2`;
- `scales` float16 [G, N] (qfx rounds scales to float16 before choosing codes);
- `g_idx` int32 [K]: the group of each input channel. qfx's act-order keeps static groups,
  so this is always k // group_size and consumers need no permutation.
Per-channel formats are one group of K (`group_size: -1` in the config).
"""
from __future__ import annotations

import re

import torch

from qfx.runtime.errors import ArtifactError
from qfx.runtime.formats import Granularity, LayerFormat, LayerQuant, ScaleDType
from qfx.runtime.layouts import NOT_ONE_BUILD, Layout
from qfx.runtime.layouts.packing import pack_along, unpack_along

BITS = (2, 4, 8)  # the widths GPTQ packs whole into int32 words (its 3 bits straddle them)
# A linear inside a repeated block: "<blocks>.<index>.<name in block>".
BLOCK_PATH = re.compile(r"^(?P<blocks>.+?)\.(?P<index>\d+)\.(?P<name>.+)$")


class GptqLayout(Layout):
    weight_scale_dtype = ScaleDType.float16
    holds_input_transforms = False

    def __init__(self, checkpoint_format: str):
        self.name = checkpoint_format  # "gptq" (v1) or "gptq_v2"
        self.zero_stored_less = 1 if checkpoint_format == "gptq" else 0

    def format_problem(self, fmt: LayerFormat) -> str | None:
        w = fmt.weight
        if fmt.input is not None or fmt.output is not None:
            return "GPTQ checkpoints are weight-only: the input and output must stay in float (null)"
        if w is None or not w.dtype.is_integer or w.dtype.bits not in BITS:
            return f"GPTQ stores {'/'.join(map(str, BITS))}-bit integer weights, not {w.dtype.value if w else 'float'}"
        if w.granularity not in (Granularity.per_group, Granularity.per_channel):
            return f"GPTQ stores per_group or per_channel weight scales, not {w.granularity.value}"
        if w.reduce_range:
            return "GPTQ has no 7-bit (reduce_range) int8 weights"
        if not w.symmetric and self.zero_stored_less:
            return ("asymmetric weights need the gptq_v2 checkpoint format: gptq (v1) stores each zero point "
                    "less 1, which cannot hold a zero point of 0 (set output.layout: gptq_v2)")
        return None

    def shape_problem(self, fmt: LayerFormat, in_features: int, out_features: int) -> str | None:
        per_word = 32 // fmt.weight.dtype.bits
        if in_features % per_word or out_features % per_word:
            return (f"{fmt.weight.dtype.value} codes are packed {per_word} to an int32 along both axes, and the layer "
                    f"is {in_features} -> {out_features}")
        return None

    def plan_problem(self, plan: dict[str, LayerQuant], linear_paths: list[str]) -> tuple[str, str] | None:
        """GPTQ's config has one format for every quantized linear, and consumers quantize the
        linears of the repeated blocks only (the same names in each block)."""
        if not plan:
            return None
        first = next(iter(plan.values()))
        blocks, names = _blocks_and_names(plan)
        for path, quant in plan.items():
            if quant.fmt != first.fmt:
                return path, (f"its format ({quant.fmt.weight.describe()}) differs from {first.module}'s "
                              f"({first.fmt.weight.describe()}); a GPTQ config has one format for all layers")
            match = BLOCK_PATH.match(path)
            if match is None or match["blocks"] != blocks:
                return path, f"it is not a linear of the repeated blocks {blocks}.N, the only ones GPTQ loaders quantize"
        for path in linear_paths:
            match = BLOCK_PATH.match(path)
            if match and match["blocks"] == blocks and match["name"] in names and path not in plan:
                return path, (f"it is left in float while the same layer of other blocks is quantized; GPTQ loaders "
                              f"quantize {match['name']} in every block")
        return None

    def to_artifact(self, tensors, fmt):
        w = fmt.weight
        bits, offset = w.dtype.bits, _offset(fmt)
        codes = tensors["weight"].to(torch.int64) + offset  # [N, K], now unsigned
        scale = tensors["weight_scale"]
        zero = tensors.get("weight_zero_point")
        zero = torch.zeros_like(scale, dtype=torch.int64) if zero is None else zero.to(torch.int64)
        scale, zero = scale.reshape(scale.shape[0], -1), zero.reshape(scale.shape[0], -1)  # [N, G]
        stored_zero = zero.T + offset - self.zero_stored_less  # [G, N]
        if bool((stored_zero < 0).any()):  # format_problem refuses the formats that produce it
            raise ArtifactError(f"a zero point of 0 cannot be stored in the {self.name} layout", hint=NOT_ONE_BUILD)
        out = {k: v for k, v in tensors.items() if not k.startswith("weight")}
        groups = scale.shape[1]
        k = codes.shape[1]
        out["qweight"] = pack_along(codes.T, bits, dim=0)
        out["qzeros"] = pack_along(stored_zero, bits, dim=1)
        out["scales"] = scale.T.to(torch.float16).contiguous()
        out["g_idx"] = (torch.arange(k) // (k // groups)).to(torch.int32)
        return out

    def from_artifact(self, tensors, fmt):
        w = fmt.weight
        bits, offset = w.dtype.bits, _offset(fmt)
        k = tensors["g_idx"].shape[0]
        groups = tensors["scales"].shape[0]
        if not torch.equal(tensors["g_idx"], (torch.arange(k) // (k // groups)).to(torch.int32)):
            raise ArtifactError("g_idx is not k // group_size: the checkpoint permutes its groups, which qfx never "
                                "writes (its act-order keeps static groups)", hint=NOT_ONE_BUILD)
        out = {k_: v for k_, v in tensors.items() if k_ not in ("qweight", "qzeros", "scales", "g_idx")}
        codes = unpack_along(tensors["qweight"], bits, dim=0).T - offset  # [N, K]
        zero = (unpack_along(tensors["qzeros"], bits, dim=1) + self.zero_stored_less).T - offset  # [N, G]
        out["weight"] = codes.to(w.dtype.storage).contiguous()
        scale = tensors["scales"].float().T.contiguous()
        grouped = w.granularity is Granularity.per_group
        out["weight_scale"] = scale if grouped else scale.reshape(-1)
        if w.symmetric:
            if bool((zero != 0).any()):
                raise ArtifactError(f"qzeros of a symmetric layer are not all {offset - self.zero_stored_less}",
                                    hint=NOT_ONE_BUILD)
        else:
            out["weight_zero_point"] = (zero if grouped else zero.reshape(-1)).to(w.dtype.storage).contiguous()
        return out

    def expected(self, fmt, in_features, out_features, bias, float_dtype, transforms=()):
        w = fmt.weight
        per_word = 32 // w.dtype.bits
        groups = in_features // w.group_size if w.group_size else 1
        out = {"qweight": (torch.int32, (in_features // per_word, out_features)),
               "qzeros": (torch.int32, (groups, out_features // per_word)),
               "scales": (torch.float16, (groups, out_features)),
               "g_idx": (torch.int32, (in_features,))}
        if bias:
            out["bias"] = (float_dtype, (out_features,))
        return out

    def config(self, plan, linear_paths):
        w = next(iter(plan.values())).fmt.weight
        blocks, names = _blocks_and_names(plan)
        config = {"quant_method": "gptq", "bits": w.dtype.bits, "group_size": w.group_size or -1,
                  "sym": w.symmetric, "desc_act": False,  # static groups: g_idx needs no reordering
                  "checkpoint_format": self.name, "format": self.name, "pack_dtype": "int32",
                  "lm_head": False, "true_sequential": True, "block_name_to_quantize": blocks,
                  "meta": {"quantizer": ["qfx"]}}
        in_blocks = {m["name"] for p in linear_paths if (m := BLOCK_PATH.match(p)) and m["blocks"] == blocks}
        if names != in_blocks:  # some linears of each block stay in float
            config["modules_in_block_to_quantize"] = [sorted(names)]
        return config


def _offset(fmt: LayerFormat) -> int:
    """What turns the format's codes into GPTQ's unsigned ones."""
    w = fmt.weight
    return 2 ** (w.dtype.bits - 1) if w.dtype.is_signed else 0


def _blocks_and_names(plan: dict[str, LayerQuant]) -> tuple[str | None, set[str]]:
    """The repeated blocks' prefix ("model.layers") of the first planned layer, and the names
    within a block of the planned layers under it."""
    first = BLOCK_PATH.match(next(iter(plan)))
    if first is None:
        return None, set()
    return first["blocks"], {m["name"] for p in plan if (m := BLOCK_PATH.match(p)) and m["blocks"] == first["blocks"]}
