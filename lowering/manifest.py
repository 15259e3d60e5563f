"""manifest.json (what was built, from what, and how well) and report.md (the same, for people).

No timestamps or absolute paths, so two builds of one spec give the same bytes."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qfx.lowering.plots import CHANNELS_PNG, LAYERS_PNG, ROTATION_PNG
from qfx.runtime import numerics
from qfx.runtime.formats import LayerFormat, LayerQuant
from qfx.runtime.hashing import MANIFEST_HASH_KEY, canonical_json, manifest_sha256
from qfx.runtime.layouts import DEFAULT_LAYOUT


def _range(t: torch.Tensor) -> list[float]:
    return [float(t.min()), float(t.max())]


def layer_record(quant: LayerQuant, buffers: dict[str, torch.Tensor], fp_weight: torch.Tensor | None) -> dict:
    """Per layer: rules applied, formats, scale ranges and the weight's SQNR against float."""
    fmt = quant.fmt
    record = {"rules": list(quant.rules), "format": fmt.to_json()}
    for role in ("weight", "input", "output"):
        if f"{role}_scale" in buffers:
            record[f"{role}_scale_range"] = _range(buffers[f"{role}_scale"])
    if fmt.weight is not None and fp_weight is not None:
        w = fmt.weight
        dq = numerics.dequantize(buffers["weight"], buffers["weight_scale"], buffers.get("weight_zero_point"),
                                 w.dtype, numerics.weight_axis(w), w.group_size)
        sqnr = numerics.sqnr_db(fp_weight, dq)
        record["weight_sqnr_db"] = round(sqnr, 3) if sqnr != float("inf") else None  # None: exact
    return record


def write_json(path: Path, data: dict) -> None:
    path.write_text(canonical_json(data))


def write_manifest(folder: Path, manifest: dict) -> None:
    """manifest.json, sealed with the sha256 of its own canonical JSON (the readers refuse a
    manifest edited after the build), and report.md, its readable twin. The seal is set on
    `manifest` too, so the caller's dict is what the file holds."""
    manifest.pop(MANIFEST_HASH_KEY, None)
    # Hashed as read back: what a reader parses and re-serializes is exactly these bytes.
    manifest[MANIFEST_HASH_KEY] = manifest_sha256(json.loads(canonical_json(manifest)))
    write_json(folder / "manifest.json", manifest)
    (folder / "report.md").write_text(render_report(manifest))


def _fmt_cell(fmt) -> str:
    return "—" if fmt is None else fmt.describe()


def _smoothquant_section(record: dict | None, pictures: list[str], title: str = "SmoothQuant") -> list[str]:
    if not record:
        return []
    lines = [f"## {title} folds", "", "| producer | consumers | channels | α | group error before → after |",
             "|---|---|---|---|---|"]
    for g in record["groups"]:
        alpha = "not smoothed (no α helped)" if g["alpha"] is None else g["alpha"]
        lines.append(f"| `{g['producer']}` ({g['kind']}) | {', '.join(f'`{c}`' for c in g['consumers'])} | "
                     f"{g['channels'][0]}/{g['channels'][1]} | {alpha} | {g['error_before']:.3g} → {g['error_after']:.3g} |")
    lines += [""] + [f"- not smoothed: `{m['layer']}`: {m['reason']}" for m in record["not_folded"]]
    if pictures:
        lines += [""] + [f"![{name.removesuffix('.png')}]({name})" for name in pictures]
    return lines + [""]


def _rotation_section(record: dict | None, pictures: list[str]) -> list[str]:
    if not record:
        return []
    lines = ["## Rotation", "", f"- kind: {record['kind']} (seed {record['seed']})"]
    if record["residual"]:
        lines.append(f"- residual stream (R1) of order {record['hidden']}, folded into {len(record['embeddings'])} "
                     f"embedding(s), {len(record['writers'])} linears writing the stream and {len(record['readers'])} "
                     f"reading it; {len(record['norms_fused'])} norm weights fused into their readers")
    else:
        lines.append("- residual stream (R1): not rotated (residual: false)")
    if record["untied"]:
        lines.append(f"- untied: {', '.join(f'`{t}`' for t in record['untied'])} (config.json: "
                     "tie_word_embeddings false)")
    if record["heads"]:
        lines.append(f"- attention heads (R2): {len(record['heads'])} value → output pairs, heads of "
                     f"{', '.join(str(b) for b in sorted({h['block'] for h in record['heads']}))}")
    if record["online"]:
        lines.append(f"- online Hadamard (R4) before {', '.join(f'`{p}`' for p in record['online'])}: runs in "
                     "qfx.runtime and ONNX; Quark-format loaders (vLLM, transformers through amd-quark) do not run it")
    if ROTATION_PNG in pictures:
        lines += ["", f"![{ROTATION_PNG.removesuffix('.png')}]({ROTATION_PNG})"]
    return lines + [""]


