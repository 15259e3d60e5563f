"""Rebuild a runnable torch model from a qfx artifact directory (no compiler needed).

Quantized linears become `QuantLinear` modules running the reference `qfx::` ops in the
same order as the compiled graph, so outputs match it bit for bit.

The artifact's files are checked as hostile input (`artifact_files`) and the model they build
is checked against them before any tensor is read. Nothing in an artifact picks code to run
unless the caller opts in (`trust_factory`).
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch

from qfx.runtime.artifact_files import (
    CONFIG_FILE,
    HF_KINDS,
    MANIFEST_FILE,
    MODEL_FILE,
    REBUILD,
    check_hashes,
    hf_config,
    read_manifest,
    read_safetensors_header,
    read_tensors,
)
from qfx.runtime.errors import ArtifactError
from qfx.runtime.formats import LayerFormat
from qfx.runtime.layouts import DEFAULT_LAYOUT, check_artifact_layer, layout_named
from qfx.runtime.quant_linear import INPUT_TRANSFORMS, QuantLinear

# The float skeleton a config.json describes may take this many times model.safetensors' bytes
# (a float32 weight whose codes are packed 4-bit takes 8 times their bytes), plus this slack for
# buffers the checkpoint does not store (rotary frequencies, position ids).
SKELETON_BYTES_PER_STORED_BYTE = 8
SKELETON_SLACK_BYTES = 64 << 20

# A factory in qfx's own installed package is trusted without opt-in: its code comes from the
# qfx install, not from the artifact, which can only choose which of these functions runs. The
# module name must equal one of these exactly (no prefix match: `qfx_evil` or `qfx.examples_x`
# are other packages), and the function must be a public one defined in that module.
TRUSTED_FACTORY_MODULES = frozenset({"qfx.examples"})


def check_factory_trusted(folder: Path, reference: str, trust_factory: bool) -> None:
    """Rebuilding a model from its recorded factory imports and calls code that the artifact
    names: allowed for qfx's own examples, otherwise only when the caller says so."""
    if trust_factory or _is_builtin_factory(reference):
        return
    raise ArtifactError(f"{MANIFEST_FILE} names the model factory {reference!r}; rebuilding the model would import "
                        "and call it, running code that the artifact, not you, chose",
                        where=str(Path(folder) / MANIFEST_FILE),
                        hint="if you trust where this artifact came from, pass trust_factory=True (on the command "
                             "line: --trust-factory); or pass the float model: qfx.runtime.load(folder, model=...)")


def _is_builtin_factory(reference: str) -> bool:
    module_name, sep, func = reference.partition(":")
    if not sep or module_name not in TRUSTED_FACTORY_MODULES or func.startswith("_"):
        return False
    obj = getattr(importlib.import_module(module_name), func, None)
    return inspect.isfunction(obj) and obj.__module__ == module_name


def _call_factory(folder: Path, reference: str) -> torch.nn.Module:
    module_name, _, func = reference.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), func)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ArtifactError(f"cannot import the model factory {reference!r} that {MANIFEST_FILE} names: {exc}",
                            where=str(Path(folder) / MANIFEST_FILE),
                            hint="make its module importable, or pass the float model: "
                                 "qfx.runtime.load(folder, model=...)") from None
    made = factory()
    model = made[0] if isinstance(made, tuple) else made
    if not isinstance(model, torch.nn.Module):
        raise ArtifactError(f"the factory {reference!r} returned a {type(model).__name__}, not a torch module")
    return model


def _skeleton(folder: Path, manifest: dict, header: dict, trust_factory: bool) -> torch.nn.Module:
    source = manifest["model"]
    if source["kind"] in HF_KINDS:
        return _hf_skeleton(folder, manifest, header)
    if "factory" not in source:
        raise ArtifactError(f"{folder} was built from a model in memory, so qfx cannot rebuild its architecture",
                            hint="pass the float model: qfx.runtime.load(folder, model=...)")
    check_factory_trusted(folder, source["factory"], trust_factory)
    return _call_factory(folder, source["factory"])


