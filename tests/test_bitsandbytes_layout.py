"""NF4 weights and the bitsandbytes layout (`output.layout: bitsandbytes`): the code table's
rounding, the packed nibbles and quant_state, the config, and what the spec refuses."""
import json

import pytest
import torch
from conftest import tiny_spec
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import qfx
import qfx.runtime
from qfx.errors import SpecError
from qfx.runtime.formats import QDType
from qfx.runtime.numerics import dequantize, quantize

NF4_G64 = {"default": {"weight": {"dtype": "nf4", "granularity": "per_group", "group_size": 64}},
           "exclude": ["lm_head"]}


def bnb_build(tmp_path, layout="bitsandbytes", **quantization):
    spec = tiny_spec(**(quantization or NF4_G64))
    spec.update(output={"dir": str(tmp_path / "artifact"), "layout": layout})
    return qfx.compile(spec=spec)


@pytest.mark.parametrize("qdtype", [QDType.nf4, QDType.bnb_fp4])
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), spread=st.floats(1e-3, 1e3))
def test_table_codes_are_the_nearest_table_entries(qdtype, seed, spread):
    """Each code is the table entry nearest to x * (1 / scale); dequantizing gives the entry times
    the scale."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)) * spread
    scale = x.abs().amax(dim=1, keepdim=True)  # absmax, as qfx's symmetric range over qmax = 1 gives
    codes = quantize(x, scale.reshape(-1), None, qdtype)
    table = qdtype.table
    distance = (x / scale).unsqueeze(-1).sub(table).abs()  # [4, 64, 16]
    chosen = distance.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
    assert bool((chosen <= distance.min(dim=-1).values + 1e-6).all())
    assert torch.equal(dequantize(codes, scale.reshape(-1), None, qdtype), table[codes.long()] * scale)


@pytest.mark.parametrize("qdtype", [QDType.nf4, QDType.bnb_fp4])
def test_table_ties_go_to_the_lower_entry(qdtype):
    """bnb_fp4's codes are not in ascending order: the lower entry is the one with the lower
    value, and of its two zeros (0 and -0) the lower code."""
    order = torch.argsort(qdtype.table, stable=True)
    ascending = qdtype.table[order]
    midpoints = (ascending[:-1] + ascending[1:]) / 2
    assert torch.equal(quantize(midpoints, torch.tensor(1.0), None, qdtype).long(), order[:-1])


def test_nf4_layer_is_stored_as_bitsandbytes_stores_it(tmp_path):
    result = bnb_build(tmp_path)
    config = json.loads((result.artifact_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"] is True
    assert (config["bnb_4bit_quant_type"], config["bnb_4bit_use_double_quant"]) == ("nf4", False)
    assert config["llm_int8_skip_modules"] == ["lm_head"]
    tensors = load_file(str(result.artifact_dir / "model.safetensors"))
    prefix = "model.layers.0.mlp.down_proj."  # 128 -> 64
    state_key = "weight.quant_state.bitsandbytes__nf4"
    assert {k[len(prefix):] for k in tensors if k.startswith(prefix)} == {"weight", "weight.absmax",
                                                                          "weight.quant_map", state_key}
    assert tensors[prefix + "weight"].shape == (64 * 128 // 2, 1) and tensors[prefix + "weight.absmax"].shape == (128,)
    assert torch.equal(tensors[prefix + "weight.quant_map"], QDType.nf4.table)
    state = json.loads(bytes(tensors[prefix + state_key].tolist()))
    assert state == {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 128]}
    model = qfx.runtime.load(result.artifact_dir)
    codes = model.model.layers[0].mlp.down_proj.weight  # [N, K] indices
    first = tensors[prefix + "weight"][0, 0].item()
    assert (first >> 4, first & 0xF) == (int(codes[0, 0]), int(codes[0, 1]))  # the first code in the HIGH nibble
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, result.graph(ids))


def test_bnb_fp4_is_stored_under_bitsandbytes_name_for_it(tmp_path):
    weight = {"dtype": "bnb_fp4", "granularity": "per_group", "group_size": 64, "double_quant": True}
    result = bnb_build(tmp_path, default={"weight": weight}, exclude=["lm_head"])
    config = json.loads((result.artifact_dir / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_quant_type"] == "fp4"
    tensors = load_file(str(result.artifact_dir / "model.safetensors"))
    prefix = "model.layers.0.mlp.down_proj."
    state = json.loads(bytes(tensors[prefix + "weight.quant_state.bitsandbytes__fp4"].tolist()))
    assert state["quant_type"] == "fp4"
    assert torch.equal(tensors[prefix + "weight.quant_map"], QDType.bnb_fp4.table)
    model = qfx.runtime.load(result.artifact_dir)
    assert model.model.layers[0].mlp.down_proj.fmt.weight.dtype is QDType.bnb_fp4
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, result.graph(ids))


@pytest.mark.parametrize("layout, quantization, message", [
    ("bitsandbytes", {"preset": "w8a8-fp8"}, "or LLM.int8 \\(preset llm-int8\\) here, not fp8_e4m3fn weights"),
    ("bitsandbytes", {"default": {"weight": NF4_G64["default"]["weight"], "input": {"dtype": "int8"}}},
     "bitsandbytes 4-bit checkpoints are weight-only"),
    ("bitsandbytes", {"preset": "w4a16-g64"}, "bitsandbytes stores 4-bit code-table weights \\(nf4 or bnb_fp4\\) or LLM.int8"),
    ("quark", NF4_G64, "Quark has no nf4"),
    ("gptq", NF4_G64, "GPTQ stores 2/4/8-bit integer weights, not nf4"),
    ("compressed-tensors", NF4_G64, "compressed-tensors has no nf4"),
])
def test_a_format_the_layout_cannot_hold_is_refused_at_its_spec_line(tmp_path, layout, quantization, message):
    with pytest.raises(SpecError, match=message) as err:
        bnb_build(tmp_path, layout, **quantization)
    assert "output.layout" in str(err.value.hint) or "output.layout" in str(err.value)
    assert not (tmp_path / "artifact").exists()


@pytest.mark.parametrize("weight, message", [
    ({"dtype": "nf4", "granularity": "per_group", "group_size": 64, "symmetric": False},
     "nf4 has no zero point: it is symmetric only"),
    ({"dtype": "nf4", "granularity": "per_channel"}, "use per_group, not per_channel"),
])
def test_nf4_schemes_the_format_cannot_take_are_refused(tmp_path, weight, message):
    with pytest.raises((SpecError, ValueError), match=message):
        bnb_build(tmp_path, default={"weight": weight})


def test_nf4_activations_are_refused():
    spec = tiny_spec(default={"input": {"dtype": "nf4"}})
    with pytest.raises(SpecError, match="nf4 activations are not supported"):
        qfx.compile(spec=spec)


def test_nf4_with_onnx_output_is_refused_before_any_work(tmp_path):
    spec = tiny_spec(**NF4_G64)
    spec.update(output={"dir": str(tmp_path / "artifact"), "layout": "bitsandbytes", "formats": ["safetensors", "onnx"]})
    with pytest.raises(SpecError, match="ONNX has no type for") as err:
        qfx.compile(spec=spec)
    assert "output.formats" in str(err.value) and not (tmp_path / "artifact").exists()


NF4_G64_DQ = {"default": {"weight": {"dtype": "nf4", "granularity": "per_group", "group_size": 64,
                                     "double_quant": True}}, "exclude": ["lm_head"]}


def test_double_quantized_scales_decode_as_mean_plus_table_entry_times_block_absmax():
    """400 scales: a block of 256 and a short one of 144, each coded against its own absmax; the
    table entry chosen is the nearest to (scale - mean) / absmax."""
    from qfx.runtime.formats import NESTED_SCALES
    from qfx.runtime.numerics import double_dequantize, double_quantize

    scale = torch.rand(8, 50, generator=torch.Generator().manual_seed(0)) * 0.1 + 1e-3
    nested = double_quantize(scale)
    assert nested["codes"].dtype == torch.uint8 and nested["codes"].shape == scale.shape
    assert nested["absmax"].shape == (2,) and torch.equal(nested["offset"], scale.mean())
    centered = (scale.reshape(-1) - scale.mean()).reshape(-1)
    blocks = [centered[:256], centered[256:]]
    assert torch.equal(nested["absmax"], torch.stack([b.abs().max() for b in blocks]))
    table = torch.tensor(NESTED_SCALES.table)
    normalized = torch.cat([b / b.abs().max() for b in blocks])
    chosen = table[nested["codes"].reshape(-1).long()]
    assert bool(((chosen - normalized).abs() <= (table - normalized[:, None]).abs().min(dim=1).values + 1e-6).all())
    decoded = double_dequantize(**nested)
    assert torch.equal(decoded.reshape(-1), chosen * nested["absmax"].repeat_interleave(256)[:400] + scale.mean())
    # the dynamic map's spacing near +-1 (1/64 of the block's absmax) bounds the error
    assert float((decoded - scale).abs().max()) <= float(nested["absmax"].max()) / 128 + 1e-7


def test_double_quantized_nf4_is_stored_as_bitsandbytes_nests_it(tmp_path):
    from qfx.runtime.formats import NESTED_SCALES

    result = bnb_build(tmp_path, **NF4_G64_DQ)
    config = json.loads((result.artifact_dir / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_use_double_quant"] is True
    tensors = load_file(str(result.artifact_dir / "model.safetensors"))
    prefix = "model.layers.0.mlp.down_proj."  # 128 -> 64: 128 scales, one short nested block
    assert tensors[prefix + "weight.absmax"].dtype == torch.uint8 and tensors[prefix + "weight.absmax"].shape == (128,)
    assert tensors[prefix + "weight.nested_absmax"].shape == (1,)
    assert torch.equal(tensors[prefix + "weight.nested_quant_map"], torch.tensor(NESTED_SCALES.table))
    state = json.loads(bytes(tensors[prefix + "weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert (state["nested_blocksize"], state["nested_dtype"]) == (256, "float32")
    model = qfx.runtime.load(result.artifact_dir)
    layer = model.model.layers[0].mlp.down_proj
    built = result.graph.get_submodule("hf." + prefix[:-1])
    for name in ("weight", "weight_scale", "weight_scale_codes", "weight_scale_absmax", "weight_scale_offset"):
        assert torch.equal(getattr(layer, name), getattr(built, name)), name  # the offset's 9 digits give it back
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, result.graph(ids))


def test_double_quantization_keeps_the_codes_and_moves_only_the_scales(tmp_path):
    """bitsandbytes' order: codes chosen with the float scales, then the scales coded."""
    plain = bnb_build(tmp_path / "plain").graph.get_submodule("hf.model.layers.0.mlp.down_proj")
    dq = bnb_build(tmp_path / "dq", **NF4_G64_DQ).graph.get_submodule("hf.model.layers.0.mlp.down_proj")
    assert torch.equal(plain.weight, dq.weight)
    relative = float(((dq.weight_scale - plain.weight_scale).abs() / plain.weight_scale).max())
    assert 0 < relative < 0.05, relative


