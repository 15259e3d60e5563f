"""Fused-op benchmark, GPU part: the Triton kernels against the vendor GEMMs, in one process run.

    python bench/kernels.py --gpu [--check] [--peak-gbs G]

Per layer shape of Llama-3-8B and Llama-3-70B (q/o, k/v, gate/up, down) at decode (M = 1, 4, 16)
and prefill (M = 512, 4096), bf16 activations, each timed by triton.testing.do_bench (median):
- w8a8: qfx's int8 GEMM (per-token activation scales, per-channel weight scales, bf16 output)
  against `torch._int_mm` (int32 output, no scales), and the whole op (prologue + GEMM);
- fp8: qfx's FP8 GEMM (per-tensor scales) against `torch._scaled_mm`, and the whole op;
- w4a16: qfx's int4 g128 kernel against the bf16 matmul of the dequantized weight.
Each with TFLOP/s, GB/s (weights + activations + output moved once) and the share of the GPU's
peak memory bandwidth (--peak-gbs, or the table below by device name). The kernels are called
through their wrappers (qfx.runtime.triton_kernels), without the custom-op dispatch a program adds.

Targets: at prefill W8A8 >= 0.9x torch._int_mm and FP8 >= 0.9x torch._scaled_mm; on the 70B shapes at
M <= 16 W4A16 >= 3x the bf16 matmul and >= 70% of peak bandwidth (each the worst shape).
Writes bench/results/kernels_gpu.json and .md. --smoke runs tiny shapes (on CPU: in Triton's
interpreter) to check this script, with no figure worth reading.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LLAMA3 = {"Llama-3-8B": {"q_proj / o_proj": (4096, 4096), "k_proj / v_proj": (1024, 4096),
                         "gate_proj / up_proj": (14336, 4096), "down_proj": (4096, 14336)},
          "Llama-3-70B": {"q_proj / o_proj": (8192, 8192), "k_proj / v_proj": (1024, 8192),
                          "gate_proj / up_proj": (28672, 8192), "down_proj": (8192, 28672)}}  # (out, in)
DECODE_M, PREFILL_M = (1, 4, 16), (512, 4096)
SMOKE = {"tiny": {"q_proj": (128, 256), "down_proj": (64, 384)}}
SMOKE_M = (1, 17)
SMOKE_TILE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}
GROUP_SIZE = 128
# Peak memory bandwidth, GB/s, by a substring of the device name (vendors' data sheets).
PEAK_GBS = {"H200": 4800, "H100": 3350, "A100": 2039, "MI355": 8000, "MI350": 8000, "MI325": 6000, "MI300": 5300}
TARGETS = {"w8a8 >= 0.9x torch._int_mm at prefill": 0.9, "fp8 >= 0.9x torch._scaled_mm at prefill": 0.9,
           "w4a16 >= 3x bf16 matmul at M <= 16 (70B)": 3.0, "w4a16 >= 70% of peak bandwidth at M <= 16 (70B)": 70.0}


def milliseconds(fn, device: torch.device) -> float:
    """Median time of fn: triton.testing.do_bench on a GPU, wall clock otherwise (smoke runs)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _entry(ms: float, m: int, n: int, k: int, moved: int, peak_gbs: float | None) -> dict:
    gbs = moved / ms / 1e6
    entry = {"ms": round(ms, 4), "tflops": round(2 * m * n * k / ms / 1e9, 2), "gbs": round(gbs, 1)}
    if peak_gbs:
        entry["peak_bandwidth_pct"] = round(100 * gbs / peak_gbs, 1)
    return entry


