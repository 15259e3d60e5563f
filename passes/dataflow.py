"""Which channel scalings fold exactly, found from the graph's dataflow alone.

A fold divides channel c of a producer (a linear's output rows, a LayerNorm's affine, a
norm's weight vector) by s_c and multiplies the consumer linears' matching input columns by
s_c. It is exact when channel c reaches nothing but those consumers, and reaches them as
*homogeneous of degree one*: every value on the way is (a channel-c element) × (something
that does not depend on any scaled channel), moved around by shape ops.

`find_fold_groups` proves that by propagating, from each producer, an index tensor through
the graph: each element holds the one producer channel it is linear in, or -1. Shape ops
(view, transpose, expand for GQA head repetition, slice, cat, ...) move the indices as they
move values; a product with an independent factor (the gated MLP's `act(gate) * up`, a
norm's `x_hat * weight`) or attention over a value tensor keeps them; anything else that
reads a channel (an activation function, a residual add, softmax, the graph output) marks it
unscalable. Channels that reach consumer linears and are never marked are the group's
foldable channels; the concrete shapes come from one run of the graph on a small input.
Nothing here knows a module or architecture name.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable

import torch
import torch.fx

from qfx.passes.annotate import LINEAR
from qfx.passes.meta import IDENTITY_ROLES, get_role, module_path

aten = torch.ops.aten

# Ops that pass values through unchanged (casts, copies, eval-mode dropout).
_SAME = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.clone.default,
         aten.contiguous.default, aten.alias.default, aten.detach.default, aten.dropout.default,
         aten.lift_fresh_copy.default, aten.type_as.default}
# Ops that only move elements: applied to the index tensor exactly as to the values.
_MOVE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
         aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
         aten.squeeze.default, aten.expand.default, aten.slice.Tensor, aten.select.int, aten.t.default,
         aten.flatten.using_ints, aten.unflatten.int, aten.narrow.default, aten.split.Tensor,
         aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int, aten.cat.default,
         aten.repeat_interleave.self_int, aten.repeat.default, aten.expand_as.default, operator.getitem}
_SCALE = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default}
_SUM = {aten.add.Tensor, aten.sub.Tensor}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_SDPA = aten.scaled_dot_product_attention.default
_LAYER_NORM = aten.layer_norm.default
# Ops whose result nobody reads (shape and dtype assertions).
IGNORED_OPS = {aten._assert_tensor_metadata.default, aten.sym_constrain_range_for_size.default}
# Elementwise ops that a norm's weight vector goes through on its way to the product
# (`(1 + weight.float())` in Gemma): invertible, so the fold can edit the parameter.
_VECTOR_STEPS = {aten.to.dtype, aten._to_copy.default, aten.add.Tensor, aten.mul.Tensor}


@dataclasses.dataclass(frozen=True)
class Producer:
    """What a fold divides: kind is 'linear' (output rows and bias), 'layer_norm' (weight and
    bias) or 'vector' (a 1-D parameter, through the steps in `chain`, multiplied into the data)."""

    kind: str
    node: torch.fx.Node  # the linear, the layer_norm, or the last node of the vector's chain
    channels: int
    params: tuple[str, ...]  # get_attr targets the fold edits
    chain: tuple[torch.fx.Node, ...] = ()  # vector: the steps from the parameter to `node`


@dataclasses.dataclass(frozen=True)
class FoldGroup:
    """A producer and the linears its channels reach; `maps[i][j]` is the producer channel that
    consumer i's input column j carries (-1: none), `foldable[c]` whether channel c may be scaled."""

    producer: Producer
    consumers: tuple[torch.fx.Node, ...]
    maps: tuple[torch.Tensor, ...]
    foldable: torch.Tensor
    # Channels whose way to the consumers only moves them, sums them over tokens (attention)
    # or scales them by factors that do not vary from channel to channel: a rotation within
    # blocks of `block` channels (the attention's head size; None without attention) folds too.
    rotatable: torch.Tensor
    block: int | None


@dataclasses.dataclass(frozen=True)
class Unfoldable:
    producer: Producer
    consumers: tuple[torch.fx.Node, ...]
    reason: str


