"""Folding: fold groups found from dataflow on several transformers families, folds that leave
the float model unchanged, and the smoothquant pass (ranges, records, bad input).

Exactness figures measured on an AVX2 CPU (the folds do the same arithmetic on every CPU;
only the float GEMMs' rounding differs, at the 1e-7 level)."""
import json

import pytest
import torch
from conftest import minilm_dir, needs_minilm, needs_shared
from families import captured, family_model, outlier_llama

import qfx
from qfx.errors import QfxWarning, SpecError, UserError
from qfx.passes.annotate import linear_nodes
from qfx.passes.dataflow import find_fold_groups
from qfx.passes.fold import apply_fold, multiply_group, shared_tensors
from qfx.passes.meta import module_path

# family -> (groups, linears each group feeds, refused producers): two layers each.
EXPECTED = {
    "llama": ("norm->qkv, norm->gate/up, v->o, up->down per layer; final norm->lm_head", 9, 0),
    "qwen2": ("as llama", 9, 0),
    "mistral": ("as llama", 9, 0),
    "phi3": ("norm->qkv_proj, norm->gate_up_proj, qkv_proj's v rows->o, gate_up_proj's up rows->down", 9, 0),
    "gemma": ("as llama, through the (1 + weight) norm", 9, 0),
    "opt": ("LayerNorm->q/k/v, v->out_proj, LayerNorm->fc1; final LayerNorm->lm_head (fc1->fc2 through ReLU: none)", 7, 0),
    "bert": ("v->attention output only: every LayerNorm also feeds a residual add", 2, 5),
}


def _group_of(groups, producer: str):
    (group,) = [g for g in groups if module_path(g.producer.node, "hf.") == producer]
    return group


def _gqa_head_repetition(groups, refused):
    # 4 query heads over 2 kv heads of 16: o_proj's heads 0,1 read kv head 0 and 2,3 read kv head 1
    expected = torch.arange(32).reshape(2, 1, 16).expand(2, 2, 16).reshape(64)
    assert torch.equal(_group_of(groups, "model.layers.0.self_attn.v_proj").maps[0], expected)


def _only_value_rows_of_fused_qkv(groups, refused):
    # rows: 4 query heads, 2 key heads, 2 value heads of 16; only the value rows reach o_proj
    assert _group_of(groups, "model.layers.0.self_attn.qkv_proj").foldable.tolist() == [False] * 96 + [True] * 32


def _layer_norms_refused_for_their_residual_add(groups, refused):
    assert {r.producer.kind for r in refused} == {"layer_norm"}
    assert all("aten.add.Tensor" in r.reason or "output" in r.reason for r in refused)


# Structure checked on the analysis of the float32 capture, beside the exactness of its folds.
STRUCTURE = {"llama": _gqa_head_repetition, "phi3": _only_value_rows_of_fused_qkv,
             "bert": _layer_norms_refused_for_their_residual_add}


def _fold_everything(gm, example, seed=1):
    """Fold random factors e^N(0,1) into every group; returns (groups, refused, folded)."""
    groups, refused = find_fold_groups(gm, example)
    gen = torch.Generator().manual_seed(seed)
    folded = 0
    for group in groups:
        if not shared_tensors(gm, group):
            apply_fold(gm, group, torch.exp(torch.randn(group.producer.channels, generator=gen, dtype=torch.float64)))
            folded += 1
    return groups, refused, folded


# Relative logits error after folding random factors into every group. float32: measured
# 1.3e-7..3.0e-7. float64: 0 to 3.6e-16, except Gemma 4.0e-8 — its norm computes
# `1 + weight.float()`, a float32 cast of the folded weight inside the model itself.
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.float64, 1e-9)])
@pytest.mark.parametrize("family", list(EXPECTED))
def test_folds_found_from_dataflow_leave_the_float_model_unchanged(family, dtype, bound):
    bundle, gm, example = captured(family_model(family), dtype)
    with torch.no_grad():
        reference = bundle.module(*example)
        groups, refused, folded = _fold_everything(gm, example)
        out = gm(*example)
        after = bundle.module(*example)
    _, n_groups, n_refused = EXPECTED[family]
    assert (len(groups), len(refused)) == (n_groups, n_refused)
    if dtype is torch.float32 and family in STRUCTURE:
        STRUCTURE[family](groups, refused)
    assert folded >= n_groups - 1  # only a head tied to the embedding is left alone
    error = float((out - reference).norm() / reference.norm())
    gemma_cast = family == "gemma" and dtype is torch.float64
    assert error <= (1e-7 if gemma_cast else bound), error
    assert torch.equal(after, reference), "folding must not touch the user's model"


