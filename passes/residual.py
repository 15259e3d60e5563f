"""The residual stream, found from the graph's dataflow: what a rotation of it must edit.

A rotation x → xQ of the hidden vector leaves a model unchanged when every op that reads the
stream is equivariant or invariant under it: sums of stream values, products with per-token
factors, shape ops that keep the hidden dimension whole and last, a norm without weight
(x · rsqrt(mean(x²))), and linears that read it (their input columns absorb Q). Values enter
the stream from embeddings (columns rotate) and from linears whose output is added to it
(output rows rotate, the writers).

`find_stream` follows the stream from the embeddings in node order with three states: the
stream itself, its elementwise square (only summed over the hidden dimension may it go on),
and values that depend on the stream only through such sums (invariant). A norm's weight
vector multiplied into the stream is recorded: the rotation pass fuses it into the linears
that read the norm, after which it is all ones. Anything else that reads the stream (a
LayerNorm's mean subtraction, a slice of the hidden dimension, the graph output) makes the
stream unrotatable, and the first such node is named. No module or architecture name appears.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from qfx.passes.annotate import LINEAR
from qfx.passes.dataflow import _MOVE, _SAME, IGNORED_OPS, get_tensor
from qfx.passes.meta import IDENTITY_ROLES, get_role, module_path

aten = torch.ops.aten

STREAM, SQUARE, INVARIANT = "stream", "square", "invariant"
_EMBEDDING = aten.embedding.default
_SUMS_OVER_LAST = {aten.mean.dim, aten.sum.dim_IntList}
_SHAPE_QUERIES = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default}
_PRODUCTS = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
_ADDS = {aten.add.Tensor, aten.sub.Tensor}


class StreamError(ValueError):
    """The residual stream cannot be rotated: `node` is where, the message says why."""

    def __init__(self, message: str, node: torch.fx.Node | None = None):
        super().__init__(message)
        self.message, self.node = message, node

    def describe(self, root_prefix: str = "") -> str:
        node = self.node
        where = f" at {node.target} in {module_path(node, root_prefix) or 'the model'} (node {node.name})" \
            if node is not None else ""
        return self.message + where


@dataclasses.dataclass(frozen=True)
class Stream:
    hidden: int
    embeddings: tuple[torch.fx.Node, ...]  # aten.embedding nodes: weight columns rotate
    writers: tuple[torch.fx.Node, ...]  # linears adding into the stream: output rows (and bias) rotate
    readers: tuple[torch.fx.Node, ...]  # linears reading the stream: input columns rotate
    norm_weights: tuple[torch.fx.Node, ...]  # vectors multiplied into the stream: fused away first


def _shape(values: dict, node) -> tuple[int, ...] | None:
    value = values.get(node) if isinstance(node, torch.fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


class _Walk:
    def __init__(self, gm: torch.fx.GraphModule, values: dict, vectors: set[torch.fx.Node]):
        self.gm, self.values, self.vectors = gm, values, vectors
        self.state: dict[torch.fx.Node, str] = {}
        self.hidden: int | None = None
        self.embeddings, self.writers, self.readers, self.norms = [], [], [], []

    def run(self) -> Stream:
        for node in self.gm.graph.nodes:
            if node.op == "call_function" and node.target is _EMBEDDING and self._param(node.args[0]) is not None:
                self._start(node)
                continue
            tracked = [a for a in node.all_input_nodes if a in self.state]
            if tracked and node.target not in IGNORED_OPS and node.target not in _SHAPE_QUERIES:
                self._step(node, tracked)
        if not self.embeddings:
            raise StreamError("the model has no embedding whose output a rotation could follow")
        return Stream(self.hidden, tuple(self.embeddings), tuple(self.writers), tuple(self.readers),
                      tuple(dict.fromkeys(self.norms)))

    def _param(self, node) -> torch.Tensor | None:
        if isinstance(node, torch.fx.Node) and node.op == "get_attr":
            value = get_tensor(self.gm, node.target)
            return value if isinstance(value, torch.Tensor) and value.ndim == 2 else None
        return None

    def _start(self, node: torch.fx.Node) -> None:
        width = int(self._param(node.args[0]).shape[1])
        if self.hidden not in (None, width):
            raise StreamError(f"embeddings of widths {self.hidden} and {width} (a position bias table?): a rotation "
                              "needs every embedding to write the one residual stream", node)
        self.hidden = width
        self.embeddings.append(node)
        self.state[node] = STREAM

    def _step(self, node: torch.fx.Node, tracked: list[torch.fx.Node]) -> None:
        states = {self.state[a] for a in tracked}
        op = node.target
        if get_role(node) in IDENTITY_ROLES:
            self.state[node] = self.state[node.args[0]]
        elif states == {INVARIANT}:
            if node.op == "call_function":
                self.state[node] = INVARIANT  # a function of invariants only; the output may return them
        elif op is LINEAR and tracked == [node.args[0]] and states == {STREAM}:
            w = self._param(node.args[1])
            if w is None or w.shape[1] != self.hidden:
                raise StreamError("a linear reads the residual stream with a weight that is not a parameter of "
                                  f"{self.hidden} input columns", node)
            self.readers.append(node)
        elif op is aten.type_as.default and node.args[0] in self.state:
            self.state[node] = self.state[node.args[0]]  # the second argument gives only its dtype
        elif op in _SAME and len(tracked) == 1 and node.args[0] is tracked[0]:
            self.state[node] = self.state[tracked[0]]
        elif op in _MOVE and states == {STREAM}:
            self._move(node)
        elif op is aten.pow.Tensor_Scalar and states == {STREAM} and node.args[1] == 2:
            self.state[node] = SQUARE
        elif op in _SUMS_OVER_LAST and states == {SQUARE} and self._over_last(node):
            self.state[node] = INVARIANT
        elif op in _PRODUCTS and states <= {STREAM, INVARIANT}:
            self._product(node)
        elif op in _ADDS and states == {STREAM}:
            self._add(node)
        elif op is aten.layer_norm.default:
            raise StreamError("a LayerNorm reads the residual stream: its mean subtraction does not commute with "
                              "a rotation (rotate RMSNorm models, or leave out the rotation)", node)
        elif node.op == "output":
            raise StreamError("the model returns the residual stream itself (hidden states), which a rotation "
                              "would change", node)
        else:
            raise StreamError("an op reads the residual stream that a rotation would change", node)

    def _over_last(self, node: torch.fx.Node) -> bool:
        dims = node.args[1] if len(node.args) > 1 else None
        ndim = len(_shape(self.values, node.args[0]) or ())
        return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] % ndim == ndim - 1 \
            and len(node.args) > 2 and node.args[2] is True

    def _move(self, node: torch.fx.Node) -> None:
        """Moves that keep the hidden dimension whole and last; checked by moving an index."""
        if node.target is operator.getitem:
            self.state[node] = STREAM
            return
        if node.target is aten.cat.default:
            if not all(a in self.state for a in node.args[0]):
                raise StreamError("the residual stream is concatenated with other values", node)
        src = next(a for a in node.all_input_nodes if a in self.state)
        shape = _shape(self.values, src)
        index = torch.arange(self.hidden).expand(shape).clone()

        def arg(a):
            if isinstance(a, torch.fx.Node):
                return index if a in self.state else self.values.get(a)
            if isinstance(a, (list, tuple)):
                return type(a)(arg(x) for x in a)
            return a

        try:
            moved = node.target(*arg(node.args), **arg(node.kwargs))
        except (RuntimeError, TypeError, IndexError):
            moved = None
        parts = moved if isinstance(moved, (list, tuple)) else [moved]
        if not all(isinstance(p, torch.Tensor) and p.ndim and p.shape[-1] == self.hidden
                   and bool((p == torch.arange(self.hidden)).all()) for p in parts):
            raise StreamError("a shape op splits or moves the hidden dimension of the residual stream", node)
        self.state[node] = STREAM

    def _product(self, node: torch.fx.Node) -> None:
        """stream × (a per-token invariant, a scalar, or a norm's weight vector) stays the stream."""
        a, b = node.args[0], node.args[1]
        if node.target in (aten.div.Tensor, aten.div.Scalar) and b in self.state and self.state[b] == STREAM:
            raise StreamError("the residual stream divides another value", node)
        if self.state.get(a) == STREAM and self.state.get(b) == STREAM:
            if a is b and node.target is aten.mul.Tensor:
                self.state[node] = SQUARE
                return
            raise StreamError("two residual stream values are multiplied elementwise", node)
        factor = b if self.state.get(a) == STREAM else a
        shape = _shape(self.values, factor)
        if self.state.get(factor) == INVARIANT or not isinstance(factor, torch.fx.Node) or not shape \
                or shape[-1] == 1:
            if shape and shape[-1] != 1:
                raise StreamError("the residual stream is multiplied by a per-token value broadcast over its "
                                  "channels, which a rotation would not commute with", node)
            self.state[node] = STREAM
        elif factor in self.vectors and shape == (self.hidden,):
            self.norms.append(factor)
            self.state[node] = STREAM
        else:
            raise StreamError("the residual stream is multiplied channel by channel by a value that is not a "
                              "norm weight", node)

    def _add(self, node: torch.fx.Node) -> None:
        """stream + stream, where a side that is not yet the stream must come from a linear."""
        for side in (node.args[0], node.args[1]):
            if side not in self.state:
                self._writer(side, node)
        if len(node.args) > 2 or node.kwargs.get("alpha", 1) != 1:
            raise StreamError("a scaled sum on the residual stream", node)
        self.state[node] = STREAM

    def _writer(self, value, add: torch.fx.Node) -> None:
        """`value` (added to the stream) must be a linear's output through casts, read only here."""
        path, node = [], value
        while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _SAME \
                and node.args[0] is not None:
            path.append(node)
            node = node.args[0]
        if not (isinstance(node, torch.fx.Node) and node.target is LINEAR and self._param(node.args[1]) is not None):
            raise StreamError("a value that no linear or embedding produced is added to the residual stream", add)
        bias = node.args[2] if len(node.args) > 2 else None
        if self._param(node.args[1]).shape[0] != self.hidden or \
                (bias is not None and not (isinstance(bias, torch.fx.Node) and bias.op == "get_attr")):
            raise StreamError(f"a linear adds to the residual stream without {self.hidden} output rows and a "
                              "bias parameter of its own", add)
        for n in [node, *path]:
            if len([u for u in n.users if u.target not in IGNORED_OPS]) != 1:
                raise StreamError(f"the output of {n.name}, added to the residual stream, is also read elsewhere", add)
        self.writers.append(node)
        for n in [node, *path]:
            self.state[n] = STREAM


def find_stream(gm: torch.fx.GraphModule, values: dict, vectors: set[torch.fx.Node]) -> Stream:
    """The residual stream of `gm`, or a StreamError naming the node that keeps it from rotating.

    `values` holds each node's example result (dataflow.concrete_values); `vectors` the nodes
    that apply a norm's weight vector (dataflow producers of kind 'vector')."""
    return _Walk(gm, values, vectors).run()
