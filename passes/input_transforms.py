"""Which transforms each quantized layer's input goes through before its quantizer: what the
artifact must record for a runtime to apply them (manifest `input_transforms`, config.json)."""
from __future__ import annotations

import operator

import torch

from qfx.passes.annotate import LINEAR
from qfx.passes.meta import module_path
from qfx.runtime.ops import DEQUANTIZE, HADAMARD, QUANTIZE, QUANTIZE_PER_TOKEN
from qfx.runtime.quant_linear import HADAMARD_TRANSFORM, PRE_QUANT_SCALE, SCALE_TRANSFORM

_QDQ = {QUANTIZE, DEQUANTIZE, QUANTIZE_PER_TOKEN, operator.getitem}


def input_transforms(gm: torch.fx.GraphModule, root_prefix: str) -> dict[str, list[str]]:
    """Layer path -> the transforms its input goes through before its quantizer, in order: a
    qfx::hadamard (rotation's R4) and a multiply by a `pre_quant_scale` (SmoothQuant's explicit
    multiply), found by walking back from each linear over its quantize/dequantize ops."""
    found = {}
    for linear in gm.graph.nodes:
        if linear.target is not LINEAR:
            continue
        transforms, node = [], linear.args[0]
        while isinstance(node, torch.fx.Node) and node.op == "call_function":
            if node.target is HADAMARD:
                transforms.append(HADAMARD_TRANSFORM)
            elif _is_scale(node):
                transforms.append(SCALE_TRANSFORM)
            elif node.target not in _QDQ:
                break
            node = node.args[0]
        if transforms:
            found[module_path(linear, root_prefix)] = transforms[::-1]
    return found


def _is_scale(node: torch.fx.Node) -> bool:
    factors = node.args[1] if node.target is torch.ops.aten.mul.Tensor else None
    return isinstance(factors, torch.fx.Node) and factors.op == "get_attr" and factors.target.endswith(
        "." + PRE_QUANT_SCALE)