def _weight_algorithm_section(layers: dict) -> list[str]:
    records = {path: rec["weight_algorithm"] for path, rec in layers.items() if "weight_algorithm" in rec}
    if not records:
        return []
    lines = ["## Weight algorithm", "", "Relative error of each layer, rounded to nearest vs the algorithm's choice: "
             "of its output on calibration rows where the algorithm saw data, else of its weight.", "",
             "| layer | algorithm | details | error | RTN → algorithm |", "|---|---|---|---|---|"]
    for path, rec in records.items():
        measure = "output_error" if "output_error" in rec else "weight_error"
        errors = rec[measure]
        details = (f"damping {rec['damp']:g}, {rec['dead_inputs']} dead inputs" if "damp" in rec
                   else f"{rec['iterations']} iterations" if "iterations" in rec else "")
        lines.append(f"| `{path}` | {rec['name']} | {details} | {measure.removesuffix('_error')} | "
                     f"{errors['rtn']:.4g} → {errors[rec['name']]:.4g} |")
    return lines + [""]


def _evaluate_section(record: dict | None) -> list[str]:
    if not record:
        return []
    verdict = "within budget" if record["passed"] else "**over budget**: " + "; ".join(record["failures"])
    lines = [f"## Evaluation (quantized vs float, on {record['data']}): {verdict}", "",
             "| figure | value | budget |", "|---|---|---|"]
    for key, value in record["figures"].items():
        limit = record["budget"].get(key)
        lines.append(f"| {key} | {value:.6g} | {'—' if limit is None else f'{limit:g}'} |")
    return lines + [""]


def render_report(manifest: dict) -> str:
    lines = [f"# qfx build report: {manifest['model']['name']}", ""]
    lines += [f"- target: `{manifest['target']}`",
              f"- pipeline: `{manifest['pipeline']}`",
              f"- checkpoint layout: `{manifest.get('layout', DEFAULT_LAYOUT)}`",
              f"- calibration: {manifest['calibration']['description']}",
              f"- quantized layers: {len(manifest['layers'])}; kept in float: "
              f"{', '.join(manifest['excluded']) or 'none'}", ""]
    check = manifest.get("check")
    if check:
        lines += ["## Accuracy (quantized vs float, on " + check["inputs"] + ")", "",
                  "| figure | value |", "|---|---|"]
        for key, value in check.items():
            if key != "inputs":
                lines.append(f"| {key} | {value:.6g} |")
        lines.append("")
    lines += _evaluate_section(manifest.get("evaluate"))
    verify = manifest.get("verify")
    if verify:
        lines += [f"## Verified: model.safetensors = model.onnx ({verify['inputs']})", "",
                  f"- stored codes, scales and zero points bit-identical: {verify['tensors_identical']} tensors",
                  f"- ONNX Runtime ({', '.join(verify['providers'])}) vs the torch artifact, quantized activations "
                  f"fed layer by layer: relative error {verify['output_rel_error']:.3g} (tolerance "
                  f"{verify['tolerance']:g}), max abs error {verify['max_abs_error']:.3g}",
                  f"- activation values that differ (codes flipped by float rounding): "
                  f"{100 * verify['activation_values_differing']:.4g}%; running free, relative error "
                  f"{verify['free_running_rel_error']:.3g}", ""]
    pictures = [name for name in manifest.get("artifact", {}) if name.endswith(".png")]
    lines += _rotation_section(manifest.get("rotation"), pictures)
    fold_pictures = [p for p in pictures if p in (LAYERS_PNG, CHANNELS_PNG)]
    lines += _smoothquant_section(manifest.get("smoothquant"), fold_pictures)
    lines += _smoothquant_section(manifest.get("awq"), fold_pictures, "AWQ")
    lines += _weight_algorithm_section(manifest["layers"])
    lines += ["## Layers", "", "| layer | rules | weight | input | output | weight SQNR (dB) | weight scale range |",
              "|---|---|---|---|---|---|---|"]
    for path, rec in manifest["layers"].items():
        fmt = LayerFormat.from_json(rec["format"])
        scale = rec.get("weight_scale_range")
        sqnr = rec.get("weight_sqnr_db", "—")
        transform = "".join(f"{t}, then " for t in rec.get("input_transforms", []))
        lines.append(f"| `{path}` | {'; '.join(rec['rules'])} | {_fmt_cell(fmt.weight)} | {transform}{_fmt_cell(fmt.input)} | "
                     f"{_fmt_cell(fmt.output)} | {'exact' if sqnr is None else sqnr} | "
                     f"{'—' if scale is None else f'{scale[0]:.3g} … {scale[1]:.3g}'} |")
    return "\n".join(lines) + "\n"
