"""The QDQ graph in the form ONNX consumers fuse, computing exactly the same numbers.

- A quantized linear becomes MatMul(x, DequantizeLinear(codes [in, out])) (+ bias): the
  weight codes are stored transposed so DequantizeLinear feeds MatMul directly, the pattern
  ONNX Runtime and MIGraphX fuse (per-channel scales on axis 1, int4 blocks along axis 0).
- For the `cpu` target, int8 codes are re-encoded as uint8 with the zero point moved by 128
  (the same real values). ONNX Runtime's x86 kernels multiply uint8 activations with uint8
  weights exactly; with int8 weights they use VPMADDUBSW, whose int16 pair sums saturate on
  CPUs without VNNI, unless every weight code is within ±64 (7-bit weights, `reduce_range`):
  those stay int8, which is exact and about twice as fast.

- Quantizers of one tensor with equal scales (q/k/v, gate/up) become one QuantizeLinear.

The result is a new GraphModule; the frozen graph and its tensors are not touched.
"""
from __future__ import annotations

import torch

from qfx.runtime import ops
from qfx.runtime.onnx_codes import int8_as_uint8, uint8_zero_point, weight_codes_as_uint8, weight_to_onnx

QDQ_OPS = (ops.QUANTIZE, ops.DEQUANTIZE)
LINEAR = torch.ops.aten.linear.default


def _attr(gm: torch.nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def onnx_ready(gm: torch.fx.GraphModule, uint8_codes: bool) -> torch.fx.GraphModule:
    """A copy of `gm` (sharing its untouched tensors) in the form above."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    attrs: dict[str, object] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            attrs[node.target] = _attr(gm, node.target)
        elif node.op == "call_module":
            attrs[node.target] = gm.get_submodule(node.target)
    for linear in [n for n in graph.nodes if n.op == "call_function" and n.target is LINEAR]:
        _to_matmul(linear, attrs)
    _share_quantizers(graph, attrs)
    if uint8_codes:
        _int8_as_uint8(graph, attrs)
    graph.lint()
    return torch.fx.GraphModule(attrs, graph)


def _to_matmul(linear: torch.fx.Node, attrs: dict) -> None:
    x, w, *rest = linear.args
    bias = rest[0] if rest else None
    graph = linear.graph
    if w.op == "call_function" and w.target is ops.DEQUANTIZE and w.args[0].op == "get_attr":
        codes, scale, zero_point, qdtype, axis, group_size, dtype = w.args
        tensors = {"codes": attrs[codes.target], "scale": attrs[scale.target],
                   "zero_point": None if zero_point is None else attrs[zero_point.target]}
        onnx_form, new_axis = weight_to_onnx(tensors, group_size)
        for key, node in (("codes", codes), ("scale", scale), ("zero_point", zero_point)):
            if node is not None:
                attrs[node.target] = onnx_form[key]
        w.args = (codes, scale, zero_point, qdtype, new_axis, group_size, dtype)
        weight = w
    else:  # a float linear: MatMul with the transposed weight, as torch.onnx would emit it
        with graph.inserting_before(linear):
            weight = graph.call_function(torch.ops.aten.t.default, (w,))
    with graph.inserting_before(linear):
        out = graph.call_function(torch.ops.aten.matmul.default, (x, weight))
        if bias is not None:
            out = graph.call_function(torch.ops.aten.add.Tensor, (out, bias))
    linear.replace_all_uses_with(out)
    graph.erase_node(linear)


def _share_quantizers(graph: torch.fx.Graph, attrs: dict) -> None:
    """One QuantizeLinear per tensor and quantization: q/k/v (and gate/up) read the same input,
    and their observers saw the same values, so they hold equal scales and make equal codes.
    Each layer keeps its own DequantizeLinear and scale; ONNX Runtime then quantizes once."""
    def same(a, b) -> bool:
        if a is None or b is None:
            return a is b
        return a.op == b.op == "get_attr" and attrs[a.target].dtype == attrs[b.target].dtype \
            and torch.equal(attrs[a.target], attrs[b.target])

    kept: dict[tuple, list[torch.fx.Node]] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not ops.QUANTIZE:
            continue
        x, scale, zero_point, *params = node.args
        candidates = kept.setdefault((x, *params), [])
        twin = next((k for k in candidates if same(scale, k.args[1]) and same(zero_point, k.args[2])), None)
        if twin is None:
            candidates.append(node)
        else:
            node.replace_all_uses_with(twin)
            graph.erase_node(node)


def _int8_as_uint8(graph: torch.fx.Graph, attrs: dict) -> None:
    """Static int8 quantize/dequantize pairs read uint8 codes and zero points shifted by 128."""
    shifted: set[str] = set()

    def shift(target: str) -> None:
        if target not in shifted:
            attrs[target] = int8_as_uint8(attrs[target])
            shifted.add(target)

    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in QDQ_OPS or node.args[3] != "int8":
            continue
        first, scale, zero_point = node.args[:3]
        if scale.op != "get_attr":
            continue  # per-token (dynamic) codes are computed, not stored: they stay int8
        if first.op == "get_attr" and not weight_codes_as_uint8(attrs[first.target]):
            continue  # 7-bit weights: uint8 x int8 is exact for them, and faster
        if zero_point is None:
            name = scale.target.removesuffix("_scale") + "_zero_point"
            if name not in attrs:
                attrs[name] = uint8_zero_point(attrs[scale.target], None)
                shifted.add(name)
            with graph.inserting_before(node):
                zero_point = graph.get_attr(name)
        elif zero_point.target not in shifted:
            attrs[zero_point.target] = uint8_zero_point(attrs[scale.target], attrs[zero_point.target])
            shifted.add(zero_point.target)
        if node.target is ops.DEQUANTIZE and first.op == "get_attr":
            shift(first.target)  # stored weight codes
        node.args = (first, scale, zero_point, "uint8", *node.args[4:])
