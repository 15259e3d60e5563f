"""Triton kernels of the fused quantized linears (qfx.runtime.qlinear), for GPUs (ROCm and
CUDA alike). On a CPU they run under TRITON_INTERPRET=1, which is how the tests check them.

quantize_rows: the activation prologue of w8a8 and fp8, one kernel: x quantized per tensor
(static scale) or per row (dynamic, symmetric: the row's max |x| over the format's max), with
the reference arithmetic of qfx.runtime.numerics (IEEE division, round half to even), so the
codes are the QDQ graph's.

scaled_matmul (w8a8, fp8): int8 x int8 codes accumulated in int32 by `tl.dot` (exact), the
activations' zero point applied to the sum through the weight rows' code sums; or FP8 x FP8
accumulated in float32 (each product is exact in float32, the sums round). Then the scales (per
row or per tensor, per channel or per tensor) and the bias in the epilogue. FP8 codes are read
as bytes and taken as the GPU's own FP8 kind: E4M3FNUZ on MI300 (gfx942), E4M3FN elsewhere. The
two share bit patterns at half / double the value, so a code of the other kind is read as it is
and its scale doubled or halved (exact: qfx caps E4M3FNUZ codes at 224); E4M3FN's -0 (0x80) is
E4M3FNUZ's NaN, so it is read as 0.

hadamard: x @ H / sqrt(n) one Kronecker factor of H at a time (qfx.runtime.hadamard), a launch
per factor: each program multiplies one row's [order, rest] view by the factor on the matrix
units (the order padded to a power of two of at least 16 with zeros, IEEE float32 products),
rounding to x's dtype after each factor as the CPU op does.

w4a16: 4-bit weight codes read packed, eight per int32 as the Quark artifact stores them
([in, out / 8], nibbles in QUARK_INT4_ORDER), dequantized group by group in registers, and
multiplied with the float activations (float32 accumulation; IEEE float32 products, not TF32,
so that the result is the QDQ graph's).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qfx.runtime.formats import QDType
from qfx.runtime.hadamard import hadamard_factors
from qfx.runtime.numerics import MIN_SCALE

# How scaled_matmul reads its codes: as int8, or FP8 bytes as E4M3FN / E4M3FNUZ.
INT8_CODES, FN_CODES, FNUZ_CODES = 0, 1, 2
FP8_CODES = {torch.float8_e4m3fn: FN_CODES, torch.float8_e4m3fnuz: FNUZ_CODES}
# 1.5 * 2^23: adding and subtracting it rounds a float32 of magnitude below 2^22 to the nearest
# integer, ties to even, on every backend (no libdevice call).
ROUNDING_MAGIC = tl.constexpr(12582912.0)
SIGN_BIT = tl.constexpr(-2147483648)  # 0x80000000 as an int32


def _configs() -> list:
    """Tile shapes to autotune over; on ROCm each also sets the MI300 / MI350 knobs (a backend
    without them would reject the keywords)."""
    rocm = {"waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2} if torch.version.hip else {}
    shapes = [(16, 64, 128, 4), (32, 64, 128, 4), (64, 64, 64, 4), (64, 128, 64, 4), (128, 128, 64, 8),
              (128, 256, 64, 8)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, **rocm}, num_warps=w, num_stages=2)
            for m, n, k, w in shapes]


def native_fp8(device: torch.device) -> torch.dtype:
    """The FP8 kind the device's matrix units take: E4M3FNUZ on MI300 (gfx942), E4M3FN elsewhere."""
    if device.type == "cuda" and torch.version.hip and "gfx94" in torch.cuda.get_device_properties(device).gcnArchName:
        return torch.float8_e4m3fnuz
    return torch.float8_e4m3fn


def fp8_scale_factor(stored: torch.dtype, native: torch.dtype) -> float:
    """What the scale of `stored` FP8 codes is multiplied by when their bits are read as `native`."""
    if stored == native:
        return 1.0
    return 2.0 if stored == torch.float8_e4m3fn else 0.5  # FN bits read as FNUZ are worth half


