"""lower: each dequantize -> linear of the frozen QDQ graph that a fused op computes becomes that
op (qfx.runtime.qlinear), whose kernel reads the codes directly.

Lowered today:
- int8 weights per channel (or per tensor, symmetric) whose input is quantized to int8 / uint8
  statically per tensor or to int8 per token -> `qfx::qlinear_w8a8`;
- FP8 (E4M3FN / E4M3FNUZ) weights per channel or per tensor whose input is quantized to FP8
  statically per tensor or per token -> `qfx::qlinear_fp8`;
- int4 / uint4 weights in groups along the input, with a float input -> `qfx::qlinear_w4a16`,
  the codes packed as the Quark artifact packs them (eight to an int32 along the output).
Any other linear keeps its reference ops, and the pass warns once per layer with the reason: a
layer left in QDQ form runs slower, never wrong.
"""
from __future__ import annotations

import dataclasses
import operator
import warnings

import torch

from qfx.passes.annotate import linear_nodes
from qfx.passes.base import Pass, PassContext, PassResult
from qfx.passes.dataflow import get_tensor
from qfx.passes.meta import copy_meta, module_path
from qfx.runtime import ops
from qfx.runtime.errors import QfxWarning
from qfx.runtime.formats import QDType
from qfx.runtime.layouts.quark import pack_int4_words
from qfx.runtime.qlinear import QLINEAR_FP8, QLINEAR_W4A16, QLINEAR_W8A8


def _int8(q: QDType) -> bool:
    return q.is_integer and q.bits == 8


def _fp8(q: QDType) -> bool:
    return q.is_float and q.bits == 8 and not q.is_mx  # MXFP8's scales are per block of 32


def _names(takes) -> tuple[str, ...]:
    return tuple(q.value for q in QDType if takes(q))


# the activation codes each fused op takes: static per tensor / dynamic per token (signed only:
# the per-token quantizer is symmetric)
W8A8_INPUTS = {"static": _names(_int8), "per token": _names(lambda q: _int8(q) and q.is_signed)}
FP8_INPUTS = {"static": _names(_fp8), "per token": _names(_fp8)}


