#!/usr/bin/env python
"""Compile benchmark: a W8A8 build of a random ~160M-parameter Llama against a plain fp32 forward.

    python bench/compile.py              # forward phase, then build phase; JSON to stdout and
                                         # bench/results/compile.json, a summary on stderr
    python bench/compile.py --repeats 2  # F, B, F, B (alternating); medians are judged
    python bench/compile.py --profile    # diagnostic: the build phase under cProfile (top 25
                                         # cumulative) and the per-function breakdown; writes
                                         # bench/results/compile-profile.json and .prof
    python bench/compile.py --check      # exit 1 when a target is missed (for CI)

Each measured phase runs in a fresh subprocess (`--phase forward` / `--phase build`, not meant
to be called by hand) that imports torch/transformers/qfx, builds the model itself (same seed,
so the same weights), reports the RSS right after that, and only then starts its clock. The
order is forward first, then build (alternating with --repeats N). Both phases see the same
32 x 128 token ids: the ids qfx's synthetic calibration draws (torch.Generator seeded 0), which
the build phase cross-checks against the calibration sha256 in the manifest.

Memory. Before the measured call the subprocess records ru_maxrss (its peak so far: imports and
model creation), then resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`)
so that VmHWM afterwards is the peak *during the measured call*. Figures:
  rss_after_model        RSS once the model exists (the build's baseline)
  phase_peak_rss         peak RSS during the measured call (VmHWM after the reset)
  process_peak_rss       peak of the whole subprocess, max(ru_maxrss before reset, phase peak)
The memory target compares the build subprocess's process_peak_rss (everything a user's
`python -c "qfx.compile(...)"` would hold: interpreter, torch, the fp32 model, the build)
with 1.5 x fp32 model bytes + 0.5 GiB. (After the reset ru_maxrss itself no longer holds the
earlier peak, which is why it is read before.)

Time. Wall clock of `qfx.compile(model, spec, output_dir=tmp)` (spec validation, capture,
calibration, convert, the accuracy check, writing the artifact) against the wall clock of the
fp32 forward over the 4 calibration batches of 8. Neither side is warmed up: both are the first
run of their process, as a user's build is. Target: build / forward <= 1.5.

Breakdown. The build phase wraps (at run time, from here; no qfx file is touched) the functions
that `qfx.build.compile` calls, the passes' `run`, the calibration closure and the lowering
helpers, with a timer that also folds the peak RSS of each into the phase it ran in. Names that
no longer exist in qfx are skipped and listed under `breakdown_missing`. `self` rows are time
spent in a phase outside the wrapped functions under it (for `compile`, that is mostly the
QDQ forward of the accuracy check on the first batch).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import hashlib
import importlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"

LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
SEED = 0
CALIBRATION = {"synthetic": True, "samples": 32, "seq_len": 128, "batch_size": 8, "seed": 0}
SPEC = {
    "version": 1,
    "target": "cpu",
    "calibration": CALIBRATION,
    # w8a8-int8: int8 per-channel symmetric weights, int8 per-tensor static minmax activations.
    "quantization": {"preset": "w8a8-int8", "exclude": ["lm_head"]},
}

TIME_RATIO_TARGET = 1.5  # build_time / forward_time <= this
RSS_MODEL_FACTOR = 1.5  # peak RSS < factor x fp32 model bytes + slack
RSS_SLACK = 1 << 29  # 0.5 GiB
QFX_FILES = re.escape(str(ROOT)) + r"/(compiler|passes|lowering|runtime)/"  # qfx's frames (profile)
MARKER = "QFX-BENCH-RESULT "  # prefix of the JSON line a phase subprocess prints on stdout


# ----------------------------------------------------------------------------- memory probes

def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_hwm() -> int:
    """Peak RSS (bytes) since process start or the last reset_hwm()."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------- phase breakdown

