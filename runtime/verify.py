"""`qfx verify`: prove an artifact's safetensors checkpoint and its ONNX model are the same model.

(a) Every stored code, scale and zero point of model.safetensors equals its ONNX initializer
    bit for bit, after the documented re-encodings (FN <-> FNUZ, [out, in] -> [in, out],
    int8 -> uint8 + 128 on the cpu target, int4 packing).
(b) The checkpoint reloaded in torch and the ONNX model in ONNX Runtime give the same outputs
    on random inputs of the build's calibration shape, within a stated tolerance, when torch is
    fed ONNX Runtime's quantized activations layer by layer. Running free, the two drift apart
    on large models: a float rounding difference that flips one activation code changes the
    next layer's inputs, which flips more codes (on the TinyStories Llama at 2 x 128 tokens,
    up to 1e-2 for int8 static). Fed, each layer is compared on equal inputs, and the share of
    activation values that differ (a flip on a rounding boundary) is reported and bounded.
(c) The lowered program (model.pt2), when the artifact has one, gives the checkpoint's outputs:
    no further from the checkpoint run with float64 sums than the checkpoint's own float32 run
    is (check_program).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qfx.runtime.artifact_files import MANIFEST_FILE, MODEL_FILE, ONNX_FILE, PROGRAM_FILE, REBUILD, read_manifest
from qfx.runtime.artifact_files import check_hashes as check_file_hashes
from qfx.runtime.errors import ArtifactError
from qfx.runtime.evaluate import compare_outputs, first_tensor, float64_matmuls, relative_error
from qfx.runtime.formats import LayerFormat, QDType
from qfx.runtime.loader import load
from qfx.runtime.onnx_codes import (
    int8_as_uint8,
    uint8_zero_point,
    weight_codes_as_uint8,
    weight_to_onnx,
)
from qfx.runtime.program import load_program
from qfx.runtime.quant_linear import PRE_QUANT_SCALE, forced_activations

# Outputs of torch and ONNX Runtime agree to float rounding, except where that rounding flips
# an activation code; FP8's coarse codes make a flip cost more.
TOLERANCE = {"int": 1e-4, "fp8": 1e-3}
META_ROOT, META_UINT8, META_INPUTS = "qfx.root_prefix", "qfx.uint8_codes", "qfx.verify_inputs"
META_ACTIVATIONS = "qfx.activation_values"
# Fed layer by layer, activation values differ only where a float rounding difference (MatMul
# accumulation order, softmax's exp) moves a value across a code boundary: rare. A wrong scale or zero
# point moves most of them.
FLIP_LIMIT = 1e-3
# The lowered program against the checkpoint. Its fused ops sum exactly, the checkpoint's linears
# in float32: they differ by float rounding (about 1e-7) unless a rounding flips a code of a later
# quantizer, which moves every layer after it. The checkpoint run with float64 sums moves by as
# much, so the program must be no further from that reference than the float32 checkpoint is,
# times PROGRAM_MARGIN, plus PROGRAM_SLACK. A wrong kernel or layout is off by far more.
PROGRAM_SLACK, PROGRAM_MARGIN = 1e-5, 2.0


def _bits(x) -> np.ndarray:
    """A tensor's or array's values as flat, comparable bytes (int4 values one per byte)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().contiguous().reshape(-1)
        return x.view(torch.uint8).numpy() if x.element_size() == 1 else x.numpy().view(np.uint8)
    x = np.ascontiguousarray(x).reshape(-1)
    if "int4" in x.dtype.name:  # ml_dtypes int4 / uint4
        return x.astype(np.int8).view(np.uint8)
    return x.view(np.uint8)


def _onnx_form(layer: dict[str, torch.Tensor], fmt: LayerFormat, uint8_codes: bool) -> dict[str, torch.Tensor]:
    """One layer's graph tensors as the ONNX artifact stores them."""
    out = {k: v for k, v in layer.items() if k.endswith(("_scale", "_zero_point"))}
    if fmt.weight is not None:
        w, _ = weight_to_onnx({"codes": layer["weight"], "scale": layer["weight_scale"],
                               "zero_point": layer.get("weight_zero_point")}, fmt.weight.group_size)
        out["weight"], out["weight_scale"] = w["codes"], w["scale"]
        if w["zero_point"] is not None:
            out["weight_zero_point"] = w["zero_point"]
    if uint8_codes:
        for role, tf in fmt.tensors.items():
            if tf.dtype is not QDType.int8 or tf.dynamic:
                continue
            if role == "weight" and not weight_codes_as_uint8(out["weight"]):
                continue  # 7-bit weights stay int8
            out[f"{role}_zero_point"] = uint8_zero_point(out[f"{role}_scale"], out.get(f"{role}_zero_point"))
            if role == "weight":
                out["weight"] = int8_as_uint8(out["weight"])
    return out


