"""An eager linear layer that runs a qfx artifact's layer with the reference ops.

It issues exactly the op sequence the compiler's convert pass writes into the QDQ graph,
so a reloaded artifact and the compiled graph give bit-identical outputs.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

from qfx.runtime import ops
from qfx.runtime.formats import LayerFormat, TensorFormat
from qfx.runtime.numerics import weight_axis


def qdq_activation(x: torch.Tensor, fmt: TensorFormat, scale: torch.Tensor | None,
                   zero_point: torch.Tensor | None) -> torch.Tensor:
    if fmt.dynamic and fmt.outlier_threshold:  # LLM.int8: outlier columns pass in float
        codes, token_scale, outliers = ops.quantize_per_token_outliers(x, fmt.dtype.value, fmt.outlier_threshold)
        return torch.where(outliers, x, ops.dequantize(codes, token_scale, None, fmt.dtype.value, -1, 0, x.dtype))
    if fmt.dynamic and fmt.group_size:  # MX: one scale per block of the last axis
        codes, block_scale = ops.quantize_blocks(x, fmt.dtype.value, fmt.group_size)
        return ops.dequantize(codes, block_scale, None, fmt.dtype.value, -1, fmt.group_size, x.dtype)
    if fmt.dynamic:
        codes, token_scale = ops.quantize_per_token(x, fmt.dtype.value)
        return ops.dequantize(codes, token_scale, None, fmt.dtype.value, -1, 0, x.dtype)
    codes = ops.quantize(x, scale, zero_point, fmt.dtype.value, 0, 0)
    return ops.dequantize(codes, scale, zero_point, fmt.dtype.value, 0, 0, x.dtype)


# The transforms a layer may apply to its input before quantizing it, in the order the manifest's
# `input_transforms` lists them: an online Hadamard (a rotation pass's R4), and a multiply by the
# layer's stored `pre_quant_scale` vector (SmoothQuant's factors where no producer absorbs them).
# config.json lists the layers with each under ONLINE_CONFIG_KEY.
HADAMARD_TRANSFORM = "hadamard"
SCALE_TRANSFORM = "scale"
INPUT_TRANSFORMS = (HADAMARD_TRANSFORM, SCALE_TRANSFORM)
PRE_QUANT_SCALE = "pre_quant_scale"
ONLINE_CONFIG_KEY = "qfx_online_transforms"

SAME_VALUE_TOLERANCE = 1e-6  # of the tensor's largest magnitude: far below any step between codes
_FORCED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("qfx_forced_activations", default=None)


@contextlib.contextmanager
def forced_activations(values: dict[tuple[str, str], torch.Tensor]):
    """Inside, each QuantLinear takes its quantized activation from `values[(layer path, role)]`
    (role "input" or "output") instead of its own, and counts how many elements of its own
    differ. Yields that count per key. `qfx verify` uses this to compare a second runtime's
    model layer by layer: a code that flips on a float rounding difference then cannot
    cascade through later layers."""
    differing: dict[tuple[str, str], int] = {}
    token = _FORCED.set({"values": values, "differing": differing})
    try:
        yield differing
    finally:
        _FORCED.reset(token)


def _maybe_forced(x: torch.Tensor, path: str, role: str) -> torch.Tensor:
    forced = _FORCED.get()
    if forced is None or (path, role) not in forced["values"]:
        return x
    value = forced["values"][(path, role)].to(x.dtype)
    if value.shape != x.shape:
        forced["differing"][(path, role)] = x.numel()
        return value
    # A flipped code moves a value by a quantization step; a per-token scale one float ulp apart
    # moves every value of its token by an ulp, which is not a difference of codes.
    bound = SAME_VALUE_TOLERANCE * float(x.abs().max())
    forced["differing"][(path, role)] = int(((value - x).abs() > bound).sum())
    return value


class QuantLinear(torch.nn.Module):
    """Holds codes and qparams as buffers named as in the compiled graph."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: LayerFormat,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.dtype = in_features, out_features, fmt, dtype
        self.path = ""  # the layer's module path in the model (set by the loader)
        self.input_transforms: tuple[str, ...] = ()  # of INPUT_TRANSFORMS, in order (set by the loader)
        if fmt.weight is None:
            self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                             requires_grad=False)
        self.bias = (torch.nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.fmt
        for transform in self.input_transforms:
            x = ops.hadamard(x) if transform == HADAMARD_TRANSFORM else x * getattr(self, PRE_QUANT_SCALE)
        if fmt.input is not None:
            x = _maybe_forced(qdq_activation(x, fmt.input, getattr(self, "input_scale", None),
                                             getattr(self, "input_zero_point", None)), self.path, "input")
        weight = self.weight
        if fmt.weight is not None:
            weight = ops.dequantize(weight, self.weight_scale, getattr(self, "weight_zero_point", None),
                                    fmt.weight.dtype.value, weight_axis(fmt.weight),
                                    fmt.weight.group_size, x.dtype)
        y = F.linear(x, weight, self.bias)
        if fmt.output is not None:
            y = _maybe_forced(qdq_activation(y, fmt.output, getattr(self, "output_scale", None),
                                             getattr(self, "output_zero_point", None)), self.path, "output")
        return y

    def extra_repr(self) -> str:
        parts = ", ".join(f"{k}={v.describe()}" for k, v in self.fmt.tensors.items())
        transform = f", input_transforms={','.join(self.input_transforms)}" if self.input_transforms else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {parts}{transform}"
