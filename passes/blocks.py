"""The repeated blocks of a captured model (a decoder's layers, an encoder's), from its module stack.

A block is a module that is an element of a container of modules (its path ends in an index,
as `nn.ModuleList` children's do) and holds at least one linear; nested containers (the
experts of a mixture) belong to the outermost block. No architecture name is consulted, so
`model.layers.3`, `encoder.layer.3` and `transformer.h.3` are found alike.
"""
from __future__ import annotations

import torch.fx

from qfx.passes.annotate import linear_nodes


def block_of(node: torch.fx.Node, root_prefix: str = "") -> str | None:
    """The path of the outermost block that issued `node`, or None outside every block."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if path.rpartition(".")[2].isdigit():
            return path.removeprefix(root_prefix)
    return None


def find_blocks(gm: torch.fx.GraphModule, root_prefix: str = "") -> list[str]:
    """The blocks that hold linears, in the order the graph runs them."""
    return list(dict.fromkeys(b for b in (block_of(n, root_prefix) for n in linear_nodes(gm)) if b is not None))
