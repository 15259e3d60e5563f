"""convert: observers and float weights become quantize/dequantize with frozen qparams.

After it the graph is a QDQ graph: each quantized linear reads integer (or fp8) weight codes
through `qfx::dequantize`, and each quantized activation passes through `qfx::quantize` ->
`qfx::dequantize` (when dynamic, `qfx::quantize_per_token` per row, `qfx::quantize_per_token_outliers`
for LLM.int8, `qfx::quantize_blocks` per MX block). Codes and qparams are
buffers on the linear's own module, named as in the artifact: weight, weight_scale,
weight_zero_point, input_scale, input_zero_point, output_scale, output_zero_point; with double
quantization also weight_scale_codes, weight_scale_absmax and weight_scale_offset, the coded form
of weight_scale (which holds their decoded value) that the layout stores.
"""
from __future__ import annotations

import dataclasses
import operator

import torch

from qfx.passes.annotate import linear_nodes
from qfx.passes.base import Pass, PassContext, PassResult
from qfx.passes.dataflow import get_tensor
from qfx.passes.meta import copy_meta, get_quant
from qfx.passes.observe import observer_name
from qfx.runtime import ops
from qfx.runtime.errors import PassFailure
from qfx.runtime.formats import TensorFormat
from qfx.runtime.numerics import double_dequantize, double_quantize, qparams_from_range, quantize_weight, weight_axis


def _fake_like(val, dtype=None, shape=None):
    if val is None:
        return None
    shape = val.shape if shape is None else shape
    return val.new_empty(shape, dtype=dtype or val.dtype)