def concrete_values(gm: torch.fx.GraphModule, example: tuple,
                    inspect: Callable[[torch.fx.Node, object], None] | None = None) -> dict[torch.fx.Node, object]:
    """Each node's result on `example`, with tensors reduced to empty tensors of their shape
    and dtype (the analysis needs shapes and integer arguments, not values). `inspect`, if
    given, sees each node's full result first."""
    recorded: dict[torch.fx.Node, object] = {}

    def keep(value):
        if isinstance(value, torch.Tensor):
            return torch.empty(value.shape, dtype=value.dtype, device="meta")
        if isinstance(value, (list, tuple)):
            return type(value)(keep(v) for v in value)
        if isinstance(value, torch.SymInt):
            return int(value)
        return value

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if inspect is not None:
                inspect(n, result)
            recorded[n] = keep(result)
            return result

    with torch.no_grad():
        Recorder(gm).run(*example)
    return recorded


def _shape(value) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


class _Propagation:
    """Index tensors of one producer's channels, pushed through the graph in node order."""

    def __init__(self, values: dict, channels: int):
        self.values = values
        self.bad = torch.zeros(channels + 1, dtype=torch.bool)  # slot `channels` stands for -1
        self.index: dict[torch.fx.Node, torch.Tensor] = {}
        self.sinks: list[tuple[torch.fx.Node, torch.Tensor]] = []
        self.first_bad: str | None = None
        self.varied = torch.zeros(channels + 1, dtype=torch.bool)  # scaled channel by channel
        self.blocks: set[int] = set()  # head sizes of the attentions the channels went through

    def mark(self, idx: torch.Tensor, node: torch.fx.Node) -> None:
        chans = idx[idx >= 0]
        if chans.numel():
            if self.first_bad is None and not bool(self.bad[chans].all()):
                self.first_bad = f"{node.target} in {module_path(node) or 'the model'} (node {node.name})"
            self.bad[chans] = True

    def clean(self, idx: torch.Tensor) -> torch.Tensor | None:
        """idx with unscalable channels turned to -1, or None when no scalable channel is left:
        a value that depends only on unscaled channels is unchanged by the fold."""
        idx = torch.where(self.bad[idx], -1, idx)
        return idx if bool((idx >= 0).any()) else None

    def arg(self, a):
        """A node argument with indexed tensors as their index and other nodes as their value."""
        if isinstance(a, torch.fx.Node):
            return self.index.get(a, self.values.get(a))
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        return a

    def step(self, node: torch.fx.Node) -> None:
        ins = [a for a in node.all_input_nodes if a in self.index]
        if not ins or node.target in IGNORED_OPS:
            return
        result = self._transfer(node, ins)
        if isinstance(result, torch.Tensor):
            result = self.clean(result)
        elif isinstance(result, (list, tuple)):
            result = type(result)(self.clean(r) if isinstance(r, torch.Tensor) else None for r in result)
            result = result if any(r is not None for r in result) else None
        if result is not None:
            self.index[node] = result

    def _fill(self, a, like_shape=None):
        """The index of an argument: its own, or all -1 for an independent tensor."""
        if isinstance(a, torch.fx.Node) and a in self.index:
            return self.index[a]
        shape = _shape(self.values.get(a)) if isinstance(a, torch.fx.Node) else None
        return torch.full(shape if shape is not None else like_shape, -1, dtype=torch.long)

    def _transfer(self, node: torch.fx.Node, ins: list[torch.fx.Node]):
        op, out = node.target, self.values.get(node)
        if get_role(node) in IDENTITY_ROLES:  # observers and statistics pass values through
            return self.index[node.args[0]]
        if node.op != "call_function":
            for a in ins:
                self.mark(self.index[a], node)
            return None
        if op is LINEAR and node.args[0] in self.index and node.args[1] not in self.index \
                and (len(node.args) < 3 or node.args[2] not in self.index):
            self.sinks.append((node, self.index[node.args[0]]))
            return None
        if op in _SAME:
            return self.index[node.args[0]]
        if op in _MOVE:
            if op is aten.cat.default:
                parts = [self._fill(a, ()) for a in node.args[0]]
                return torch.cat(parts, *[self.arg(a) for a in node.args[1:]])
            if op is operator.getitem:
                return self.index[node.args[0]][node.args[1]]
            try:
                return op(*self.arg(node.args), **self.arg(node.kwargs))
            except (RuntimeError, TypeError, IndexError):  # a move the index cannot follow: refuse
                self.mark(self.index[ins[0]], node) if isinstance(self.index[ins[0]], torch.Tensor) else None
                return None
        if op in _SCALE or op in _SUM or op in _MATMUL:
            return self._binary(node, op, _shape(out))
        if op is _SDPA and len(ins) == 1 and node.args[2] in self.index and _shape(out) is not None:
            return self._over_tokens(self.index[node.args[2]], _shape(out), node)
        for a in ins:
            idx = self.index[a]
            for t in (idx if isinstance(idx, (list, tuple)) else [idx]):
                if isinstance(t, torch.Tensor):
                    self.mark(t, node)
        return None

    def _over_tokens(self, idx: torch.Tensor, out_shape: tuple, node) -> torch.Tensor | None:
        """A weighted sum over dim -2 of a value tensor (attention, P @ V): column j keeps its
        channel when every row holds the same one."""
        same = (idx == idx[..., :1, :]).all(dim=-2, keepdim=True)
        self.mark(idx[~same.expand_as(idx)], node)
        # A rotation within heads needs each head's row to hold one aligned block of channels in
        # order; channels of any other row are scaled, but not rotated, exactly.
        d = int(idx.shape[-1])
        rows = idx.reshape(-1, d)
        aligned = (rows < 0).all(dim=1) | ((rows == rows[:, :1] + torch.arange(d)).all(dim=1) & (rows[:, 0] % d == 0))
        self.varied[rows[~aligned][rows[~aligned] >= 0]] = True
        self.blocks.add(d)
        row = torch.where(same, idx[..., :1, :], -1)
        try:
            return row.expand(out_shape).clone()
        except RuntimeError:
            self.mark(idx, node)
            return None

    def _binary(self, node, op, out_shape):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        ia = self.index.get(a) if isinstance(a, torch.fx.Node) else None
        ib = self.index.get(b) if isinstance(b, torch.fx.Node) else None
        if out_shape is None:
            for i in (ia, ib):
                if i is not None:
                    self.mark(i, node)
            return None
        if op in _MATMUL:
            if ia is not None:  # the contracted dimension of `a` mixes its channels
                self.mark(ia, node)
                if ib is not None:
                    self.mark(ib, node)
                return None
            return self._over_tokens(ib, out_shape, node)
        if op in _SUM:
            ia = ia if ia is not None else self._fill(a, ())
            ib = ib if ib is not None else self._fill(b, ())
            ia, ib = ia.expand(out_shape), ib.expand(out_shape)
            differ = ia != ib  # a channel plus anything else is not homogeneous in it
            self.mark(ia[differ], node)
            self.mark(ib[differ], node)
            return torch.where(differ, -1, ia).clone()
        if op is aten.div.Tensor and ib is not None:  # dividing by a channel is not linear in it
            self.mark(ib, node)
            ib = None
            if ia is None:
                return None
        if ia is not None and ib is not None:  # a product of two channels is not linear in either
            ia, ib = ia.expand(out_shape), ib.expand(out_shape)
            both = (ia >= 0) & (ib >= 0)
            self.mark(ia[both], node)
            self.mark(ib[both], node)
            return torch.where(ia >= 0, ia, ib).clone()
        idx = (ia if ia is not None else ib).expand(out_shape).clone()
        self._mark_varied(idx, b if ia is not None else a)
        return idx

    def _mark_varied(self, idx: torch.Tensor, factor) -> None:
        """Mark the channels of `idx` when the independent `factor` may differ between two of
        them at one position: it has more than one element along a dimension the channels vary on."""
        shape = _shape(self.values.get(factor)) if isinstance(factor, torch.fx.Node) else ()
        shape = (1,) * (idx.ndim - len(shape or ())) + tuple(shape or ())
        for dim, size in enumerate(shape):
            if size > 1 and bool((idx != idx.narrow(dim, 0, 1)).any()):
                chans = idx[idx >= 0]
                self.varied[chans] = True
                return


