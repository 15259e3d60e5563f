"""rotation: rotate the residual stream and the attention heads by orthogonal matrices, folded
exactly into the weights (QuaRot / SpinQuant's offline rotations R1 and R2).

An orthogonal Q spreads each outlier channel over all channels, so the activations a
quantizer sees lose their outliers while the float model computes the same function:

- R1, the residual stream (passes/residual.py finds it): every norm's weight vector is first
  fused into the linears that read the norm (it must be ones for the norm to commute with Q);
  then embeddings take E·Q, the linears writing into the stream Qᵀ·W (and bias), the linears
  reading it W·Q;
- R2, each attention head between the value projection and the output projection: a fold
  group whose channels pass only through attention (passes/dataflow.py) takes Rᵀ on each head's
  rows of the producer and R on the consumer's matching columns, R of the head's size;
- R4 (`online_down_proj`), optional: a `qfx::hadamard` op before each quantized linear whose
  input other linears' outputs make through elementwise ops alone (the MLP's down projection,
  after its activation or gated product), which no offline rotation reaches; its weight takes
  W·H/sqrt(n). The op runs at inference: artifacts record it, and consumers that do not know it
  cannot run them.

R1 needs a stream that commutes with Q: RMSNorm. A LayerNorm's mean subtraction does not, so
for LayerNorm models (post-LN BERT) `residual: false` keeps R2 and R4, which need no stream.

The rotation runs before observe: it needs no data, and every range is then taken on the
rotated model. A tied head is untied first (config.json then says tie_word_embeddings: false).
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from qfx.passes.annotate import LINEAR, linear_nodes
from qfx.passes.base import Pass, PassContext, PassResult
from qfx.passes.dataflow import IGNORED_OPS, FoldGroup, aten, concrete_values, find_fold_groups, get_tensor, producers
from qfx.passes.fold import fuse_vector, set_tensor, shared_tensors, untie
from qfx.passes.meta import copy_meta, get_quant, module_path
from qfx.passes.residual import StreamError, find_stream
from qfx.runtime.errors import UserError
from qfx.runtime.hadamard import KINDS, NoHadamardError, Orthogonal, hadamard_factors, hadamard_transform, orthogonal
from qfx.runtime.ops import HADAMARD

_EMBEDDING = torch.ops.aten.embedding.default


class RotationError(UserError):
    """The model (or a part the spec asks to rotate) cannot be rotated exactly."""


@dataclasses.dataclass(frozen=True)
class Rotation(Pass):
    name = "rotation"
    # Annotations say which linears are quantized: only those get an online Hadamard.
    requires = frozenset({"annotated"})
    produces = frozenset({"rotated"})
    # Observers already in the graph would see the analysis run of the unrotated model and sit
    # before an online Hadamard; smoothing folded before would be fused into the linears and
    # rotated away.
    conflicts = frozenset({"observed", "smoothed", "qdq", "weights_quantized"})
    kind: str = "hadamard"  # hadamard (random signs) or random (uniformly random orthogonal)
    seed: int = 0
    residual: bool = True  # R1: rotate the residual stream (RMSNorm models only)
    heads: bool = True  # R2: also rotate each attention head between value and output projections
    online_down_proj: bool = False  # R4: an online Hadamard before the MLP's down projection

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    def run(self, gm, ctx: PassContext) -> PassResult:
        if ctx.example is None:
            raise RuntimeError("rotation needs an example input in the pass context")
        stream, untied, fused = None, [], []
        if self.residual:
            untied = _untie_embeddings(gm, ctx.root_prefix)
        inputs = {n.args[0]: n for n in reversed(linear_nodes(gm)) if get_quant(n) is not None}
        before = {}  # quantized linear -> its input's per-channel max |x|, for the report's picture

        def record_input(node, value):
            if node in inputs:
                before[inputs[node]] = _channel_max(value)

        values = concrete_values(gm, ctx.example, record_input)
        if self.residual:
            vectors = {p.node for p in producers(gm) if p.kind == "vector"}
            try:
                stream = find_stream(gm, values, vectors)
            except StreamError as exc:
                raise RotationError(f"the residual stream cannot be rotated: {exc.describe(ctx.root_prefix)}",
                                    hint="set residual: false to keep only the head rotation and the online "
                                         "Hadamard, which need no stream") from None
        groups, _ = find_fold_groups(gm, ctx.example, values)
        if stream is not None:
            fused = [_fuse_norm(gm, groups, node, ctx.root_prefix) for node in stream.norm_weights]
            _rotate_stream(gm, stream, self._matrix(stream.hidden, 0, "the hidden size"))
        heads = []
        if self.heads:
            for group in groups:
                if (used := _heads_used(gm, group)) is not None:
                    block = group.block
                    r = self._matrix(block, 1, f"the head size of {_path(group.producer.node, ctx.root_prefix)}")
                    _rotate_heads(gm, group, used, r)
                    heads.append({"producer": _path(group.producer.node, ctx.root_prefix),
                                  "consumers": [_path(c, ctx.root_prefix) for c in group.consumers], "block": block})
        online = _online_hadamards(gm, values, ctx.root_prefix) if self.online_down_proj else []
        gm.recompile()
        # For the report's picture: the quantized input with the strongest outliers, after.
        shown = max(before, key=lambda n: _outlier_ratio(before[n]), default=None)
        channel_max = None if shown is None else {
            "layer": _path(shown, ctx.root_prefix), "before": before[shown].tolist(),
            "after": _input_max(gm, ctx.example, shown).tolist()}
        record = {"kind": self.kind, "seed": self.seed, "residual": stream is not None,
                  "hidden": stream.hidden if stream else None,
                  "embeddings": [str(n.args[0].target).removeprefix(ctx.root_prefix)
                                 for n in (stream.embeddings if stream else ())],
                  "writers": [_path(n, ctx.root_prefix) for n in (stream.writers if stream else ())],
                  "readers": [_path(n, ctx.root_prefix) for n in (stream.readers if stream else ())],
                  "norms_fused": fused, "untied": untied, "heads": heads, "online": online,
                  "channel_max": channel_max}  # not kept in the manifest
        return PassResult(gm, modified=bool(stream or heads or online), stats=record)

    def _matrix(self, n: int, offset: int, what: str) -> Orthogonal:
        try:
            return orthogonal(n, self.kind, self.seed + offset)
        except NoHadamardError as exc:
            raise RotationError(f"{what} is {n}: {exc}", hint="use rotation kind: random, which has every size") from None


def _channel_max(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()


class _Found(Exception):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value  # not in args: torch.fx's Interpreter rewrites those


class _InputMax(torch.fx.Interpreter):
    """Runs the graph up to `linear`, for the per-channel max |x| of its input."""

    def __init__(self, gm: torch.fx.GraphModule, linear: torch.fx.Node):
        super().__init__(gm)
        self.linear = linear

    def run_node(self, n: torch.fx.Node):
        if n is self.linear:
            raise _Found(_channel_max(self.env[n.args[0]]))
        return super().run_node(n)


def _input_max(gm, example: tuple, linear: torch.fx.Node) -> torch.Tensor:
    try:
        with torch.no_grad():
            _InputMax(gm, linear).run(*example)
    except _Found as found:
        return found.value
    raise AssertionError(f"{linear.name} is not in the graph")


def _outlier_ratio(channel_max: torch.Tensor) -> float:
    return float(channel_max.max() / channel_max.median().clamp(min=1e-30))


def _path(node: torch.fx.Node, prefix: str) -> str:
    return module_path(node, prefix) or node.name


def _untie_embeddings(gm: torch.fx.GraphModule, prefix: str) -> list[str]:
    """Untie every embedding table that other ops also read (the tied head)."""
    untied = []
    for node in list(gm.graph.nodes):
        readers = [u for u in node.users if u.target not in IGNORED_OPS]
        if node.op == "get_attr" and any(u.target is _EMBEDDING for u in readers) and len(readers) > 1:
            try:
                untied += [t.removeprefix(prefix) for t in untie(gm, node, prefix)]
            except ValueError as exc:
                raise RotationError(str(exc)) from None
    gm.recompile()
    return untied


def _fuse_norm(gm, groups: list[FoldGroup], vector: torch.fx.Node, prefix: str) -> str:
    (group,) = [g for g in groups if g.producer.node is vector] or [None]
    name = group.producer.params[0].removeprefix(prefix) if group else vector.name
    if group is None or not bool(group.foldable.all()):
        raise RotationError(f"the norm weight {name} cannot be fused into the linears that read it: its "
                            "output also reaches other ops")
    if shared := shared_tensors(gm, group):
        raise RotationError(f"fusing the norm weight {name} would edit {', '.join(shared)}, which other ops "
                            "also read")
    fuse_vector(gm, group)
    return name


def _edit(gm, node: torch.fx.Node, index: int, fn) -> None:
    """Replace a tensor by fn(tensor), computed in its own precision but at least float32: a
    rotation's sums of ±x/sqrt(n) then round about as the model's own float32 GEMMs do
    (2.4e-7 relative, measured), at half float64's cost on the largest tensors (the embedding)."""
    target = node.args[index].target
    w = get_tensor(gm, target)
    set_tensor(gm, target, fn(w.to(torch.promote_types(w.dtype, torch.float32))))