def layer_case(n: int, k: int, m: int, device: torch.device, peak_gbs: float | None, tile: dict | None) -> dict:
    """Every op of one (M, N, K) on `device`: {name: {ms, tflops, gbs, ...}} or {name: {error}}. The
    qfx kernels autotune unless `tile` fixes their tile shape (the interpreter cannot autotune)."""
    from qfx.runtime import triton_kernels as tk
    from qfx.runtime.formats import QDType
    from qfx.runtime.layouts.quark import pack_int4_words

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen, device=device).to(torch.bfloat16) * 0.02
    w_codes = torch.randint(-127, 128, (n, k), generator=gen, device=device, dtype=torch.int8)
    a_codes = torch.randint(-127, 128, (m, k), generator=gen, device=device, dtype=torch.int8)
    a_scale, w_scale = torch.rand(m, generator=gen, device=device) * 1e-2, torch.rand(n, generator=gen, device=device)
    native = tk.native_fp8(device)
    fp8 = QDType.fp8_e4m3fnuz if native == torch.float8_e4m3fnuz else QDType.fp8_e4m3fn
    w_fp8, a_fp8 = (w * 1e3).clamp(-fp8.qmax, fp8.qmax).to(native), (x * 10).clamp(-fp8.qmax, fp8.qmax).to(native)
    one = torch.tensor(1.0, device=device)
    int4 = torch.randint(-8, 8, (n, k), dtype=torch.int8)  # packed on CPU, by the artifact's packer
    packed, scale_t = (pack_int4_words(int4.t().contiguous()).to(device),
                       torch.rand(k // GROUP_SIZE, n, device=device, generator=gen))
    bf16 = torch.bfloat16
    act, out = 2 * m * k, 2 * m * n  # bytes of the bf16 activations and output
    runs = {
        "bf16 matmul": (lambda: F.linear(x, w), 2 * n * k + act + out),
        "w8a8 gemm (qfx)": (lambda: tk.scaled_matmul(a_codes, 0, a_scale, w_codes, w_scale, None, bf16, tk.INT8_CODES,
                                                              tile),
                            n * k + m * k + out),
        "w8a8 op (qfx, per-token prologue)": (lambda: tk.w8a8_linear(x, w_codes, w_scale, None, None, None,
                                                                     QDType.int8, tile), n * k + act + out),
        "torch._int_mm": (lambda: torch._int_mm(a_codes, w_codes.t()), n * k + m * k + 4 * m * n),
        "fp8 gemm (qfx)": (lambda: tk.scaled_matmul(a_fp8, 0, one, w_fp8, one, None, bf16, tk.FP8_CODES[native],
                                                             tile),
                           n * k + m * k + out),
        "fp8 op (qfx, static prologue)": (lambda: tk.fp8_linear(x, w_fp8, one, None, one, fp8, tile),
                                          n * k + act + out),
        "torch._scaled_mm": (lambda: torch._scaled_mm(a_fp8, w_fp8.t(), one, one, out_dtype=bf16), n * k + m * k + out),
        "w4a16 g128 (qfx)": (lambda: tk.w4a16_linear(x, packed, scale_t.to(bf16), None, None, QDType.int4, GROUP_SIZE,
                                                            tile),
                             n * k // 2 + 2 * n * k // GROUP_SIZE + act + out),
    }
    case = {}
    for name, (fn, moved) in runs.items():
        try:
            case[name] = _entry(milliseconds(fn, device), m, n, k, moved, peak_gbs)
        except RuntimeError as exc:  # e.g. torch._int_mm refuses M <= 16 on CUDA
            if "qfx" in name and tile is not None:  # a smoke run checks our kernels
                raise
            case[name] = {"error": str(exc).splitlines()[0][:200]}
    return case


def _ratio(case: dict, baseline: str, ours: str) -> float | None:
    if "ms" not in case[baseline] or "ms" not in case[ours]:
        return None
    return round(case[baseline]["ms"] / case[ours]["ms"], 3)


def gpu_rows(device: torch.device, smoke: bool, peak_gbs: float | None) -> list[dict]:
    rows = []
    models, ms = (SMOKE, SMOKE_M) if smoke else (LLAMA3, DECODE_M + PREFILL_M)
    for model, layers in models.items():
        for layer, (n, k) in layers.items():
            for m in ms:
                case = layer_case(n, k, m, device, peak_gbs, SMOKE_TILE if smoke else None)
                row = {"model": model, "layer": layer, "m": m, "n": n, "k": k, "ops": case,
                       "w8a8_vs_int_mm": _ratio(case, "torch._int_mm", "w8a8 gemm (qfx)"),
                       "fp8_vs_scaled_mm": _ratio(case, "torch._scaled_mm", "fp8 gemm (qfx)"),
                       "w4a16_vs_bf16": _ratio(case, "bf16 matmul", "w4a16 g128 (qfx)")}
                rows.append(row)
                print(f"[bench] {model} {layer} M={m}: w8a8/int_mm {row['w8a8_vs_int_mm']}, fp8/scaled_mm "
                      f"{row['fp8_vs_scaled_mm']}, w4a16 {row['w4a16_vs_bf16']}x bf16 "
                      f"({case['w4a16 g128 (qfx)'].get('peak_bandwidth_pct', '-')}% peak)", file=sys.stderr)
    return rows


def _worst(values) -> float | None:
    values = [v for v in values if v is not None]
    return min(values) if values else None


def targets(rows: list[dict], smoke: bool) -> dict:
    """The worst shape of each target's rows, and whether it is met."""
    prefill = [r for r in rows if r["m"] > 16]
    decode_70b = [r for r in rows if r["m"] <= 16 and (smoke or r["model"] == "Llama-3-70B")]
    worst = {"w8a8 >= 0.9x torch._int_mm at prefill": _worst(r["w8a8_vs_int_mm"] for r in prefill),
             "fp8 >= 0.9x torch._scaled_mm at prefill": _worst(r["fp8_vs_scaled_mm"] for r in prefill),
             "w4a16 >= 3x bf16 matmul at M <= 16 (70B)": _worst(r["w4a16_vs_bf16"] for r in decode_70b),
             "w4a16 >= 70% of peak bandwidth at M <= 16 (70B)":
                 _worst(r["ops"]["w4a16 g128 (qfx)"].get("peak_bandwidth_pct") for r in decode_70b)}
    return {name: {"worst": value, "met": value is not None and value >= TARGETS[name]} for name, value in worst.items()}


def markdown(rows: list[dict], result: dict) -> str:
    names = list(rows[0]["ops"])
    lines = [f"{result['device']}, peak bandwidth {result['peak_gbs'] or '?'} GB/s; ms (TFLOP/s, % of peak "
             "bandwidth)", "", "| model | layer | M | " + " | ".join(names) + " | w8a8 / _int_mm | fp8 / _scaled_mm "
             "| w4a16 / bf16 |", "|---" * (len(names) + 6) + "|"]
    for r in rows:
        cells = []
        for name in names:
            e = r["ops"][name]
            cells.append("error" if "error" in e else f"{e['ms']} ({e['tflops']}, {e.get('peak_bandwidth_pct', '?')}%)")
        lines.append(f"| {r['model']} | {r['layer']} | {r['m']} | " + " | ".join(cells)
                     + f" | {r['w8a8_vs_int_mm']} | {r['fp8_vs_scaled_mm']} | {r['w4a16_vs_bf16']} |")
    lines += ["", "| target | worst shape | met |", "|---|---|---|"]
    lines += [f"| {name} | {t['worst']} | {t['met']} |" for name, t in result["targets"].items()]
    return "\n".join(lines) + "\n"


def main(check: bool, smoke: bool, peak_gbs: float | None, folder: Path) -> int:
    from compile import publish

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not smoke:
        print("bench/kernels.py --gpu: no GPU here (torch.cuda.is_available() is False); --smoke checks the "
              "script on CPU in Triton's interpreter", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    peak_gbs = peak_gbs or next((v for key, v in PEAK_GBS.items() if key in name), None)
    rows = gpu_rows(device, smoke, peak_gbs)
    result = {"benchmark": "fused quantized linears on a GPU" + (" (smoke run)" if smoke else ""), "device": name,
              "torch": torch.__version__, "hip": torch.version.hip, "peak_gbs": peak_gbs, "layers": rows}
    result["targets"] = targets(rows, smoke)
    result["targets_met"] = {key: t["met"] for key, t in result["targets"].items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kernels_gpu.md").write_text(markdown(rows, result))
    summary = ", ".join(f"{key}: {t['worst']}" for key, t in result["targets"].items())
    return publish("kernels_gpu", result, summary, check, folder)
