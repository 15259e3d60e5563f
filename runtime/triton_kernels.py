"""Triton kernels of the fused quantized linears (qfx.runtime.qlinear), for GPUs (ROCm and
CUDA alike). On a CPU they run under TRITON_INTERPRET=1, which is how the tests check them.

w4a16: 4-bit weight codes read packed, eight per int32 as the Quark artifact stores them
([in, out / 8], nibbles in QUARK_INT4_ORDER), dequantized group by group in registers, and
multiplied with the float activations (float32 accumulation; IEEE float32 products, not TF32,
so that the result is the QDQ graph's).

w8a8: int8 activation codes x int8 weight codes, accumulated in int32 by `tl.dot` (exact), the
activations' zero point applied to the sum through the weight rows' code sums, then the scales
(per token or per tensor, per channel or per tensor) and the bias in the epilogue.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qfx.runtime import numerics
from qfx.runtime.formats import QDType


def _configs() -> list:
    """Tile shapes to autotune over; on ROCm each also sets the MI300 / MI350 knobs (a backend
    without them would reject the keywords)."""
    rocm = {"waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2} if torch.version.hip else {}
    shapes = [(16, 64, 128, 4), (32, 64, 128, 4), (64, 64, 64, 4), (64, 128, 64, 4), (128, 128, 64, 8),
              (128, 256, 64, 8)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, **rocm}, num_warps=w, num_stages=2)
            for m, n, k, w in shapes]


@triton.jit
def w8a8_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, b_sum_ptr, bias_ptr, a_offset,
                M, N, K, stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                PER_TOKEN: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_OFFSET: tl.constexpr,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c = ((a + a_offset) @ b^T) * a_scale * b_scale + bias, a [M, K] and b [N, K] int8."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0)
        acc += tl.dot(a, b)
    if HAS_OFFSET:  # (a + offset) . b = a . b + offset * sum(b)
        acc += a_offset * tl.load(b_sum_ptr + rn, mask=rn < N, other=0)[None, :]
    if PER_TOKEN:
        a_scale = tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)[:, None]
    else:
        a_scale = tl.load(a_scale_ptr)
    if PER_CHANNEL:
        b_scale = tl.load(b_scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
    else:
        b_scale = tl.load(b_scale_ptr)
    c = acc.to(tl.float32) * a_scale * b_scale
    if HAS_BIAS:
        c += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, c.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


w8a8_autotuned = triton.autotune(configs=_configs(), key=["M", "N", "K"])(w8a8_kernel)


def _launch(kernel, autotuned, m: int, n: int, args: tuple, flags: dict, config: dict | None) -> None:
    """One program per BLOCK_M x BLOCK_N tile of the [m, n] output: the autotuned kernel, or
    `kernel` with the tile shape `config` fixes."""
    if config is None:
        def grid(meta):
            return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])
        autotuned[grid](*args, **flags)
    else:
        kernel[(triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]))](*args, **flags, **config)


def w8a8_matmul(a: torch.Tensor, a_offset: int, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """((a + a_offset) @ b^T) * a_scale * b_scale + bias for int8 a [M, K] and b [N, K];
    a_scale [M] or [], b_scale [N] or []. `config` fixes the tile shape (BLOCK_M/N/K) instead
    of autotuning."""
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    a_scale, b_scale = a_scale.float().reshape(-1).contiguous(), b_scale.float().reshape(-1).contiguous()
    b_sum = b.sum(1, dtype=torch.int32) if a_offset else c  # c: an unused pointer
    args = (a, b, c, a_scale, b_scale, b_sum, c if bias is None else bias, a_offset, m, n, k,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    flags = {"PER_TOKEN": a_scale.numel() > 1, "PER_CHANNEL": b_scale.numel() > 1,
             "HAS_OFFSET": a_offset != 0, "HAS_BIAS": bias is not None}
    _launch(w8a8_kernel, w8a8_autotuned, m, n, args, flags, config)
    return c


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                input_scale: torch.Tensor | None, input_zero_point: torch.Tensor | None, qdtype: QDType,
                config: dict | None = None) -> torch.Tensor:
    """qfx::qlinear_w8a8 on the kernel: x quantized as the QDQ graph quantizes it, its codes
    moved into int8 (uint8 codes shifted by 128) with the zero point folded into one offset."""
    flat = x.reshape(-1, x.shape[-1])
    if input_scale is None:
        codes, scale = numerics.quantize_per_token(flat, qdtype)
    else:
        codes, scale = numerics.quantize(flat, input_scale, input_zero_point, qdtype), input_scale
    offset = 0 if input_zero_point is None else -int(input_zero_point)
    if qdtype is QDType.uint8:
        codes, offset = (codes.to(torch.int16) - 128).to(torch.int8), offset + 128
    out = w8a8_matmul(codes.contiguous(), offset, scale, weight, weight_scale, bias, x.dtype, config)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@triton.jit
def w4a16_kernel(a_ptr, b_ptr, s_ptr, z_ptr, bias_ptr, c_ptr, M, N, K, group_size,
                 stride_am, stride_ak, stride_bk, stride_bw, stride_sg, stride_sn, stride_zg, stride_zw,
                 stride_cm, stride_cn, SIGNED: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c = a @ ((q - z) * s) + bias; q, z: 4-bit codes packed along N in Quark's nibble order."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    word = rn // 8
    # QUARK_INT4_ORDER (0, 2, 4, 6, 1, 3, 5, 7): an even output e sits in nibble e / 2, an odd one in 4 + e // 2
    shift = 4 * ((rn % 2) * 4 + (rn % 8) // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        kn_mask = (kk[:, None] < K) & (rn[None, :] < N)
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        q = (tl.load(b_ptr + kk[:, None] * stride_bk + word[None, :] * stride_bw, mask=kn_mask, other=0)
             >> shift[None, :]) & 0xF
        if SIGNED:
            q = (q ^ 8) - 8
        g = kk // group_size
        scale = tl.load(s_ptr + g[:, None] * stride_sg + rn[None, :] * stride_sn, mask=kn_mask, other=0.0)
        if HAS_ZP:
            z = (tl.load(z_ptr + g[:, None] * stride_zg + word[None, :] * stride_zw, mask=kn_mask, other=0)
                 >> shift[None, :]) & 0xF
            if SIGNED:
                z = (z ^ 8) - 8
            q = q - z
        w = (q.to(tl.float32) * scale.to(tl.float32)).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


w4a16_autotuned = triton.autotune(configs=_configs(), key=["M", "N", "K"])(w4a16_kernel)


def w4a16_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 weight_zero_point: torch.Tensor | None, bias: torch.Tensor | None, qdtype: QDType,
                 group_size: int, config: dict | None = None) -> torch.Tensor:
    """qfx::qlinear_w4a16 on the kernel. `config` fixes the tile shape instead of autotuning."""
    a = x.reshape(-1, x.shape[-1])
    m, k = a.shape
    n = weight_scale.shape[1]
    c = torch.empty((m, n), dtype=x.dtype, device=x.device)
    z = weight if weight_zero_point is None else weight_zero_point  # unused pointer when None
    args = (a, weight, weight_scale, z, c if bias is None else bias, c, m, n, k, group_size,
            a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), weight_scale.stride(0),
            weight_scale.stride(1), z.stride(0), z.stride(1), c.stride(0), c.stride(1))
    flags = {"SIGNED": qdtype.is_signed, "HAS_ZP": weight_zero_point is not None, "HAS_BIAS": bias is not None}
    _launch(w4a16_kernel, w4a16_autotuned, m, n, args, flags, config)
    return c.reshape(*x.shape[:-1], n)