@pytest.mark.parametrize("layout, quantization, message", [
    ("gptq", {"preset": "w4a16-g64", "default": {"weight": {"double_quant": True}}},
     "the gptq layout has no place for double-quantized scales"),
    ("bitsandbytes", {"default": {"weight": {"dtype": "nf4", "granularity": "per_channel", "double_quant": True}}},
     "double_quant codes the scales of per_group weights"),
    ("quark", {"preset": "w8a8-int8", "default": {"input": {"double_quant": True}}},
     "double_quant codes the scales of per_group weights; per_tensor has no groups"),
])
def test_double_quantization_where_it_cannot_go_is_refused(tmp_path, layout, quantization, message):
    with pytest.raises(SpecError, match=message):
        bnb_build(tmp_path, layout, **quantization)
    assert not (tmp_path / "artifact").exists()


def test_one_config_holds_one_double_quant_setting(tmp_path):
    quantization = dict(NF4_G64_DQ, rules=[{"match": ["*down_proj"], "weight": {"double_quant": False}}])
    with pytest.raises(SpecError, match="a bitsandbytes config has one quant_type and bnb_4bit_use_double_quant"):
        bnb_build(tmp_path, **quantization)


def test_a_nested_quant_map_that_is_not_the_dynamic_map_is_refused(tmp_path):
    from safetensors.torch import save_file

    from qfx.runtime.errors import ArtifactError

    result = bnb_build(tmp_path, **NF4_G64_DQ)
    path = result.artifact_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.down_proj.weight.nested_quant_map"][0] = -1.0
    save_file(tensors, str(path))
    with pytest.raises(ArtifactError, match="weight.nested_quant_map is not the 8-bit dynamic map"):
        qfx.runtime.load(result.artifact_dir, verify_hashes=False)


