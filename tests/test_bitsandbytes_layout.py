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


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), spread=st.floats(1e-3, 1e3))
def test_nf4_codes_are_the_nearest_table_entries(seed, spread):
    """Each code is the table entry nearest to x * (1 / scale), ties to the lower one; dequantizing
    gives the entry times the scale."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)) * spread
    scale = x.abs().amax(dim=1, keepdim=True)  # absmax, as qfx's symmetric range over qmax = 1 gives
    codes = quantize(x, scale.reshape(-1), None, QDType.nf4)
    table = QDType.nf4.table
    distance = (x / scale).unsqueeze(-1).sub(table).abs()  # [4, 64, 16]
    chosen = distance.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
    assert bool((chosen <= distance.min(dim=-1).values + 1e-6).all())
    assert torch.equal(dequantize(codes, scale.reshape(-1), None, QDType.nf4), table[codes.long()] * scale)


def test_nf4_ties_go_to_the_lower_entry():
    table = QDType.nf4.table
    midpoints = (table[:-1] + table[1:]) / 2
    assert torch.equal(quantize(midpoints, torch.tensor(1.0), None, QDType.nf4).long(), torch.arange(15))


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


@pytest.mark.parametrize("layout, quantization, message", [
    ("bitsandbytes", {"preset": "w8a8-fp8"}, "bitsandbytes 4-bit checkpoints are weight-only"),
    ("bitsandbytes", {"preset": "w4a16-g64"}, "bitsandbytes stores 4-bit code-table weights \\(nf4\\) here, not int4"),
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
