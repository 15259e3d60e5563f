"""`qfx.compile`: spec -> capture -> passes (with calibration) -> artifact."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import time
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch

from qfx import __version__, budget
from qfx.background import in_background, settle
from qfx.calib_data import CalibrationSet, calibration_set, run_calibration
from qfx.capture import ModelBundle, dynamic_dims, export, load_model, wrap_module
from qfx.errors import BudgetError, ModelLoadError, OutputError, QfxWarning, SpecError, UserError
from qfx.lowering import AtomicDir, emit_artifact, write_manifest, write_model_file
from qfx.passes import PassContext, format_pipeline, parse_pipeline
from qfx.passes.annotate import linear_nodes
from qfx.passes.awq import Awq
from qfx.passes.gptq import Gptq
from qfx.passes.hqq import Hqq
from qfx.passes.input_transforms import input_transforms
from qfx.passes.lower import Lower
from qfx.passes.meta import describe_node, module_path
from qfx.passes.registry import CALIBRATE, PASSES, check_pipeline
from qfx.passes.rotation import Rotation
from qfx.passes.smoothquant import SmoothQuant
from qfx.rules import LinearInfo, resolve_plan
from qfx.runner import run_pipeline
from qfx.runtime.artifact_files import PROGRAM_FILE
from qfx.runtime.evaluate import compare_outputs, first_tensor
from qfx.runtime.formats import LayerQuant
from qfx.runtime.hashing import sha256_file, sha256_tensors
from qfx.runtime.layouts import DEFAULT_LAYOUT, Layout, layout_named
from qfx.runtime.memory import release_memory
from qfx.runtime.ort import require_onnx
from qfx.runtime.qlinear import triton_kernels
from qfx.runtime.verify import META_INPUTS, META_ROOT, META_UINT8, check_program, verify_artifact
from qfx.spec import OutputFormat, Target
from qfx.spec_loader import LoadedSpec, load_spec


@dataclasses.dataclass
class CompileResult:
    graph: torch.fx.GraphModule  # the frozen QDQ graph; call it like the captured model
    plan: dict[str, LayerQuant]
    manifest: dict | None
    artifact_dir: Path | None
    stats: dict
    root_prefix: str = ""  # of the captured wrapper's module paths (e.g. "hf.")

    def lowered(self) -> tuple[torch.fx.GraphModule, dict]:
        """A copy of `graph` whose linears run the fused ops (passes/lower.py), and the pass's
        record of the layers it lowered and kept; `graph` stays the QDQ graph the artifacts hold."""
        return lower_graph(self.graph, self.plan, self.root_prefix)


def lower_graph(gm: torch.fx.GraphModule, plan: dict[str, LayerQuant], root_prefix: str
                ) -> tuple[torch.fx.GraphModule, dict]:
    """The lower pass on a copy of a frozen QDQ graph: (lowered graph, the pass's record)."""
    ctx = PassContext(plan=plan, root_prefix=root_prefix, facts={"frozen"})
    lowered = run_pipeline(copy.deepcopy(gm), [Lower()], ctx)
    return lowered, ctx.stats[Lower.name]


def _program(gm: torch.fx.GraphModule, plan: dict[str, LayerQuant], bundle: ModelBundle, example: tuple) -> dict:
    """What emit_artifact needs to write model.pt2, checked first against the QDQ graph on the
    capture example (runtime.verify.check_program)."""
    lowered, stats = lower_graph(gm, plan, bundle.root_prefix)
    if not stats["lowered"]:
        first, why = next(iter(stats["kept"].items()), ("", "no layer is quantized"))
        raise UserError("output.formats: program asks for the lowered program, but no layer can be lowered "
                        f"({len(stats['kept'])} kept, e.g. {first}: {why}), so it would be the QDQ graph",
                        hint="lowered today: int8 weights with int8/uint8 inputs (w8a8), int4/uint4 grouped weights "
                             "with float inputs (w4a16); drop `program` from output.formats for this scheme")
    with torch.no_grad():
        check = check_program(lambda: first_tensor(gm(*example)), first_tensor(lowered(*example)),
                              " + ".join("x".join(map(str, t.shape)) for t in example if isinstance(t, torch.Tensor)))
    record = {"file": PROGRAM_FILE, "lowered": stats["lowered"], "kept": stats["kept"], "check": check,
              "inputs": _input_spec(bundle, example)}
    dynamic = tuple(dynamic_dims(t, bundle.kind) for t in example)
    return {"graph": lowered, "example": example, "dynamic_shapes": dynamic, "record": record}


def _linears(gm: torch.fx.GraphModule, prefix: str) -> list[LinearInfo]:
    out = []
    for node in linear_nodes(gm):
        path = module_path(node, prefix)
        w = node.args[1].meta.get("val")
        if path is None or w is None or w.ndim != 2:
            continue
        out.append(LinearInfo(path, int(w.shape[1]), int(w.shape[0])))
    return out


# The accuracy check of a build compares float and quantized outputs on this many calibration
# samples: one sample (seq_len tokens) catches a broken build, at 1/samples of calibration's cost.
CHECK_SAMPLES = 1


def _example(data: CalibrationSet) -> tuple:
    # Two samples, so export treats the batch size as dynamic rather than specializing on 1.
    first = tuple(t[:2] for t in data.inputs)
    return first if first[0].shape[0] == 2 else tuple(torch.cat([t, t]) for t in first)


# Analyses that need concrete shapes (fold groups) run the graph once on this many tokens of
# one sample: their cost grows with the tensors' size, and any length shows the same dataflow.
ANALYSIS_TOKENS = 16


def _analysis_example(example: tuple, kind: str) -> tuple:
    if kind == "module":  # a plain module's dimensions may be fixed by its export
        return example
    return tuple(t[:1, :ANALYSIS_TOKENS] for t in example)


def _output_check(reference: torch.Tensor, quantized: torch.Tensor, kind: str, samples: int) -> dict:
    figures = compare_outputs(reference, quantized, top1=kind == "causal_lm")
    inputs = "the first calibration sample" if samples == 1 else f"the first {samples} calibration samples"
    return {"inputs": inputs, **figures}


def _state_sha256(bundle: ModelBundle) -> Future | None:
    """The sha256 of an in-memory model's state, computed on a helper thread while export
    (pure Python) leaves the second core idle."""
    if bundle.model_dir is not None:
        return None  # the manifest hashes the model's files instead
    return in_background(sha256_tensors, sorted(bundle.module.state_dict().items()))


def _model_record(bundle: ModelBundle, out_dir: Path, state_sha256: Future | None) -> dict:
    if bundle.model_dir is not None:
        files = {p.name: sha256_file(p) for p in sorted(bundle.model_dir.iterdir())
                 if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")}
        # Relative to the artifact, so the manifest is the same bytes in every checkout.
        return {"kind": bundle.kind, "name": bundle.model_dir.name, "files": files,
                "path": os.path.relpath(bundle.model_dir, out_dir)}
    record = {"kind": bundle.kind, "name": type(bundle.hf_model or bundle.module).__name__,
              "state_sha256": state_sha256.result()}
    if bundle.factory:
        record["factory"] = bundle.factory
    return record


def compile(model=None, spec=None, *, example_inputs=None, pipeline: str | None = None,
            output_dir: str | Path | None = None, force: bool | None = None) -> CompileResult:
    """Quantize `model` (or the spec's model) as `spec` says, and write the artifact if the
    spec (or `output_dir`) names a directory.

    spec: a path to YAML/JSON, a dict, or a `qfx.Spec`. model: an nn.Module (Hugging Face
    models need nothing else; others need `example_inputs`), overriding spec.model.
    """
    loaded: LoadedSpec = load_spec(spec)
    cfg = loaded.spec
    items = _pipeline(cfg, pipeline)
    _check_rule_algorithms(loaded, items)
    out_path = Path(output_dir) if output_dir is not None else (Path(cfg.output.dir) if cfg.output else None)
    force = force if force is not None else bool(cfg.output and cfg.output.force)
    if out_path is not None and not any(getattr(i, "name", None) == "convert" for i in items):
        raise UserError(f"pipeline {format_pipeline(items)!r} has no convert, so there is no quantized graph "
                        "to write", hint="add convert (and freeze), or build without an output directory")
    if out_path is not None and _wants_onnx(cfg):
        require_onnx("output.formats: onnx")
    if out_path is not None and cfg.output is not None and OutputFormat.program in cfg.output.formats \
            and torch.cuda.is_available():
        triton_kernels()  # a GPU runs the program's fused ops with Triton: say so before any work
    seconds: dict[str, float] = {}

    # Claim the output directory first: a bad path fails in a second, not after calibration.
    out = AtomicDir(out_path, force=force).__enter__() if out_path is not None else None
    model_file = None
    try:
        with _timed(seconds, "load"):
            bundle = _bundle(model, example_inputs, cfg)
            data = calibration_set(cfg.calibration, bundle, given="calibration" in cfg.model_fields_set)
            evaluation = budget.prepare(cfg.evaluate, bundle, data) if cfg.evaluate is not None else None
            state_sha256 = _state_sha256(bundle) if out is not None else None
        example = _example(data)
        with _timed(seconds, "export"):
            gm = export(bundle, example)
        linears = _linears(gm, bundle.root_prefix)
        if not linears:
            raise UserError(f"{_model_name(bundle)} has no linear layer (aten.linear with a 2-D weight) that "
                            "qfx can quantize, so the build would quantize nothing",
                            hint=_no_linear_hint(gm))
        layout = layout_named(cfg.output.layout.value if cfg.output is not None else DEFAULT_LAYOUT)
        plan = resolve_plan(cfg.quantization, cfg.target, linears, loaded.source, layout)
        if _wants_onnx(cfg):
            check_onnx_formats(plan, loaded.source)
        _warn_of_consumer_gaps(layout, plan)
        if not plan:
            raise UserError(f"the spec quantizes none of the {len(linears)} linear layers of {_model_name(bundle)}",
                            hint="every layer is excluded or has all its tensors set to null; check "
                                 "quantization.exclude and the rules")

        def calibrate(graph):
            stats = run_calibration(graph, data, cfg.calibration.batch_size)
            release_memory()
            return stats

        if any(getattr(i, "name", None) == SmoothQuant.name for i in items) and \
                not any(q.fmt.input is not None for q in plan.values()):
            raise UserError("algorithms: smoothquant moves activation outliers into the weights, but the spec "
                            "quantizes no activations", hint="quantize the layers' inputs (e.g. preset "
                            "w8a8-int8), or remove smoothquant for weight-only quantization")
        ctx = PassContext(plan=plan, root_prefix=bundle.root_prefix, run_data=calibrate,
                          calibration_batches=lambda: data.batches(cfg.calibration.batch_size),
                          example=_analysis_example(example, bundle.kind))
        with _timed(seconds, "passes"):
            gm = run_pipeline(gm, items, ctx, spec_json=cfg.model_dump_json(indent=2, exclude={"output"}))
        release_memory()
        if out is not None:  # written while the accuracy check computes
            check_layout_transforms(layout, input_transforms(gm, bundle.root_prefix))
            model_file = in_background(write_model_file, out.tmp, gm, plan, bundle.root_prefix, layout)
        check = None
        if "qdq" in ctx.facts:
            with _timed(seconds, "check"), torch.no_grad():
                # Passes edit only the captured graph's own modules, so the eager model is still
                # the float model the graph was captured from.
                check_batch = next(data.batches(CHECK_SAMPLES))
                reference = first_tensor(bundle.module(*check_batch))
                check = _output_check(reference, first_tensor(gm(*check_batch)), bundle.kind, check_batch[0].shape[0])
        verdict = None
        if evaluation is not None:
            if "qdq" not in ctx.facts:
                raise UserError(f"evaluate judges the quantized graph, and pipeline {format_pipeline(items)!r} does "
                                "not convert", hint="add convert, or remove the evaluate section")
            with _timed(seconds, "evaluate"):
                verdict = budget.evaluate(evaluation, bundle, gm)

        manifest = None
        if out is not None:
            with _timed(seconds, "emit"):
                header = _header(bundle, loaded, items, data, check, out.target, state_sha256)
                if verdict is not None:
                    header["evaluate"] = verdict
                    if not verdict["passed"]:  # kept for inspection, beside output.dir, not in it
                        out.retarget(over_budget_dir(out.target))
                if (rotation := ctx.stats.get(Rotation.name)) is not None:
                    header["rotation"] = {k: v for k, v in rotation.items()
                                          if k not in ("modified", "seconds", "channel_max")}
                fold_pass = next((n for n in (SmoothQuant.name, Awq.name) if n in ctx.stats), None)
                folds = ctx.stats.get(fold_pass)
                if folds is not None:  # the per-channel maxima go to the pictures only
                    header[fold_pass] = {"groups": [{k: v for k, v in g.items() if k != "channel_max"}
                                                    for g in folds["groups"]], "not_folded": folds["not_folded"]}
                onnx = _onnx_options(cfg, bundle, example) if _wants_onnx(cfg) else None
                verify = onnx is not None and cfg.output.onnx.verify
                program = _program(gm, plan, bundle, example) \
                    if cfg.output is not None and OutputFormat.program in cfg.output.formats else None
                manifest = _emit(out, gm, plan, layout, bundle, linears, header, model_file, onnx, verify,
                                 ctx.float_weights, folds, ctx.stats.get(Rotation.name),
                                 _weight_algorithm_records(ctx.stats), program)
        if verdict is not None and not verdict["passed"]:
            written = f"the artifact was written to {out.target} for inspection, not to {out_path}" if out \
                else "nothing was written"
            raise BudgetError(f"the quantized model is over its accuracy budget on {verdict['data']}: "
                              + "; ".join(verdict["failures"]), figures=verdict,
                              hint=f"{written}; quantize less aggressively (a weight algorithm, finer groups, "
                                   "more layers excluded) or relax evaluate.budget")
        return CompileResult(gm, plan, manifest, out.target if out else None,
                             dict(ctx.stats, check=check, seconds=seconds, evaluate=verdict), bundle.root_prefix)
    finally:
        if out is not None:
            settle(model_file)
            out.__exit__(None, None, None)


def over_budget_dir(target: Path) -> Path:
    """Where a build over its accuracy budget puts its artifact: beside output.dir, named for it."""
    return target.with_name(target.name + ".over-budget")


def _pipeline(cfg, explicit: str | None) -> list:
    """The spec's pipeline: its algorithms after observe, where they calibrate (smoothquant runs
    the data itself). An explicit pipeline replaces it, but must run every algorithm the spec asks for."""
    wanted = [_algorithm_pass(a) for a in cfg.algorithms]
    # Data-free transforms before the observers, then the passes that run the data (the first of
    # them calibrates the observers), weight algorithms last: they need the final float weights.
    weights = [p for p in wanted if "weights_quantized" in p.produces]
    before = [p for p in wanted if "observed" not in p.requires and p not in weights]
    data = [p for p in wanted if "observed" in p.requires and p not in weights]
    calibrated = any("calibrated" in p.produces for p in data + weights)
    text = explicit or ",".join(format_pipeline(group) for group in (
        ["annotate"], before, ["observe"], data, [] if calibrated else [CALIBRATE], weights,
        ["convert", "freeze"]) if group)
    items = parse_pipeline(text)
    check_pipeline(items)
    names = {getattr(i, "name", i) for i in items}
    if missing := [p.name for p in wanted if p.name not in names]:
        raise UserError(f"the spec's algorithms ask for {', '.join(missing)}, which pipeline {text!r} does not run",
                        hint=f"add {format_pipeline(wanted)} (rotation before observe, smoothquant after it, gptq, awq or hqq before convert), "
                             "or leave out --pipeline")
    return items


def _check_rule_algorithms(loaded: LoadedSpec, items: list) -> None:
    """A rule that chooses gptq, awq or hqq for its layers needs that pass in the pipeline: without it
    the rule would silently leave them rounded to nearest."""
    names = {getattr(i, "name", i) for i in items}
    for r, rule in enumerate(loaded.spec.quantization.rules):
        if rule.algorithm not in (None, "rtn") and rule.algorithm not in names:
            raise SpecError(f"this rule chooses {rule.algorithm} for its layers, but the build runs no {rule.algorithm}",
                            where=loaded.source.where(("quantization", "rules", r, "algorithm")),
                            hint=f"list it under algorithms (e.g. `- {rule.algorithm}: {{}}`), or use rtn")


def _weight_algorithm_records(stats: dict) -> dict:
    """Module path -> the record of the weight algorithm (gptq, awq, hqq) that chose its codes."""
    return {path: record for name, figures in stats.items()
            if name in PASSES and "weights_quantized" in PASSES[name].produces
            for path, record in figures.get("layers", {}).items()}


def _algorithm_pass(algorithm):
    options = getattr(algorithm, algorithm.name)
    if algorithm.name == SmoothQuant.name:
        return SmoothQuant(alpha=str(options.alpha), explicit_multiply=options.explicit_multiply)
    if algorithm.name == Awq.name:
        return Awq(alpha=str(options.alpha), explicit_multiply=options.explicit_multiply, clip=options.clip)
    if algorithm.name == Rotation.name:
        return Rotation(kind=options.kind, seed=options.seed, residual=options.residual, heads=options.heads,
                        online_down_proj=options.online_down_proj)
    if algorithm.name in (Gptq.name, Hqq.name):
        return PASSES[algorithm.name](**options.model_dump())
    raise AssertionError(f"algorithm {algorithm.name} has no pass")


def _model_name(bundle: ModelBundle) -> str:
    return type(bundle.hf_model or bundle.module).__name__


# Ops that multiply by a weight without being a linear layer: named in the error, since a
# model written with them builds nothing quantized.
_MATMULS = ("aten.matmul", "aten.mm", "aten.bmm", "aten.addmm", "aten.einsum", "aten.conv")


def _no_linear_hint(gm: torch.fx.GraphModule) -> str:
    found = sorted({str(n.target).rsplit(".", 1)[0] for n in gm.graph.nodes if n.op == "call_function"
                    and str(n.target).startswith(_MATMULS)})
    seen = f"the graph multiplies with {', '.join(found)}; " if found else ""
    return (f"{seen}qfx quantizes nn.Linear (F.linear) layers: write the model's weight products as "
            "nn.Linear modules")


@contextlib.contextmanager
def _timed(seconds: dict, stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = round(time.perf_counter() - start, 3)


def _bundle(model, example_inputs, cfg) -> ModelBundle:
    if model is not None:
        return wrap_module(model if example_inputs is None else (model, example_inputs))
    if cfg.model is not None:
        return load_model(cfg.model)
    raise ModelLoadError("no model: pass one to qfx.compile or set model.path / model.factory in the spec")


def _header(bundle: ModelBundle, loaded: LoadedSpec, items, data: CalibrationSet, check, out_dir: Path,
            state_sha256: Future | None) -> dict:
    """The manifest's build record: sources, versions, pipeline, calibration, accuracy check."""
    cfg = loaded.spec
    versions = {"qfx": __version__, "torch": torch.__version__.split("+")[0]}
    if bundle.hf_model is not None:
        import transformers
        versions["transformers"] = transformers.__version__
    return {
        "generator": "qfx",
        "versions": versions,
        "model": _model_record(bundle, out_dir, state_sha256),
        "spec_sha256": hashlib.sha256(loaded.raw_text).hexdigest(),
        "target": cfg.target.value,
        "pipeline": format_pipeline(items),
        "calibration": {"description": data.description, "sha256": data.sha256(),
                        "samples": data.samples, "batch_size": cfg.calibration.batch_size},
        "check": check,
    }


def _wants_onnx(cfg) -> bool:
    return cfg.output is not None and OutputFormat.onnx in cfg.output.formats


def _input_spec(bundle: ModelBundle, example: tuple) -> list[dict]:
    """The graph inputs `verify` draws (shapes of the exported example, dtype, and a fill value
    or an upper bound for integers): recorded beside model.onnx and model.pt2."""
    if bundle.kind == "causal_lm":
        return [{"shape": list(example[0].shape), "dtype": "int64", "high": bundle.vocab_size}]
    if bundle.kind == "encoder":
        return [{"shape": list(example[0].shape), "dtype": "int64", "high": bundle.vocab_size},
                {"shape": list(example[1].shape), "dtype": "int64", "fill": 1}]
    return [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
             "high": None if t.is_floating_point() else int(t.max()) + 1} for t in example]


def _onnx_options(cfg, bundle: ModelBundle, example: tuple) -> dict:
    """write_onnx's arguments: I/O names by model kind, the exported example's shapes (verify
    draws its random inputs from them), and what verify must know to pair tensors."""
    if bundle.kind == "causal_lm":
        names, outputs = ["input_ids"], ["logits"]
    elif bundle.kind == "encoder":
        names, outputs = ["input_ids", "attention_mask"], ["last_hidden_state"]
    else:
        names, outputs = [f"input_{i}" for i in range(len(example))], ["output_0"]
    inputs = _input_spec(bundle, example)
    uint8_codes = cfg.target is Target.cpu
    return {"example": example, "dynamic_shapes": tuple(dynamic_dims(t, bundle.kind) for t in example),
            "input_names": names, "output_names": outputs, "uint8_codes": uint8_codes,
            "opset": cfg.output.onnx.opset,
            "describe_node": describe_node,
            "metadata": {META_ROOT: bundle.root_prefix, META_UINT8: "1" if uint8_codes else "0",
                         META_INPUTS: json.dumps(inputs), "qfx.target": cfg.target.value}}


def _warn_of_input_transforms(layers: dict) -> None:
    transformed = [path for path, layer in layers.items() if layer.get("input_transforms")]
    if transformed:
        kinds = sorted({t for path in transformed for t in layers[path]["input_transforms"]})
        warnings.warn(QfxWarning(
            f"{len(transformed)} layers ({transformed[0]}, ...) transform their input before quantizing it "
            f"({', '.join(kinds)}): qfx.runtime and ONNX run these artifacts; Quark-format loaders (vLLM, "
            "transformers through amd-quark) do not"), stacklevel=2)


def _warn_of_consumer_gaps(layout: Layout, plan: dict[str, LayerQuant]) -> None:
    gaps = {path: gap for path, quant in plan.items() if (gap := layout.consumer_gap(quant.fmt))}
    if gaps:
        path, gap = next(iter(gaps.items()))
        warnings.warn(QfxWarning(
            f"{len(gaps)} of the quantized layers ({path}, ...) are stored in the {layout.name} layout in a form not "
            f"every loader of it reads ({gap}); qfx.runtime runs the artifact"), stacklevel=2)


def check_onnx_formats(plan: dict[str, LayerQuant], source) -> None:
    """Refuse, before any work, an ONNX artifact for a format ONNX has no type for."""
    for path, quant in plan.items():
        for role, tf in quant.fmt.tensors.items():
            if tf.dtype.is_mx:
                raise SpecError(f"output.formats asks for onnx, and {path}'s {role} is {tf.dtype.value}, an MX format "
                                "(E8M0 scales per block of 32), which qfx does not emit in ONNX: ONNX has no FP6 "
                                "type, and ONNX Runtime's CPU provider runs no FLOAT4E2M1 QDQ (1.32) or cannot load "
                                "the type (1.22), so the model could not be verified against the safetensors",
                                where=source.where(("output", "formats")),
                                hint="drop onnx from output.formats (the Quark safetensors and the lowered program run "
                                     "it), or build ONNX from an int4 / int8 / fp8_e4m3 spec")
            if tf.dtype.spec.onnx_type is None:
                raise SpecError(f"output.formats asks for onnx, and {path}'s {role} is {tf.dtype.value}, which ONNX has "
                                "no type for", where=source.where(("output", "formats")),
                                hint="drop onnx from output.formats (the safetensors artifact and the lowered program "
                                     "still run it), or quantize to int4 for ONNX")
            if tf.outlier_threshold:
                raise SpecError(f"output.formats asks for onnx, and {path}'s {role} keeps outlier columns in float "
                                "(LLM.int8), which qfx does not express in ONNX", where=source.where(("output", "formats")),
                                hint="drop onnx from output.formats, or drop outlier_threshold (plain per_token int8)")


def check_layout_transforms(layout: Layout, transforms: dict[str, list[str]]) -> None:
    """Refuse, before anything is written, input transforms the layout's consumers cannot run."""
    if transforms and not layout.holds_input_transforms:
        path, kinds = next(iter(transforms.items()))
        raise UserError(f"{len(transforms)} layers ({path}, ...) transform their input before quantizing it "
                        f"({', '.join(kinds)}), which the {layout.name} layout cannot express: its loaders would "
                        "compute another model",
                        hint="drop the online rotation / explicit_multiply smoothquant for this layout, or write "
                             "output.layout: quark")


def _emit(out: AtomicDir, gm, plan, layout: Layout, bundle: ModelBundle, linears: list[LinearInfo], header: dict,
          model_file: Future, onnx: dict | None, verify: bool, float_weights: dict, folds: dict | None,
          rotation: dict | None, weight_algorithms: dict | None, program: dict | None) -> dict:
    def fp_weight(path: str):  # the weight convert quantized, folds included
        return float_weights.get(path)

    try:
        manifest = emit_artifact(
            out.tmp, gm=gm, plan=plan, root_prefix=bundle.root_prefix, layout=layout,
            linear_paths=[layer.path for layer in linears],
            hf_config=bundle.hf_model.config.to_dict() if bundle.hf_model is not None else None,
            model_dir=bundle.model_dir, fp_weight=fp_weight, header=header, model_file=model_file.result(),
            onnx=onnx, folds=folds, rotation=rotation, transforms=input_transforms(gm, bundle.root_prefix),
            weight_algorithms=weight_algorithms, program=program)
        _warn_of_input_transforms(manifest["layers"])
        if verify:  # on the files as written, before they are published
            float_model = copy.deepcopy(bundle.module) if bundle.kind == "module" else None
            # check_hashes=False: the build wrote these files and their hashes a moment ago
            manifest["verify"] = verify_artifact(out.tmp, model=float_model, check_hashes=False)
            write_manifest(out.tmp, manifest)
        out.commit()
    except OSError as exc:
        raise OutputError(f"writing the artifact to {out.target} failed: {exc}",
                          hint="check free disk space and permissions") from None
    except ValueError as exc:  # a tensor the artifact format cannot hold
        raise OutputError(f"cannot write the artifact: {exc}") from None
    return manifest
