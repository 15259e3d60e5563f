#!/usr/bin/env python
"""Weight-quantization benchmark: W4A16 int4 symmetric, groups of 128, on the bench Llama.

    python bench/gptq.py [--check]

The model is bench/compile.py's (random Llama, hidden 1024, 8 layers, seed 0, fp32; lm_head
excluded). Calibration: 32 x 128 random ids (seed 1); evaluation: 8 x 128 random ids (seed 2);
figure: relative error of the logits against the fp32 model, ||q - f|| / ||f||. Every weight
algorithm qfx has is built side by side in this process, at 1 thread (the harness the peers
were measured with). Target: the best build's error <= 0.43 (every peer measured >= 0.439).
Writes bench/results/gptq.json and .md.
"""
from __future__ import annotations

import argparse
import sys

import torch
from accuracy import CALIBRATION, EVAL_SEED, EVAL_SHAPE, make_model, measured_build
from compile import HERE, LLAMA, publish

W4 = {"preset": "w4a16-g128", "exclude": ["lm_head"]}
CASES = [  # (name, quantization, algorithms)
    ("round to nearest (min-max)", W4, []),
    ("MSE clipping per group (observer: mse)", {**W4, "default": {"weight": {"observer": "mse"}}}, []),
]
TARGET = 0.43


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()
    import qfx

    torch.set_num_threads(1)
    model = make_model(outliers=False)
    ids = torch.randint(0, LLAMA["vocab_size"], EVAL_SHAPE, generator=torch.Generator().manual_seed(EVAL_SEED))
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    rows = []
    for name, quantization, algorithms in CASES:
        _, error, elapsed = measured_build(qfx, model, quantization, algorithms, reference, ids)
        rows.append({"case": name, "logits_rel_error": round(error, 4), "build_s": round(elapsed, 2)})
        print(f"[bench] {name:45s} {error:.4f}  ({elapsed:.1f} s)", file=sys.stderr)
    best = min(rows, key=lambda r: r["logits_rel_error"])
    result = {"benchmark": "logits relative error of W4A16 int4 g128 builds of a random Llama (hidden 1024, "
                           "8 layers), 1 thread",
              "calibration": CALIBRATION, "evaluation": {"shape": list(EVAL_SHAPE), "seed": EVAL_SEED},
              "threads": torch.get_num_threads(), "rows": rows, "target": TARGET,
              "targets_met": {"best error": best["logits_rel_error"] <= TARGET}}
    (HERE / "results").mkdir(exist_ok=True)
    lines = ["| case | logits rel. error | build s |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['logits_rel_error']:.4f} | {r['build_s']} |" for r in rows]
    (HERE / "results" / "gptq.md").write_text("\n".join(lines) + f"\n\ntarget: best <= {TARGET}\n")
    return publish("gptq", result, f"best: {best['case']} {best['logits_rel_error']:.4f} (target <= {TARGET})",
                   args.check)


if __name__ == "__main__":
    sys.exit(main())
