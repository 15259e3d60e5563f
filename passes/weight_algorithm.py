"""What the weight algorithms (gptq, awq, hqq) share: which layers they take, and how a layer's
choice is measured."""
from __future__ import annotations

import torch

from qfx.passes.annotate import linear_nodes
from qfx.passes.meta import get_quant


def why_rounded_to_nearest(node: torch.fx.Node, algorithm: str) -> str | None:
    """Why the weight algorithm named `algorithm` leaves this quantized linear to round-to-nearest,
    or None when it takes it."""
    quant = get_quant(node)
    weight = node.args[1]
    if quant is None or quant.fmt.weight is None:
        return "weight not quantized"
    if quant.algorithm not in (None, algorithm):
        return f"a rule chose {quant.algorithm}"
    if not quant.fmt.weight.dtype.is_integer:
        return f"{quant.fmt.weight.dtype.value} weights are rounded to nearest"
    if weight.op != "get_attr" or len(weight.users) > 1:
        return "weight computed in the graph or shared with other nodes (tied)"
    return None


def taken_and_left(gm: torch.fx.GraphModule, algorithm: str) -> tuple[list[torch.fx.Node], dict[str, str]]:
    """The linears the weight algorithm `algorithm` takes, and the quantized ones it leaves
    (module path -> why)."""
    taken, left = [], {}
    for node in linear_nodes(gm):
        why = why_rounded_to_nearest(node, algorithm)
        if why is None:
            taken.append(node)
        elif why != "weight not quantized":
            left[get_quant(node).module] = why
    return taken, left
