"""The GPTQ checkpoint layouts (`output.layout: gptq | gptq_v2`): packing, zero points, scales
rounded to float16 before the codes are chosen, the configs, and the formats they refuse."""
import json

import pytest
import torch
from conftest import tiny_spec
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import qfx
import qfx.runtime
from qfx.errors import SpecError, UserError
from qfx.runtime.errors import ArtifactError
from qfx.runtime.formats import Granularity, LayerFormat, QDType, ScaleDType, TensorFormat
from qfx.runtime.layouts import layout_named
from qfx.runtime.layouts.packing import pack_along, unpack_along


def gptq_spec(tmp_path, layout="gptq", algorithms=(), **quantization):
    spec = tiny_spec(**(quantization or {"preset": "w4a16-g64", "exclude": ["lm_head"]}))
    spec["output"] = {"dir": str(tmp_path / "artifact"), "layout": layout}
    spec["algorithms"] = list(algorithms)
    return spec


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([4, 8]), rows=st.integers(1, 3), words=st.integers(1, 3), dim=st.sampled_from([0, 1]),
       seed=st.integers(0, 2**16))
def test_packing_round_trips(bits, rows, words, dim, seed):
    per_word = 32 // bits
    shape = [rows, words * per_word] if dim == 1 else [words * per_word, rows]
    values = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(seed))
    packed = pack_along(values, bits, dim)
    assert packed.dtype == torch.int32 and packed.shape[dim] == words
    assert torch.equal(unpack_along(packed, bits, dim), values)


def test_packing_puts_the_first_value_in_the_lowest_bits():
    codes = torch.arange(8).reshape(8, 1)  # along K (dim 0), as qweight packs
    assert pack_along(codes, 4, 0).item() == 0x76543210
    assert pack_along(torch.tensor([[1, 2, 3, 255]]), 8, 1).item() == 0xFF030201 - 2**32


