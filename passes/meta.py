"""The only module that reads or writes qfx's graph meta.

Keys are namespaced and values are frozen dataclasses, so a pass cannot half-update them.
"""
from __future__ import annotations

import torch.fx

from qfx.runtime.formats import LayerQuant

QUANT_KEY = "qfx.quant"
ROLE_KEY = "qfx.role"

# Roles of the nodes qfx inserts that return their input unchanged (recorders of statistics).
IDENTITY_ROLES = ("observer", "statistics")

# Meta that every node a pass creates copies from the node it stands beside.
INHERITED_KEYS = ("nn_module_stack", "stack_trace")


def get_quant(node: torch.fx.Node) -> LayerQuant | None:
    return node.meta.get(QUANT_KEY)


def set_quant(node: torch.fx.Node, value: LayerQuant) -> None:
    node.meta[QUANT_KEY] = value


def get_role(node: torch.fx.Node) -> str | None:
    return node.meta.get(ROLE_KEY)


def copy_meta(new: torch.fx.Node, source: torch.fx.Node, role: str, val=None) -> None:
    for key in INHERITED_KEYS:
        if key in source.meta:
            new.meta[key] = source.meta[key]
    new.meta[ROLE_KEY] = role
    if val is not None:
        new.meta["val"] = val


def module_path(node: torch.fx.Node, root_prefix: str = "") -> str | None:
    """The dotted path of the innermost module that issued `node`, relative to the model."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    if root_prefix and path.startswith(root_prefix):
        path = path[len(root_prefix):]
    return path


def describe_node(node: torch.fx.Node) -> str:
    """Where a node comes from, for error messages: its module and the spec rules of the
    layer it belongs to (its own, or that of the linear it feeds)."""
    parts = []
    path = module_path(node)
    if path:
        parts.append(f"in module {path}")
    quant = get_quant(node) or next((get_quant(u) for u in node.users if get_quant(u)), None)
    if quant is not None:
        parts.append(f"quantized by {', '.join(quant.rules)}")
    return ", ".join(parts)