class Breakdown:
    """Inclusive wall time, calls and peak RSS per nested phase (keyed by its path of labels)."""

    def __init__(self):
        self.stack: list[list] = []  # [path, t0, peak, self_peak]
        self.rows: dict[str, dict] = {}
        self.patched: list[tuple] = []
        self.missing: list[str] = []

    def _fold(self) -> None:
        peak = vm_hwm()
        for frame in self.stack:
            frame[2] = max(frame[2], peak)
        if self.stack:  # the segment since the last fold ran in the innermost phase's own code
            self.stack[-1][3] = max(self.stack[-1][3], peak)
        reset_hwm()

    def enter(self, label: str) -> None:
        self._fold()
        path = f"{self.stack[-1][0]}/{label}" if self.stack else label
        self.stack.append([path, time.perf_counter(), 0, 0])

    def exit(self) -> None:
        self._fold()
        path, t0, peak, self_peak = self.stack.pop()
        row = self.rows.setdefault(path, {"calls": 0, "seconds": 0.0, "peak_rss": 0, "self_peak_rss": 0})
        row["calls"] += 1
        row["seconds"] += time.perf_counter() - t0
        row["peak_rss"] = max(row["peak_rss"], peak)  # the parent's frame holds it too (folded)
        row["self_peak_rss"] = max(row["self_peak_rss"], self_peak)
        row["rss_after"] = rss_now()  # after the last call

    def wrap(self, fn, label: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.enter(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()
        return timed

    def patch(self, owner, attr: str, label: str | None = None) -> None:
        name = f"{getattr(owner, '__name__', owner)}.{attr}"
        original = getattr(owner, attr, None)
        if original is None or not callable(original):
            self.missing.append(name)
            return
        setattr(owner, attr, self.wrap(original, label or attr))
        self.patched.append((owner, attr, original))

    def unpatch(self) -> None:
        for owner, attr, original in reversed(self.patched):
            setattr(owner, attr, original)
        self.patched.clear()

    def peak(self) -> int:
        return max([r["peak_rss"] for r in self.rows.values()] + [vm_hwm()])

    def table(self) -> dict[str, dict]:
        """Per phase path: calls, inclusive seconds, peak RSS during it, RSS after its last call.
        Phases with children get a `(self)` row: time and peak outside the wrapped children."""
        out: dict[str, dict] = {}
        for path, row in self.rows.items():
            out[path] = {"calls": row["calls"], "seconds": round(row["seconds"], 3),
                         "peak_rss": row["peak_rss"], "rss_after": row["rss_after"]}
            children = [r for p, r in self.rows.items()
                        if p.startswith(path + "/") and "/" not in p[len(path) + 1:]]
            if children:
                out[path + "/(self)"] = {
                    "calls": row["calls"],
                    "seconds": round(row["seconds"] - sum(c["seconds"] for c in children), 3),
                    "peak_rss": row["self_peak_rss"]}
        return dict(sorted(out.items()))


def instrument(bd: Breakdown) -> None:
    """Wrap what qfx.compile calls. Only attributes are replaced, in this process."""
    import torch

    def mod(name):
        try:
            return importlib.import_module(name)
        except ImportError:
            bd.missing.append(name)
            return None

    build = mod("qfx.build")
    if build is not None:
        for attr in ("load_spec", "wrap_module", "load_model", "calibration_set", "export", "_linears",
                     "resolve_plan", "run_pipeline", "run_calibration", "_output_check", "_model_record",
                     "emit_artifact"):
            bd.patch(build, attr)
        # The calibration closure (run_calibration + the float reference forward of batch 0) is
        # handed to the pipeline through PassContext: time it there.
        ctx_cls = getattr(build, "PassContext", None)
        if ctx_cls is not None:
            def make_ctx(*args, **kwargs):
                if kwargs.get("calibrate") is not None:
                    kwargs["calibrate"] = bd.wrap(kwargs["calibrate"], "calibrate")
                return ctx_cls(*args, **kwargs)
            build.PassContext = make_ctx
            bd.patched.append((build, "PassContext", ctx_cls))
        else:
            bd.missing.append("qfx.build.PassContext")
    runner = mod("qfx.runner")
    if runner is not None:
        bd.patch(runner, "verify_graph")
    passes = mod("qfx.passes")
    for cls in (getattr(passes, "PASSES", {}) or {}).values():
        bd.patch(cls, "run", f"pass:{cls.name}")
    convert = mod("qfx.passes.convert")
    if convert is not None:
        bd.patch(convert, "quantize_weight")
    emit = mod("qfx.lowering.emit")
    if emit is not None:
        for attr in ("artifact_tensors", "save_file", "quantization_config", "layer_buffers", "layer_record",
                     "sha256_file", "write_json", "render_report"):
            bd.patch(emit, attr)
    bd.patch(torch.export, "export", "torch.export.export")
    bd.patch(torch.export.ExportedProgram, "module", "ExportedProgram.module (unlift)")


# ----------------------------------------------------------------------------- the phases

def make_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).float().eval()


def calibration_ids():
    """The ids qfx's synthetic calibration draws for this spec (qfx.calib_data.synthetic)."""
    import torch

    gen = torch.Generator().manual_seed(CALIBRATION["seed"])
    return torch.randint(0, LLAMA["vocab_size"], (CALIBRATION["samples"], CALIBRATION["seq_len"]),
                         generator=gen)


def ids_sha256(ids) -> str:
    """As qfx.calib_data.CalibrationSet.sha256 computes it, to check both sides saw the same data."""
    import torch

    digest = hashlib.sha256()
    digest.update(str((ids.dtype, tuple(ids.shape))).encode())
    digest.update(ids.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_phase(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase == "build":
        import qfx  # imported before the baseline, as the forward phase imports transformers
    rss_imports = rss_now()
    info_load = os.getloadavg()
    model = make_model()
    params = list(model.parameters())
    info = {
        "phase": args.phase,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in params),
        "model_bytes": sum(p.numel() * p.element_size() for p in params),
        "rss_after_imports": rss_imports,
        "loadavg_1m_at_start": round(info_load[0], 2),
        "rss_after_model": rss_now(),
        "ru_maxrss_before": ru_maxrss(),
    }
    del params
    ids = calibration_ids()
    info["calibration_sha256"] = ids_sha256(ids)
    bs = CALIBRATION["batch_size"]

    if args.phase == "forward":
        batches = [ids[i:i + bs] for i in range(0, ids.shape[0], bs)]
        info["hwm_reset"] = reset_hwm()
        t0 = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                out = model(input_ids=batch, use_cache=False)
                del out
        info["wall_s"] = time.perf_counter() - t0
        info["batches"] = len(batches)
    else:
        import qfx

        spec = SPEC
        try:
            qfx.load_spec(spec)
        except AttributeError as exc:
            # qfx bug seen at f6b0f21: spec_loader._resolve_paths reads spec.model.path even when
            # the spec has no model (the model is passed to qfx.compile). Name the factory that
            # made the model instead; qfx.compile ignores it when given a model.
            spec = {**SPEC, "model": {"factory": "bench.compile:make_model"}}
            qfx.load_spec(spec)
            info["spec_workaround"] = (f"load_spec(spec without `model`) raised AttributeError: {exc}; "
                                       "built with model.factory = bench.compile:make_model (unused)")
        tmp = Path(tempfile.mkdtemp(prefix="qfx-bench-", dir=args.tmp_dir))
        out_dir = tmp / "artifact"
        bd = Breakdown() if args.breakdown else None
        if bd is not None:
            instrument(bd)
        profiler = None
        if args.profile:
            import cProfile
            profiler = cProfile.Profile()
        info["hwm_reset"] = reset_hwm()
        try:
            t0 = time.perf_counter()
            if bd is not None:
                bd.enter("compile")
            try:
                if profiler is not None:
                    result = profiler.runcall(qfx.compile, model, spec, output_dir=out_dir)
                else:
                    result = qfx.compile(model, spec, output_dir=out_dir)
            finally:
                if bd is not None:
                    bd.exit()
            info["wall_s"] = time.perf_counter() - t0
            files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
            info["artifact_files"] = files
            info["artifact_bytes"] = sum(files.values())
            manifest = result.manifest or {}
            calib_sha = (manifest.get("calibration") or {}).get("sha256")
            info["same_calibration_data"] = None if calib_sha is None else calib_sha == info["calibration_sha256"]
            info["quantized_layers"] = len(result.plan)
            info["check"] = result.stats.get("check")
            info["pass_stats"] = {k: v for k, v in result.stats.items() if k != "check"}
            del result
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if bd is not None:
                bd.unpatch()
        if bd is not None:
            info["breakdown"] = bd.table()
            info["breakdown_missing"] = bd.missing
        if profiler is not None:
            import io
            import pstats

            if args.profile_out:
                profiler.dump_stats(args.profile_out)
            for key, restrict in (("cumulative", None), ("tottime", None), ("qfx_cumulative", QFX_FILES)):
                buf = io.StringIO()
                stats = pstats.Stats(profiler, stream=buf)
                if restrict is None:
                    stats.strip_dirs()
                stats.sort_stats(key.rsplit("_", 1)[-1])
                stats.print_stats(*([restrict] if restrict else []), args.profile_top)
                info[f"profile_{key}"] = buf.getvalue()
    info["phase_peak_rss"] = vm_hwm() if info["hwm_reset"] else None
    if info["hwm_reset"] and info.get("breakdown"):  # the breakdown resets VmHWM at each boundary
        info["phase_peak_rss"] = max(info["phase_peak_rss"], info["breakdown"]["compile"]["peak_rss"])
    info["ru_maxrss_end"] = ru_maxrss()
    info["process_peak_rss"] = max(info["ru_maxrss_before"], info["phase_peak_rss"] or 0, info["ru_maxrss_end"])
    info["rss_end"] = rss_now()
    info["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return info


# ----------------------------------------------------------------------------- orchestration

def launch(phase: str, args, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.tmp_dir:
        cmd += ["--tmp-dir", args.tmp_dir]
    if not args.breakdown:
        cmd += ["--no-breakdown"]
    cmd += list(extra)
    print(f"[bench] running {phase} phase ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"[bench] the {phase} phase failed (exit {proc.returncode})")
    info = json.loads(lines[-1][len(MARKER):])
    info["subprocess_wall_s"] = round(time.perf_counter() - t0, 3)
    print(f"[bench] {phase}: {info['wall_s']:.2f} s, phase peak {_mib(info.get('phase_peak_rss'))}, "
          f"process peak {_mib(info['process_peak_rss'])}", file=sys.stderr, flush=True)
    return info


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def _git() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty_tracked_files": len(status.splitlines())}


def _machine() -> dict:
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "memory_bytes": mem}


def _round(d):
    if isinstance(d, float):
        return round(d, 4)
    if isinstance(d, dict):
        return {k: _round(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_round(v) for v in d]
    return d


def summarize(forwards: list[dict], builds: list[dict], args) -> dict:
    fwd_t = statistics.median(f["wall_s"] for f in forwards)
    bld_t = statistics.median(b["wall_s"] for b in builds)
    b0 = builds[0]
    model_bytes = b0["model_bytes"]
    budget = RSS_MODEL_FACTOR * model_bytes + RSS_SLACK
    peak = max(b["process_peak_rss"] for b in builds)
    phase_peak = max((b["phase_peak_rss"] or 0) for b in builds) or None
    baseline = b0["rss_after_model"]
    time_ratio = bld_t / fwd_t
    keep = ("wall_s", "loadavg_1m_at_start", "loadavg_1m_at_end", "rss_after_imports", "rss_after_model", "phase_peak_rss", "process_peak_rss",
            "rss_end", "subprocess_wall_s")
    result = {
        "benchmark": "compile",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**_machine(), "torch": b0["torch"], "torch_threads": b0["threads"]},
        "git": _git(),
        "order": ("each phase in a fresh subprocess; forward first, then build"
                  + (f"; alternating F,B x{args.repeats}, medians judged" if args.repeats > 1 else "")),
        "model": {"arch": "LlamaForCausalLM", "config": LLAMA, "seed": SEED, "dtype": "float32",
                  "params": b0["params"], "size_bytes": model_bytes},
        "spec": SPEC,
        "forward": {
            "what": "fp32 model(input_ids=batch, use_cache=False) under no_grad over the 4 calibration batches",
            "wall_s": fwd_t,
            "runs": [{k: f.get(k) for k in keep} for f in forwards],
        },
        "build": {
            "what": "qfx.compile(model, spec, output_dir=tmp), artifact written",
            "wall_s": bld_t,
            "baseline_rss": baseline,
            "phase_peak_rss": phase_peak,
            "process_peak_rss": peak,
            "build_rss_increase": (phase_peak - baseline) if phase_peak else None,
            "artifact_bytes": b0.get("artifact_bytes"),
            "artifact_files": b0.get("artifact_files"),
            "quantized_layers": b0.get("quantized_layers"),
            "same_calibration_data_as_forward": b0.get("same_calibration_data"),
            "spec_workaround": b0.get("spec_workaround"),
            "check": b0.get("check"),
            "runs": [{k: b.get(k) for k in keep} for b in builds],
            "breakdown": b0.get("breakdown"),
            "breakdown_missing": b0.get("breakdown_missing"),
        },
        "targets": {
            "time": {"build_over_forward": time_ratio, "target_max": TIME_RATIO_TARGET,
                     "met": time_ratio <= TIME_RATIO_TARGET},
            "memory": {"peak_rss": peak, "budget": budget,
                       "budget_formula": f"{RSS_MODEL_FACTOR} x model size_bytes + 0.5 GiB",
                       "peak_over_budget": peak / budget, "met": peak < budget},
        },
    }
    result["targets"]["all_met"] = result["targets"]["time"]["met"] and result["targets"]["memory"]["met"]
    return _round(result)


def print_breakdown(rows: dict | None, stream=sys.stderr) -> None:
    if not rows:
        return
    print(f"{'phase':<44} {'calls':>5} {'seconds':>8} {'peak RSS':>10} {'RSS after':>10}", file=stream)
    for path, row in rows.items():
        depth = path.count("/")
        name = "  " * depth + path.rsplit("/", 1)[-1]
        peak = _mib(row["peak_rss"]) if row.get("peak_rss") else ""
        after = _mib(row["rss_after"]) if "rss_after" in row else ""
        print(f"{name:<44} {row['calls']:>5} {row['seconds']:>8.2f} {peak:>10} {after:>10}", file=stream)


def main(argv=None) -> int:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=head, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["forward", "build"], help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help="diagnostic: profile the build phase only")
    p.add_argument("--profile-top", type=int, default=25, help="rows of the profile to print (25)")
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=1, help="forward/build pairs, alternating (1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in both phases (default: torch's)")
    p.add_argument("--tmp-dir", default=None, help="where the artifact is written (a temp dir, removed)")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="do not wrap qfx functions with timers in the build phase")
    p.add_argument("--output", default=str(RESULTS_DIR / "compile.json"), help="the JSON file to write")
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = p.parse_args(argv)

    if args.phase:
        info = run_phase(args)
        print(MARKER + json.dumps(info), flush=True)
        return 0

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if args.profile:
        prof = RESULTS_DIR / "compile-build.prof"
        info = launch("build", args, ["--profile", "--profile-top", str(args.profile_top),
                                      "--profile-out", str(prof)])
        print(f"== top {args.profile_top} functions by cumulative time (build phase)")
        print(info["profile_cumulative"])
        print(f"== top {args.profile_top} qfx functions by cumulative time")
        print(info["profile_qfx_cumulative"])
        print("== breakdown (wall time and RSS per wrapped qfx function, under the profiler)")
        print_breakdown(info.get("breakdown"), sys.stdout)
        out = {k: info.get(k) for k in ("wall_s", "rss_after_model", "phase_peak_rss", "process_peak_rss",
                                         "breakdown", "profile_cumulative", "profile_qfx_cumulative",
                                         "profile_tottime")}
        out["note"] = "under cProfile: times are inflated; use the proportions"
        path = RESULTS_DIR / "compile-profile.json"
        path.write_text(json.dumps(_round(out), indent=2) + "\n")
        print(f"[bench] wrote {path} and {prof} (snakeviz / pstats)", file=sys.stderr)
        return 0

    forwards, builds = [], []
    for _ in range(max(1, args.repeats)):
        forwards.append(launch("forward", args))
        builds.append(launch("build", args))
    result = summarize(forwards, builds, args)
    text = json.dumps(result, indent=2)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text + "\n")
    print(text)
    print_breakdown(result["build"]["breakdown"])
    t, m = result["targets"]["time"], result["targets"]["memory"]
    print(f"[bench] build {result['build']['wall_s']:.2f} s / forward {result['forward']['wall_s']:.2f} s "
          f"= {t['build_over_forward']:.2f} (target <= {TIME_RATIO_TARGET}): {'MET' if t['met'] else 'MISSED'}",
          file=sys.stderr)
    print(f"[bench] peak RSS {_mib(m['peak_rss'])} vs budget {_mib(m['budget'])} "
          f"({m['peak_over_budget']:.2f}x): {'MET' if m['met'] else 'MISSED'}; wrote {args.output}",
          file=sys.stderr)
    return 1 if args.check and not result["targets"]["all_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
