"""What a pass is, and what it is handed."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.fx

from qfx.runtime.formats import LayerQuant, QDType


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
    quantized_weights: module path -> the codes and qparams a weight algorithm chose for that
        layer (keep_codes / take_codes), which convert stores instead of rounding the float weight
        to nearest.
    """

    plan: dict[str, LayerQuant]
    root_prefix: str = ""
    run_data: Callable[[torch.fx.GraphModule], dict] | None = None
    calibration_batches: Callable[[], Iterable[tuple]] | None = None
    example: tuple | None = None
    facts: set[str] = dataclasses.field(default_factory=set)
    stats: dict[str, dict] = dataclasses.field(default_factory=dict)
    float_weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    quantized_weights: dict[str, HeldCodes] = dataclasses.field(default_factory=dict)

    def keep_codes(self, module: str, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   qdtype: QDType) -> None:
        self.quantized_weights[module] = HeldCodes.hold(codes, scale, zero_point, qdtype)

    def take_codes(self, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(codes, scale, zero point) kept for `module`, handed over once; None if none were kept."""
        held = self.quantized_weights.pop(module, None)
        return None if held is None else held.release()


@dataclasses.dataclass
class HeldCodes:
    """A weight algorithm's codes while they wait for convert: every layer's wait for the end of
    the algorithm's pass, so codes of four bits or fewer are held two to a byte (at int4 this
    halves the largest thing the pass accumulates)."""

    codes: torch.Tensor  # as quantize returns them, or nibbles packed low first into uint8
    shape: torch.Size
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    qdtype: QDType
    packed: bool

    @classmethod
    def hold(cls, codes, scale, zero_point, qdtype: QDType) -> HeldCodes:
        stored, packed = codes, not qdtype.is_float and qdtype.bits <= 4
        if packed:  # byte-wide temporaries only: the codes' own bits, two's complement
            nibbles = codes.reshape(-1).view(torch.uint8) & 0xF
            if nibbles.numel() % 2:
                nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
            stored = nibbles[0::2] | (nibbles[1::2] << 4)
        return cls(stored, codes.shape, scale, zero_point, qdtype, packed)

    def release(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        codes = self.codes
        if self.packed:
            if self.qdtype.storage.is_signed:  # an arithmetic shift right sign-extends each nibble
                low, high = (codes << 4).view(torch.int8) >> 4, codes.view(torch.int8) >> 4
            else:
                low, high = codes & 0xF, codes >> 4
            codes = torch.stack([low, high], dim=1).reshape(-1)[:self.shape.numel()]
            codes = codes.to(self.qdtype.storage).reshape(self.shape)
        return codes, self.scale, self.zero_point


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
