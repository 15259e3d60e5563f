"""The compressed-tensors layout (`output.layout: compressed-tensors`): pack-quantized integer
weights, int-quantized W8A8 and float-quantized FP8, their config, and what it refuses."""
import json

import pytest
import torch
from conftest import tiny_spec
from safetensors.torch import load_file

import qfx
import qfx.runtime
from qfx.errors import SpecError


def ct_build(tmp_path, target="cpu", **quantization):
    spec = tiny_spec(**quantization)
    spec.update(target=target, output={"dir": str(tmp_path / "artifact"), "layout": "compressed-tensors"})
    return qfx.compile(spec=spec)


def reloads_exactly(result):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(qfx.runtime.load(result.artifact_dir)(ids).logits, result.graph(ids))


def test_int4_groups_are_packed_along_the_input(tmp_path):
    result = ct_build(tmp_path, preset="w4a16-g64", exclude=["lm_head"])
    config = json.loads((result.artifact_dir / "config.json").read_text())["quantization_config"]
    assert (config["format"], config["quantization_status"], config["ignore"]) == ("pack-quantized", "compressed",
                                                                                 ["lm_head"])
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == \
        {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    tensors = load_file(str(result.artifact_dir / "model.safetensors"))
    prefix = "model.layers.0.mlp.down_proj."  # 128 -> 64
    assert {k[len(prefix):] for k in tensors if k.startswith(prefix)} == {"weight_packed", "weight_scale",
                                                                          "weight_shape"}
    assert tensors[prefix + "weight_packed"].shape == (64, 16) and tensors[prefix + "weight_scale"].shape == (64, 2)
    assert tensors[prefix + "weight_shape"].tolist() == [64, 128]
    codes = qfx.runtime.load(result.artifact_dir).model.layers[0].mlp.down_proj.weight  # int4 in int8, [N, K]
    first_word = sum(((int(c) + 8) & 0xF) << (4 * i) for i, c in enumerate(codes[0, :8]))
    assert tensors[prefix + "weight_packed"][0, 0].item() % 2**32 == first_word  # first code in the lowest bits
    assert reloads_exactly(result)


def test_w8a8_with_asymmetric_inputs_moves_uint8_onto_signed_codes(tmp_path):
    result = ct_build(tmp_path, preset="w8a8-int8", exclude=["lm_head"],
                      default={"input": {"dtype": "uint8", "symmetric": False}})
    config = json.loads((result.artifact_dir / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"
    tensors = load_file(str(result.artifact_dir / "model.safetensors"))
    prefix = "model.layers.0.self_attn.q_proj."
    assert tensors[prefix + "weight"].dtype == torch.int8 and tensors[prefix + "weight_scale"].shape == (64, 1)
    ours = qfx.runtime.load(result.artifact_dir).model.layers[0].self_attn.q_proj.input_zero_point
    assert tensors[prefix + "input_zero_point"].item() == int(ours) - 128  # the same grid, signed
    assert reloads_exactly(result)


def test_fnuz_codes_are_stored_as_their_fn_twins(tmp_path):
    result = ct_build(tmp_path, target="gfx942", preset="w8a8-fp8", exclude=["lm_head"])
    tensors = load_file(str(result.artifact_dir / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert json.loads((result.artifact_dir / "config.json").read_text())["quantization_config"]["format"] == \
        "float-quantized"
    assert reloads_exactly(result)


@pytest.mark.parametrize("quantization, message", [
    ({"preset": "w4a16-g128-asym"}, "asymmetric weight-only"),
    ({"preset": "w8a8-int8", "rules": [{"match": ["*k_proj"], "output": {"dtype": "int8"}}]}, "KV cache"),
    ({"preset": "w8a8-int8", "default": {"weight": {"reduce_range": True}}}, "reduce_range"),
])
def test_formats_the_layout_cannot_hold_are_refused(tmp_path, quantization, message):
    spec = tiny_spec(**dict(quantization, exclude=["lm_head"]))
    spec["output"] = {"dir": str(tmp_path / "artifact"), "layout": "compressed-tensors"}
    if quantization.get("preset") == "w4a16-g128-asym":
        spec["model"] = {"factory": "qfx.examples:small_llama"}
    with pytest.raises(SpecError, match=message) as info:
        qfx.compile(spec=spec)
    assert "compressed-tensors layout" in str(info.value)
    assert not (tmp_path / "artifact").exists()


def test_asymmetric_per_tensor_uint8_weights_reload_exactly(tmp_path):
    result = ct_build(tmp_path, preset="w8a8-int8", exclude=["lm_head"],
                      default={"weight": {"dtype": "uint8", "symmetric": False, "granularity": "per_tensor"}})
    tensors = load_file(str(result.artifact_dir / "model.safetensors"))
    assert tensors["model.layers.0.mlp.up_proj.weight_zero_point"].shape == (1,)
    assert reloads_exactly(result)


def test_widths_between_are_packed_densely_across_words(tmp_path):
    """int3 codes straddle int32 words: code j takes bits 3j..3j+2 of the row's bit stream."""
    result = ct_build(tmp_path, default={"weight": {"dtype": "int3", "granularity": "per_group", "group_size": 32}},
                      exclude=["lm_head"])
    config = json.loads((result.artifact_dir / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert (group["weights"]["num_bits"], config["format"]) == (3, "pack-quantized")
    tensors = load_file(str(result.artifact_dir / "model.safetensors"))
    prefix = "model.layers.0.mlp.down_proj."  # 128 -> 64: 384 bits a row, 12 words
    packed = tensors[prefix + "weight_packed"]
    assert packed.shape == (64, 12)
    codes = qfx.runtime.load(result.artifact_dir).model.layers[0].mlp.down_proj.weight
    stream = sum(int(w) % 2**32 << (32 * i) for i, w in enumerate(packed[0].tolist()))
    assert [(stream >> (3 * j)) & 7 for j in range(128)] == [int(c) + 4 for c in codes[0]]
    assert reloads_exactly(result)


def test_a_weight_shape_that_does_not_fit_its_packed_codes_is_refused(tmp_path):
    from safetensors.torch import save_file

    from qfx.runtime.errors import ArtifactError

    result = ct_build(tmp_path, default={"weight": {"dtype": "int3", "granularity": "per_group", "group_size": 32}},
                      exclude=["lm_head"])
    path = result.artifact_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.down_proj.weight_shape"] = torch.tensor([64, 96])
    save_file(tensors, str(path))
    with pytest.raises(ArtifactError, match=r"weight_shape \[64, 96\] does not fit weight_packed \[64, 12\]"):
        qfx.runtime.load(result.artifact_dir, verify_hashes=False)  # as if resealed by whoever edited it


@pytest.mark.parametrize("layout, message", [
    ("quark", "Quark stores 4- and 8-bit integers, not int3"),
    ("gptq", "GPTQ stores 2/4/8-bit integer weights, not int3"),
])
def test_widths_a_layout_cannot_pack_are_refused(tmp_path, layout, message):
    spec = tiny_spec(default={"weight": {"dtype": "int3", "granularity": "per_group", "group_size": 32}},
                     exclude=["lm_head"])
    spec.update(output={"dir": str(tmp_path / "artifact"), "layout": layout})
    with pytest.raises(SpecError, match=message):
        qfx.compile(spec=spec)


def test_widths_below_8_bits_are_weight_only():
    with pytest.raises(SpecError, match="int3 activations are not supported"):
        qfx.compile(spec=tiny_spec(default={"input": {"dtype": "int3"}}))
