#!/usr/bin/env python
"""Compile benchmark: a W8A8 build of a random ~160M-parameter Llama next to a plain fp32 forward.

    python bench/compile.py [--repeats N] [--check]

Each phase runs in a fresh subprocess that imports torch/transformers/qfx, makes the model
(seed 0, so both phases hold the same weights), and only then starts its clock, after
resetting the kernel's peak-RSS counter. The forward phase runs the fp32 model over the 32 x 128
calibration ids in batches of 8; the build phase runs `qfx.compile(model, spec, output_dir=tmp)`
(capture, calibration on the same ids, convert, the accuracy check, writing the artifact).
Phases alternate forward, build (N times); medians are judged. Targets: build / forward <= 1.5;
peak RSS of the build process <= 1.5 x fp32 model bytes + 0.5 GiB. Writes
bench/results/compile.json and prints it; --check exits 1 when a target is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
CALIBRATION = {"synthetic": True, "samples": 32, "seq_len": 128, "batch_size": 8, "seed": 0}
SPEC = {"version": 1, "target": "cpu", "calibration": CALIBRATION,
        "quantization": {"preset": "w8a8-int8", "exclude": ["lm_head"]}}
TIME_TARGET = 1.5
RSS_FACTOR, RSS_SLACK = 1.5, 1 << 29
MARKER = "QFX-BENCH "


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from the current RSS


def make_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).float().eval()


def calibration_ids():
    """The ids qfx's synthetic calibration draws for SPEC (qfx.calib_data.synthetic)."""
    import torch

    gen = torch.Generator().manual_seed(CALIBRATION["seed"])
    return torch.randint(0, LLAMA["vocab_size"], (CALIBRATION["samples"], CALIBRATION["seq_len"]), generator=gen)


def run_phase(phase: str) -> dict:
    import torch

    import qfx  # imported in both phases, so both baselines hold the same libraries

    model = make_model()
    info = {"phase": phase, "threads": torch.get_num_threads(),
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "rss_after_model": _status("VmRSS:")}
    _reset_peak_rss()
    start = time.perf_counter()
    if phase == "forward":
        ids, bs = calibration_ids(), CALIBRATION["batch_size"]
        with torch.no_grad():
            for i in range(0, ids.shape[0], bs):
                model(input_ids=ids[i:i + bs], use_cache=False)
        info["wall_s"] = time.perf_counter() - start
    else:
        with tempfile.TemporaryDirectory(prefix="qfx-bench-") as tmp:
            result = qfx.compile(model, SPEC, output_dir=Path(tmp) / "artifact")
            info["wall_s"] = time.perf_counter() - start
            info["artifact_bytes"] = sum(p.stat().st_size for p in result.artifact_dir.iterdir())
        info["stages_s"] = result.stats["seconds"]
        info["passes_s"] = {k: v["seconds"] for k, v in result.stats.items() if isinstance(v, dict) and "seconds" in v
                            and k != "seconds"}
        info["check"] = result.stats["check"]
    info["peak_rss"] = _status("VmHWM:")  # the phase's own peak: it starts from rss_after_model
    return info


def launch(phase: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--phase", phase], capture_output=True, text=True,
                          cwd=HERE.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode or not lines:
        sys.exit(f"the {phase} phase failed:\n{proc.stderr[-4000:]}")
    info = json.loads(lines[-1][len(MARKER):])
    print(f"[bench] {phase}: {info['wall_s']:.2f} s, peak RSS {info['peak_rss'] / 2**20:.0f} MiB", file=sys.stderr)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["forward", "build"], help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    if args.phase:
        print(MARKER + json.dumps(run_phase(args.phase)))
        return 0
    forwards, builds = [], []
    for _ in range(args.repeats):
        forwards.append(launch("forward"))
        builds.append(launch("build"))
    forward_s = statistics.median(r["wall_s"] for r in forwards)
    build_s = statistics.median(r["wall_s"] for r in builds)
    peak = statistics.median(r["peak_rss"] for r in builds)
    budget = RSS_FACTOR * builds[0]["model_bytes"] + RSS_SLACK
    result = {
        "benchmark": "qfx.compile W8A8 of a random Llama (hidden 1024, 8 layers, vocab 32000) vs fp32 forward",
        "calibration": CALIBRATION, "repeats": args.repeats, "loadavg_1m": os.getloadavg()[0],
        "forward_s": round(forward_s, 3), "build_s": round(build_s, 3),
        "build_over_forward": round(build_s / forward_s, 3), "time_target": TIME_TARGET,
        "model_bytes": builds[0]["model_bytes"], "build_peak_rss": int(peak), "rss_budget": int(budget),
        "peak_over_budget": round(peak / budget, 3),
        "targets_met": {"time": build_s / forward_s <= TIME_TARGET, "memory": peak <= budget},
        "runs": {"forward": forwards, "build": builds},
    }
    return publish("compile", result, f"build {build_s:.2f} s / forward {forward_s:.2f} s = {build_s / forward_s:.2f} "
                   f"(target <= {TIME_TARGET}); peak RSS {peak / 2**20:.0f} MiB vs budget {budget / 2**20:.0f} MiB",
                   args.check)


def publish(name: str, result: dict, summary: str, check: bool, folder: Path = HERE / "results") -> int:
    """Write NAME.json (in bench/results unless `folder` says), print it and the one-line summary;
    the exit status for --check."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"[bench] {summary}", file=sys.stderr)
    return 1 if check and not all(result["targets_met"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
