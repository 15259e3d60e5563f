"""The Triton kernels against the fused ops' CPU implementations, over generated shapes. Without a
GPU they run in Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are compiled),
where int8 `tl.dot` is exact as on the GPU."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qfx.runtime import numerics  # noqa: E402
from qfx.runtime.formats import QDType  # noqa: E402
from qfx.runtime.layouts.quark import pack_quark_int4  # noqa: E402
from qfx.runtime.ops import HADAMARD  # noqa: E402
from qfx.runtime.qlinear import QLINEAR_FP8, QLINEAR_W4A16, QLINEAR_W8A8  # noqa: E402
from qfx.runtime.triton_kernels import fp8_linear, quantize_rows, w4a16_linear, w8a8_linear  # noqa: E402
from qfx.runtime.triton_kernels import hadamard as triton_hadamard  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton 3.9's interpreter multiplies bfloat16 operands as their raw 16-bit patterns (create_dot
# hands numpy the uint16 storage), so bfloat16 activations are checked on a GPU only.
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Small tiles: the interpreter's time grows with the tile count, not with the tile's size.
TILES = st.sampled_from([{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32},
                         {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64}])


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 300), n=st.sampled_from([16, 48, 80, 128]), k=st.sampled_from([16, 64, 96, 160]),
       scheme=st.sampled_from(["int8 static", "uint8 static", "int8 per token"]), bias=st.booleans(),
       per_channel=st.booleans(), tile=TILES, seed=st.integers(0, 2**16))
def test_w8a8_kernel_equals_the_cpu_op(m, n, k, scheme, bias, per_channel, tile, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 3
    weight = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(n if per_channel else (), generator=gen) * 0.01 + 1e-4
    b = torch.randn(n, generator=gen) if bias else None
    qdtype, scale, zero_point = "int8", None, None
    if scheme != "int8 per token":
        qdtype, scale = scheme.split()[0], torch.tensor(0.05)
        zero_point = torch.tensor(120, dtype=torch.uint8) if qdtype == "uint8" else None
    args = (x, weight, w_scale, b, scale, zero_point)
    reference = QLINEAR_W8A8(*args, qdtype)
    on_device = [None if t is None else t.to(DEVICE) for t in args]
    got = w8a8_linear(*on_device, QDType(qdtype), tile).cpu()
    # The integer sums are exact on both; the kernel applies the scales in float32, the CPU op in
    # float64 (a few float32 ulps apart).
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6 * float(reference.abs().max()))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 300), n=st.sampled_from([16, 48, 80, 128]), groups=st.integers(1, 3),
       group_size=st.sampled_from([16, 32, 64]), qdtype=st.sampled_from(["int4", "uint4"]),
       zero_point=st.booleans(), bias=st.booleans(), dtype=st.sampled_from(FLOAT_DTYPES),
       tile=TILES, split_k=st.sampled_from([None, 2, 3]), seed=st.integers(0, 2**16))
def test_w4a16_kernel_equals_the_cpu_op(m, n, groups, group_size, qdtype, zero_point, bias, dtype, tile, split_k,
                                        seed):
    """Codes packed by the artifact's own packer (pack_quark_int4), so the kernel's nibble order is
    the safetensors layout's; K split over programs too (as at decode), also where a split gets
    no block."""
    gen = torch.Generator().manual_seed(seed)
    k = groups * group_size
    q = QDType(qdtype)
    codes = torch.randint(int(q.qmin), int(q.qmax) + 1, (n, k), generator=gen).to(q.storage)
    scale = torch.rand(n, groups, generator=gen) * 0.02 + 1e-3
    zeros = torch.randint(int(q.qmin), int(q.qmax) + 1, (n, groups), generator=gen).to(q.storage)
    packed, scale_t, zeros_packed = pack_quark_int4(codes, scale, zeros)
    x = (torch.randn(m, k, generator=gen)).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    args = (x, packed, scale_t, zeros_packed if zero_point else None, b)
    reference = QLINEAR_W4A16(*args, qdtype, group_size)
    on_device = [None if t is None else t.to(DEVICE) for t in args]
    got = w4a16_linear(*on_device, q, group_size, {**tile, "SPLIT_K": split_k}).cpu()
    # float32: same products, another summation order; 16-bit: the same 16-bit operands, float32
    # sums vs CPU's own, rounded to 16 bits
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.float(), reference.float(), rtol=tolerance,
                               atol=tolerance * float(reference.float().abs().max()))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), k=st.sampled_from([16, 100, 1500]),
       scheme=st.sampled_from(["int8 static", "uint8 static", "int8 per token", "fp8_e4m3fn static",
                               "fp8_e4m3fnuz static", "fp8_e4m3fn per token", "fp8_e4m3fnuz per token"]),
       magnitude=st.sampled_from([1e-3, 1.0, 300.0]), zero_row=st.booleans(), seed=st.integers(0, 2**16))
def test_quantize_prologue_gives_the_reference_codes(m, k, scheme, magnitude, zero_row, seed):
    """The kernels' activation prologue against qfx.runtime.numerics, code for code: rounding ties,
    saturation (magnitude 300 overflows a scale of 1/16), zero rows (the smallest scale)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * magnitude
    x[0, :3] = torch.tensor([0.5, -1.5, 2.5]) / 16  # exact ties at the static scale 1/16
    x[0, 3:6] = torch.tensor([-1e-9, -0.0, 0.0])  # zeros of both signs (FP8 keeps the sign: -0 is 0x80)
    if zero_row:
        x[-1] = 0
    name, kind = scheme.split(" ", 1)
    q = QDType(name)
    if kind == "static":
        scale = torch.tensor(1 / 16)
        zero_point = torch.tensor(120, dtype=torch.uint8) if q is QDType.uint8 else None
        expected, expected_scale = numerics.quantize(x, scale, zero_point, q), scale
    else:
        scale, zero_point = None, None
        expected, expected_scale = numerics.quantize_per_token(x, q)
    shift = 128 if q is QDType.uint8 else 0
    on_device = [None if t is None else t.to(DEVICE) for t in (x, scale, zero_point)]
    codes, got_scale = quantize_rows(*on_device, q, shift)
    if q.is_float:
        assert torch.equal(codes.cpu().view(torch.uint8), expected.view(torch.uint8))
    else:
        assert torch.equal(codes.cpu().to(torch.int16) + shift, expected.to(torch.int16))
    assert torch.equal(got_scale.cpu().reshape(-1), expected_scale.float().reshape(-1))


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 300), n=st.sampled_from([16, 48, 80, 128]), k=st.sampled_from([16, 64, 96, 160]),
       qdtype=st.sampled_from(["fp8_e4m3fn", "fp8_e4m3fnuz"]), per_token=st.booleans(), per_channel=st.booleans(),
       bias=st.booleans(), native=st.sampled_from([torch.float8_e4m3fn, torch.float8_e4m3fnuz]), tile=TILES,
       seed=st.integers(0, 2**16))
