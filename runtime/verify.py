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
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from qfx.runtime.errors import ArtifactError
from qfx.runtime.evaluate import compare_outputs, first_tensor
from qfx.runtime.formats import LayerFormat, QDType
from qfx.runtime.layout import (
    int8_as_uint8,
    layer_from_artifact,
    uint8_zero_point,
    weight_codes_as_uint8,
    weight_to_onnx,
)
from qfx.runtime.loader import MODEL_FILE, ONNX_FILE, load, read_manifest
from qfx.runtime.loader import check_hashes as check_file_hashes
from qfx.runtime.quant_linear import forced_activations

# Outputs of torch and ONNX Runtime agree to float rounding, except where that rounding flips
# an activation code; FP8's coarse codes make a flip cost more.
TOLERANCE = {"int": 1e-4, "fp8": 1e-3}
META_ROOT, META_UINT8, META_INPUTS = "qfx.root_prefix", "qfx.uint8_codes", "qfx.verify_inputs"
META_ACTIVATIONS = "qfx.activation_values"
# Fed layer by layer, activation values differ only where a float rounding difference (MatMul
# accumulation order, softmax's exp) moves a value across a code boundary: rare. A wrong scale or zero
# point moves most of them.
FLIP_LIMIT = 1e-3


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


def compare_tensors(folder: Path, manifest: dict, model) -> int:
    """(a): raise ArtifactError naming the first tensor that differs; return how many matched."""
    from onnx import numpy_helper

    meta = {p.key: p.value for p in model.metadata_props}
    prefix, uint8_codes = meta.get(META_ROOT, ""), meta.get(META_UINT8) == "1"
    inits = {t.name: t for t in model.graph.initializer}
    stored = load_file(str(folder / MODEL_FILE))
    compared = 0
    for path, record in manifest["layers"].items():
        fmt = LayerFormat.from_json(record["format"])
        start = path + "."
        layer = {k[len(start):]: v for k, v in stored.items() if k.startswith(start) and "." not in k[len(start):]}
        expected_tensors = _onnx_form(layer_from_artifact(layer, fmt), fmt, uint8_codes)
        if not any(prefix + start + key in inits for key in expected_tensors):
            continue  # a layer the model's output does not use (a BERT pooler): export drops it
        for key, expected in expected_tensors.items():
            name = prefix + start + key
            if name not in inits:
                raise ArtifactError(f"{ONNX_FILE} has no initializer {name} for {MODEL_FILE} tensor {start + key}",
                                    hint="the two files do not come from one build; rebuild the artifact")
            got = numpy_helper.to_array(inits[name], base_dir=str(folder))
            same_shape = tuple(expected.shape) == tuple(got.shape)
            a, b = _bits(expected), _bits(got)
            if not same_shape or not np.array_equal(a, b):
                where = (f"shape {tuple(expected.shape)} vs {tuple(got.shape)}" if not same_shape
                         else f"{int((a != b).sum())} of {a.size} bytes")
                raise ArtifactError(f"{MODEL_FILE} tensor {start + key} differs from {ONNX_FILE} initializer "
                                    f"{name} ({where})", hint="the artifact was edited or corrupted; rebuild it")
            compared += 1
    return compared


def _inputs(spec: list[dict]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for item in spec:
        dtype = getattr(torch, item["dtype"])
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
                    check_hashes: bool = True) -> dict:
    """Run (a) and (b) on the artifact in `folder`; return the figures, or raise ArtifactError."""
    import onnx

    from qfx.runtime.ort import session

    folder = Path(folder)
    manifest = read_manifest(folder)
    onnx_path = folder / ONNX_FILE
    if not onnx_path.is_file():
        raise ArtifactError(f"{folder} has no {ONNX_FILE} to verify",
                            hint="build with output.formats: [safetensors, onnx]")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    compared = compare_tensors(folder, manifest, proto)  # before the hashes: an edit is named by tensor
    if check_hashes:
        check_file_hashes(folder, manifest)
    meta = {p.key: p.value for p in proto.metadata_props}
    inputs = _inputs(json.loads(meta[META_INPUTS]))
    activations = {name: tuple(key) for name, key in json.loads(meta.get(META_ACTIVATIONS, "{}")).items()}
    torch_model = load(folder, model=model, verify_hashes=False)
    kind = manifest["model"]["kind"]
    free_running = _torch_output(torch_model, kind, inputs)

    # ONNX Runtime runs once, reporting every dequantized activation beside the model output.
    for name in activations:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    with _model_source(proto, folder) as source:
        sess = session(source, providers)
    names = [i.name for i in sess.get_inputs()]
    got, *values = sess.run([proto.graph.output[0].name, *activations],
                            {n: t.numpy() for n, t in zip(names, inputs)})
    got = torch.from_numpy(got)
    with forced_activations({key: torch.from_numpy(v) for key, v in zip(activations.values(), values)}) as differing:
        fed = _torch_output(torch_model, kind, inputs)
    elements = sum(v.size for v in values)
    flipped = sum(differing.values()) / max(elements, 1)

    fp8 = any(QDType(tf["dtype"]).is_fp8 for rec in manifest["layers"].values()
              for tf in rec["format"].values() if tf)
    tolerance = TOLERANCE["fp8" if fp8 else "int"]
    error = compare_outputs(fed, got, top1=False)["rel_error"]
    figures = {"tensors_identical": compared, "output_rel_error": error, "tolerance": tolerance,
               "max_abs_error": float((got - fed).abs().max()),
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
    return figures


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