def _param(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    value = get_tensor(gm, node.target)
    return value if isinstance(value, torch.Tensor) else None


def get_tensor(gm: torch.nn.Module, target: str):
    """What a get_attr node with this target reads."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def producers(gm: torch.fx.GraphModule) -> list[Producer]:
    """Every node whose output channels a fold could divide."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is LINEAR:
            w = _param(gm, node.args[1])
            bias = node.args[2] if len(node.args) > 2 else None
            if w is not None and w.ndim == 2 and (bias is None or _param(gm, bias) is not None):
                params = (node.args[1].target,) + ((bias.target,) if bias is not None else ())
                found.append(Producer("linear", node, int(w.shape[0]), params))
        elif node.op == "call_function" and node.target is _LAYER_NORM:
            args = list(node.args) + [None] * (4 - len(node.args))
            w, bias = _param(gm, args[2]), args[3]
            if w is not None and w.ndim == 1 and len(args[1]) == 1 and (bias is None or _param(gm, bias) is not None):
                params = (args[2].target,) + ((bias.target,) if bias is not None else ())
                found.append(Producer("layer_norm", node, int(w.shape[0]), params))
        elif node.op == "get_attr" and (p := _param(gm, node)) is not None and p.ndim == 1 \
                and p.is_floating_point():
            chain = _vector_chain(node)
            if chain:
                found.append(Producer("vector", chain[-1], int(p.shape[0]), (node.target,), tuple(chain)))
    return found


def _vector_chain(param: torch.fx.Node) -> list[torch.fx.Node]:
    """The invertible steps from a 1-D parameter to the product that applies it to the data
    (`weight * x_hat`, or `(1 + weight) * x_hat`), or [] when it is not used that way."""
    chain, node = [param], param
    while len(users := [u for u in node.users if u.target not in IGNORED_OPS]) == 1:
        (user,) = users
        if user.target in _VECTOR_STEPS and user.op == "call_function":
            scalar_args = [a for a in user.args if a is not node]
            if user.target in (aten.add.Tensor, aten.mul.Tensor) and \
                    not all(isinstance(a, (int, float)) for a in scalar_args):
                return chain if user.target is aten.mul.Tensor else []
            chain.append(user)
            node = user
            continue
        return []
    return []


def find_fold_groups(gm: torch.fx.GraphModule, example: tuple, values: dict | None = None
                     ) -> tuple[list[FoldGroup], list[Unfoldable]]:
    """Fold groups of `gm`, and the producers whose channels reach linears but cannot fold."""
    values = values if values is not None else concrete_values(gm, example)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = list(gm.graph.nodes)
    groups, refused = [], []
    for prod in producers(gm):
        flow = _Propagation(values, prod.channels)
        shape = _shape(values.get(prod.node))
        if shape is None:
            continue
        flow.index[prod.node] = torch.arange(prod.channels).expand(shape).clone()
        for node in nodes[order[prod.node] + 1:]:
            flow.step(node)
        if not flow.sinks:
            continue
        consumers, maps = _consumer_maps(flow)
        good = torch.zeros(prod.channels, dtype=torch.bool)
        for m in maps:
            good[m[m >= 0]] = True
        good &= ~flow.bad[:-1]
        if bool(good.any()):
            block = next(iter(flow.blocks)) if len(flow.blocks) == 1 else None
            groups.append(FoldGroup(prod, tuple(consumers), tuple(torch.where(flow.bad[m], -1, m) for m in maps), good,
                                    good & ~flow.varied[:-1], block))
        else:
            refused.append(Unfoldable(prod, tuple(consumers),
                                      f"its channels also reach {flow.first_bad or 'other nodes'}"))
    return groups, refused


def _consumer_maps(flow: _Propagation) -> tuple[list[torch.fx.Node], list[torch.Tensor]]:
    """Per consumer linear, the producer channel of each input column; a column whose rows
    carry different channels marks them unscalable."""
    consumers, maps = [], []
    for node, idx in flow.sinks:
        rows = idx.reshape(-1, idx.shape[-1])
        same = (rows == rows[:1]).all(dim=0)
        flow.mark(rows[:, ~same], node)
        consumers.append(node)
        maps.append(torch.where(same, rows[0], -1))
    return consumers, maps
