"""lower: each dequantize -> linear of the frozen QDQ graph that a fused op computes becomes that
op (qfx.runtime.qlinear), whose kernel reads the codes directly.

Lowered today: int8 weights per channel (or per tensor, symmetric) whose input is quantized to
int8 / uint8 statically per tensor or to int8 per token -> `qfx::qlinear_w8a8`. Any other
linear keeps its reference ops, and the pass warns once per layer with the reason: a layer
left in QDQ form runs slower, never wrong.
"""
from __future__ import annotations

import dataclasses
import operator
import warnings

import torch

from qfx.passes.annotate import linear_nodes
from qfx.passes.base import Pass, PassContext, PassResult
from qfx.passes.meta import copy_meta, module_path
from qfx.runtime import ops
from qfx.runtime.errors import QfxWarning
from qfx.runtime.qlinear import QLINEAR_W8A8

W8A8_INPUTS = ("int8", "uint8")  # static per-tensor activation codes the w8a8 op takes


def _is(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


def _quantized_input(dq: torch.fx.Node) -> tuple | str:
    """(float input, scale node, zero point node, qdtype) of the activation that `dq` dequantizes,
    scale None for per-token; or why the w8a8 op cannot take it."""
    source = dq.args[0]
    if _is(source, ops.QUANTIZE):
        x, scale, zero_point, qdtype, axis, group_size = source.args
        val = scale.meta.get("val") if isinstance(scale, torch.fx.Node) else None
        if qdtype not in W8A8_INPUTS or group_size or (val is not None and val.numel() != 1):
            return f"its input is quantized to {qdtype} per channel or group, which the w8a8 op does not take"
        return x, scale, zero_point, qdtype
    if _is(source, operator.getitem) and _is(source.args[0], ops.QUANTIZE_PER_TOKEN):
        x, qdtype = source.args[0].args
        if qdtype != "int8":
            return f"its input is quantized per token to {qdtype}; the w8a8 op takes int8"
        return x, None, None, qdtype
    return "its input is not quantized by a qfx quantize op"


def w8a8_arguments(linear: torch.fx.Node) -> tuple | str:
    """The qlinear_w8a8 arguments that compute `linear`, or why it cannot."""
    x_dq, w_dq = linear.args[:2]
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    if not _is(w_dq, ops.DEQUANTIZE):
        return "its weight is float"
    codes, w_scale, w_zero_point, w_qdtype, axis, group_size = w_dq.args[:6]
    if w_qdtype != "int8" or group_size or axis != 0:
        return f"its weight is {w_qdtype}{' in groups' if group_size else ''}: no fused op for it yet"
    if w_zero_point is not None:
        return "its int8 weight has a zero point: the w8a8 op takes symmetric weights"
    if not _is(x_dq, ops.DEQUANTIZE):
        return "its input is float (weight-only): no fused op for it yet"
    found = _quantized_input(x_dq)
    if isinstance(found, str):
        return found
    x, scale, zero_point, qdtype = found
    return x, codes, w_scale, bias, scale, zero_point, qdtype


@dataclasses.dataclass(frozen=True)
class Lower(Pass):
    name = "lower"
    requires = frozenset({"frozen"})
    produces = frozenset({"lowered"})

    def run(self, gm, ctx: PassContext) -> PassResult:
        lowered, kept = {}, {}
        for linear in linear_nodes(gm):
            where = module_path(linear, ctx.root_prefix) or linear.name
            found = w8a8_arguments(linear)
            if isinstance(found, str):
                if _is(linear.args[1], ops.DEQUANTIZE):  # a float layer is not a missed one
                    kept[where] = found
                continue
            with gm.graph.inserting_before(linear):
                fused = gm.graph.call_function(QLINEAR_W8A8, found)
            copy_meta(fused, linear, "qlinear", linear.meta.get("val"))
            linear.replace_all_uses_with(fused)
            gm.graph.erase_node(linear)
            lowered[where] = str(QLINEAR_W8A8.overloadpacket)
        for where, why in kept.items():
            warnings.warn(QfxWarning(f"{where} keeps its reference ops (not lowered): {why}"), stacklevel=2)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, modified=bool(lowered), stats={"lowered": lowered, "kept": kept})