def _hf_skeleton(folder: Path, manifest: dict, header: dict) -> torch.nn.Module:
    """The float model config.json describes, built first on the meta device (no memory) and
    checked against model.safetensors, so a config that asks for a huge model fails before any
    of it is allocated."""
    import transformers

    path = folder / CONFIG_FILE
    config = hf_config(path)
    kind = manifest["model"]["kind"]
    auto = transformers.AutoModelForCausalLM if kind == "causal_lm" else transformers.AutoModel
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > len(header):  # every layer stores at least one tensor
        raise ArtifactError(f"{CONFIG_FILE} asks for {layers} layers, but {MODEL_FILE} holds {len(header)} tensors",
                            where=str(path), hint=REBUILD)
    try:
        with torch.device("meta"):
            meta = auto.from_config(config, dtype=torch.float32, trust_remote_code=False)
    except Exception as exc:  # model code runs on the config's values: any failure means a bad config
        raise ArtifactError(f"transformers cannot build a {kind} model from {CONFIG_FILE}: "
                            f"{type(exc).__name__}: {str(exc)[:300]}", where=str(path), hint=REBUILD) from None
    check_fits(meta, header, manifest, folder / MODEL_FILE)
    stored = (folder / MODEL_FILE).stat().st_size
    need = sum(t.numel() * t.element_size() for t in [*meta.parameters(), *meta.buffers()])
    if need > SKELETON_BYTES_PER_STORED_BYTE * stored + SKELETON_SLACK_BYTES:
        raise ArtifactError(f"{CONFIG_FILE} describes a model of {need} bytes in float, far more than the "
                            f"{stored} bytes of {MODEL_FILE} can hold", where=str(path), hint=REBUILD)
    return auto.from_config(config, dtype=torch.float32, trust_remote_code=False)


def _linear(model: torch.nn.Module, path: str) -> torch.nn.Linear:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ArtifactError(f"layer {path} of the manifest is not in the model",
                            hint="the artifact and the model are different architectures") from None
    if not isinstance(module, torch.nn.Linear):
        raise ArtifactError(f"layer {path} of the manifest is a {type(module).__name__} in the model, "
                            "not a linear layer", hint="the artifact and the model are different architectures")
    return module


