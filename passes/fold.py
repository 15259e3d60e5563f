"""Apply a fold: divide a producer's channels by s, multiply its consumers' columns by s.

Tensors are replaced, never edited in place: the captured graph shares its parameters with
the user's model, so a replaced tensor leaves that model (the build's float reference)
as it was. The arithmetic runs in float64 and rounds once to the tensor's dtype.
"""
from __future__ import annotations

import torch
import torch.fx

from qfx.passes.dataflow import IGNORED_OPS, FoldGroup, Producer, aten, get_tensor


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
    _divide_producer(gm, group.producer, s)
    for consumer, t in zip(group.consumers, column_scales(group, s)):
        target = consumer.args[1].target
        w = get_tensor(gm, target)
        set_tensor(gm, target, w.double() * t)


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
