"""Apply a fold: divide a producer's channels by s, multiply its consumers' columns by s.

Tensors are replaced, never edited in place: the captured graph shares its parameters with
the user's model, so a replaced tensor leaves that model (the build's float reference)
as it was. The arithmetic runs in float64 and rounds once to the tensor's dtype.
"""
from __future__ import annotations

import torch
import torch.fx

from qfx.passes.dataflow import IGNORED_OPS, FoldGroup, Producer, aten, get_tensor
from qfx.passes.meta import copy_meta, module_path
from qfx.passes.observe import observer_name
from qfx.runtime.quant_linear import PRE_QUANT_SCALE

# A producer kind of no node of the model: the factors go into an explicit multiply.
MULTIPLY = "multiply"


def set_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Give `gm` its own tensor at `target` (a parameter stays a parameter)."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, name)
    value = value.to(old.dtype)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, name, torch.nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(name, value)


def shared_tensors(gm: torch.fx.GraphModule, group: FoldGroup) -> list[str]:
    """The tensors a fold of `group` would edit that other nodes also read (tied weights)."""
    targets = list(group.producer.params) + [c.args[1].target for c in group.consumers]
    readers = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    shared = []
    for target in targets:
        node = readers.get(target)
        if node is None or len([u for u in node.users if u.target not in IGNORED_OPS]) > 1:
            shared.append(target)
    return shared


def column_scales(group: FoldGroup, s: torch.Tensor) -> list[torch.Tensor]:
    """Per consumer, the factor of each input column: s of the channel it carries, else 1."""
    ones = torch.ones((), dtype=s.dtype)
    return [torch.where(m >= 0, s[m.clamp(min=0)], ones) for m in group.maps]


def apply_fold(gm: torch.fx.GraphModule, group: FoldGroup, s: torch.Tensor) -> None:
    """Fold per-channel scales `s` (float64, 1 where a channel is not foldable) exactly."""
    s = torch.where(group.foldable, s.double(), torch.ones((), dtype=torch.float64))
    if group.producer.kind == MULTIPLY:
        _insert_multiply(gm, group, s)
    else:
        _divide_producer(gm, group.producer, s)
    _scale_columns(gm, group, s)


def multiply_group(feed: torch.fx.Node, consumers: tuple[torch.fx.Node, ...], channels: int) -> FoldGroup:
    """The group of linears reading `feed` whose factors no producer absorbs: the fold puts an
    explicit multiply by 1/s on their input (before its observer, if it has one)."""
    identity = torch.arange(channels)
    ones = torch.ones(channels, dtype=torch.bool)
    return FoldGroup(Producer(MULTIPLY, feed, channels, ()), consumers, (identity,) * len(consumers), ones, ones, None)


def _insert_multiply(gm: torch.fx.GraphModule, group: FoldGroup, s: torch.Tensor) -> None:
    """x -> x * (1/s) before the group's consumers. Each consumer's module holds the factors as
    its `pre_quant_scale` (the artifact stores them per layer; the graph reads the first's)."""
    feed = group.producer.node
    dtype = feed.meta["val"].dtype
    owners = [c.args[1].target.rpartition(".")[0] for c in group.consumers]
    for owner in owners:
        gm.get_submodule(owner).register_buffer(PRE_QUANT_SCALE, (1 / s).to(dtype))
    observed = observer_name(feed)
    source = feed.args[0] if observed else feed
    with gm.graph.inserting_after(source):
        factors = gm.graph.get_attr(f"{owners[0]}.{PRE_QUANT_SCALE}")
    with gm.graph.inserting_after(factors):
        node = gm.graph.call_function(aten.mul.Tensor, (source, factors))
    copy_meta(node, group.consumers[0], "explicit_multiply", source.meta.get("val"))
    if observed:
        feed.replace_input_with(source, node)
    else:
        for consumer in group.consumers:
            consumer.replace_input_with(source, node)