def test_llm_int8_is_stored_as_bitsandbytes_8bit_checkpoints_are(tmp_path):
    result = bnb_build(tmp_path, preset="llm-int8", exclude=["lm_head"])
    config = json.loads((result.artifact_dir / "config.json").read_text())["quantization_config"]
    assert (config["load_in_8bit"], config["load_in_4bit"], config["llm_int8_threshold"]) == (True, False, 6.0)
    tensors = load_file(str(result.artifact_dir / "model.safetensors"))
    prefix = "model.layers.0.mlp.down_proj."
    assert {k[len(prefix):] for k in tensors if k.startswith(prefix)} == {"weight", "SCB", "weight_format"}
    assert tensors[prefix + "weight"].dtype == torch.int8 and tensors[prefix + "weight"].shape == (64, 128)
    model = qfx.runtime.load(result.artifact_dir)
    layer = model.model.layers[0].mlp.down_proj
    assert torch.equal(tensors[prefix + "SCB"], layer.weight_scale.reshape(-1) * 127)  # each row's absmax
    assert torch.equal(layer.weight, tensors[prefix + "weight"])
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, result.graph(ids))


@settings(max_examples=200, deadline=None)
@given(exponent=st.floats(-30, 10), mantissa=st.floats(1.0, 2.0, exclude_max=True))
def test_absmax_scales_survive_their_round_trip(exponent, mantissa):
    """float32_absmax scales: the checkpoint holds fl(scale * 127), the reader fl(absmax / 127); a
    scale rounded once comes back unchanged."""
    from qfx.runtime.formats import ScaleDType

    scale = ScaleDType.float32_absmax.representable(torch.tensor(mantissa * 2.0**exponent), 127.0)
    assert torch.equal((scale * 127) / 127, scale)