@needs_shared
def test_folds_on_the_tinystories_llama_are_exact():
    from conftest import TINYSTORIES
    from transformers import AutoModelForCausalLM

    bundle, gm, example = captured(AutoModelForCausalLM.from_pretrained(TINYSTORIES), torch.float32)
    with torch.no_grad():
        reference = bundle.module(*example)
        groups, _, folded = _fold_everything(gm, example)
        error = float((gm(*example) - reference).norm() / reference.norm())
    print(f"TinyStories folds: {folded} of {len(groups)} groups, relative logits error {error:.2e}")
    assert folded == len(groups) - 1 >= 4 * 5  # 5 layers; the final norm -> tied head is left alone
    assert error <= 1e-5, error  # measured 1.8e-7 (AVX2)


TINY_SQ = {"version": 1, "model": {"factory": "qfx.examples:tiny_llama"},
           "calibration": {"synthetic": True, "samples": 8, "seq_len": 32},
           "quantization": {"preset": "w8a8-int8", "exclude": ["lm_head"]},
           "algorithms": [{"smoothquant": {"alpha": "auto"}}]}


def _input_scales(result) -> dict[str, float]:
    return {name: float(t) for name, t in result.graph.state_dict().items() if name.endswith("input_scale")}


def test_smoothquant_ranges_from_channel_statistics_equal_a_second_calibration():
    derived = qfx.compile(spec=TINY_SQ)
    recalibrated = qfx.compile(spec=TINY_SQ, pipeline="annotate,observe,smoothquant,observe,calibrate,convert,freeze")
    a, b = _input_scales(derived), _input_scales(recalibrated)
    assert a.keys() == b.keys() and len(a) == 14
    worst = max(abs(a[k] / b[k] - 1) for k in a)
    assert worst < 1e-6, worst  # float rounding of x / s in the graph vs max|x| / s: measured 1.2e-7
    assert derived.stats["smoothquant"]["observers_recalibrated"] == 0


def test_smoothquant_recalibrates_observers_whose_range_no_statistic_gives():
    spec = dict(TINY_SQ, quantization={**TINY_SQ["quantization"], "default": {"input": {"observer": "percentile"}}})
    derived = qfx.compile(spec=spec)
    recalibrated = qfx.compile(spec=spec, pipeline="annotate,observe,smoothquant,observe,calibrate,convert,freeze")
    assert derived.stats["smoothquant"]["observers_recalibrated"] > 0
    assert _input_scales(derived) == _input_scales(recalibrated)


