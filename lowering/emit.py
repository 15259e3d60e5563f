"""Write the artifact: model.safetensors (in the spec's layout), config.json, tokenizer files,
manifest.json and report.md, into a directory that is published only when all are written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from qfx.lowering.checkpoint import artifact_tensors
from qfx.lowering.manifest import layer_record, write_manifest
from qfx.lowering.safetensors_writer import write_safetensors
from qfx.runtime.artifact_files import MODEL_FILE
from qfx.runtime.formats import LayerQuant
from qfx.runtime.hashing import sha256_file
from qfx.runtime.layouts import Layout
from qfx.runtime.quant_linear import ONLINE_CONFIG_KEY

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


def layer_buffers(gm: torch.nn.Module, root_prefix: str, path: str) -> dict[str, torch.Tensor]:
    module = gm.get_submodule(root_prefix + path)
    return {**dict(module.named_buffers(recurse=False)), **dict(module.named_parameters(recurse=False))}


def nodes_reaching_output(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """The nodes the graph's outputs depend on."""
    seen: set[torch.fx.Node] = set()
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def layers_off_output_path(gm: torch.fx.GraphModule, plan: dict[str, LayerQuant], root_prefix: str) -> list[str]:
    """The planned layers none of whose tensors the graph's output depends on (a BERT pooler
    under last_hidden_state): the ONNX export drops them. Read from the torch graph, not the ONNX
    model, so that `qfx verify` can tell such a layer from one the emitter lost."""
    used = {str(n.target) for n in nodes_reaching_output(gm) if n.op == "get_attr"}
    owners = {t.rpartition(".")[0] for t in used}
    return sorted(path for path in plan if root_prefix + path not in owners)


def write_model_file(folder: Path, gm: torch.nn.Module, plan: dict[str, LayerQuant], root_prefix: str,
                     layout: Layout) -> tuple[str, dict[str, str]]:
    """model.safetensors in `layout`; returns its sha256 and the tied-weight aliases."""
    tensors, aliases = artifact_tensors(gm, plan, root_prefix, layout)
    return write_safetensors(folder / MODEL_FILE, tensors, metadata={"format": "pt"}), aliases


def emit_artifact(folder: Path, *, gm: torch.nn.Module, plan: dict[str, LayerQuant], root_prefix: str,
                  layout: Layout, linear_paths: list[str], hf_config: dict | None, model_dir: Path | None,
                  fp_weight: Callable[[str], torch.Tensor | None], header: dict,
                  model_file: tuple[str, dict[str, str]] | None = None, onnx: dict | None = None,
                  folds: dict | None = None, rotation: dict | None = None,
                  transforms: dict[str, list[str]] | None = None,
                  weight_algorithms: dict[str, dict] | None = None, program: dict | None = None) -> dict:
    """The whole artifact. `model_file` is write_model_file's result when the caller already
    wrote model.safetensors (the build writes it while its accuracy check runs); `onnx` holds
    write_onnx's options when the artifact includes model.onnx; `folds` the smoothquant pass's
    records and `rotation` the rotation pass's, pictured in PNGs that report.md shows;
    `transforms` each layer's input transforms, in order (passes.input_transforms);
    `weight_algorithms` the records of the layers a weight algorithm (gptq, awq, hqq) quantized;
    `program` the lowered graph to write as model.pt2 (keys graph, example, dynamic_shapes) and
    the manifest's record of it (record)."""
    transforms = transforms or {}
    model_sha256, aliases = model_file or write_model_file(folder, gm, plan, root_prefix, layout)
    files = [MODEL_FILE]
    if onnx is not None:
        from qfx.lowering.onnx_emit import write_onnx  # onnx and onnxscript load only when asked for

        files += write_onnx(folder, gm, **onnx)
    if program is not None:
        from qfx.lowering.program import write_program

        files.append(write_program(folder, program["graph"], program["example"], program["dynamic_shapes"]))
    if folds is not None and folds["groups"]:
        from qfx.lowering.plots import write_fold_plots  # matplotlib loads only when there is a picture

        files += write_fold_plots(folder, folds["groups"])
    if rotation is not None and rotation.get("channel_max"):
        from qfx.lowering.plots import write_rotation_plot

        files += write_rotation_plot(folder, rotation["channel_max"])
    if hf_config is not None:
        config = dict(hf_config, quantization_config=layout.config(plan, linear_paths))
        if config.get("tie_word_embeddings") and not aliases:  # a fold untied the head from the embedding
            config["tie_word_embeddings"] = False
        if transforms:  # for a reader to tell that these layers need them (vLLM's Quark loader does not)
            config[ONLINE_CONFIG_KEY] = {kind: [p for p, t in transforms.items() if kind in t]
                                         for kind in dict.fromkeys(k for t in transforms.values() for k in t)}
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        files.append("config.json")
    if model_dir is not None:
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, folder / name)
                files.append(name)
    manifest = dict(header)
    manifest["layout"] = layout.name
    manifest["layers"] = {path: layer_record(quant, layer_buffers(gm, root_prefix, path), fp_weight(path))
                          for path, quant in plan.items()}
    for path, layer_transforms in transforms.items():
        manifest["layers"][path]["input_transforms"] = layer_transforms
    for path, record in (weight_algorithms or {}).items():
        manifest["layers"][path]["weight_algorithm"] = record
    if program is not None:
        manifest["program"] = program["record"]
    manifest["excluded"] = [p for p in linear_paths if p not in plan]
    manifest["unused_layers"] = layers_off_output_path(gm, plan, root_prefix)
    manifest["tied"] = aliases
    manifest["artifact"] = {name: model_sha256 if name == MODEL_FILE else sha256_file(folder / name)
                            for name in sorted(files)}
    write_manifest(folder, manifest)
    return manifest