def _rotate_stream(gm, stream, q: Orthogonal) -> None:
    edited = [n.args[0] for n in stream.embeddings] + [n.args[1] for n in (*stream.writers, *stream.readers)]
    edited += [n.args[2] for n in stream.writers if len(n.args) > 2 and n.args[2] is not None]
    for attr in dict.fromkeys(edited):
        # One reader each: a tensor read twice would be rotated twice (a linear that both reads
        # and writes the stream is one reader, edited on both sides).
        if len([u for u in attr.users if u.target not in IGNORED_OPS]) != 1:
            raise RotationError(f"{attr.target} is read by more than one op (shared or tied weights), so rotating "
                                "it for one of them would change the others")
    for node in stream.embeddings:
        _edit(gm, node, 0, q.apply)
    for node in stream.writers:
        _edit(gm, node, 1, lambda w: q.apply(w.T).T)  # Qᵀ W
        if len(node.args) > 2 and node.args[2] is not None:
            _edit(gm, node, 2, q.apply)
    for node in stream.readers:
        _edit(gm, node, 1, q.apply)


def _online_hadamards(gm, values: dict, prefix: str) -> list[str]:
    """Put qfx::hadamard before each quantized linear whose input is made from other linears'
    outputs by elementwise ops alone, and rotate its weight's columns to match; returns their
    paths."""
    done = []
    for linear in linear_nodes(gm):
        if get_quant(linear) is None or not _elementwise_of_linears(linear.args[0], values):
            continue
        n = int(get_tensor(gm, linear.args[1].target).shape[1])
        try:
            hadamard_factors(n)
        except NoHadamardError as exc:
            raise RotationError(f"the input of {_path(linear, prefix)} has {n} channels: {exc}",
                                hint="leave out online_down_proj for this model") from None
        source = linear.args[0]
        with gm.graph.inserting_before(linear):
            node = gm.graph.call_function(HADAMARD, (source,))
        copy_meta(node, linear, "online_rotation", source.meta.get("val"))
        linear.replace_input_with(source, node)
        _edit(gm, linear, 1, hadamard_transform)  # W · H / sqrt(n), as the op computes it
        done.append(_path(linear, prefix))
    return done


