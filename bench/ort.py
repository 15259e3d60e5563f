#!/usr/bin/env python
"""ONNX Runtime benchmark: qfx's W8A8 ONNX against the fp32 ONNX of the same model and against
ONNX Runtime's own quantizer, on ORT's CPU execution provider.

    python bench/ort.py [--runs 20]

Model: the random Llama of bench/compile.py (seed 0); calibration: its 32 x 128 synthetic ids.
Every linear layer is quantized, the LM head included (--exclude-lm-head keeps it float in both).
- fp32: the captured float graph written by qfx's ONNX emitter (the same graph, no QDQ).
- qfx:  `qfx.compile` with preset w8a8-int8 and 7-bit weights (`reduce_range: true`: ORT's fast
        uint8 x int8 kernels are then exact without VNNI; --full-range for 8-bit weights, which
        the ONNX artifact then holds as uint8), target cpu, formats [safetensors, onnx].
- ort:  `onnxruntime.quantization.quantize_static` on the fp32 ONNX (after its quant_pre_process):
        QDQ, per-channel, MinMax, its default uint8 activations and int8 weights, MatMul nodes
        only (op_types_to_quantize; without it, it also quantizes the adds, multiplies and
        softmax: 0.38 logits error), calibrated one sample at a time on the same 32 samples. It
        quantizes the 16 attention MatMuls and every MatMul output too (MatMulConstBOnly is
        asked for but left them), which qfx keeps in float: more int8 work on its side.
Latency: batch 1, sequence 128, every session opened the same way (qfx.runtime.ort.session,
ORT_ENABLE_ALL); 3 warm-up runs, then the three models take turns in blocks of 5 timed runs, so
machine drift hits all alike; medians of --runs. Each turn starts with one untimed run: the
first run after another session's was 25-40 ms slower for every model (measured), a cost of
sharing one process that a process serving one model does not pay. Error: logits relative
error against the fp32 ONNX on 4 held-out samples (seed 1). Targets: qfx >= 1.8x faster than
fp32, and qfx's error <= ort's. Writes bench/results/ort.json and prints it; --check exits 1 when a target is missed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compile import CALIBRATION, LLAMA, calibration_ids, make_model, publish  # noqa: E402

SPEED_TARGET = 1.8
SEQ = 128
BLOCK = 5  # timed runs per turn


def write_fp32_onnx(model, folder: Path) -> Path:
    from qfx.capture import dynamic_dims, export, wrap_module
    from qfx.lowering.onnx_emit import write_onnx

    bundle = wrap_module(model)
    example = (calibration_ids()[:2],)
    gm = export(bundle, example)
    write_onnx(folder, gm, example=example, dynamic_shapes=tuple(dynamic_dims(t, bundle.kind) for t in example),
               input_names=["input_ids"], output_names=["logits"], uint8_codes=False, metadata={})
    return folder / "model.onnx"


def ort_quantize(fp32: Path, out: Path, exclude_lm_head: bool) -> Path:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name("preprocessed.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    matmuls = [n.name for n in onnx.load(str(pre), load_external_data=False).graph.node if n.op_type == "MatMul"]

    class Samples(CalibrationDataReader):
        def __init__(self):
            ids = calibration_ids()
            self.feeds = iter([{"input_ids": ids[i:i + 1].numpy()} for i in range(ids.shape[0])])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(pre), str(out), Samples(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["MatMul"],
                    nodes_to_exclude=matmuls[-1:] if exclude_lm_head else [],  # the LM head: the last MatMul
                    extra_options={"MatMulConstBOnly": True})
    return out


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--exclude-lm-head", action="store_true", help="keep the LM head in float (in both)")
    parser.add_argument("--full-range", dest="reduce_range", action="store_false",
                        help="8-bit weights (uint8 in ONNX: exact on any x86, but the slower uint8 x uint8 kernels)")
    args = parser.parse_args()

    import qfx
    from qfx.runtime.ort import session

    model = make_model()
    with tempfile.TemporaryDirectory(prefix="qfx-bench-ort-") as tmp:
        tmp = Path(tmp)
        seconds = {}
        start = time.perf_counter()
        (tmp / "fp32").mkdir()
        fp32_path = write_fp32_onnx(model, tmp / "fp32")
        seconds["fp32_export"] = time.perf_counter() - start
        spec = {"version": 1, "target": "cpu", "calibration": CALIBRATION,
                "quantization": {"preset": "w8a8-int8", "default": {"weight": {"reduce_range": args.reduce_range}},
                                 "exclude": ["lm_head"] if args.exclude_lm_head else []},
                "output": {"dir": str(tmp / "qfx"), "formats": ["safetensors", "onnx"]}}
        start = time.perf_counter()
        result = qfx.compile(model, spec)
        seconds["qfx_build"] = time.perf_counter() - start
        start = time.perf_counter()
        ort_path = ort_quantize(fp32_path, tmp / "ort.onnx", args.exclude_lm_head)
        seconds["ort_quantize"] = time.perf_counter() - start
        del model

        sessions = {"fp32": session(fp32_path), "qfx": session(result.artifact_dir / "model.onnx"),
                    "ort": session(ort_path)}
        held_out = torch.randint(0, LLAMA["vocab_size"], (4, SEQ), generator=torch.Generator().manual_seed(1))
        logits = {k: s.run(None, {"input_ids": held_out.numpy()})[0] for k, s in sessions.items()}
        one = {"input_ids": held_out[:1].numpy()}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():
            for _ in range(3):
                s.run(None, one)
        for _ in range(-(-args.runs // BLOCK)):
            for k, s in sessions.items():
                s.run(None, one)  # the switch-over run, untimed
                for _ in range(BLOCK):
                    start = time.perf_counter()
                    s.run(None, one)
                    times[k].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    errors = {k: rel_error(logits[k], logits["fp32"]) for k in ("qfx", "ort")}
    out = {
        "benchmark": "ORT CPU latency (batch 1, seq 128) and logits error: qfx W8A8 ONNX vs fp32 ONNX vs "
                     "onnxruntime.quantization.quantize_static",
        "runs": len(times["fp32"]), "block": BLOCK, "lm_head": "float" if args.exclude_lm_head else "quantized",
        "qfx_weights": "7-bit (reduce_range)" if args.reduce_range else "8-bit",
        "latency_ms": {k: round(1000 * v, 3) for k, v in median.items()},
        "speedup_over_fp32": {k: round(median["fp32"] / median[k], 3) for k in ("qfx", "ort")},
        "logits_rel_error_vs_fp32": errors, "qfx_verify": result.manifest["verify"],
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "targets_met": {"speed": median["fp32"] / median["qfx"] >= SPEED_TARGET,
                        "error": errors["qfx"] <= errors["ort"]},
    }
    speedup = out["speedup_over_fp32"]
    summary = (f"qfx {speedup['qfx']:.2f}x / ort {speedup['ort']:.2f}x faster than fp32 (target >= {SPEED_TARGET}); "
               f"logits error qfx {errors['qfx']:.3g} vs ort {errors['ort']:.3g}")
    return publish("ort", out, summary, args.check)


if __name__ == "__main__":
    sys.exit(main())