def _is(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


def _takes(inputs: dict, kind: str) -> str:
    return " or ".join(inputs[kind])


def _quantized_input(dq: torch.fx.Node, inputs: dict, op: str) -> tuple | str:
    """(float input, scale node, zero point node, qdtype) of the activation that `dq` dequantizes,
    scale None for per-token; or why `op`, which takes `inputs`, cannot take it."""
    source = dq.args[0]
    if _is(source, ops.QUANTIZE):
        x, scale, zero_point, qdtype, axis, group_size = source.args
        val = scale.meta.get("val") if isinstance(scale, torch.fx.Node) else None
        if qdtype not in inputs["static"]:
            return f"its input is quantized to {qdtype}; the {op} op takes {_takes(inputs, 'static')}"
        if group_size or (val is not None and val.numel() != 1):
            return f"its input is quantized per channel or group; the {op} op takes one scale per tensor or token"
        return x, scale, zero_point, qdtype
    if _is(source, operator.getitem) and _is(source.args[0], ops.QUANTIZE_PER_TOKEN):
        x, qdtype = source.args[0].args
        if qdtype not in inputs["per token"]:
            return f"its input is quantized per token to {qdtype}; the {op} op takes {_takes(inputs, 'per token')}"
        return x, None, None, qdtype
    if _is(source, operator.getitem) and _is(source.args[0], ops.QUANTIZE_BLOCKS):
        return f"its input is quantized in MX blocks; the {op} op takes one scale per tensor or token"
    return "its input is not quantized by a qfx quantize op"


def _bias(linear: torch.fx.Node):
    return linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")


def scaled_arguments(linear: torch.fx.Node, inputs: dict, op: str) -> tuple | str:
    """(input, weight codes, weight scale, bias, input scale, input zero point, input qdtype) for
    the op `op` of 8-bit codes (w8a8, fp8), which takes `inputs`, to compute `linear`; or why it
    cannot."""
    x_dq, w_dq = linear.args[:2]
    codes, w_scale, w_zero_point, w_qdtype, axis, group_size = w_dq.args[:6]
    if group_size or axis != 0:
        return f"its {w_qdtype} weight is in groups: no fused op for it yet"
    if w_zero_point is not None:
        return f"its {w_qdtype} weight has a zero point: the {op} op takes symmetric weights"
    if _is(x_dq, torch.ops.aten.where.self):
        return "its input keeps outlier columns in float (LLM.int8): no fused op for it yet"
    if not _is(x_dq, ops.DEQUANTIZE):
        return "its input is float (weight-only): no fused op for it yet"
    found = _quantized_input(x_dq, inputs, op)
    if isinstance(found, str):
        return found
    x, scale, zero_point, qdtype = found
    return x, codes, w_scale, _bias(linear), scale, zero_point, qdtype


def _packed_int4(gm, owner: str, name: str, node: torch.fx.Node | None, transform) -> torch.fx.Node | None:
    """A buffer `name` on module `owner` holding transform(the tensor `node` reads), read by a new
    get_attr node."""
    if node is None:
        return None
    gm.get_submodule(owner).register_buffer(name, transform(get_tensor(gm, node.target)))
    return gm.graph.get_attr(f"{owner}.{name}")


def w4a16_arguments(gm, linear: torch.fx.Node) -> tuple | str:
    """The qlinear_w4a16 arguments that compute `linear` (its weight dequantizes 4-bit codes), with
    the codes packed into new buffers beside them; or why it cannot."""
    x, w_dq = linear.args[:2]
    codes, w_scale, w_zero_point, w_qdtype, axis, group_size = w_dq.args[:6]
    if not group_size or axis != 1:
        return f"its {w_qdtype} weight is not in groups along the input: no fused op for it yet"
    if _is(x, ops.DEQUANTIZE):
        return f"its input is quantized too: no fused op for {w_qdtype} weights with quantized inputs yet"
    if any(n is not None and n.op != "get_attr" for n in (codes, w_scale, w_zero_point)):
        return "its codes or qparams are computed in the graph"
    out_features = codes.meta["val"].shape[0]
    if out_features % 8:
        return f"its {out_features} outputs are not a multiple of 8 (eight codes pack to a word)"
    owner = codes.target.rpartition(".")[0]
    with gm.graph.inserting_before(linear):
        packed = _packed_int4(gm, owner, "weight_int4", codes, lambda t: pack_int4_words(t.t().contiguous()))
        scale = _packed_int4(gm, owner, "weight_scale_t", w_scale, lambda t: t.t().contiguous())
        zero_point = _packed_int4(gm, owner, "weight_zero_point_int4", w_zero_point,
                                  lambda t: pack_int4_words(t.t().contiguous()))
    for node in (packed, scale, zero_point):
        if node is not None:
            copy_meta(node, linear, "qparam", getattr(gm.get_submodule(owner), node.target.rpartition(".")[2])
                      .to("meta"))
    return x, packed, scale, zero_point, _bias(linear), w_qdtype, group_size


def fused_call(gm, linear: torch.fx.Node) -> tuple | str:
    """(fused op, its arguments) for `linear`, or why it keeps its reference ops."""
    w_dq = linear.args[1]
    if not _is(w_dq, ops.DEQUANTIZE):
        return "its weight is float"
    w_qdtype = w_dq.args[3]
    q = QDType(w_qdtype)
    if _int8(q) and q.is_signed:
        found = scaled_arguments(linear, W8A8_INPUTS, "w8a8")
        return found if isinstance(found, str) else (QLINEAR_W8A8, found)
    if _fp8(q):
        found = scaled_arguments(linear, FP8_INPUTS, "fp8")
        if isinstance(found, str):
            return found
        x, codes, w_scale, bias, scale, _, qdtype = found  # FP8 has no zero point
        return QLINEAR_FP8, (x, codes, w_scale, bias, scale, qdtype)
    if q.bits == 4 and q.is_integer:
        found = w4a16_arguments(gm, linear)
        return found if isinstance(found, str) else (QLINEAR_W4A16, found)
    return f"its weight is {w_qdtype}: no fused op for it yet"


@dataclasses.dataclass(frozen=True)
class Lower(Pass):
    name = "lower"
    requires = frozenset({"frozen"})
    produces = frozenset({"lowered"})

    def run(self, gm, ctx: PassContext) -> PassResult:
        lowered, kept = {}, {}
        for linear in linear_nodes(gm):
            where = module_path(linear, ctx.root_prefix) or linear.name
            found = fused_call(gm, linear)
            if isinstance(found, str):
                if _is(linear.args[1], ops.DEQUANTIZE):  # a float layer is not a missed one
                    kept[where] = found
                continue
            op, args = found
            with gm.graph.inserting_before(linear):
                fused = gm.graph.call_function(op, args)
            copy_meta(fused, linear, "qlinear", linear.meta.get("val"))
            linear.replace_all_uses_with(fused)
            gm.graph.erase_node(linear)
            lowered[where] = str(op.overloadpacket)
        for where, why in kept.items():
            warnings.warn(QfxWarning(f"{where} keeps its reference ops (not lowered): {why}"), stacklevel=2)
        gm.graph.eliminate_dead_code()
        _drop_unread_buffers(gm)
        gm.recompile()
        return PassResult(gm, modified=bool(lowered), stats={"lowered": lowered, "kept": kept})


def _drop_unread_buffers(gm) -> None:
    """Delete the buffers of lowered layers that no node reads any more (4-bit codes, now packed),
    so that the lowered program does not carry both forms."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        owner, _, attr = name.rpartition(".")
        if name not in read and attr in ("weight", "weight_scale", "weight_zero_point") \
                and f"{owner}.weight_int4" in read:
            delattr(gm.get_submodule(owner), attr)

