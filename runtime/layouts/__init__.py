"""Checkpoint layouts: how model.safetensors stores a layer's codes and qparams, and the
config.json `quantization_config` that tells a consumer how to read them.

The graph keeps one representation whatever the layout (unpacked codes in their compute dtype,
float32 scales, zero points only where asymmetric); a layout maps it to the tensors a
consumer's loader expects and back. Writing (lowering.emit), reading (runtime.loader) and the
checks in between all go through the `Layout` the manifest names, so the two directions of one
layout live in one module and cannot drift apart.
"""
from __future__ import annotations

import abc

import torch

from qfx.runtime.errors import ArtifactError
from qfx.runtime.formats import LayerFormat, LayerQuant, ScaleDType

DEFAULT_LAYOUT = "quark"
NOT_ONE_BUILD = "the checkpoint and manifest.json do not describe one build; rebuild the artifact"


class Layout(abc.ABC):
    name: str
    # The dtype the layout stores weight scales in: the compiler rounds scales to it before it
    # chooses codes, so that what the consumer reads is what qfx built.
    weight_scale_dtype: ScaleDType = ScaleDType.float32
    # Whether the checkpoint can carry a layer's input transforms (online rotation, a stored
    # pre-quant scale), which qfx.runtime runs; a layout whose consumers know nothing of them
    # cannot hold such layers.
    holds_input_transforms: bool = True
    # Whether the checkpoint can store double-quantized weight scales (their codes, block absmax
    # and offset: formats.NESTED_SCALES).
    holds_double_quant: bool = False
    # Whether the checkpoint can store OCP MX formats (codes with E8M0 block scales).
    holds_mx: bool = False

    def refusal(self, fmt: LayerFormat) -> str | None:
        """Why this layout cannot hold a layer of format `fmt`, or None: what the layout has no
        place for, then its own `format_problem`."""
        if fmt.weight is not None and fmt.weight.double_quant and not self.holds_double_quant:
            return (f"the {self.name} layout has no place for double-quantized scales; drop double_quant or "
                    "write output.layout: bitsandbytes")
        if not self.holds_mx and (mx := [f"{r} {tf.dtype.value}" for r, tf in fmt.tensors.items() if tf.dtype.is_mx]):
            return (f"the {self.name} layout has no MX formats ({', '.join(mx)}); write output.layout: quark, "
                    "which amd-quark and vLLM load")
        return self.format_problem(fmt)

    @abc.abstractmethod
    def format_problem(self, fmt: LayerFormat) -> str | None:
        """Why this layout cannot hold a layer of format `fmt` (beyond `refusal`'s checks), or None."""

    def consumer_gap(self, fmt: LayerFormat) -> str | None:
        """What of `fmt` the layout can store but its consumers do not load (qfx.runtime does), or
        None: the build says so."""
        return None

    def shape_problem(self, fmt: LayerFormat, in_features: int, out_features: int) -> str | None:
        """Why this layout cannot hold a layer of `fmt` with these features (its packing), or None."""
        return None

    def plan_problem(self, plan: dict[str, LayerQuant], linear_paths: list[str]) -> tuple[str, str] | None:
        """(layer, why) when the layers taken together do not fit the layout's one config, or None."""
        return None

    @abc.abstractmethod
    def to_artifact(self, tensors: dict[str, torch.Tensor], fmt: LayerFormat) -> dict[str, torch.Tensor]:
        """One layer's graph buffers (keys 'weight', 'weight_scale', ...) as the checkpoint stores them."""

    @abc.abstractmethod
    def from_artifact(self, tensors: dict[str, torch.Tensor], fmt: LayerFormat) -> dict[str, torch.Tensor]:
        """The inverse of `to_artifact` (tensors already checked by `check_artifact_layer`)."""

    @abc.abstractmethod
    def expected(self, fmt: LayerFormat, in_features: int, out_features: int, bias: bool,
                 float_dtype: torch.dtype, transforms: tuple[str, ...] = ()
                 ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """name -> (dtype, shape) of every tensor one layer has in the checkpoint."""

    @abc.abstractmethod
    def config(self, plan: dict[str, LayerQuant], linear_paths: list[str]) -> dict:
        """config.json's `quantization_config` for the planned layers (`linear_paths`: all linears)."""


def layouts() -> dict[str, Layout]:
    from qfx.runtime.layouts.bitsandbytes import BitsAndBytesLayout
    from qfx.runtime.layouts.compressed_tensors import CompressedTensorsLayout
    from qfx.runtime.layouts.gptq import GptqLayout
    from qfx.runtime.layouts.quark import QuarkLayout

    return {layout.name: layout for layout in (QuarkLayout(), GptqLayout("gptq"), GptqLayout("gptq_v2"),
                                               CompressedTensorsLayout(), BitsAndBytesLayout())}


def layout_named(name: str) -> Layout:
    known = layouts()
    if name not in known:
        raise ArtifactError(f"the layout {name!r} is not one this qfx knows ({', '.join(known)})",
                            hint="load it with the qfx version that built it")
    return known[name]


def check_artifact_layer(layout: Layout, tensors: dict[str, torch.Tensor], fmt: LayerFormat, in_features: int,
                         out_features: int, bias: bool, float_dtype: torch.dtype, where: str,
                         transforms: tuple[str, ...] = ()) -> None:
    """Raise ArtifactError naming the first of a layer's checkpoint tensors that is missing, extra,
    of the wrong dtype or shape for `fmt` and the layer's features, or a scale that is not finite
    and positive. Unpacking and running a layer with such tensors fails deep inside torch, or
    silently computes garbage."""
    if transforms and not layout.holds_input_transforms:
        raise ArtifactError(f"layer {where} has input transforms ({', '.join(transforms)}), which the {layout.name} "
                            "layout has no place for", hint=NOT_ONE_BUILD)
    if problem := layout.shape_problem(fmt, in_features, out_features):
        raise ArtifactError(f"layer {where} cannot be stored in the {layout.name} layout: {problem}",
                            hint=NOT_ONE_BUILD)
    expected = layout.expected(fmt, in_features, out_features, bias, float_dtype, transforms)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ArtifactError(f"layer {where} has {'no ' + ', '.join(missing) if missing else ''}"
                            f"{' and ' if missing and extra else ''}"
                            f"{'unexpected ' + ', '.join(extra) if extra else ''} for its format "
                            f"({', '.join(f'{r} {tf.describe()}' for r, tf in fmt.tensors.items())})",
                            hint=NOT_ONE_BUILD)
    for name, (dtype, shape) in expected.items():
        t = tensors[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ArtifactError(f"tensor {where}.{name} is {str(t.dtype).removeprefix('torch.')} "
                                f"{list(t.shape)}, but its format and the layer's {in_features} -> {out_features} "
                                f"features need {str(dtype).removeprefix('torch.')} {list(shape)}",
                                hint="the checkpoint was edited or belongs to another model; rebuild the artifact")
        if name.endswith(("_scale", "scales")) and t.dtype == torch.uint8:  # E8M0 exponent bytes
            if bool((t == 255).any()):
                raise ArtifactError(f"tensor {where}.{name} holds the E8M0 byte 255, which is NaN, not a scale",
                                    hint="a quantization scale divides the values; rebuild the artifact")
        elif name.endswith(("_scale", "scales")) and not bool(torch.isfinite(t).all() and (t > 0).all()):
            raise ArtifactError(f"tensor {where}.{name} holds a scale that is not finite and positive",
                                hint="a quantization scale divides the values; rebuild the artifact")
