#!/usr/bin/env python
"""Weight-quantization benchmark: W4A16 int4 symmetric, groups of 128, on the bench Llama.

    python bench/gptq.py [--check] [--no-depth]

The model is bench/compile.py's (random Llama, hidden 1024, 8 layers, seed 0, fp32; lm_head
excluded). Calibration: 32 x 128 random ids (seed 1); evaluation: 8 x 128 random ids (seed 2);
figure: relative error of the logits against the fp32 model, ||q - f|| / ||f||. Every weight
algorithm qfx has (RTN, MSE clipping, GPTQ, AWQ, HQQ) is built side by side in this process, at 1 thread (the harness the peers
were measured with). GPTQ's peak RSS is measured apart, in a fresh process that holds only
the model (bench/compile.py's method).

Targets: the best build's error <= 0.43 (every peer measured >= 0.439); GPTQ's build <= 45 s
and <= 2x RTN's; peak RSS <= 1.5 x the fp32 model + 0.5 GiB; and GPTQ's time linear in depth:
the same model at 4, 8 and 16 layers, time(16) / time(8) <= 2.2.
Writes bench/results/gptq.json and .md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from accuracy import CALIBRATION, EVAL_SEED, EVAL_SHAPE, make_model, measured_build
from compile import HERE, LLAMA, MARKER, RSS_FACTOR, RSS_SLACK, _reset_peak_rss, _status, publish

W4 = {"preset": "w4a16-g128", "exclude": ["lm_head"]}
W4_MSE = {**W4, "default": {"weight": {"observer": "mse"}}}
RTN, GPTQ = "round to nearest (min-max)", "GPTQ (act_order, static groups)"
CASES = [  # (name, quantization, algorithms)
    (RTN, W4, []),
    ("MSE clipping per group (observer: mse)", W4_MSE, []),
    (GPTQ, W4, [{"gptq": {}}]),
    ("GPTQ + MSE clipping", W4_MSE, [{"gptq": {}}]),
    ("AWQ (scales, then clipping)", W4, [{"awq": {}}]),
    ("HQQ (no data)", W4, [{"hqq": {}}]),
    ("HQQ + MSE clipping", W4_MSE, [{"hqq": {}}]),
]
TARGET = 0.43
TIME_LIMIT_S, TIME_RATIO = 45.0, 2.0
DEPTHS, DEPTH_RATIO = (4, 8, 16), 2.2


def depth_scaling(qfx) -> dict:
    """GPTQ's pass time on the bench Llama at each of DEPTHS layers (other sizes unchanged)."""
    seconds = {}
    for depth in DEPTHS:
        saved = LLAMA["num_hidden_layers"]
        LLAMA["num_hidden_layers"] = depth
        try:
            model = make_model(outliers=False)
        finally:
            LLAMA["num_hidden_layers"] = saved
        spec = {"version": 1, "target": "cpu", "calibration": CALIBRATION, "quantization": W4,
                "algorithms": [{"gptq": {}}]}
        seconds[depth] = qfx.compile(model, spec).stats["gptq"]["seconds"]
        print(f"[bench] GPTQ pass at {depth} layers: {seconds[depth]:.1f} s", file=sys.stderr)
    return {"gptq_pass_s": seconds, "ratio_16_8": round(seconds[16] / seconds[8], 3)}


def gptq_peak_rss() -> int:
    """Peak RSS of the GPTQ build, in this process (run fresh, with nothing but the model)."""
    import qfx

    torch.set_num_threads(1)
    model = make_model(outliers=False)
    spec = {"version": 1, "target": "cpu", "calibration": CALIBRATION, "quantization": W4,
            "algorithms": [{"gptq": {}}]}
    _reset_peak_rss()
    qfx.compile(model, spec)
    return _status("VmHWM:")