@triton.jit
def _round_to_fp8(y, FP8_EMIN: tl.constexpr):
    """y rounded, ties to even, to the nearest value of an FP8 E4M3 kind (3 mantissa bits) whose
    smallest normal exponent is FP8_EMIN; the grid step of y's binade is 2^(exponent - 3). The
    magnitude is rounded and y's sign bit put back, so that a negative value that rounds to zero
    is -0, as the cast gives it."""
    bits = y.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    step = tl.maximum(exponent, FP8_EMIN) - 3
    unit = ((step + 127) << 23).to(tl.float32, bitcast=True)  # 2^step
    inverse = ((127 - step) << 23).to(tl.float32, bitcast=True)
    magnitude = ((tl.abs(y) * inverse + ROUNDING_MAGIC) - ROUNDING_MAGIC) * unit
    return (magnitude.to(tl.int32, bitcast=True) | (bits & SIGN_BIT)).to(tl.float32, bitcast=True)


@triton.jit
def quantize_rows_kernel(x_ptr, codes_ptr, scale_ptr, zero_point, shift, K, stride_xm, stride_cm, qmin, qmax,
                         DYNAMIC: tl.constexpr, INTEGER: tl.constexpr, FP8_EMIN: tl.constexpr,
                         MIN_SCALE: tl.constexpr, BLOCK_K: tl.constexpr):
    """codes[row] = quantize(x[row]) - shift, one program per row; DYNAMIC: scale[row] = max |x[row]| / qmax."""
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    if DYNAMIC:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), qmax), MIN_SCALE)
        tl.store(scale_ptr + row, scale)
    else:
        scale = tl.load(scale_ptr)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + rk < K
        y = tl.math.div_rn(tl.load(x_ptr + row * stride_xm + k0 + rk, mask=mask, other=0.0).to(tl.float32), scale)
        if INTEGER:  # round half to even, add the zero point, saturate (the bounds keep |y| below 2^22)
            y = tl.minimum(tl.maximum(y, -1024.0), 1024.0)
            y = tl.minimum(tl.maximum((y + ROUNDING_MAGIC) - ROUNDING_MAGIC + zero_point, qmin), qmax) - shift
        else:  # FP8: saturate, round to the FP8 grid here, so that the cast is exact on every backend
            y = _round_to_fp8(tl.minimum(tl.maximum(y, -qmax), qmax), FP8_EMIN)
        tl.store(codes_ptr + row * stride_cm + k0 + rk, y.to(codes_ptr.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None, qdtype: QDType,
                  shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes - shift, scale) of x [M, K] quantized as qfx.runtime.numerics quantizes it: statically
    with (scale, zero_point), or per row (symmetric) when scale is None. Integer codes minus `shift`
    are stored as int8 (uint8 codes shifted by 128 become int8), FP8 codes in their own type."""
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    codes = torch.empty((m, k), dtype=torch.int8 if not qdtype.is_float else qdtype.storage, device=x.device)
    dynamic = scale is None
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device) if dynamic else scale.float()
    zp = 0 if zero_point is None else int(zero_point)
    quantize_rows_kernel[(m,)](x, codes, scale, zp, shift, k, x.stride(0), codes.stride(0), float(qdtype.qmin),
                               float(qdtype.qmax), DYNAMIC=dynamic, INTEGER=not qdtype.is_float,
                               FP8_EMIN=qdtype.spec.min_exponent or 0, MIN_SCALE=MIN_SCALE,
                               BLOCK_K=min(1024, triton.next_power_of_2(k)))
    return codes, scale


@triton.jit
def _as_codes(v, CODES: tl.constexpr):
    """Loaded codes as tl.dot takes them: int8 as they are, FP8 bytes as the native FP8 type."""
    if CODES == 1:
        v = v.to(tl.float8e4nv, bitcast=True)
    elif CODES == 2:
        v = tl.where(v == 0x80, tl.zeros_like(v), v).to(tl.float8e4b8, bitcast=True)
    return v


@triton.jit
def scaled_matmul_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, b_sum_ptr, bias_ptr, a_offset,
                         M, N, K, stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                         CODES: tl.constexpr, PER_TOKEN: tl.constexpr, PER_CHANNEL: tl.constexpr,
                         HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c = ((a + a_offset) @ b^T) * a_scale * b_scale + bias, a [M, K] and b [N, K] codes (CODES)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if CODES == 0:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0)
        acc += tl.dot(_as_codes(a, CODES), _as_codes(b, CODES))
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


scaled_matmul_autotuned = triton.autotune(configs=_configs(), key=["M", "N", "K", "CODES"])(scaled_matmul_kernel)


def _launch(kernel, autotuned, m: int, n: int, args: tuple, flags: dict, config: dict | None, splits: int = 1
            ) -> None:
    """One program per BLOCK_M x BLOCK_N tile of the [m, n] output (times `splits` along K): the
    autotuned kernel, or `kernel` with the tile shape `config` fixes."""
    if config is None:
        def grid(meta):
            return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), splits
        autotuned[grid](*args, **flags)
    else:
        kernel[(triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]), splits)](*args, **flags,
                                                                                            **config)


def scaled_matmul(a: torch.Tensor, a_offset: int, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, codes: int = INT8_CODES,
                  config: dict | None = None) -> torch.Tensor:
    """((a + a_offset) @ b^T) * a_scale * b_scale + bias for codes a [M, K] and b [N, K]: int8, or
    FP8 bytes read as `codes` (FN_CODES, FNUZ_CODES); a_scale [M] or [], b_scale [N] or [].
    `config` fixes the tile shape (BLOCK_M/N/K) instead of autotuning."""
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if codes != INT8_CODES:  # bytes: the kernel takes them as its FP8 kind
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    a_scale, b_scale = a_scale.float().reshape(-1).contiguous(), b_scale.float().reshape(-1).contiguous()
    b_sum = b.sum(1, dtype=torch.int32) if a_offset else c  # c: an unused pointer
    args = (a, b, c, a_scale, b_scale, b_sum, c if bias is None else bias, a_offset, m, n, k,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    flags = {"CODES": codes, "PER_TOKEN": a_scale.numel() > 1, "PER_CHANNEL": b_scale.numel() > 1,
             "HAS_OFFSET": a_offset != 0, "HAS_BIAS": bias is not None}
    _launch(scaled_matmul_kernel, scaled_matmul_autotuned, m, n, args, flags, config)
    return c


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                input_scale: torch.Tensor | None, input_zero_point: torch.Tensor | None, qdtype: QDType,
                config: dict | None = None) -> torch.Tensor:
    """qfx::qlinear_w8a8 on the kernels: x quantized by the prologue, its codes moved into int8
    (uint8 codes shifted by 128) with the zero point folded into one offset."""
    flat = x.reshape(-1, x.shape[-1])
    shift = 0 if qdtype.is_signed else 128
    codes, scale = quantize_rows(flat, input_scale, input_zero_point, qdtype, shift)
    offset = shift - (0 if input_zero_point is None else int(input_zero_point))
    out = scaled_matmul(codes, offset, scale, weight, weight_scale, bias, x.dtype, INT8_CODES, config)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               input_scale: torch.Tensor | None, qdtype: QDType, config: dict | None = None,
               native: torch.dtype | None = None) -> torch.Tensor:
    """qfx::qlinear_fp8 on the kernels, the codes read as `native` FP8 (default: the device's own)."""
    native = native or native_fp8(x.device)
    flat = x.reshape(-1, x.shape[-1])
    codes, scale = quantize_rows(flat, input_scale, None, qdtype)
    a_scale = scale * fp8_scale_factor(codes.dtype, native)
    b_scale = weight_scale * fp8_scale_factor(weight.dtype, native)
    out = scaled_matmul(codes, 0, a_scale, weight, b_scale, bias, x.dtype, FP8_CODES[native], config)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@triton.jit
def w4a16_kernel(a_ptr, b_ptr, s_ptr, z_ptr, bias_ptr, c_ptr, M, N, K, group_size,
                 stride_am, stride_ak, stride_bk, stride_bw, stride_sg, stride_sn, stride_zg, stride_zw,
                 stride_cs, stride_cm, stride_cn, SIGNED: tl.constexpr, HAS_ZP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """c = a @ ((q - z) * s) + bias; q, z: 4-bit codes packed along N in Quark's nibble order.
    SPLIT_K > 1: program k sums every SPLIT_K-th K block into c[k] (float32, no bias)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    word = rn // 8
    # QUARK_INT4_ORDER (0, 2, 4, 6, 1, 3, 5, 7): an even output e sits in nibble e / 2, an odd one in 4 + e // 2
    shift = 4 * ((rn % 2) * 4 + (rn % 8) // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
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
    if HAS_BIAS and SPLIT_K == 1:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + pid_k * stride_cs + rm[:, None] * stride_cm + rn[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


w4a16_autotuned = triton.autotune(configs=_configs(), key=["M", "N", "K", "SPLIT_K"])(w4a16_kernel)
# At decode (a few rows) the output has too few tiles to keep the GPU's memory busy: K is split
# over up to MAX_SPLIT_K programs per tile, each at least SPLIT_MIN_K long, and the float32
# partial sums added after.
DECODE_ROWS, SPLIT_MIN_K, MAX_SPLIT_K = 16, 512, 16


def k_splits(m: int, k: int) -> int:
    return 1 if m > DECODE_ROWS else max(1, min(MAX_SPLIT_K, k // SPLIT_MIN_K))


def w4a16_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 weight_zero_point: torch.Tensor | None, bias: torch.Tensor | None, qdtype: QDType,
                 group_size: int, config: dict | None = None) -> torch.Tensor:
    """qfx::qlinear_w4a16 on the kernel. `config` fixes the tile shape (and may fix SPLIT_K)
    instead of autotuning."""
    a = x.reshape(-1, x.shape[-1])
    m, k = a.shape
    n = weight_scale.shape[1]
    config = None if config is None else dict(config)
    splits = config.pop("SPLIT_K", None) if config else None
    splits = splits or k_splits(m, k)
    c = torch.empty((splits, m, n), dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    z = weight if weight_zero_point is None else weight_zero_point  # unused pointer when None
    args = (a, weight, weight_scale, z, c if bias is None else bias, c, m, n, k, group_size,
            a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), weight_scale.stride(0),
            weight_scale.stride(1), z.stride(0), z.stride(1), c.stride(0), c.stride(1), c.stride(2))
    flags = {"SIGNED": qdtype.is_signed, "HAS_ZP": weight_zero_point is not None, "HAS_BIAS": bias is not None,
             "SPLIT_K": splits}
    _launch(w4a16_kernel, w4a16_autotuned, m, n, args, flags, config, splits)
    out = c[0] if splits == 1 else (c.sum(0) if bias is None else c.sum(0).add_(bias)).to(x.dtype)
    return out.reshape(*x.shape[:-1], n)


@triton.jit
def hadamard_factor_kernel(y_ptr, f_ptr, out_ptr, order, rest, ORDER_PAD: tl.constexpr, BLOCK_J: tl.constexpr):
    """out[r, i, j] = sum_p f[p, i] * y[r, p, j], y and out viewed as [rows, order, rest]."""
    r, jb = tl.program_id(0), tl.program_id(1)
    p = tl.arange(0, ORDER_PAD)
    j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    base = r.to(tl.int64) * order * rest
    mask = (p[:, None] < order) & (j[None, :] < rest)
    y = tl.load(y_ptr + base + p[:, None] * rest + j[None, :], mask=mask, other=0.0).to(tl.float32)
    f_t = tl.load(f_ptr + p[None, :] * order + p[:, None], mask=(p[:, None] < order) & (p[None, :] < order),
                  other=0.0)  # f_t[i, p] = f[p, i]
    out = tl.dot(f_t, y, input_precision="ieee")
    tl.store(out_ptr + base + p[:, None] * rest + j[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """qfx::hadamard on the kernel: x @ H / sqrt(n) over the last dimension."""
    n = x.shape[-1]
    y, rest = x.contiguous(), n
    for factor in hadamard_factors(n):
        order = factor.shape[0]
        rest //= order
        out = torch.empty_like(y)
        block_j = max(16, min(64, triton.next_power_of_2(rest)))
        grid = (y.numel() // (order * rest), triton.cdiv(rest, block_j))
        hadamard_factor_kernel[grid](y, factor.to(device=x.device, dtype=torch.float32), out, order, rest,
                                     ORDER_PAD=max(16, triton.next_power_of_2(order)), BLOCK_J=block_j)
        y = out
    return y * (1.0 / n ** 0.5)