def compare_tensors(folder: Path, manifest: dict, model, torch_model: torch.nn.Module) -> int:
    """(a): raise ArtifactError naming the first tensor that differs; return how many matched.

    Each layer's tensors are those `torch_model` (the artifact loaded by `load`, which checked
    them against their formats) holds, which are model.safetensors' in graph form. A layer with
    none of its tensors in model.onnx must be one the build recorded as off the output's path
    (`unused_layers`: a BERT pooler under last_hidden_state, which export drops); any other
    such layer is one the ONNX model computes without."""
    from onnx import numpy_helper

    meta = {p.key: p.value for p in model.metadata_props}
    prefix, uint8_codes = meta.get(META_ROOT, ""), meta.get(META_UINT8) == "1"
    inits = {t.name: t for t in model.graph.initializer}
    unused = set(manifest.get("unused_layers", []))
    compared = 0
    for path, record in manifest["layers"].items():
        fmt = LayerFormat.from_json(record["format"])
        start = path + "."
        module = torch_model.get_submodule(path)
        layer = {k: v for k, v in [*module.named_buffers(recurse=False), *module.named_parameters(recurse=False)]
                 if v is not None}
        expected_tensors = _onnx_form(layer, fmt, uint8_codes)
        if not any(prefix + start + key in inits for key in expected_tensors):
            if path in unused:
                continue
            names = ", ".join(sorted(expected_tensors))
            raise ArtifactError(f"{ONNX_FILE} has none of layer {path}'s tensors ({names}), yet the model's output "
                                f"uses that layer (the build recorded {len(unused)} unused layer(s), not this one): "
                                "the ONNX model computes without it", where=str(folder),
                                hint="the two files do not come from one build (or the ONNX emitter dropped the "
                                     "layer, a qfx bug if the artifact is unedited); rebuild the artifact")
        for key, expected in expected_tensors.items():
            name = prefix + start + key
            if name not in inits and key == PRE_QUANT_SCALE:
                # Layers that read one input (q, k, v) share one multiply, which reads the
                # first one's factors: the others' are stored alike, compared with those.
                name = next((n for n in inits if n.endswith("." + PRE_QUANT_SCALE) and np.array_equal(
                    _bits(expected), _bits(numpy_helper.to_array(inits[n], base_dir=str(folder))))), name)
            if name not in inits:
                raise ArtifactError(f"{ONNX_FILE} has no initializer {name} for {MODEL_FILE} tensor {start + key}",
                                    hint="the two files do not come from one build; rebuild the artifact")
            try:
                got = numpy_helper.to_array(inits[name], base_dir=str(folder))
            except (ValueError, TypeError, OSError, KeyError) as exc:
                raise ArtifactError(f"{ONNX_FILE} initializer {name} cannot be read: {str(exc)[:200]}",
                                    where=str(folder / ONNX_FILE), hint=REBUILD) from None
            same_shape = tuple(expected.shape) == tuple(got.shape)
            a, b = _bits(expected), _bits(got)
            if not same_shape or not np.array_equal(a, b):
                where = (f"shape {tuple(expected.shape)} vs {tuple(got.shape)}" if not same_shape
                         else f"{int((a != b).sum())} of {a.size} bytes")
                raise ArtifactError(f"{MODEL_FILE} tensor {start + key} differs from {ONNX_FILE} initializer "
                                    f"{name} ({where})", hint="the artifact was edited or corrupted; rebuild it")
            compared += 1
    return compared


# What verify's random inputs may be: the dtypes a build records, and at most this many
# elements each (a build records its calibration shape, e.g. 2 x 128 tokens).
INPUT_DTYPES = {name: getattr(torch, name) for name in ("float16", "bfloat16", "float32", "float64", "bool",
                                                         "int8", "uint8", "int16", "int32", "int64")}
MAX_INPUT_ELEMENTS = 1 << 24


def read_onnx(path: Path):
    """model.onnx's protobuf (initializer data in external files stays unread)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise ArtifactError(f"{ONNX_FILE} is not an ONNX model: {str(exc)[:200]}", where=str(path),
                            hint=REBUILD) from None


def _onnx_tensors(graph):
    """Every tensor a graph holds: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _onnx_tensors(attr.g)
            for sub in attr.graphs:
                yield from _onnx_tensors(sub)