class _Editor:
    """Adds buffers to a linear's module and graph nodes that read them."""

    def __init__(self, gm: torch.fx.GraphModule, linear: torch.fx.Node, owner_path: str):
        self.gm, self.linear, self.owner_path = gm, linear, owner_path
        self.owner = gm.get_submodule(owner_path)

    def buffer(self, name: str, value: torch.Tensor | None) -> torch.fx.Node | None:
        if value is None:
            return None
        if name in self.owner._parameters:
            del self.owner._parameters[name]
        self.owner.register_buffer(name, value)
        node = self.gm.graph.get_attr(f"{self.owner_path}.{name}")
        copy_meta(node, self.linear, "qparam", value.to("meta"))
        return node

    def call(self, target, args, role: str, val) -> torch.fx.Node:
        node = self.gm.graph.call_function(target, args)
        copy_meta(node, self.linear, role, val)
        return node

    def qdq_activation(self, x: torch.fx.Node, fmt: TensorFormat, prefix: str,
                       lo_hi: tuple[torch.Tensor, torch.Tensor] | None) -> torch.fx.Node:
        x_val = x.meta.get("val")
        q = fmt.dtype.value
        if fmt.dynamic and fmt.group_size:  # MX: one scale per block of the last axis
            both = self.call(ops.QUANTIZE_BLOCKS, (x, q, fmt.group_size), "quantize", None)
            codes = self.call(operator.getitem, (both, 0), "quantize", _fake_like(x_val, fmt.dtype.storage))
            scale = self.call(operator.getitem, (both, 1), "quantize",
                              _fake_like(x_val, torch.float32, (*x_val.shape[:-1], x_val.shape[-1] // fmt.group_size)))
            both.meta["val"] = (codes.meta.get("val"), scale.meta.get("val"))
            return self.call(ops.DEQUANTIZE, (codes, scale, None, q, -1, fmt.group_size, x_val.dtype),
                             "dequantize", x_val)
        if fmt.dynamic:
            outliers = fmt.outlier_threshold > 0  # LLM.int8: its outlier columns pass in float
            both = self.call(ops.QUANTIZE_PER_TOKEN_OUTLIERS if outliers else ops.QUANTIZE_PER_TOKEN,
                             (x, q, fmt.outlier_threshold) if outliers else (x, q), "quantize", None)
            codes = self.call(operator.getitem, (both, 0), "quantize", _fake_like(x_val, fmt.dtype.storage))
            scale = self.call(operator.getitem, (both, 1), "quantize",
                              _fake_like(x_val, torch.float32, (*x_val.shape[:-1], 1)) if x_val is not None else None)
            both.meta["val"] = (codes.meta.get("val"), scale.meta.get("val"))
            dq = self.call(ops.DEQUANTIZE, (codes, scale, None, q, -1, 0, x_val.dtype), "dequantize", x_val)
            if not outliers:
                return dq
            columns = self.call(operator.getitem, (both, 2), "quantize",
                                _fake_like(x_val, torch.bool, x_val.shape[-1:]))
            both.meta["val"] = (*both.meta["val"], columns.meta.get("val"))
            return self.call(torch.ops.aten.where.self, (columns, x, dq), "dequantize", x_val)
        scale, zero_point = qparams_from_range(*lo_hi, fmt)
        scale_node = self.buffer(f"{prefix}_scale", scale)
        zp_node = self.buffer(f"{prefix}_zero_point", zero_point)
        codes = self.call(ops.QUANTIZE, (x, scale_node, zp_node, q, 0, 0), "quantize",
                          _fake_like(x_val, fmt.dtype.storage))
        return self.call(ops.DEQUANTIZE, (codes, scale_node, zp_node, q, 0, 0, x_val.dtype),
                         "dequantize", x_val)


class _InputRanges:
    """Each input observer's range, taken once however many linears read it. An observer that
    measures its error through its readers (`reads_readers`, e.g. mse) gets their float weights,
    stacked: gathered before convert replaces any weight with its codes."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm, self.ranges = gm, {}
        self.readers: dict[str, list[torch.Tensor]] = {}
        for linear in linear_nodes(gm):
            obs, quant = observer_name(linear.args[0]), get_quant(linear)
            if obs and quant is not None and quant.fmt.input is not None and linear.args[1].op == "get_attr" \
                    and gm.get_submodule(obs).reads_readers:
                self.readers.setdefault(obs, []).append(get_tensor(gm, linear.args[1].target).detach())

    def __call__(self, obs: str) -> tuple[torch.Tensor, torch.Tensor]:
        if obs not in self.ranges:
            weights = self.readers.get(obs)
            self.ranges[obs] = self.gm.get_submodule(obs).range(None if weights is None else torch.cat(weights))
        return self.ranges[obs]


@dataclasses.dataclass(frozen=True)
class Convert(Pass):
    name = "convert"
    requires = frozenset({"annotated", "calibrated"})
    produces = frozenset({"qdq"})
    invalidates = frozenset({"observed", "calibrated"})  # it consumes the observers

    def run(self, gm, ctx: PassContext) -> PassResult:
        graph = gm.graph
        converted = 0
        input_range = _InputRanges(gm)
        for linear in linear_nodes(gm):
            quant = get_quant(linear)
            if quant is None:
                continue
            weight_node = linear.args[1]
            if weight_node.op != "get_attr":
                raise PassFailure(f"the weight of {quant.module} is computed in the graph, not a parameter",
                                  where=linear.name, hint="exclude this layer in the spec")
            owner_path = weight_node.target.rsplit(".", 1)[0]
            edit = _Editor(gm, linear, owner_path)
            fmt = quant.fmt
            x_val = linear.args[0].meta.get("val")
            dtype = x_val.dtype if x_val is not None else torch.float32
            if fmt.weight is not None:
                if len(weight_node.users) > 1:
                    raise PassFailure(f"the weight of {quant.module} is also read by other nodes "
                                      f"({', '.join(u.name for u in weight_node.users)})",
                                      hint="exclude this layer (tied weights are kept in float)")
                w = getattr(edit.owner, weight_node.target.rsplit(".", 1)[1])
                ctx.float_weights[quant.module] = w.detach()
                chosen = ctx.take_codes(quant.module)  # a weight algorithm's codes
                codes, scale, zero_point = chosen if chosen is not None else quantize_weight(w.detach(), fmt.weight)
                if fmt.weight.double_quant:  # as bitsandbytes: codes chosen, then their scales coded
                    nested = double_quantize(scale)
                    scale = double_dequantize(**nested)
                    for key, value in nested.items():  # read by no node: the layout stores them
                        edit.owner.register_buffer(f"weight_scale_{key}", value)
                with graph.inserting_before(linear):
                    codes_node = edit.buffer(weight_node.target.rsplit(".", 1)[1], codes)
                    dq = edit.call(ops.DEQUANTIZE,
                                   (codes_node, edit.buffer("weight_scale", scale),
                                    edit.buffer("weight_zero_point", zero_point), fmt.weight.dtype.value,
                                    weight_axis(fmt.weight), fmt.weight.group_size, dtype),
                                   "dequantize", _fake_like(weight_node.meta.get("val"), dtype))
                linear.replace_input_with(weight_node, dq)
                graph.erase_node(weight_node)
            if fmt.input is not None:
                x = linear.args[0]
                obs = observer_name(x)
                source = x.args[0] if obs else x
                with graph.inserting_before(linear):
                    dq = edit.qdq_activation(source, fmt.input, "input",
                                             input_range(obs) if obs else None)
                linear.replace_input_with(x, dq)
                if obs and not x.users:  # a shared observer goes with its last reader
                    graph.erase_node(x)
                    gm.delete_submodule(obs)
            if fmt.output is not None:
                # Output quantization is static per tensor (validated in the spec), so the
                # observer that `observe` put after the linear is its only user.
                (obs_node,) = linear.users
                with graph.inserting_before(obs_node):
                    dq = edit.qdq_activation(linear, fmt.output, "output",
                                             gm.get_submodule(obs_node.target).range())
                obs_node.replace_all_uses_with(dq)
                graph.erase_node(obs_node)
                gm.delete_submodule(obs_node.target)
            converted += 1
        graph.lint()
        gm.recompile()
        return PassResult(gm, modified=converted > 0, stats={"converted": converted})