def test_llm_int8_inputs_keep_outlier_columns_in_float():
    """A column with one value of magnitude >= 6 passes whole in float; the other columns are
    coded against each row's absmax below the threshold, outlier columns' small values included."""
    from qfx.runtime.formats import Granularity, TensorFormat
    from qfx.runtime.numerics import quantize_per_token_outliers
    from qfx.runtime.quant_linear import qdq_activation

    x = torch.tensor([[0.5, 7.0, -1.0, 0.25], [0.1, 2.0, 0.2, -0.3]])
    codes, scale, columns = quantize_per_token_outliers(x, QDType.int8, 6.0)
    assert columns.tolist() == [False, True, False, False]
    assert torch.equal(scale.reshape(-1), torch.tensor([1.0, 2.0]) / 127)  # row 2: 2.0 of the outlier column counts
    assert codes[:, 1].tolist() == [0, 0]
    fmt = TensorFormat(QDType.int8, Granularity.per_token, observer=None, outlier_threshold=6.0)
    y = qdq_activation(x, fmt, None, None)
    assert torch.equal(y[:, 1], x[:, 1]) and float((y - x).abs().max()) <= 2.0 / 127 / 2 + 1e-6


@pytest.mark.parametrize("quantization, message", [
    ({"preset": "w8a8-int8", "default": {"input": {"outlier_threshold": 6.0}}},
     "outlier_threshold keeps outlier columns of per_token int8 inputs in float; this is int8 per_tensor"),
    ({"preset": "llm-int8", "default": {"weight": {"outlier_threshold": 6.0}}},
     "outlier_threshold keeps outlier columns of per_token int8 inputs in float; this is int8 per_channel"),
    ({"preset": "w8a8-int8"}, "bitsandbytes 8-bit checkpoints \\(LLM.int8\\) hold int8 per_channel symmetric weights"),
    ({"preset": "llm-int8", "rules": [{"match": ["*down_proj"], "input": {"outlier_threshold": 4.0}}]},
     "a bitsandbytes config has one quant_type and bnb_4bit_use_double_quant, or one llm_int8_threshold"),
])
def test_llm_int8_schemes_bitsandbytes_cannot_hold_are_refused(tmp_path, quantization, message):
    with pytest.raises(SpecError, match=message):
        bnb_build(tmp_path, exclude=["lm_head"], **quantization)
    assert not (tmp_path / "artifact").exists()


def test_llm_int8_with_onnx_output_is_refused_before_any_work(tmp_path):
    spec = tiny_spec(preset="llm-int8")
    spec.update(output={"dir": str(tmp_path / "artifact"), "formats": ["safetensors", "onnx"]})
    with pytest.raises(SpecError, match="keeps outlier columns in float \\(LLM.int8\\)"):
        qfx.compile(spec=spec)
    assert not (tmp_path / "artifact").exists()