def check_external_data(proto, manifest: dict, folder: Path) -> None:
    """A tensor kept in external data must name a file of the artifact that the manifest hashes,
    not a path elsewhere on this machine (ONNX resolves it relative to the model)."""
    from onnx.external_data_helper import uses_external_data

    for tensor in _onnx_tensors(proto.graph):
        if not uses_external_data(tensor):
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        if location not in manifest["artifact"] or "/" in location or "\\" in location:
            raise ArtifactError(f"{ONNX_FILE} keeps tensor {tensor.name} in {location!r}, which is not a file of "
                                f"the artifact that {MANIFEST_FILE} lists", where=str(folder / ONNX_FILE),
                                hint=REBUILD)


def _metadata(proto, kind: str, path: Path) -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """The inputs verify draws and the activations it feeds, from model.onnx's metadata, checked:
    they come from a file, and torch allocates what they say."""
    meta = {p.key: p.value for p in proto.metadata_props}

    def bad(message: str) -> ArtifactError:
        return ArtifactError(f"{ONNX_FILE}'s metadata {message}", where=str(path), hint=REBUILD)

    try:
        spec = json.loads(meta[META_INPUTS])
        activations = json.loads(meta.get(META_ACTIVATIONS, "{}"))
    except KeyError:
        raise bad(f"has no {META_INPUTS}, which a qfx build writes") from None
    except (ValueError, RecursionError) as exc:
        raise bad(f"is not valid JSON: {str(exc)[:200]}") from None
    graph_inputs = len(proto.graph.input)
    least = {"causal_lm": 1, "encoder": 2}.get(kind, 1)
    if not isinstance(spec, list) or len(spec) != graph_inputs or graph_inputs < least:
        raise bad(f"{META_INPUTS} does not describe the graph's {graph_inputs} inputs")
    for item in spec:
        _check_input_spec(item, bad)
    if not proto.graph.output:
        raise bad("belongs to a graph with no output")
    if not (isinstance(activations, dict) and all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[1] in ("input", "output")
            for v in activations.values())):
        raise bad(f"{META_ACTIVATIONS} is not a map of value names to [layer, input|output]")
    return spec, {name: tuple(key) for name, key in activations.items()}


def _check_input_spec(item, bad) -> None:
    if not isinstance(item, dict) or item.get("dtype") not in INPUT_DTYPES:
        raise bad(f"gives an input {item!r} without a dtype verify can draw")
    shape = item.get("shape")
    if not (isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape)):
        raise bad(f"gives an input the shape {shape!r}")
    numel = 1
    for d in shape:
        numel *= d
    if numel > MAX_INPUT_ELEMENTS:
        raise bad(f"asks for an input of {numel} elements, over verify's limit of {MAX_INPUT_ELEMENTS}")
    if INPUT_DTYPES[item["dtype"]].is_floating_point:
        return
    fill, high = item.get("fill"), item.get("high")
    if not (type(fill) is int or (type(high) is int and high > 0)):
        raise bad(f"gives the integer input {item!r} neither a fill value nor a positive bound")


