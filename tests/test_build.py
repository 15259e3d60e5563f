"""End to end: every spec builds; the artifact holds what it should, reloads, and equals the graph."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, TINY_SPECS, TINYSTORIES_TEXT, needs_shared, tiny_spec
from safetensors import safe_open

import qfx
import qfx.runtime


def reload_matches_graph(result, inputs):
    model = qfx.runtime.load(result.artifact_dir)
    with torch.no_grad():
        compiled = result.graph(*inputs)
        out = model(*inputs)
    out = getattr(out, "logits", getattr(out, "last_hidden_state", out))
    return torch.equal(compiled, out), (compiled - out).abs().max()


def tensors_of(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("name", [p.name for p in TINY_SPECS])
def test_tiny_specs_build_reload_and_match_the_graph_exactly(name, built_specs):
    result = built_specs[name]
    names = sorted(p.name for p in result.artifact_dir.iterdir())
    pictures = ["folds_channels.png", "folds_layers.png"] if "smoothquant" in name else []
    pictures += ["rotation_channels.png"] if "rotation" in name else []
    formats = yaml.safe_load((ROOT / "specs" / name).read_text())["output"]["formats"]
    program = ["model.pt2"] if "program" in formats else []
    assert names == sorted(["config.json", *pictures, *program, "manifest.json", "model.onnx", "model.safetensors",
                            "report.md"])
    equal, diff = reload_matches_graph(result, (torch.randint(0, 256, (2, 24)),))
    assert equal, f"reloaded artifact differs from the compiled graph by {diff}"
    config = json.loads((result.artifact_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "quark"


def test_two_builds_are_byte_identical(built_specs, tmp_path):
    spec = ROOT / "specs" / "tiny-w8a8-int8.yaml"
    a = built_specs[spec.name].artifact_dir
    b = qfx.compile(spec=spec, output_dir=tmp_path / "b").artifact_dir
    for name in ("model.safetensors", "model.onnx", "model.pt2", "manifest.json", "config.json", "report.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_int8_layout_is_quarks(built_specs):
    result = built_specs["tiny-w8a8-int8.yaml"]
    t = tensors_of(result.artifact_dir / "model.safetensors")
    p = "model.layers.0.self_attn.k_proj."
    assert t[p + "weight"].dtype == torch.int8 and t[p + "weight"].shape == (32, 64)
    assert t[p + "weight_scale"].dtype == torch.float32 and t[p + "weight_scale"].shape == (32,)
    assert t[p + "weight_zero_point"].dtype == torch.int8 and not t[p + "weight_zero_point"].any()
    assert t[p + "input_scale"].shape == () and t[p + "input_zero_point"].dtype == torch.int8
    assert t[p + "output_scale"].shape == ()
    down = "model.layers.0.mlp.down_proj."  # the asymmetric rule: real zero points
    assert t[down + "weight_zero_point"].any()
    assert "lm_head.weight" not in t and t["model.embed_tokens.weight"].dtype == torch.float32


def test_w4a16_layout_is_quarks_packed_int32(built_specs):
    result = built_specs["tiny-w4a16.yaml"]
    t = tensors_of(result.artifact_dir / "model.safetensors")
    up = "model.layers.0.mlp.up_proj."  # int4, groups of 32: [in, out/8] int32, scales [in/g, out]
    assert t[up + "weight"].dtype == torch.int32 and t[up + "weight"].shape == (64, 128 // 8)
    assert t[up + "weight_scale"].shape == (64 // 32, 128)
    down = "model.layers.0.mlp.down_proj."  # uint4 asymmetric, groups of 64
    assert t[down + "weight_scale"].shape == (128 // 64, 64) and t[down + "weight_zero_point"].dtype == torch.int32
    assert t["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float32  # `weight: null`
    layers = json.loads((result.artifact_dir / "manifest.json").read_text())["layers"]
    assert layers[up[:-1]]["weight_sqnr_db"] > 15  # measured 19.6 dB for int4 g32 on random weights


def test_encoder_and_plain_module_build_and_reload(tmp_path):
    bert = qfx.compile(spec=dict(tiny_spec(preset="w8a8-int8-dynamic"), model={"factory": "qfx.examples:tiny_bert"}),
                       output_dir=tmp_path / "bert")
    ids = torch.randint(0, 256, (2, 12))
    equal, diff = reload_matches_graph(bert, (ids, torch.ones_like(ids)))
    assert equal, diff
    mlp = qfx.compile(spec=dict(tiny_spec(preset="w8a8-int8"), model={"factory": "qfx.examples:tiny_mlp"}),
                      output_dir=tmp_path / "mlp")
    assert sorted(mlp.plan) == ["down", "up"]
    equal, diff = reload_matches_graph(mlp, (torch.randn(3, 32),))
    assert equal, diff


def test_python_api_takes_a_model_object_and_writes_nothing_without_an_output(tmp_path):
    from qfx.examples import tiny_llama

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = qfx.compile(model, tiny_spec(preset="w8a8-fp8", exclude=["lm_head"]))
    assert result.artifact_dir is None and len(result.plan) == 14
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model is untouched"
    assert result.stats["check"]["rel_error"] < 0.1  # measured 0.035


def test_corrupted_artifact_is_refused(tmp_path):
    result = qfx.compile(spec=tiny_spec(), output_dir=tmp_path / "a")
    path = result.artifact_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(qfx.errors.ArtifactError, match="model.safetensors changed after the build"):
        qfx.runtime.load(result.artifact_dir)


@needs_shared
def test_tinystories_fp8_kv_spec_builds_with_the_expected_tensors(tmp_path):
    spec = ROOT / "specs" / "tinystories-fp8-kv.yaml"
    result = qfx.compile(spec=spec, output_dir=tmp_path / "a")
    out = result.artifact_dir
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    t = tensors_of(out / "model.safetensors")
    linears = [f"model.layers.{i}.{m}" for i in range(5) for m in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(5):
        expected |= {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"}
    for name in linears:
        expected |= {name + ".weight", name + ".weight_scale", name + ".input_scale"}
        if name.endswith(("k_proj", "v_proj")):
            expected.add(name + ".output_scale")
    assert set(t) == expected  # exactly: tied lm_head stored once, as the embedding
    for name in linears:
        assert t[name + ".weight"].dtype == torch.float8_e4m3fn  # OCP in safetensors, FNUZ in the graph
        assert all(t[name + s].dtype == torch.float32 and t[name + s].shape == () for s in (".weight_scale", ".input_scale"))
    assert all(v.dtype == torch.float32 for k, v in t.items() if "norm" in k or "embed" in k)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"]["model.layers.0.self_attn.k_proj"]["rules"] == ["default", "rules[0] (*k_proj)"]
    assert manifest["excluded"] == ["lm_head"] and manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert manifest["model"]["files"]["model.safetensors"] and manifest["calibration"]["sha256"]
    ids = torch.randint(0, 512, (2, 64))
    equal, diff = reload_matches_graph(result, (ids,))
    assert equal, diff


@needs_shared
def test_cli_build_inspect_and_eval(tmp_path):
    out = tmp_path / "a"
    build = subprocess.run([sys.executable, "-m", "qfx.cli", "build", str(ROOT / "specs" / "tinystories-fp8-kv.yaml"),
                            "-o", str(out)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert "35 layers quantized, kept in float: lm_head" in build.stdout
    inspect = subprocess.run([sys.executable, "-m", "qfx.cli", "inspect", str(out)], capture_output=True, text=True)
    assert "| `model.layers.4.mlp.down_proj` |" in inspect.stdout
    ev = subprocess.run([sys.executable, "-m", "qfx.cli", "eval", str(out), "--text", str(TINYSTORIES_TEXT),
                         "--max-tokens", "2048", "--json"], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    figures = json.loads(ev.stdout)
    assert figures["tokens"] == 2048 - 1  # every token after the first, as lm-evaluation-harness scores
    assert 0 < figures["perplexity_increase"] < 0.08  # measured +3.6% on the whole sample (FP8 + FP8 KV)
    assert figures["top1_agreement"] > 0.8


def test_artifact_of_an_in_memory_module_reloads_given_its_architecture(tmp_path):
    from qfx.examples import tiny_mlp

    model, example = tiny_mlp()
    result = qfx.compile(model, tiny_spec(preset="w8a8-int8"), example_inputs=example, output_dir=tmp_path / "a")
    with pytest.raises(qfx.errors.ArtifactError, match="built from a model in memory"):
        qfx.runtime.load(result.artifact_dir)
    reloaded = qfx.runtime.load(result.artifact_dir, model=tiny_mlp(seed=1)[0])
    x = torch.randn(3, 32)
    assert torch.equal(reloaded(x), result.graph(x))


def test_mse_weights_clip_each_group_and_beat_min_max(tmp_path):
    rules = [{"match": "*", "weight": {"observer": "mse"}}]
    plain = qfx.compile(spec=tiny_spec(preset="w4a16-g32", exclude=["lm_head"]))
    mse = qfx.compile(spec=tiny_spec(preset="w4a16-g32", exclude=["lm_head"], rules=rules), output_dir=tmp_path / "a")
    print(f"tiny Llama W4A16 g32: relative error min-max {plain.stats['check']['rel_error']:.4f}, "
          f"mse {mse.stats['check']['rel_error']:.4f}")
    assert mse.stats["check"]["rel_error"] < plain.stats["check"]["rel_error"]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    layer = manifest["layers"]["model.layers.0.mlp.up_proj"]
    assert layer["format"]["weight"]["observer"] == "mse"
    # clipped: every group's scale is at most min-max's
    assert layer["weight_scale_range"][1] <= plain.graph.state_dict()[
        "hf.model.layers.0.mlp.up_proj.weight_scale"].max().item() + 1e-12
    equal, diff = reload_matches_graph(mse, (torch.randint(0, 256, (1, 8)),))
    assert equal, diff


@pytest.mark.parametrize("scheme, message", [
    ({"weight": {"observer": "percentile"}}, "use minmax, or mse"),
    ({"weight": {"observer": "histogram"}}, "use minmax, or mse"),
])
def test_observers_each_role_cannot_take_are_spec_errors(scheme, message):
    with pytest.raises(qfx.SpecError, match=message):
        qfx.compile(spec=tiny_spec(preset="w8a8-int8", exclude=["lm_head"], rules=[{"match": "*", **scheme}]))

