"""The `qfx::` ops that a QDQ graph is made of: quantize / dequantize, and the online Hadamard
rotation that a rotation pass may put before a linear.

Each is a torch custom op with a fake implementation, so graphs holding them export, save and
reload; the body is the reference arithmetic of `qfx.runtime.numerics`. They mirror ONNX
QuantizeLinear / DequantizeLinear (axis, block size) so an ONNX emitter maps them one to one.
"""
from __future__ import annotations

import torch

from qfx.runtime import numerics
from qfx.runtime.formats import QDType
from qfx.runtime.hadamard import hadamard_transform


@torch.library.custom_op("qfx::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
             qdtype: str, axis: int, group_size: int) -> torch.Tensor:
    return numerics.quantize(x, scale, zero_point, QDType(qdtype), axis, group_size)


@quantize.register_fake
def _(x, scale, zero_point, qdtype, axis, group_size):
    return torch.empty_like(x, dtype=QDType(qdtype).storage)


@torch.library.custom_op("qfx::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               qdtype: str, axis: int, group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    return numerics.dequantize(codes, scale, zero_point, QDType(qdtype), axis, group_size, out_dtype)


@dequantize.register_fake
def _(codes, scale, zero_point, qdtype, axis, group_size, out_dtype):
    return torch.empty_like(codes, dtype=out_dtype)


@torch.library.custom_op("qfx::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, qdtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    return numerics.quantize_per_token(x, QDType(qdtype))


@quantize_per_token.register_fake
def _(x, qdtype):
    return (torch.empty_like(x, dtype=QDType(qdtype).storage),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


@torch.library.custom_op("qfx::quantize_blocks", mutates_args=())
def quantize_blocks(x: torch.Tensor, qdtype: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic MX quantization: codes, and one E8M0 scale per `block` elements of the last axis."""
    return numerics.quantize_blocks(x, QDType(qdtype), block)


@quantize_blocks.register_fake
def _(x, qdtype, block):
    return (torch.empty_like(x, dtype=QDType(qdtype).storage),
            x.new_empty((*x.shape[:-1], x.shape[-1] // block), dtype=torch.float32))


@torch.library.custom_op("qfx::quantize_per_token_outliers", mutates_args=())
def quantize_per_token_outliers(x: torch.Tensor, qdtype: str, threshold: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8's input: per-token codes, and the columns that stay in float (numerics)."""
    return numerics.quantize_per_token_outliers(x, QDType(qdtype), threshold)


@quantize_per_token_outliers.register_fake
def _(x, qdtype, threshold):
    return (torch.empty_like(x, dtype=QDType(qdtype).storage),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32), x.new_empty(x.shape[-1:], dtype=torch.bool))


@torch.library.custom_op("qfx::hadamard", mutates_args=())
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H / sqrt(n) over the last dimension (qfx.runtime.hadamard)."""
    return hadamard_transform(x)


@hadamard.register_fake
def _(x):
    return torch.empty_like(x)


@hadamard.register_kernel("cuda")
def _(x):
    from qfx.runtime.qlinear import triton_kernels

    return triton_kernels().hadamard(x)


QUANTIZE = torch.ops.qfx.quantize.default
DEQUANTIZE = torch.ops.qfx.dequantize.default
QUANTIZE_PER_TOKEN = torch.ops.qfx.quantize_per_token.default
QUANTIZE_BLOCKS = torch.ops.qfx.quantize_blocks.default
QUANTIZE_PER_TOKEN_OUTLIERS = torch.ops.qfx.quantize_per_token_outliers.default
HADAMARD = torch.ops.qfx.hadamard.default
