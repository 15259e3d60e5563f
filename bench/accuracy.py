#!/usr/bin/env python
"""Accuracy benchmark: W8A8 int8 builds of the bench Llama, with and without outlier channels.

    python bench/accuracy.py [--check]

The model is bench/compile.py's (random Llama, hidden 1024, 8 layers, seed 0, fp32). The
outlier variant multiplies every layer's input_layernorm and post_attention_layernorm weight
by a vector of ones with 50.0 at 8 channels (torch.randperm(1024) from a generator seeded 3):
the few huge activation channels of real LLMs. Calibration: 32 x 128 random ids (seed 1);
evaluation: 8 x 128 random ids (seed 2); figure: relative error of the logits against the
fp32 model, ||q - f|| / ||f||. Each build runs `qfx.compile` in this process, side by side,
so the time ratios compare like with like; they come from extra rounds of the timed builds,
interleaved with the plain one (medians). Writes bench/results/accuracy.json and .md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from compile import HERE, LLAMA, publish

OUTLIER_SCALE, OUTLIER_CHANNELS, OUTLIER_SEED = 50.0, 8, 3
CALIBRATION = {"synthetic": True, "samples": 32, "seq_len": 128, "batch_size": 8, "seed": 1}
EVAL_SEED, EVAL_SHAPE = 2, (8, 128)
STATIC = {"preset": "w8a8-int8", "exclude": ["lm_head"]}
DYNAMIC = {"preset": "w8a8-int8-dynamic", "exclude": ["lm_head"]}
PERCENTILE = {"preset": "w8a8-int8", "exclude": ["lm_head"], "default": {"input": {"observer": "percentile"}}}
SQ_AUTO = [{"smoothquant": {"alpha": "auto"}}]
SQ_HALF = [{"smoothquant": {"alpha": 0.5}}]
ROT = [{"rotation": {"kind": "hadamard"}}]  # R1 + R2, folded
R4 = [{"rotation": {"kind": "hadamard", "online_down_proj": True}}]  # and an online Hadamard (R4)
R4_SQ = R4 + SQ_AUTO
# (model, name, quantization, algorithms, target): targets from the folding issue
CASES = [
    ("outlier", "static minmax", STATIC, [], None),
    ("outlier", "static percentile", PERCENTILE, [], None),
    ("outlier", "static + smoothquant 0.5", STATIC, SQ_HALF, None),
    ("outlier", "static + smoothquant auto", STATIC, SQ_AUTO, 0.38),
    ("outlier", "per-token dynamic", DYNAMIC, [], None),
    ("outlier", "per-token dynamic + smoothquant auto", DYNAMIC, SQ_AUTO, None),
    ("outlier", "static + rotation R1 R2", STATIC, ROT, None),
    ("outlier", "static + rotation R1 R2 R4", STATIC, R4, 0.33),
    ("outlier", "static percentile + rotation R1 R2 R4", PERCENTILE, R4, 0.33),
    ("outlier", "static + rotation R1 R2 R4 + smoothquant auto", STATIC, R4_SQ, 0.33),
    ("outlier", "per-token dynamic + rotation R1 R2 R4", DYNAMIC, R4, 0.25),
    ("outlier", "per-token dynamic + rotation R1 R2 R4 + smoothquant auto", DYNAMIC, R4_SQ, 0.25),
    ("plain", "static minmax", STATIC, [], None),
    ("plain", "static + smoothquant auto", STATIC, SQ_AUTO, None),
    ("plain", "static + rotation R1 R2 R4", STATIC, R4, None),
    ("plain", "static percentile + rotation R1 R2 R4", PERCENTILE, R4, 0.065),
]
TIME_TARGET = 2.0  # a build with folds / the plain build
TIMED = ("static + smoothquant auto", "static + rotation R1 R2 R4 + smoothquant auto")
# The time ratios come from rounds of these builds interleaved (plain, then each timed case),
# median per build: one build's time moves by 10-15% with the machine's load.
TIMING_ROUNDS = 3


def make_model(outliers: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).float().eval()
    if outliers:
        channels = torch.randperm(LLAMA["hidden_size"], generator=torch.Generator().manual_seed(OUTLIER_SEED))
        scale = torch.ones(LLAMA["hidden_size"])
        scale[channels[:OUTLIER_CHANNELS]] = OUTLIER_SCALE
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight.mul_(scale)
                layer.post_attention_layernorm.weight.mul_(scale)
    return model


def measured_build(qfx, model, quantization: dict, algorithms: list, reference: torch.Tensor, ids: torch.Tensor):
    """(result, logits relative error on `ids`, build seconds) of one build of `model`."""
    spec = {"version": 1, "target": "cpu", "calibration": CALIBRATION, "quantization": quantization,
            "algorithms": algorithms}
    start = time.perf_counter()
    result = qfx.compile(model, spec)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        return result, qfx.runtime.evaluate.relative_error(reference, result.graph(ids)), elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--cases", default="", help="run only the cases whose name contains this text "
                                                    "(results are not written)")
    args = parser.parse_args()
    import qfx

    ids = torch.randint(0, LLAMA["vocab_size"], EVAL_SHAPE, generator=torch.Generator().manual_seed(EVAL_SEED))
    rows, seconds = [], {}
    for variant in ("outlier", "plain"):
        model = make_model(variant == "outlier")
        with torch.no_grad():
            reference = model(input_ids=ids, use_cache=False).logits
        for name, quantization, algorithms, target in [c[1:] for c in CASES if c[0] == variant
                                                       and (args.cases in c[1] or c[1] == "static minmax")]:
            result, error, elapsed = measured_build(qfx, model, quantization, algorithms, reference, ids)
            seconds[(variant, name)] = elapsed
            row = {"model": variant, "case": name, "logits_rel_error": round(error, 4), "target": target,
                   "build_s": round(elapsed, 2)}
            if "smoothquant" in result.stats:
                row["alphas"] = sorted({g["alpha"] for g in result.stats["smoothquant"]["groups"]},
                                       key=lambda a: (a is None, a))
            rows.append(row)
            print(f"[bench] {variant:8s} {name:40s} {error:.4f}  ({elapsed:.1f} s)", file=sys.stderr)
    if args.cases:
        return 0
    times = _timing_rounds(qfx, make_model(True))
    ratios = {case: round(statistics.median(times[case]) / statistics.median(times["static minmax"]), 3)
              for case in TIMED}
    ratio = max(ratios.values())
    result = {
        "benchmark": "logits relative error of W8A8 int8 builds of a random Llama (hidden 1024, 8 layers) "
                     "with and without 8 outlier channels x50",
        "calibration": CALIBRATION, "evaluation": {"shape": list(EVAL_SHAPE), "seed": EVAL_SEED},
        "threads": torch.get_num_threads(), "loadavg_1m": os.getloadavg()[0],
        "rows": rows, "build_s_rounds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "build_over_plain": ratios, "time_target": TIME_TARGET,
        "targets_met": {**{f"{r['model']}: {r['case']}": r["logits_rel_error"] <= r["target"]
                           for r in rows if r["target"] is not None}, "time": ratio <= TIME_TARGET},
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "accuracy.md").write_text(_markdown(rows, ratios))
    return publish("accuracy", result, f"slowest build with folds / plain build = {ratio:.2f} (target <= "
                   f"{TIME_TARGET})", args.check)


def _timing_rounds(qfx, model) -> dict[str, list[float]]:
    """Build seconds of the plain build and each TIMED case, TIMING_ROUNDS rounds interleaved."""
    builds = {name: (quantization, algorithms) for variant, name, quantization, algorithms, _ in CASES
              if variant == "outlier" and name in ("static minmax", *TIMED)}
    times: dict[str, list[float]] = {name: [] for name in builds}
    for _ in range(TIMING_ROUNDS):
        for name, (quantization, algorithms) in builds.items():
            spec = {"version": 1, "target": "cpu", "calibration": CALIBRATION, "quantization": quantization,
                    "algorithms": algorithms}
            start = time.perf_counter()
            qfx.compile(model, spec)
            times[name].append(time.perf_counter() - start)
            print(f"[bench] timing   {name:40s} ({times[name][-1]:.1f} s)", file=sys.stderr)
    return times


def _markdown(rows: list[dict], ratios: dict[str, float]) -> str:
    lines = ["| model | case | logits rel. error | target | build s |", "|---|---|---|---|---|"]
    for r in rows:
        target = "" if r["target"] is None else f"≤ {r['target']}"
        lines.append(f"| {r['model']} | {r['case']} | {r['logits_rel_error']:.4f} | {target} | {r['build_s']} |")
    lines.append("")
    lines += [f"outlier model, build time of {case} / static minmax (median of {TIMING_ROUNDS} interleaved "
              f"rounds): {r:.2f}" for case, r in ratios.items()]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
