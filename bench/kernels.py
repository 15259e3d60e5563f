#!/usr/bin/env python
"""Fused-op benchmark, CPU part: qfx::qlinear_w8a8 against fp32 linear and torch._int_mm, and the
lowered bench Llama (W8A8) against the fp32 model.

    python bench/kernels.py [--check] [--threads N]

Per layer shape of Llama-3-8B (q/k/v/o, gate/up, down) at decode (M = 1, 16) and of the bench
Llama (hidden 1024) at M = 128: the median time of fp32 `F.linear`, of the op (static per-tensor
and per-token inputs) and of `torch._int_mm` on the same int8 codes (where it finishes in
reasonable time), all in this process; ratios are fp32 time / op time (above 1: faster than fp32).
Then the bench Llama quantized W8A8 static, lowered, against the fp32 model: batch 1 x 128 tokens.

Target (issue: lowering): the lowered Llama at least 1.5x faster than fp32. A GPU section (Triton
against the vendor GEMMs) runs where a GPU is present. Writes bench/results/kernels.json and .md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from accuracy import CALIBRATION, make_model
from compile import HERE, publish

LLAMA3_8B = {"q_proj / o_proj": (4096, 4096), "k_proj / v_proj": (1024, 4096), "gate_proj / up_proj": (14336, 4096),
             "down_proj": (4096, 14336)}  # name -> (out, in)
BENCH_LLAMA = {"bench q_proj": (1024, 1024), "bench gate_proj": (2816, 1024), "bench down_proj": (1024, 2816)}
DECODE_M, BENCH_M = (1, 16), 128
INT_MM_MAX_MACS = 2e8  # torch._int_mm's CPU kernel is too slow to time beyond this
SPEEDUP_TARGET = 1.5


def median_seconds(fn, rounds: int = 7) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_rows() -> list[dict]:
    from qfx.runtime.qlinear import QLINEAR_W8A8

    gen = torch.Generator().manual_seed(0)
    rows = []
    shapes = [(name, shape, m) for name, shape in LLAMA3_8B.items() for m in DECODE_M]
    shapes += [(name, shape, BENCH_M) for name, shape in BENCH_LLAMA.items()]
    for name, (n, k), m in shapes:
        x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) * 0.02
        codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        w_scale, x_scale = torch.full((n,), 0.02 / 127), torch.tensor(4.0 / 127)
        row = {"layer": name, "m": m, "n": n, "k": k,
               "fp32_linear_ms": 1e3 * median_seconds(lambda: F.linear(x, w)),
               "w8a8_static_ms": 1e3 * median_seconds(lambda: QLINEAR_W8A8(x, codes, w_scale, None, x_scale, None,
                                                                          "int8")),
               "w8a8_per_token_ms": 1e3 * median_seconds(lambda: QLINEAR_W8A8(x, codes, w_scale, None, None, None,
                                                                             "int8"))}
        if m * n * k <= INT_MM_MAX_MACS:
            x_codes, codes_t = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8), codes.T
            row["torch_int_mm_ms"] = 1e3 * median_seconds(lambda: torch._int_mm(x_codes, codes_t), rounds=3)
        row = {key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}
        row["static_speedup"] = round(row["fp32_linear_ms"] / row["w8a8_static_ms"], 3)
        if "torch_int_mm_ms" in row:
            row["int_mm_speedup"] = round(row["fp32_linear_ms"] / row["torch_int_mm_ms"], 3)
        rows.append(row)
        print(f"[bench] {name:20s} M={m:4d} fp32 {row['fp32_linear_ms']:.3f} ms, w8a8 {row['w8a8_static_ms']:.3f} ms "
              f"({row['static_speedup']}x), _int_mm {row.get('torch_int_mm_ms', '-')} ms", file=sys.stderr)
    return rows


def whole_model() -> dict:
    import qfx

    model = make_model(outliers=False)
    spec = {"version": 1, "target": "cpu", "calibration": CALIBRATION,
            "quantization": {"preset": "w8a8-int8", "exclude": ["lm_head"]}}
    result = qfx.compile(model, spec)
    lowered, stats = result.lowered()
    ids = torch.randint(0, 32000, (1, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp32_s = median_seconds(lambda: model(input_ids=ids, use_cache=False).logits, rounds=5)
        qdq_s = median_seconds(lambda: result.graph(ids), rounds=5)
        lowered_s = median_seconds(lambda: lowered(ids), rounds=5)
        qdq, fused = result.graph(ids), lowered(ids)
    return {"lowered_layers": len(stats["lowered"]), "kept_layers": len(stats["kept"]),
            "fp32_ms": round(1e3 * fp32_s, 2), "qdq_ms": round(1e3 * qdq_s, 2), "lowered_ms": round(1e3 * lowered_s, 2),
            "lowered_speedup": round(fp32_s / lowered_s, 3),
            "lowered_vs_qdq_rel": float(f"{float((fused - qdq).norm() / qdq.norm()):.3g}")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = layer_rows()
    model = whole_model()
    print(f"[bench] bench Llama 1x128: fp32 {model['fp32_ms']} ms, QDQ {model['qdq_ms']} ms, lowered "
          f"{model['lowered_ms']} ms ({model['lowered_speedup']}x fp32)", file=sys.stderr)
    result = {"benchmark": "fused quantized linears on CPU", "threads": args.threads,
              "cpu": torch.backends.cpu.get_cpu_capability(), "layers": rows, "bench_llama": model,
              "targets_met": {"lowered llama >= 1.5x fp32": model["lowered_speedup"] >= SPEEDUP_TARGET}}
    lines = ["| layer | M | fp32 ms | w8a8 static ms | w8a8 per-token ms | torch._int_mm ms | fp32 / w8a8 |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['m']} | {r['fp32_linear_ms']} | {r['w8a8_static_ms']} | {r['w8a8_per_token_ms']} "
              f"| {r.get('torch_int_mm_ms', '—')} | {r['static_speedup']} |" for r in rows]
    lines += ["", f"bench Llama W8A8, batch 1 x 128, {args.threads} threads ({result['cpu']}): fp32 {model['fp32_ms']} ms, "
                  f"QDQ graph {model['qdq_ms']} ms, lowered {model['lowered_ms']} ms = {model['lowered_speedup']}x "
                  f"fp32 (target >= {SPEEDUP_TARGET}); lowered vs QDQ logits {model['lowered_vs_qdq_rel']} relative"]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "kernels.md").write_text("\n".join(lines) + "\n")
    return publish("kernels", result, f"lowered bench Llama {model['lowered_speedup']}x fp32", args.check)


if __name__ == "__main__":
    sys.exit(main())