def test_smoothquant_records_every_fold_and_keeps_the_build_accurate(tmp_path):
    plain = qfx.compile(spec={k: v for k, v in TINY_SQ.items() if k != "algorithms"})
    result = qfx.compile(spec=TINY_SQ, output_dir=tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    groups = manifest["smoothquant"]["groups"]
    assert {tuple(g["consumers"]) for g in groups} >= {
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
        ("model.layers.1.mlp.down_proj",)}
    assert all(g["error_after"] <= g["error_before"] for g in groups)
    layer = groups[0]["layers"]["model.layers.0.self_attn.v_proj"]  # per layer: without, with the fold
    assert len(layer["error"]) == len(layer["weight_sqnr_db"]) == 2 and layer["error"][1] < layer["error"][0]
    report = (tmp_path / "a" / "report.md").read_text()
    for picture in ("folds_layers.png", "folds_channels.png"):
        assert (tmp_path / "a" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert picture in manifest["artifact"] and f"]({picture})" in report  # hashed, and shown
    assert "## SmoothQuant folds" in report
    assert manifest["pipeline"] == "annotate,observe,smoothquant,convert,freeze"
    # SQNR is measured against the folded float weights, so it stays a weight-quantization figure
    assert all(layer["weight_sqnr_db"] > 35 for layer in manifest["layers"].values())
    assert result.stats["check"]["rel_error"] <= plain.stats["check"]["rel_error"] * 1.05


def test_smoothquant_tames_outlier_channels():
    model = outlier_llama()
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    spec = {k: v for k, v in TINY_SQ.items() if k != "model"}
    errors = {}
    for name, algorithms in (("plain", []), ("smoothquant", TINY_SQ["algorithms"])):
        graph = qfx.compile(model, dict(spec, algorithms=algorithms)).graph
        with torch.no_grad():
            errors[name] = float((graph(ids) - reference).norm() / reference.norm())
    print(f"outlier small Llama, logits relative error: {errors}")
    assert errors["smoothquant"] < 0.5 * errors["plain"], errors  # measured 0.069 vs 0.209 (AVX2)


@pytest.mark.parametrize("algorithms, message", [
    ([{"smoothquant": {"alpha": 1.5}}], "alpha must be in (0, 1) or auto"),
    ([{"smoothquant": {"alpha": 0}}], "alpha must be in (0, 1) or auto"),
    ([{"rotate": {}}], "unknown field 'rotate'"),
    ([{"smoothquant": {"beta": 1}}], "unknown field 'beta'"),
    (["smoothquant", "smoothquant"], "smoothquant is listed more than once"),
    (["smoothquant", "rotation"], "rotation must come before smoothquant"),
    ([{"rotation": {"kind": "givens"}}], "'hadamard' or 'random'"),
])
def test_bad_algorithms_are_named_with_their_spec_line(tmp_path, algorithms, message):
    import yaml

    spec = dict(TINY_SQ, algorithms=algorithms, output={"dir": str(tmp_path / "out")})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SpecError) as info:
        qfx.compile(spec=path)
    assert message in str(info.value) and "spec.yaml:" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_smoothquant_on_a_weight_only_build_is_an_error(tmp_path):
    spec = dict(TINY_SQ, quantization={"preset": "w8a16-int8", "exclude": ["lm_head"]})
    with pytest.raises(UserError, match="quantizes no activations"):
        qfx.compile(spec=spec, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_explicit_pipeline_must_run_the_specs_algorithms():
    with pytest.raises(UserError, match="ask for smoothquant"):
        qfx.compile(spec=TINY_SQ, pipeline="annotate,observe,calibrate,convert,freeze")


def test_smoothquant_without_any_fold_group_still_calibrates():
    spec = {"version": 1, "model": {"factory": "qfx.examples:tiny_mlp"}, "quantization": {"preset": "w8a8-int8"},
            "algorithms": ["smoothquant"]}
    result = qfx.compile(spec=spec)  # up -> GELU -> down: nothing folds exactly
    assert result.stats["smoothquant"]["groups"] == []
    assert [m["layer"] for m in result.stats["smoothquant"]["not_folded"]] == ["up", "down"]
    assert result.stats["check"]["rel_error"] < 0.05


# An explicit multiply by 1/s before every linear, s = e^N(0,1), with the columns times s.
# Relative output error measured: float32 1.5e-7 (OPT), 1.2e-7 (BERT); float64 2e-16, 1.6e-16.
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
@pytest.mark.parametrize("family", ["bert", "opt"])
def test_explicit_multiplies_leave_the_float_model_unchanged(family, dtype, bound):
    bundle, gm, example = captured(family_model(family), dtype)
    gen = torch.Generator().manual_seed(1)
    feeds = {}
    for node in linear_nodes(gm):
        feeds.setdefault(node.args[0], []).append(node)
    with torch.no_grad():
        reference = bundle.module(*example)
        for feed, consumers in feeds.items():
            group = multiply_group(feed, tuple(consumers), int(feed.meta["val"].shape[-1]))
            if not shared_tensors(gm, group):
                apply_fold(gm, group, torch.exp(torch.randn(group.producer.channels, generator=gen, dtype=torch.float64)))
        gm.recompile()
        out = gm(*example)
    multiplies = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor
                  and str(getattr(n.args[1], "target", "")).endswith("pre_quant_scale")]
    assert len(multiplies) >= len(feeds) - 1  # all but a head tied to the embedding (OPT)
    error = float((out - reference).norm() / reference.norm())
    print(f"{family} {dtype}: relative error {error:.2e}")
    assert error <= bound, error


TINY_BERT_FOLDED = {
    "version": 1, "model": {"factory": "qfx.examples:tiny_bert"}, "target": "cpu",
    "calibration": {"synthetic": True, "samples": 8, "seq_len": 32}, "quantization": {"preset": "w8a8-int8"},
    "algorithms": [{"rotation": {"residual": False, "online_down_proj": True}},
                   {"smoothquant": {"alpha": 0.5, "explicit_multiply": True}}]}


def test_explicit_multiplies_reach_the_artifact_the_runtime_and_onnx(tmp_path):
    output = {"dir": str(tmp_path / "a"), "formats": ["safetensors", "onnx"]}
    with pytest.warns(QfxWarning, match="Quark-format loaders .* do not"):
        result = qfx.compile(spec=dict(TINY_BERT_FOLDED, output=output))
    record = result.stats["smoothquant"]
    multiplied = {c for g in record["groups"] if g["kind"] == "multiply" for c in g["consumers"]}
    # post-LN BERT: only value -> attention output folds; every other quantized input is multiplied
    assert {"encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense",
            "encoder.layer.0.output.dense"} <= multiplied
    assert record["not_folded"] == [{"layer": "pooler.dense",
                                     "reason": "no explicit multiply: the model's output does not depend on it"}]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    layers = manifest["layers"]
    assert layers["encoder.layer.0.output.dense"]["input_transforms"] == ["hadamard", "scale"]
    assert layers["encoder.layer.0.attention.self.key"]["input_transforms"] == ["scale"]
    assert "input_transforms" not in layers["encoder.layer.0.attention.output.dense"]  # folded into value
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert sorted(config["qfx_online_transforms"]["scale"]) == sorted(p for p in layers if "scale" in
                                                                     layers[p].get("input_transforms", []))
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| hadamard, then scale, then int8 per_tensor" in report
    assert "residual stream (R1): not rotated (residual: false)" in report and "(multiply)" in report
    assert manifest["verify"]["output_rel_error"] < 1e-5  # ONNX Runtime multiplies too (measured 4e-7)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reloaded = qfx.runtime.load(tmp_path / "a")(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert torch.equal(reloaded.last_hidden_state, result.graph(ids, torch.ones_like(ids)))


def test_smoothquant_multiplies_explicitly_only_when_asked():
    spec = {"version": 1, "model": {"factory": "qfx.examples:tiny_mlp"}, "quantization": {"preset": "w8a8-int8"},
            "algorithms": [{"smoothquant": {"alpha": 0.5, "explicit_multiply": True}}]}
    result = qfx.compile(spec=spec)  # up -> GELU -> down: nothing folds, both inputs multiplied
    assert [g["consumers"] for g in result.stats["smoothquant"]["groups"]] == [["up"], ["down"]]
    assert result.stats["smoothquant"]["not_folded"] == []
    assert result.stats["check"]["rel_error"] < 0.05


# MiniLM (post-LN BERT): rotation's R2 and R4, then SmoothQuant's folds (value -> attention output)
# and explicit multiplies everywhere else, through qfx.compile up to calibration: measured 9.3e-7.
@needs_minilm
def test_rotation_and_smoothquant_on_minilm_are_exact():
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir()).eval()
    spec = {"version": 1, "calibration": {"synthetic": True, "samples": 4, "seq_len": 32},
            "quantization": {"preset": "w8a8-int8"}}
    result = qfx.compile(model, spec, pipeline="annotate,rotation{residual=false,online_down_proj=true},observe,"
                                                "smoothquant{alpha=0.5,explicit_multiply=true}")
    kinds = [g["kind"] for g in result.stats["smoothquant"]["groups"]]
    assert kinds.count("linear") == 6 and kinds.count("multiply") == 18  # per layer: v->o; q/k/v, FFN in, out
    assert len(result.stats["rotation"]["online"]) == len(result.stats["rotation"]["heads"]) == 6
    ids = torch.randint(0, 30000, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).last_hidden_state
        error = float((result.graph(ids, mask) - reference).norm() / reference.norm())
    print(f"MiniLM rotated and smoothed: relative error {error:.2e}")
    assert error <= 1e-5, error