# Ops that pass values through unchanged or change only their dtype, and ops that take a part
# of the last dimension (a fused gate_up projection's halves).
_PASS_THROUGH = {aten.to.dtype, aten.type_as.default, aten._to_copy.default, aten.dropout.default,
                 aten.clone.default, aten.contiguous.default}
_LAST_DIM_PARTS = {aten.chunk.default: 2, aten.split.Tensor: 2, aten.split_with_sizes.default: 2,
                   aten.slice.Tensor: 1}


def _elementwise_of_linears(node: torch.fx.Node, values: dict) -> bool:
    """Whether `node` is computed from linears' outputs (and constants) by elementwise ops and
    parts of the last dimension only: no norm, attention or other reduction over channels."""
    stack, seen, linears = [node], set(), 0
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            continue
        if n.op != "call_function":
            return False
        if n.target is LINEAR:
            linears += 1
            continue
        if n.target is operator.getitem or n.target in _PASS_THROUGH or _pointwise(n.target):
            pass
        elif n.target in _LAST_DIM_PARTS:
            ndim = getattr(values.get(n.args[0]), "ndim", None)
            dim = n.args[_LAST_DIM_PARTS[n.target]] if len(n.args) > _LAST_DIM_PARTS[n.target] else 0
            if ndim is None or dim % ndim != ndim - 1:
                return False
        else:
            return False
        stack.extend(n.all_input_nodes)
    return linears > 0


def _pointwise(target) -> bool:
    return torch.Tag.pointwise in getattr(target, "tags", ())


def _heads_used(gm, group: FoldGroup) -> torch.Tensor | None:
    """Which of the producer's heads (blocks of group.block rows) reach the consumers, when
    every channel that does passes only through attention and each consumer reads whole,
    aligned heads of it in order; else None."""
    d = group.block
    if group.producer.kind != "linear" or d is None or shared_tensors(gm, group):
        return None
    used = torch.zeros(group.producer.channels, dtype=torch.bool)
    for m in group.maps:
        if m.numel() % d:
            return None
        for seg in m.reshape(-1, d):
            if bool((seg < 0).all()):
                continue
            if int(seg[0]) % d or not torch.equal(seg, seg[0] + torch.arange(d)):
                return None
            used[seg] = True
    blocks = used.reshape(-1, d) if group.producer.channels % d == 0 else None
    if blocks is None or not bool(blocks.all(dim=1).eq(blocks.any(dim=1)).all()):
        return None  # a head partly used
    return blocks.any(dim=1) if bool(used.any()) and bool(group.rotatable[used].all()) else None


def _rotate_heads(gm, group: FoldGroup, heads: torch.Tensor, rotation: Orthogonal) -> None:
    d, matrix = group.block, rotation.matrix()

    def rows(w: torch.Tensor) -> torch.Tensor:
        w, r = w.clone(), matrix.to(w.dtype)
        for h in torch.nonzero(heads).flatten().tolist():
            w[h * d:(h + 1) * d] = r.T @ w[h * d:(h + 1) * d]
        return w

    _edit(gm, group.producer.node, 1, rows)
    if len(group.producer.params) > 1:
        _edit(gm, group.producer.node, 2, rows)
    for consumer, m in zip(group.consumers, group.maps):
        def columns(w: torch.Tensor, m=m) -> torch.Tensor:
            w, r = w.clone(), matrix.to(w.dtype)
            for start in range(0, m.numel(), d):
                if int(m[start]) >= 0:
                    w[:, start:start + d] = w[:, start:start + d] @ r
            return w

        _edit(gm, consumer, 1, columns)
