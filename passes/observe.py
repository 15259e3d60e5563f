"""observe: put an observer on every static activation the annotations quantize.

Inputs get one in front of the linear, outputs (the KV cache on k/v_proj) one after it.
Dynamic (per-token) activations need none.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

from qfx.passes.annotate import linear_nodes
from qfx.passes.base import Pass, PassContext, PassResult
from qfx.passes.meta import copy_meta, get_quant
from qfx.passes.observers import make_observer

OBSERVER_PREFIX = "qfx_observer_"


def observer_name(node) -> str:
    return node.target if node.op == "call_module" and node.target.startswith(OBSERVER_PREFIX) else ""


@dataclasses.dataclass(frozen=True)
class Observe(Pass):
    name = "observe"
    requires = frozenset({"annotated"})
    produces = frozenset({"observed"})
    invalidates = frozenset({"calibrated"})  # new observers have seen no data yet
    percentile: float = 99.99  # for `percentile` observers: the upper percentile of each batch
    averaging_constant: float = 0.1  # for `moving_average` observers

    def __post_init__(self):
        if not 50 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if not 0 < self.averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {self.averaging_constant}")

    def _observer(self, fmt, where):
        return make_observer(fmt, where, percentile=self.percentile,
                             averaging_constant=self.averaging_constant)

    def run(self, gm, ctx: PassContext) -> PassResult:
        replaced = remove_observers(gm)
        names = _fresh_names(gm)
        count = 0
        graph = gm.graph
        # Linears that read one tensor with one format (q/k/v, gate/up) share its observer:
        # they would all record the same range.
        shared: dict[tuple[torch.fx.Node, object], torch.fx.Node] = {}
        for node in linear_nodes(gm):
            quant = get_quant(node)
            if quant is None:
                continue
            fmt = quant.fmt
            if fmt.input is not None and not fmt.input.dynamic:
                source = node.args[0]
                obs = shared.get((source, fmt.input))
                if obs is None:
                    target = next(names)
                    gm.add_submodule(target, self._observer(fmt.input, f"{quant.module} (input)"))
                    with graph.inserting_after(source):
                        obs = graph.call_module(target, (source,))
                    copy_meta(obs, node, "observer", source.meta.get("val"))
                    shared[(source, fmt.input)] = obs
                    count += 1
                node.replace_input_with(source, obs)
            if fmt.output is not None and not fmt.output.dynamic:
                target = next(names)
                gm.add_submodule(target, self._observer(fmt.output, f"{quant.module} (output)"))
                with graph.inserting_after(node):
                    obs = graph.call_module(target, (node,))
                copy_meta(obs, node, "observer", node.meta.get("val"))
                node.replace_all_uses_with(obs, delete_user_cb=lambda user: user is not obs)
                count += 1
        gm.recompile()
        return PassResult(gm, modified=count > 0 or replaced > 0, stats={"observers": count, "replaced": replaced})


def remove_observers(gm: torch.fx.GraphModule) -> int:
    """Take out the observers an earlier `observe` inserted: whatever ran since may have
    changed the values they watch, so a second `observe` starts afresh."""
    removed = 0
    for node in list(gm.graph.nodes):
        if observer_name(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
            removed += 1
    return removed


def _fresh_names(gm: torch.fx.GraphModule):
    """Observer module names not yet taken in `gm`."""
    taken = {name for name, _ in gm.named_children()}
    return (name for name in (f"{OBSERVER_PREFIX}{i}" for i in itertools.count()) if name not in taken)


def calibration_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The part of `gm` that feeds its recorders (observers, a pass's statistics modules), sharing
    gm's modules and tensors.

    Calibration only needs the recorders to see their inputs, so whatever runs after the last
    one (typically the LM head, a fifth of a small LLM's compute) is cut, and so is whatever no
    recorder reads: a weight-only build's graph has none, and runs nothing. The cut is by
    reachability, not dead-code elimination, which keeps nodes torch calls impure (export's
    metadata asserts, attention with its dropout) and with them the whole model. The slice
    returns nothing, so each activation is freed after its last reader."""
    graph = torch.fx.Graph()
    graph.graph_copy(gm.graph, {})
    graph.output(None)
    needed: set[torch.fx.Node] = set()
    stack = [n for n in graph.nodes
             if n.op == "call_module" and getattr(gm.get_submodule(n.target), "_is_impure", False)]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    for node in reversed(list(graph.nodes)):
        if node.op not in ("output", "placeholder") and node not in needed:
            graph.erase_node(node)
    sliced = torch.fx.GraphModule(gm, graph)
    sliced.recompile()
    return sliced
