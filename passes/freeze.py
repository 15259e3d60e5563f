"""freeze: drop what the QDQ graph no longer reads, and check nothing mutable is left."""
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
        before = sum(1 for _ in gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        tensors = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers(remove_duplicate=False))
        # A name that is not read but shares storage with one that is (tied embeddings) stays:
        # the checkpoint layout needs it under its own name.
        read_storage = {tensors[n].untyped_storage().data_ptr() for n in read if n in tensors}
        dropped = 0
        for name, tensor in tensors.items():
            if name not in read and tensor.untyped_storage().data_ptr() not in read_storage:
                owner_path, _, attr = name.rpartition(".")
                owner = gm.get_submodule(owner_path)
                owner._parameters.pop(attr, None)
                owner._buffers.pop(attr, None)
                dropped += 1
        for p in gm.parameters():
            p.requires_grad_(False)
        gm.recompile()
        removed = before - sum(1 for _ in gm.graph.nodes)
        return PassResult(gm, modified=bool(removed or dropped),
                          stats={"nodes_removed": removed, "tensors_dropped": dropped})
