"""Run a graph node by node over all calibration batches, handing a weight algorithm each
chosen linear's inputs (every batch) before the linear runs.

Each node runs once per batch, in graph order, and each value is freed after its last reader.
The stretch between two chosen linears runs batch by batch, so memory holds every batch's copy
only of the values that cross a chosen linear (samples x seq x hidden each: the residual
stream, the chosen inputs) plus what the algorithm keeps, and time is one forward pass over the
data: linear in depth, where re-running the graph up to each layer would be quadratic. A layer's
weight is needed only while its own node runs, the door to streaming models larger than memory.

With `sequential`, the weight the algorithm returns is the one the linear runs with, so later
layers see the quantized model's activations (what they will see at inference); without it,
they see the float model's. Observers record only when asked to (see run_sequential).
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

from qfx.passes.blocks import block_of, find_blocks
from qfx.passes.meta import IDENTITY_ROLES, get_role
from qfx.runtime.memory import release_memory

# (linear node, its input in every batch) -> the weight the linear runs with from now on.
WeightAlgorithm = Callable[[torch.fx.Node, list[torch.Tensor]], torch.Tensor]


def run_sequential(gm: torch.fx.GraphModule, batches: list[tuple], linears: list[torch.fx.Node],
                   algorithm: WeightAlgorithm, *, sequential: bool = True, calibrate: bool = False,
                   root_prefix: str = "", desc: str = "quantizing weights") -> None:
    """With `calibrate`, observers record what they see, so this one pass over the data is also
    the calibration (of the quantized model's activations, when `sequential`)."""
    from tqdm import tqdm

    order = list(gm.graph.nodes)
    recorders = {n for n in order if calibrate and get_role(n) == "observer"}
    needed = [order.index(n) for n in (*linears, *recorders)]
    if not needed:
        return
    chosen = set(linears)
    stop = max(needed)  # what runs after the last chosen linear or recorder is not needed
    last_reader: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in order[:stop + 1]:
        for source in node.all_input_nodes:
            last_reader[source] = node
    freed_by: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for source, reader in last_reader.items():
        freed_by.setdefault(reader, []).append(source)

    interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)
    envs: list[dict] = [{} for _ in batches]
    position = {n: i for i, n in enumerate(n for n in order if n.op == "placeholder")}
    blocks = find_blocks(gm, root_prefix)
    bar = tqdm(total=max(len(blocks), 1), desc=desc, unit="block", disable=not sys.stderr.isatty(), leave=False)
    current_block = None
    with torch.no_grad():
        for segment in segments(order[:stop + 1], chosen):
            head = segment[0]
            if head in chosen:
                block = block_of(head, root_prefix)
                if block != current_block and current_block is not None:
                    bar.update(1)
                current_block = block
                weight = algorithm(head, [env[head.args[0]] for env in envs])
                release_memory()  # the algorithm's temporaries are as large as the layer
                if sequential:
                    for env in envs:  # the weight's get_attr has this linear as its only reader
                        env[head.args[1]] = weight
                del weight  # else it would outlive its linear until the next algorithm call
            # Batch by batch up to the next chosen linear: only the values that cross a segment
            # are held for every batch at once, not the intermediates inside it (the MLP's).
            for env, batch in zip(envs, batches):
                interpreter.env = env
                for node in segment:
                    if node.op == "placeholder":
                        env[node] = batch[position[node]]
                    elif get_role(node) in IDENTITY_ROLES and node not in recorders:
                        env[node] = env[node.args[0]]
                    else:
                        env[node] = interpreter.run_node(node)
                    for source in freed_by.get(node, ()):
                        env.pop(source, None)
    bar.update(bar.total - bar.n)
    bar.close()


def segments(nodes: list[torch.fx.Node], chosen: set[torch.fx.Node]) -> list[list[torch.fx.Node]]:
    """`nodes` (an output node ends them) cut before every chosen linear."""
    cut: list[list[torch.fx.Node]] = [[]]
    for node in nodes:
        if node.op == "output":
            break
        if node in chosen and cut[-1]:
            cut.append([])
        cut[-1].append(node)
    return [s for s in cut if s]
