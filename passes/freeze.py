"""freeze: the QDQ graph becomes inference-only: no observers and no dead nodes.

Tensors the graph does not read stay: the artifact carries every tensor of the model (a
checkpoint loader expects them all, e.g. a BERT pooler that the captured output skips)."""
from __future__ import annotations

import dataclasses

from qfx.passes.base import Pass, PassContext, PassResult
from qfx.passes.observe import OBSERVER_PREFIX
from qfx.runtime.errors import PassFailure


@dataclasses.dataclass(frozen=True)
class Freeze(Pass):
    name = "freeze"
    requires = frozenset({"qdq"})
    produces = frozenset({"frozen"})

    def run(self, gm, ctx: PassContext) -> PassResult:
        left = [n for n, _ in gm.named_children() if n.startswith(OBSERVER_PREFIX)]
        if left:
            raise PassFailure(f"observers left after convert: {left}")
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        removed = before - len(gm.graph.nodes)
        return PassResult(gm, modified=removed > 0, stats={"nodes_removed": removed})