def fuse_vector(gm: torch.fx.GraphModule, group: FoldGroup) -> None:
    """Move a norm's weight vector into the linears that read the norm: their columns take its
    values and the vector becomes all ones (exact also where a weight is 0, unlike a fold by it)."""
    v = _vector_value(gm, group.producer)
    _scale_columns(gm, group, v)
    set_tensor(gm, group.producer.params[0], _vector_inverse(group.producer.chain, torch.ones_like(v)))


def _scale_columns(gm: torch.fx.GraphModule, group: FoldGroup, s: torch.Tensor) -> None:
    """Multiply each consumer's input columns by s of the producer channel they carry."""
    for consumer, t in zip(group.consumers, column_scales(group, s)):
        target = consumer.args[1].target
        w = get_tensor(gm, target)
        narrow = t.to(w.dtype)
        if w.dtype in (torch.float32, torch.float64) and torch.equal(narrow.double(), t):
            # The factors are exact in w's dtype (a norm's weight): one rounded multiply there
            # gives the same bits as float64 and one rounding, without widening the weight.
            set_tensor(gm, target, w * narrow)
        else:
            set_tensor(gm, target, w.double() * t)


def untie(gm: torch.fx.GraphModule, node: torch.fx.Node, root_prefix: str) -> list[str]:
    """Give each reader of a tensor that several ops read (a head tied to the embedding) its
    own get_attr, under the name the tensor has in that reader's module, so that a fold can
    edit one without the other. Returns the targets now read separately.

    The tensors stay one object until a fold replaces one (set_tensor), and the artifact
    stores identical tensors once, so untying costs nothing where no fold needs it."""
    tensor = get_tensor(gm, node.target)
    names = {name for name, t in [*gm.named_parameters(remove_duplicate=False),
                                  *gm.named_buffers(remove_duplicate=False)] if t is tensor}
    readers = [u for u in node.users if u.target not in IGNORED_OPS]
    targets = []
    for user in readers:
        owner = module_path(user) or ""
        target = next((n for n in sorted(names) if n.rpartition(".")[0] == owner), None)
        if target is None:
            raise ValueError(f"{node.target} is read by {user.name} in {owner.removeprefix(root_prefix) or 'the model'}, "
                             "whose module has no name for it: the tensor cannot be untied")
        targets.append(target)
    if len(set(targets)) != len(targets):
        raise ValueError(f"{node.target} is read twice within one module: the tensor cannot be untied")
    existing = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    for user, target in zip(readers, targets):
        if target != node.target:
            own = existing.get(target)
            if own is None:
                with gm.graph.inserting_before(node):
                    own = gm.graph.get_attr(target)
                own.meta.update(node.meta)
            user.replace_input_with(node, own)
    return targets


def _divide_producer(gm, prod: Producer, s: torch.Tensor) -> None:
    if prod.kind == "linear":
        w = get_tensor(gm, prod.params[0])
        set_tensor(gm, prod.params[0], w.double() / s[:, None])
        if len(prod.params) > 1:
            set_tensor(gm, prod.params[1], get_tensor(gm, prod.params[1]).double() / s)
    elif prod.kind == "layer_norm":
        for target in prod.params:
            set_tensor(gm, target, get_tensor(gm, target).double() / s)
    else:
        set_tensor(gm, prod.params[0], _vector_inverse(prod.chain, _vector_value(gm, prod) / s))


def _scalar(step: torch.fx.Node) -> float:
    return next(a for a in step.args if not isinstance(a, torch.fx.Node))


def _vector_value(gm, prod: Producer) -> torch.Tensor:
    """The vector as the data sees it: the parameter through its chain, in float64."""
    v = get_tensor(gm, prod.params[0]).double()
    for step in prod.chain[1:]:
        if step.target is aten.add.Tensor:
            v = v + _scalar(step)
        elif step.target is aten.mul.Tensor:
            v = v * _scalar(step)
    return v


def _vector_inverse(chain: tuple[torch.fx.Node, ...], v: torch.Tensor) -> torch.Tensor:
    """The parameter that gives `v` after the chain (casts, + c, * c undone in reverse)."""
    for step in reversed(chain[1:]):
        if step.target is aten.add.Tensor:
            v = v - _scalar(step)
        elif step.target is aten.mul.Tensor:
            v = v / _scalar(step)
    return v