def test_fp8_kernel_equals_the_cpu_op(m, n, k, qdtype, per_token, per_channel, bias, native, tile, seed):
    """Both FP8 kinds, each read as either kind of matrix unit (MI300 takes E4M3FNUZ, the others
    E4M3FN): the same bits at a doubled or halved scale."""
    gen = torch.Generator().manual_seed(seed)
    q = QDType(qdtype)
    x = torch.randn(m, k, generator=gen) * 3
    x[0, 0] = -1e-9  # quantizes to -0, E4M3FN's 0x80: E4M3FNUZ's NaN unless the kernel clears it
    weight = (torch.randn(n, k, generator=gen) * q.qmax / 3).clamp(-q.qmax, q.qmax).to(q.storage)
    w_scale = torch.rand(n if per_channel else (), generator=gen) * 0.01 + 1e-4
    b = torch.randn(n, generator=gen) if bias else None
    scale = None if per_token else torch.tensor(0.05)
    args = (x, weight, w_scale, b, scale)
    reference = QLINEAR_FP8(*args, qdtype)
    on_device = [None if t is None else t.to(DEVICE) for t in args]
    got = fp8_linear(*on_device, q, tile, native).cpu()
    # Every product of two FP8 codes is exact in float32; the kernel scales the sum of code
    # products, the CPU op sums products of dequantized values: float32 rounding apart.
    assert not got.isnan().any()
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_gpu_bench_runs_in_one_command(tmp_path):
    """bench/kernels.py --gpu on tiny shapes (--smoke; here in the interpreter): every qfx kernel
    timed beside its vendor baseline, and a verdict per target, in JSON and Markdown."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench"
    run = subprocess.run([sys.executable, str(bench / "kernels.py"), "--gpu", "--smoke", "--out", str(tmp_path)],
                         cwd=bench, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"} if DEVICE == "cpu" else None)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "kernels_gpu.json").read_text())
    ops = result["layers"][0]["ops"]
    assert {"w8a8 gemm (qfx)", "fp8 gemm (qfx)", "w4a16 g128 (qfx)", "torch._scaled_mm", "bf16 matmul"} <= set(ops)
    assert all(row["ops"][name]["ms"] > 0 for row in result["layers"] for name in row["ops"] if "qfx" in name)
    assert set(result["targets_met"]) == set(result["targets"]) and (tmp_path / "kernels_gpu.md").exists()


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 12), n=st.sampled_from([16, 96, 128, 176, 1024, 1280]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
def test_hadamard_kernel_equals_the_cpu_op(rows, n, dtype, seed):
    """Orders with a Paley factor (96 = 12 x 8, 176 = 44 x 4, 1280 = 20 x 64) and without, so
    factors of orders below 16 and not powers of two are padded on the matrix units."""
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    reference = HADAMARD(x)
    got = triton_hadamard(x.to(DEVICE)).cpu()
    # the same factors in the same order; sums within a factor in another order, rounded to the
    # dtype after each factor on both
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), reference.float(), rtol=tolerance,
                               atol=tolerance * float(reference.float().abs().max()))