def test_symmetric_int4_is_v1_with_the_reference_zero_word(tmp_path):
    result = qfx.compile(spec=gptq_spec(tmp_path))
    config = json.loads((result.artifact_dir / "config.json").read_text())["quantization_config"]
    assert config | {"meta": None} == {
        "quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": False,
        "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32", "lm_head": False,
        "true_sequential": True, "block_name_to_quantize": "model.layers", "meta": None}
    tensors = load_file(str(result.artifact_dir / "model.safetensors"))
    prefix = "model.layers.0.mlp.down_proj."  # 128 -> 64, groups of 64
    assert {k[len(prefix):] for k in tensors if k.startswith(prefix)} == {"qweight", "qzeros", "scales", "g_idx"}
    assert tensors[prefix + "qweight"].shape == (16, 64) and tensors[prefix + "scales"].dtype == torch.float16
    # v1 stores zero - 1: the symmetric zero 8 becomes 7 in every nibble
    assert bool((tensors[prefix + "qzeros"] == 0x77777777).all())
    assert torch.equal(tensors[prefix + "g_idx"], (torch.arange(128) // 64).to(torch.int32))
    manifest = json.loads((result.artifact_dir / "manifest.json").read_text())
    assert manifest["layout"] == "gptq"
    assert manifest["layers"][prefix[:-1]]["format"]["weight"]["scale_dtype"] == "float16"


def test_artifact_reloads_bit_exactly_with_float16_scales(tmp_path):
    result = qfx.compile(spec=gptq_spec(tmp_path, algorithms=[{"gptq": {}}]))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model = qfx.runtime.load(result.artifact_dir)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, result.graph(ids))
    scale = model.model.layers[0].self_attn.q_proj.weight_scale
    assert torch.equal(scale, scale.half().float())  # chosen in float16, so storing lost nothing


def test_asymmetric_weights_need_v2_and_keep_their_zero_points(tmp_path):
    quantization = {"preset": "w4a16-g64", "exclude": ["lm_head"],
                    "default": {"weight": {"dtype": "uint4", "symmetric": False}}}
    with pytest.raises(SpecError, match="asymmetric weights need the gptq_v2 checkpoint format") as info:
        qfx.compile(spec=gptq_spec(tmp_path, **quantization))
    assert "quantization.default.weight" in str(info.value)
    spec = gptq_spec(tmp_path, layout="gptq_v2", **quantization)
    spec["output"]["formats"] = ["safetensors", "onnx"]  # the build verifies ONNX against the GPTQ checkpoint
    result = qfx.compile(spec=spec)
    config = json.loads((result.artifact_dir / "config.json").read_text())["quantization_config"]
    assert (config["checkpoint_format"], config["sym"]) == ("gptq_v2", False)
    assert "verify" in json.loads((result.artifact_dir / "manifest.json").read_text())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(qfx.runtime.load(result.artifact_dir)(ids).logits, result.graph(ids))


@pytest.mark.parametrize("quantization, message", [
    ({"preset": "w8a8-int8", "exclude": ["lm_head"]}, "weight-only"),
    ({"preset": "w4a16-g64", "exclude": ["lm_head"],
      "default": {"weight": {"dtype": "fp8_e4m3", "granularity": "per_channel", "group_size": None}}},
     "integer weights, not fp8"),
    ({"preset": "w4a16-g64", "exclude": ["lm_head"], "default": {"weight": {"dtype": "int8",
                                                                           "granularity": "per_tensor",
                                                                           "group_size": None}}},
     "per_group or per_channel"),
    ({"preset": "w4a16-g64"}, "not a linear of the repeated blocks"),  # lm_head quantized
    ({"preset": "w4a16-g64", "exclude": ["lm_head", "*layers.0.mlp.down_proj"]}, "same layer of other blocks"),
    ({"preset": "w4a16-g64", "exclude": ["lm_head"],
      "rules": [{"match": ["*down_proj"], "weight": {"group_size": 128}}]}, "differs from"),
])
def test_formats_the_layout_cannot_hold_are_refused_with_the_spec_line(tmp_path, quantization, message):
    with pytest.raises(SpecError, match=message) as info:
        qfx.compile(spec=gptq_spec(tmp_path, **quantization))
    assert "<spec>" in str(info.value) and "gptq" in str(info.value)
    assert not (tmp_path / "artifact").exists()


def test_input_transforms_are_refused_before_anything_is_written(tmp_path):
    spec = gptq_spec(tmp_path, algorithms=[{"rotation": {"online_down_proj": True}}])
    with pytest.raises(UserError, match="the gptq layout cannot express"):
        qfx.compile(spec=spec)
    assert not (tmp_path / "artifact").exists()


def layer_tensors(tmp_path):
    result = qfx.compile(spec=gptq_spec(tmp_path))
    tensors = load_file(str(result.artifact_dir / "model.safetensors"))
    return result.artifact_dir, tensors


@pytest.mark.parametrize("edit, message", [
    (lambda t, p: t.__setitem__(p + "g_idx", torch.zeros_like(t[p + "g_idx"])), "g_idx is not k // group_size"),
    (lambda t, p: t.__setitem__(p + "qzeros", torch.zeros_like(t[p + "qzeros"])), "qzeros of a symmetric layer"),
    (lambda t, p: t.__setitem__(p + "scales", t[p + "scales"].float()), "scales is float32"),
])
def test_edited_checkpoints_are_refused(tmp_path, edit, message):
    folder, tensors = layer_tensors(tmp_path)
    edit(tensors, "model.layers.1.mlp.down_proj.")  # two groups
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ArtifactError, match=message):
        qfx.runtime.load(folder, verify_hashes=False)


def test_scales_are_representable_in_the_layouts_dtype():
    fmt = TensorFormat(QDType.int4, Granularity.per_group, group_size=32, scale_dtype=ScaleDType.float16)
    w = torch.randn(8, 64) * torch.logspace(-9, 2, 8).unsqueeze(1)  # down to float16's subnormals
    codes_fmt = LayerFormat(weight=fmt)
    scale, _ = qfx.runtime.numerics.weight_qparams(w, fmt)
    assert bool((scale > 0).all()) and torch.equal(scale, scale.half().float())
    assert layout_named("gptq").format_problem(codes_fmt) is None
    assert TensorFormat.from_json(fmt.to_json()) == fmt
