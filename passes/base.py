"""What a pass is, and what it is handed."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.fx

from qfx.runtime.formats import LayerQuant


@dataclasses.dataclass
class PassContext:
    """State shared by the passes of one build.

    plan: module path -> LayerQuant, resolved from the spec before the graph is touched.
    root_prefix: the module-path prefix of the captured wrapper (e.g. "hf.").
    run_data: runs the calibration data through the part of a graph that feeds its recorders
        (observers, or a pass's statistics modules); the `calibrate` phase and passes that
        need data both use it, so data reaches passes through the context.
    calibration_batches: the calibration data as batches of graph inputs, for passes that run
        the graph their own way (GPTQ's sequential engine).
    example: a small input of the captured graph, for analyses that need concrete shapes.
    facts: what the passes so far have established (checked against `requires`).
    float_weights: module path -> the float weight `convert` quantized (after any fold), the
        reference of the artifact's weight SQNR.
    quantized_weights: module path -> (codes, scale, zero point) a weight algorithm chose for
        that layer, which convert stores instead of rounding the float weight to nearest.
    """

    plan: dict[str, LayerQuant]
    root_prefix: str = ""
    run_data: Callable[[torch.fx.GraphModule], dict] | None = None
    calibration_batches: Callable[[], Iterable[tuple]] | None = None
    example: tuple | None = None
    facts: set[str] = dataclasses.field(default_factory=set)
    stats: dict[str, dict] = dataclasses.field(default_factory=dict)
    float_weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    quantized_weights: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = \
        dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PassResult:
    gm: torch.fx.GraphModule
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Pass:
    """A graph-to-graph transform. Options are the dataclass fields of a subclass."""

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset()
    produces: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()  # facts that stop holding once it has run
    conflicts: ClassVar[frozenset[str]] = frozenset()  # facts under which it must not run

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
