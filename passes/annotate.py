"""annotate: mark each linear node the plan quantizes with its resolved formats (meta only)."""
from __future__ import annotations

import dataclasses

import torch

from qfx.passes.base import Pass, PassContext, PassResult
from qfx.passes.meta import module_path, set_quant
from qfx.runtime.errors import PassFailure

LINEAR = torch.ops.aten.linear.default


def linear_nodes(gm: torch.fx.GraphModule):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is LINEAR]


@dataclasses.dataclass(frozen=True)
class Annotate(Pass):
    name = "annotate"
    produces = frozenset({"annotated"})

    def run(self, gm, ctx: PassContext) -> PassResult:
        seen: dict[str, str] = {}
        for node in linear_nodes(gm):
            path = module_path(node, ctx.root_prefix)
            plan = ctx.plan.get(path)
            if plan is None:
                continue
            if path in seen:
                raise PassFailure(f"module {path} is called twice (nodes {seen[path]} and "
                                  f"{node.name}); qfx quantizes a module called once",
                                  hint="exclude it in the spec's `exclude` list")
            seen[path] = node.name
            set_quant(node, plan)
        missing = sorted(set(ctx.plan) - set(seen))
        if missing:
            raise PassFailure(f"planned layers not found as linear nodes: {missing[:5]}")
        return PassResult(gm, modified=bool(seen), stats={"annotated": len(seen)})