def layer_of(name: str, layers) -> str | None:
    """The quantized layer a checkpoint tensor belongs to, or None. A layer is a linear, which has
    no submodules, so everything under its path is its own: layouts name some tensors with dots
    (bitsandbytes' `weight.absmax`)."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if (path := ".".join(parts[:end])) in layers:
            return path
    return None


def check_fits(model: torch.nn.Module, header: dict, manifest: dict, path: Path) -> None:
    """Every tensor of `model` outside the quantized layers is in the checkpoint with its dtype
    and shape, and the checkpoint holds nothing else (the layers are checked against their
    formats by `check_artifact_layer`). Works on a meta-device model."""
    layers, tied = manifest["layers"], set(manifest.get("tied", {}))
    for layer in layers:
        _linear(model, layer)
    state = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in layers and k not in tied}
    missing = [k for k in state if k not in header]
    unexpected = [k for k in header if k not in state and layer_of(k, layers) is None]
    if missing or unexpected:
        raise ArtifactError(f"{MODEL_FILE} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}",
                            where=str(path), hint="the artifact and the model are different architectures; "
                                                  + REBUILD)
    for name, t in state.items():
        dtype, shape = header[name]
        if dtype != t.dtype or shape != tuple(t.shape):
            raise ArtifactError(f"tensor {name} is {str(dtype).removeprefix('torch.')} {list(shape)} in {MODEL_FILE}, "
                                f"but the model's is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}",
                                where=str(path), hint="the artifact and the model are different architectures; "
                                                      + REBUILD)


def load(folder: str | Path, model: torch.nn.Module | None = None, verify_hashes: bool = True,
         trust_factory: bool = False, program: bool = False, device: str | torch.device | None = None
         ) -> torch.nn.Module:
    """The artifact in `folder` as an eager torch model in eval mode, or with `program=True` its
    lowered program (model.pt2: qfx.runtime.program.load_program), moved to `device` if given.

    The architecture comes from config.json (Hugging Face models) or the recorded factory;
    `model`, a float model of the same architecture, serves where neither exists (its linear
    layers are replaced and its tensors overwritten). A factory outside qfx's own examples runs
    only with `trust_factory=True`: it is code that the artifact names."""
    if program:
        from qfx.runtime.program import load_program

        return load_program(folder, verify_hashes, device)
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify_hashes:
        check_hashes(folder, manifest)
    path = folder / MODEL_FILE
    header = read_safetensors_header(path)
    model = model if model is not None else _skeleton(folder, manifest, header, trust_factory)
    check_fits(model, header, manifest, path)
    tensors = read_tensors(path)
    layout = layout_named(manifest.get("layout", DEFAULT_LAYOUT))
    by_layer: dict[str, dict[str, torch.Tensor]] = {}  # each quantized layer's tensors, by name within it
    for name in list(tensors):
        if (owner := layer_of(name, manifest["layers"])) is not None:
            by_layer.setdefault(owner, {})[name[len(owner) + 1:]] = tensors.pop(name)
    for layer_path, record in manifest["layers"].items():
        fmt = LayerFormat.from_json(record["format"])
        linear = _linear(model, layer_path)
        layer = by_layer.get(layer_path, {})
        transforms = _input_transforms(record, layer_path, folder)
        check_artifact_layer(layout, layer, fmt, linear.in_features, linear.out_features, linear.bias is not None,
                             linear.weight.dtype, layer_path, transforms)
        layer = layout.from_artifact(layer, fmt)
        quant = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, fmt)
        quant.path = layer_path
        quant.input_transforms = transforms
        for name, value in layer.items():
            if name in ("weight", "bias") and name in quant._parameters:
                quant._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
            else:
                quant.register_buffer(name, value)
        parent, _, child = layer_path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quant)
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise ArtifactError(f"{MODEL_FILE} does not fit the model: {str(exc)[:300]}", where=str(path),
                            hint=REBUILD) from None
    tied = set(manifest.get("tied", {}))
    missing = [k for k in result.missing_keys if k not in tied and not _is_quant_key(model, k)]
    if missing or result.unexpected_keys:
        raise ArtifactError(f"{folder / MODEL_FILE} does not fit the model: missing {missing[:5]}, "
                            f"unexpected {result.unexpected_keys[:5]}")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    _check_tied(model, manifest["tied"] if tied else {}, path)
    return model.eval() if device is None else model.eval().to(device)


def _input_transforms(record: dict, layer_path: str, folder: Path) -> tuple[str, ...]:
    transforms = record.get("input_transforms", [])
    unknown = [t for t in transforms if t not in INPUT_TRANSFORMS]
    if not isinstance(transforms, list) or unknown:
        raise ArtifactError(f"layer {layer_path} of {MANIFEST_FILE} has input_transforms {transforms!r}, which this "
                            f"qfx does not know (it knows {', '.join(INPUT_TRANSFORMS)})", where=str(folder),
                            hint="load it with the qfx version that built it")
    return tuple(transforms)


def _check_tied(model: torch.nn.Module, tied: dict[str, str], path: Path) -> None:
    """Each tensor the manifest calls tied (stored once, under its target's name) must share its
    target's storage once the model ties its weights; otherwise it kept its random init."""
    state = model.state_dict(keep_vars=True)
    for alias, target in tied.items():
        a, b = state.get(alias), state.get(target)
        if a is None or b is None or a.data_ptr() != b.data_ptr():
            raise ArtifactError(f"{MANIFEST_FILE} says {alias} is stored as {target}, but the model does not tie "
                                "the two, so it would keep random values", where=str(path.parent / MANIFEST_FILE),
                                hint=REBUILD)


def _is_quant_key(model: torch.nn.Module, key: str) -> bool:
    owner, _, _ = key.rpartition(".")
    try:
        return isinstance(model.get_submodule(owner), QuantLinear)
    except AttributeError:
        return False
