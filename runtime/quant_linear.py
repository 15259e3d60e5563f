"""An eager linear layer that runs a qfx artifact's layer with the reference ops.

It issues exactly the op sequence the compiler's convert pass writes into the QDQ graph,
so a reloaded artifact and the compiled graph give bit-identical outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qfx.runtime import ops
from qfx.runtime.formats import LayerFormat, TensorFormat
from qfx.runtime.numerics import weight_axis


def qdq_activation(x: torch.Tensor, fmt: TensorFormat, scale: torch.Tensor | None,
                   zero_point: torch.Tensor | None) -> torch.Tensor:
    if fmt.dynamic:
        codes, token_scale = ops.quantize_per_token(x, fmt.dtype.value)
        return ops.dequantize(codes, token_scale, None, fmt.dtype.value, -1, 0, x.dtype)
    codes = ops.quantize(x, scale, zero_point, fmt.dtype.value, 0, 0)
    return ops.dequantize(codes, scale, zero_point, fmt.dtype.value, 0, 0, x.dtype)


class QuantLinear(torch.nn.Module):
    """Holds codes and qparams as buffers named as in the compiled graph."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: LayerFormat,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.dtype = in_features, out_features, fmt, dtype
        if fmt.weight is None:
            self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                             requires_grad=False)
        self.bias = (torch.nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.fmt
        if fmt.input is not None:
            x = qdq_activation(x, fmt.input, getattr(self, "input_scale", None),
                               getattr(self, "input_zero_point", None))
        weight = self.weight
        if fmt.weight is not None:
            weight = ops.dequantize(weight, self.weight_scale, getattr(self, "weight_zero_point", None),
                                    fmt.weight.dtype.value, weight_axis(fmt.weight),
                                    fmt.weight.group_size, x.dtype)
        y = F.linear(x, weight, self.bias)
        if fmt.output is not None:
            y = qdq_activation(y, fmt.output, getattr(self, "output_scale", None),
                               getattr(self, "output_zero_point", None))
        return y

    def extra_repr(self) -> str:
        parts = ", ".join(f"{k}={v.describe()}" for k, v in self.fmt.tensors.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, {parts}"