def _inputs(spec: list[dict]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for item in spec:
        dtype = INPUT_DTYPES[item["dtype"]]
        if dtype.is_floating_point:
            out.append(torch.randn(item["shape"], generator=gen, dtype=dtype))
        elif item.get("fill") is not None:
            out.append(torch.full(item["shape"], item["fill"], dtype=dtype))
        else:
            out.append(torch.randint(0, item["high"], item["shape"], generator=gen, dtype=dtype))
    return tuple(out)


def _torch_output(model: torch.nn.Module, kind: str, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        if kind == "causal_lm":
            return model(input_ids=inputs[0], use_cache=False).logits
        if kind == "encoder":
            return model(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state
        return first_tensor(model(*inputs))


def verify_artifact(folder: str | Path, providers: list[str] | None = None, model: torch.nn.Module | None = None,
                    check_hashes: bool = True, trust_factory: bool = False) -> dict:
    """Run (a) and (b) when the artifact has model.onnx and (c) when it has model.pt2; return the
    figures ((c)'s under "program"), or raise ArtifactError. `trust_factory`: as for
    `qfx.runtime.load`."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    has_program = PROGRAM_FILE in manifest["artifact"]
    if (folder / ONNX_FILE).is_file() or not has_program:
        figures, torch_model = _verify_onnx(folder, manifest, providers, model, check_hashes, trust_factory)
    else:
        figures, torch_model = {}, load(folder, model=model, verify_hashes=check_hashes, trust_factory=trust_factory)
    if has_program:
        figures["program"] = _verify_program(folder, manifest, torch_model)
    return figures


def _verify_program(folder: Path, manifest: dict, torch_model: torch.nn.Module) -> dict:
    """(c) on random inputs of the shapes the build recorded for the program."""
    record = manifest.get("program")
    path = folder / PROGRAM_FILE

    def bad(message: str) -> ArtifactError:
        return ArtifactError(f"{MANIFEST_FILE}'s program record {message}", where=str(path), hint=REBUILD)

    if not isinstance(record, dict) or not isinstance(record.get("inputs"), list) or not record["inputs"]:
        raise bad("does not describe the program's inputs")
    for item in record["inputs"]:
        _check_input_spec(item, bad)
    inputs = _inputs(record["inputs"])
    program = load_program(folder, verify_hashes=False)  # the caller checked every hash
    with torch.no_grad():
        got = first_tensor(program(*inputs))
    kind = manifest["model"]["kind"]
    described = " + ".join(f"{'x'.join(map(str, t.shape))} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
    return check_program(lambda: _torch_output(torch_model, kind, inputs), got, described + " (random, seed 0)")


def check_program(qdq: Callable[[], torch.Tensor], program_output: torch.Tensor, inputs: str) -> dict:
    """The figures of a lowered program's output against the QDQ model's, which `qdq()` computes
    (run twice: with float64 sums, and as it is); ArtifactError when the program is further from
    the float64 run than PROGRAM_MARGIN times the float32 run is, plus PROGRAM_SLACK."""
    with float64_matmuls():
        exact = qdq()
    with torch.no_grad():
        as_is = qdq()
    own, error = relative_error(exact, as_is), relative_error(exact, program_output)
    bound = PROGRAM_SLACK + PROGRAM_MARGIN * own
    figures = {"rel_error_vs_float64_sums": float(f"{error:.3g}"), "rel_error_vs_float32": float(
                   f"{relative_error(as_is, program_output):.3g}"),
               "float32_vs_float64_sums": float(f"{own:.3g}"), "bound": float(f"{bound:.3g}"), "inputs": inputs}
    if not error <= bound:
        raise ArtifactError(f"the lowered program ({PROGRAM_FILE}) differs from the QDQ model on {inputs}: relative "
                            f"error {error:.3g} against the QDQ model with float64 sums, whose own float32 run is "
                            f"{own:.3g} from it (bound {bound:.3g})",
                            hint="this is a qfx bug if the artifact is unedited; please report it")
    return figures


def _verify_onnx(folder: Path, manifest: dict, providers: list[str] | None, model: torch.nn.Module | None,
                 check_hashes: bool, trust_factory: bool) -> tuple[dict, torch.nn.Module]:
    """(a) and (b): their figures, and the checkpoint as loaded for them."""
    import onnx

    from qfx.runtime.ort import session

    onnx_path = folder / ONNX_FILE
    if not onnx_path.is_file():
        raise ArtifactError(f"{folder} has no {ONNX_FILE} (nor {PROGRAM_FILE}) to verify",
                            hint="build with output.formats: [safetensors, onnx] (or program)")
    if ONNX_FILE not in manifest["artifact"]:
        raise ArtifactError(f"{MANIFEST_FILE} does not list {ONNX_FILE}, so no hash covers it",
                            where=str(folder / MANIFEST_FILE), hint=REBUILD)
    proto = read_onnx(onnx_path)
    kind = manifest["model"]["kind"]
    spec, activations = _metadata(proto, kind, onnx_path)
    check_external_data(proto, manifest, folder)
    # Before the hashes, so that an edit is named by tensor; `load` checks every tensor it reads.
    torch_model = load(folder, model=model, verify_hashes=False, trust_factory=trust_factory)
    compared = compare_tensors(folder, manifest, proto, torch_model)
    if check_hashes:
        check_file_hashes(folder, manifest)
    inputs = _inputs(spec)
    _check_token_ids(torch_model, kind, spec, onnx_path)
    free_running = _run_torch(torch_model, kind, inputs)

    # ONNX Runtime runs once, reporting every dequantized activation beside the model output.
    for name in activations:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    try:
        with _model_source(proto, folder) as source:
            sess = session(source, providers)
        names = [i.name for i in sess.get_inputs()]
        got, *values = sess.run([proto.graph.output[0].name, *activations],
                                {n: t.numpy() for n, t in zip(names, inputs)})
    except _ort_errors() as exc:
        raise ArtifactError(f"ONNX Runtime cannot run {ONNX_FILE}: {type(exc).__name__}: {str(exc)[:300]}",
                            where=str(onnx_path), hint="rebuild the artifact; if it is unedited, this is a qfx bug: "
                                                       "please report it") from None
    got = torch.from_numpy(np.asarray(got))
    with forced_activations({key: torch.from_numpy(np.asarray(v)) for key, v in zip(activations.values(), values)}
                            ) as differing:
        fed = _run_torch(torch_model, kind, inputs)
    if got.shape != fed.shape:
        raise ArtifactError(f"ONNX Runtime's output has shape {list(got.shape)}, the torch artifact's "
                            f"{list(fed.shape)}", where=str(onnx_path), hint=REBUILD)
    elements = sum(v.size for v in values)
    flipped = sum(differing.values()) / max(elements, 1)

    fp8 = any(QDType(tf["dtype"]).is_float for rec in manifest["layers"].values()
              for tf in rec["format"].values() if tf)
    tolerance = TOLERANCE["fp8" if fp8 else "int"]
    error = compare_outputs(fed, got, top1=False)["rel_error"]
    figures = {"tensors_identical": compared, "output_rel_error": error, "tolerance": tolerance,
               "max_abs_error": float((got - fed).abs().max()) if got.numel() else 0.0,
               "activations_fed": len(activations), "activation_values_differing": flipped,
               "free_running_rel_error": compare_outputs(free_running, got, top1=False)["rel_error"],
               "providers": sess.get_providers(),
               "inputs": " + ".join(f"{'x'.join(map(str, t.shape))} {str(t.dtype).removeprefix('torch.')}"
                                    for t in inputs) + " (random, seed 0)"}
    if len(differing) != len(activations):
        raise ArtifactError(f"{ONNX_FILE} reports activations of layers the torch artifact does not quantize: "
                            f"{sorted(set(activations.values()) - set(differing))[:3]}")
    if not (error <= tolerance and flipped <= FLIP_LIMIT):
        raise ArtifactError(f"ONNX Runtime's model differs from the torch artifact's on {figures['inputs']}: "
                            f"output relative error {error:.3g} (tolerance {tolerance:g}) with activations fed "
                            f"layer by layer; {100 * flipped:.3g}% of activation values differ (limit "
                            f"{100 * FLIP_LIMIT:g}%)", hint="this is a qfx bug if the artifact is unedited; please report it")
    return figures, torch_model


def _ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's own exception types (Fail, InvalidGraph, ...): each derives from Exception."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


def _check_token_ids(model: torch.nn.Module, kind: str, spec: list[dict], path: Path) -> None:
    """Random token ids must index the model's embedding table."""
    if kind not in ("causal_lm", "encoder") or not hasattr(model, "get_input_embeddings"):
        return
    vocab = model.get_input_embeddings().num_embeddings
    high = spec[0].get("high")
    if not (type(high) is int and 0 < high <= vocab):
        raise ArtifactError(f"{ONNX_FILE}'s metadata draws token ids below {high!r}, but the model has {vocab}",
                            where=str(path), hint=REBUILD)


def _run_torch(model: torch.nn.Module, kind: str, inputs: tuple) -> torch.Tensor:
    """The torch artifact's output on inputs that model.onnx's metadata describes: inputs from a
    file, so a model that cannot take them is a bad artifact, not a qfx fault."""
    try:
        return _torch_output(model, kind, inputs)
    except (RuntimeError, IndexError, ValueError, TypeError) as exc:
        shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
        raise ArtifactError(f"the torch artifact cannot run on the inputs {ONNX_FILE}'s metadata describes "
                            f"({shapes}): {type(exc).__name__}: {str(exc)[:200]}", hint=REBUILD) from None


@contextlib.contextmanager
def _model_source(proto, folder: Path):
    """What ONNX Runtime opens: the model's bytes, or, when its initializers live in external
    data (models over 2 GB, beyond protobuf's limit), a temporary file beside that data."""
    from onnx.external_data_helper import uses_external_data

    if not any(uses_external_data(t) for t in proto.graph.initializer):
        yield proto.SerializeToString()
        return
    import onnx

    path = folder / ".qfx-verify.onnx"
    onnx.save_model(proto, str(path))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
