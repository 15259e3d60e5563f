"""Rebuild a runnable torch model from a qfx artifact directory (no compiler needed).

Quantized linears become `QuantLinear` modules running the reference `qfx::` ops in the
same order as the compiled graph, so outputs match it bit for bit.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from qfx.runtime.errors import ArtifactError
from qfx.runtime.formats import LayerFormat
from qfx.runtime.hashing import sha256_file
from qfx.runtime.layout import layer_from_artifact
from qfx.runtime.quant_linear import QuantLinear

MODEL_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a qfx artifact (no manifest.json)",
                            hint="point at the output.dir of a `qfx build`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("generator") != "qfx":
        raise ArtifactError(f"{path} was not written by qfx")
    return manifest


def check_hashes(folder: Path, manifest: dict) -> None:
    for name, expected in manifest.get("artifact", {}).items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{folder} is missing {name}, which the manifest lists")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{path} changed after the build (sha256 differs from manifest.json)",
                                hint="rebuild the artifact; qfx will not run files it cannot vouch for")


def _skeleton(folder: Path, manifest: dict) -> torch.nn.Module:
    source = manifest["model"]
    if "factory" not in source and source["kind"] == "module":
        raise ArtifactError(f"{folder} was built from a model in memory, so qfx cannot rebuild its architecture",
                            hint="pass the float model: qfx.runtime.load(folder, model=...)")
    if source["kind"] in ("causal_lm", "encoder"):
        import transformers

        config_dict = json.loads((folder / "config.json").read_text())
        config_dict.pop("quantization_config", None)
        model_type = config_dict.pop("model_type")
        config = transformers.AutoConfig.for_model(model_type, **config_dict)
        auto = transformers.AutoModelForCausalLM if source["kind"] == "causal_lm" else transformers.AutoModel
        return auto.from_config(config, dtype=torch.float32)
    module_name, _, func = source["factory"].partition(":")
    made = getattr(importlib.import_module(module_name), func)()
    return made[0] if isinstance(made, tuple) else made


def load(folder: str | Path, model: torch.nn.Module | None = None, verify_hashes: bool = True) -> torch.nn.Module:
    """The artifact in `folder` as an eager torch model in eval mode.

    The architecture comes from config.json (Hugging Face models) or the recorded factory;
    `model`, a float model of the same architecture, serves where neither exists (its linear
    layers are replaced and its tensors overwritten)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify_hashes:
        check_hashes(folder, manifest)
    model = model if model is not None else _skeleton(folder, manifest)
    tensors = load_file(str(folder / MODEL_FILE))
    for path, record in manifest["layers"].items():
        fmt = LayerFormat.from_json(record["format"])
        try:
            linear = model.get_submodule(path)
        except AttributeError:
            raise ArtifactError(f"layer {path} of the manifest is not in the model") from None
        prefix = path + "."
        layer = {k[len(prefix):]: tensors.pop(k) for k in list(tensors)
                 if k.startswith(prefix) and "." not in k[len(prefix):]}
        layer = layer_from_artifact(layer, fmt)
        quant = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, fmt)
        quant.path = path
        for name, value in layer.items():
            if name in ("weight", "bias") and name in quant._parameters:
                quant._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
            else:
                quant.register_buffer(name, value)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quant)
    result = model.load_state_dict(tensors, strict=False)
    tied = set(manifest.get("tied", {}))
    missing = [k for k in result.missing_keys if k not in tied and not _is_quant_key(model, k)]
    if missing or result.unexpected_keys:
        raise ArtifactError(f"{folder / MODEL_FILE} does not fit the model: missing {missing[:5]}, "
                            f"unexpected {result.unexpected_keys[:5]}")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _is_quant_key(model: torch.nn.Module, key: str) -> bool:
    owner, _, _ = key.rpartition(".")
    try:
        return isinstance(model.get_submodule(owner), QuantLinear)
    except AttributeError:
        return False