def measure_memory() -> int:
    proc = subprocess.run([sys.executable, __file__, "--memory-phase"], capture_output=True, text=True, cwd=HERE)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode or not lines:
        sys.exit(f"the memory phase failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(MARKER):])["peak_rss"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--no-depth", action="store_true", help="skip the 4/8/16-layer timing")
    parser.add_argument("--memory-phase", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_phase:
        print(MARKER + json.dumps({"peak_rss": gptq_peak_rss()}))
        return 0
    import qfx

    torch.set_num_threads(1)
    model = make_model(outliers=False)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, LLAMA["vocab_size"], EVAL_SHAPE, generator=torch.Generator().manual_seed(EVAL_SEED))
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    rows = []
    for name, quantization, algorithms in CASES:
        result, error, elapsed = measured_build(qfx, model, quantization, algorithms, reference, ids)
        passes = {k: v["seconds"] for k, v in result.stats.items() if isinstance(v, dict) and "seconds" in v
                  and k != "seconds"}
        del result
        rows.append({"case": name, "logits_rel_error": round(error, 4), "build_s": round(elapsed, 2),
                     "passes_s": passes})
        print(f"[bench] {name:45s} {error:.4f}  ({elapsed:.1f} s) {passes}", file=sys.stderr)
    by_case = {r["case"]: r for r in rows}
    best = min(rows, key=lambda r: r["logits_rel_error"])
    rss_budget_mib = round((RSS_FACTOR * model_bytes + RSS_SLACK) / 2**20)
    peak_mib = round(measure_memory() / 2**20)
    print(f"[bench] GPTQ build peak RSS {peak_mib} MiB (budget {rss_budget_mib} MiB)", file=sys.stderr)
    gptq_s, rtn_s = by_case[GPTQ]["build_s"], by_case[RTN]["build_s"]
    met = {"best error": best["logits_rel_error"] <= TARGET,
           "gptq build time": gptq_s <= TIME_LIMIT_S, "gptq / rtn time": gptq_s <= TIME_RATIO * rtn_s,
           "gptq peak rss": peak_mib <= rss_budget_mib}
    result = {"benchmark": "logits relative error of W4A16 int4 g128 builds of a random Llama (hidden 1024, "
                           "8 layers), 1 thread",
              "calibration": CALIBRATION, "evaluation": {"shape": list(EVAL_SHAPE), "seed": EVAL_SEED},
              "threads": torch.get_num_threads(), "rows": rows, "target": TARGET,
              "model_mib": round(model_bytes / 2**20), "gptq_peak_rss_mib": peak_mib, "rss_budget_mib": rss_budget_mib,
              "gptq_over_rtn_time": round(gptq_s / rtn_s, 3)}
    if not args.no_depth:
        result["depth"] = depth_scaling(qfx)
        met["linear in depth"] = result["depth"]["ratio_16_8"] <= DEPTH_RATIO
    result["targets_met"] = met
    (HERE / "results").mkdir(exist_ok=True)
    lines = ["| case | logits rel. error | build s |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['logits_rel_error']:.4f} | {r['build_s']} |" for r in rows]
    lines += ["", f"targets: best <= {TARGET}; GPTQ <= {TIME_LIMIT_S} s and <= {TIME_RATIO}x RTN "
                  f"({result['gptq_over_rtn_time']}x); GPTQ peak RSS {peak_mib} MiB (budget {rss_budget_mib} MiB)"]
    if "depth" in result:
        lines.append(f"GPTQ pass time at {', '.join(map(str, DEPTHS))} layers: "
                     f"{', '.join(f'{s:.1f} s' for s in result['depth']['gptq_pass_s'].values())} "
                     f"(16/8 = {result['depth']['ratio_16_8']}, target <= {DEPTH_RATIO})")
    lines.append("targets met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()))
    (HERE / "results" / "gptq.md").write_text("\n".join(lines) + "\n")
    return publish("gptq", result, f"best: {best['case']} {best['logits_rel_error']:.4f} (target <= {TARGET}); "
                   f"GPTQ {gptq_s:.1f} s = {result['gptq_over_rtn_time']}x RTN", args.check)


if __name__ == "__main__":
    sys.exit(main())
