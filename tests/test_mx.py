"""OCP MX formats (mxfp4, mxfp6_e2m3, mxfp6_e3m2, mxfp8): the element rounding and E8M0 block
scales, dynamic MX inputs, the Quark layout's bytes, and what the spec and the other layouts
refuse. That the scales and values are amd-quark's bit for bit, and that transformers + amd-quark
load the artifacts, is in test_conformance.py."""
import json

import pytest
import torch
from conftest import mx_element_values, tiny_spec
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import qfx
import qfx.runtime
from qfx.errors import SpecError
from qfx.runtime import numerics
from qfx.runtime.errors import ArtifactError
from qfx.runtime.formats import MX_BLOCK, Granularity, QDType, TensorFormat

MX = [QDType.mxfp4, QDType.mxfp6_e2m3, QDType.mxfp6_e3m2, QDType.mxfp8]
PRESETS = {QDType.mxfp4: "w4a4-mxfp4", QDType.mxfp6_e2m3: "w6a6-mxfp6-e2m3",
           QDType.mxfp6_e3m2: "w6a6-mxfp6-e3m2", QDType.mxfp8: "w8a8-mxfp8"}
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def mx_build(tmp_path, layout="quark", formats=None, **quantization):
    spec = tiny_spec(**quantization)
    spec.update(target="gfx950", output={"dir": str(tmp_path / "artifact"), "layout": layout,
                                         **({"formats": formats} if formats else {})})
    return qfx.compile(spec=spec)


def test_element_tables_are_the_ocp_ones():
    assert QDType.mxfp4.table[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]  # E2M1, code = sign << 3 | magnitude
    assert torch.equal(QDType.mxfp4.table[8:], -QDType.mxfp4.table[:8])
    e2m3, e3m2 = QDType.mxfp6_e2m3.table, QDType.mxfp6_e3m2.table
    assert (e2m3[1], e2m3[8], e2m3[31]) == (0.125, 1.0, 7.5)  # subnormal step 2**-3, emax 2
    assert (e3m2[1], e3m2[4], e3m2[31]) == (0.0625, 0.25, 28.0)  # subnormal step 2**-4, emax 4


@pytest.mark.parametrize("qdtype", MX)
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), exponent=st.integers(-30, 30))
def test_elements_round_to_the_nearest_value_ties_to_even_code(qdtype, seed, exponent):
    """Against a search of every element value: the nearest one; at a tie the one whose code is
    even (the mantissa's last bit 0); beyond the largest, the largest."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)) * 2.0**exponent
    values = mx_element_values(qdtype)
    y = x / 2.0**exponent * 2  # spans about -8 .. 8 elements; values beyond saturate
    ties = ((values[:-1] + values[1:]) / 2)[torch.randint(0, len(values) - 1, (64,),
                                                            generator=torch.Generator().manual_seed(seed))]
    y = torch.cat([y, ties[None]])
    rounded = numerics.round_to_element(y, qdtype)
    distance = (y.unsqueeze(-1) - values).abs()
    nearest = distance.min(dim=-1).values
    assert torch.equal((rounded - y).abs(), nearest)
    at_tie = (distance == nearest.unsqueeze(-1)).sum(dim=-1) > 1
    codes = numerics.mx_codes(rounded[at_tie], qdtype)
    bits = codes.view(torch.uint8) if qdtype.is_float else codes
    assert bool((bits & 1 == 0).all())  # even codes: the last mantissa bit is 0
    assert bool(at_tie.any())


@pytest.mark.parametrize("qdtype", MX)
@settings(max_examples=30, deadline=None)
@given(mantissa=st.integers(0, 2**23 - 1), exponent=st.integers(-140, 120))
def test_block_scale_makes_room_for_the_block_absmax(qdtype, mantissa, exponent):
    """The E8M0 scale of an absmax is the power of two that puts it in the element's top binade,
    one binade higher where the absmax rounds (at the element's mantissa width) up to the next
    power of two: Quark's `even` rule. Beyond E8M0's range it clamps to 2**-127 / 2**127."""
    amax = torch.tensor([(1 + mantissa / 2**23) * 2.0**exponent], dtype=torch.float32)
    scale = numerics.mx_scale(amax, qdtype)
    _, mbits = qdtype.spec.mx_element
    emax = qdtype.spec.mx_emax
    frac, e = torch.frexp(amax)
    top = int(e) - 1  # amax = 1.m * 2**top
    carries = float(frac) * 2 >= 2 - 2.0 ** -(mbits + 1)
    expected = min(max(top + carries - emax, -127), 127)
    if float(amax) < 2.0**-126:  # subnormal absmax: its exponent field is 0
        expected = -127
    assert float(scale) == 2.0**expected
    assert torch.equal(numerics.e8m0_exponent(scale), torch.tensor([expected], dtype=torch.int32))


@pytest.mark.parametrize("qdtype", MX)
def test_block_scale_carries_exactly_where_the_absmax_rounds_up(qdtype):
    """At (2 - 2**-(mbits + 1)) * 2**e the absmax rounds up to 2**(e + 1); one float32 step below
    it does not."""
    _, mbits = qdtype.spec.mx_element
    at = torch.tensor([(2 - 2.0 ** -(mbits + 1)) * 2.0**e for e in (-10, 0, 7)])
    below = torch.nextafter(at, torch.zeros_like(at))
    assert torch.equal(numerics.mx_scale(at, qdtype), 2 * numerics.mx_scale(below, qdtype))


@pytest.mark.filterwarnings("ignore:.*cannot dequantize a per_group fp8_e4m3")  # mxfp8: its own test
@pytest.mark.parametrize("qdtype", MX)
def test_mx_artifact_reloads_to_the_compiled_graph(qdtype, tmp_path):
    result = mx_build(tmp_path, preset=PRESETS[qdtype], exclude=["lm_head"])
    manifest = json.loads((result.artifact_dir / "manifest.json").read_text())
    layer = manifest["layers"]["model.layers.0.mlp.down_proj"]["format"]
    assert layer["weight"]["dtype"] == layer["input"]["dtype"] == qdtype.value
    assert layer["input"]["observer"] is None  # dynamic: nothing calibrated
    model = qfx.runtime.load(result.artifact_dir)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, result.graph(IDS))


def test_mx_weights_are_stored_as_quark_stores_them(tmp_path):
    """FP4: two codes to a byte, element 0 in the low nibble; FP6: four codes to three bytes, a
    little-endian 24-bit word; scales as E8M0 bytes (exponent + 127); no zero points, and nothing
    for the dynamic inputs. config.json says so in the fields vLLM's Quark loader reads."""
    prefix = "model.layers.0.mlp.down_proj."  # 128 -> 64
    for qdtype, per_byte in ((QDType.mxfp4, 2), (QDType.mxfp6_e2m3, 4 / 3)):
        result = mx_build(tmp_path / qdtype.value, preset=PRESETS[qdtype], exclude=["lm_head"])
        tensors = load_file(str(result.artifact_dir / "model.safetensors"))
        assert {k[len(prefix):] for k in tensors if k.startswith(prefix)} == {"weight", "weight_scale"}
        stored, scale_bytes = tensors[prefix + "weight"], tensors[prefix + "weight_scale"]
        assert stored.dtype == scale_bytes.dtype == torch.uint8
        assert stored.shape == (64, int(128 / per_byte)) and scale_bytes.shape == (64, 128 // MX_BLOCK)
        module = qfx.runtime.load(result.artifact_dir).model.layers[0].mlp.down_proj
        codes = module.weight.long()
        first = stored[0, :3].long()
        if qdtype.bits == 4:
            assert (int(first[0]) & 0xF, int(first[0]) >> 4) == (int(codes[0, 0]), int(codes[0, 1]))
        else:
            word = int(first[0]) | int(first[1]) << 8 | int(first[2]) << 16
            assert [word >> (6 * i) & 63 for i in range(4)] == codes[0, :4].tolist()
        assert torch.equal(2.0 ** (scale_bytes.float() - 127), module.weight_scale)
        config = json.loads((result.artifact_dir / "config.json").read_text())["quantization_config"]
        weight, inputs = config["global_quant_config"]["weight"], config["global_quant_config"]["input_tensors"]
        assert (weight["dtype"], weight["qscheme"], weight["group_size"], weight["scale_format"],
                weight["scale_calculation_mode"], weight["is_dynamic"]) == (
            "fp4" if qdtype.bits == 4 else "fp6_e2m3", "per_group", 32, "e8m0", "even", False)
        assert inputs["is_dynamic"] is True and inputs["observer_cls"] == "PerBlockMXObserver"


@pytest.mark.filterwarnings("ignore:.*cannot dequantize a per_group fp8_e4m3")
def test_mxfp8_weights_are_e4m3fn_codes(tmp_path):
    result = mx_build(tmp_path, preset="w8a8-mxfp8", exclude=["lm_head"])
    tensors = load_file(str(result.artifact_dir / "model.safetensors"))
    weight = tensors["model.layers.0.mlp.down_proj.weight"]
    assert weight.dtype == torch.float8_e4m3fn and weight.shape == (64, 128)
    config = json.loads((result.artifact_dir / "config.json").read_text())["quantization_config"]
    assert config["global_quant_config"]["weight"]["dtype"] == "fp8_e4m3"


def test_each_input_block_takes_its_own_scale():
    """A block of large values leaves the next block's small values their own resolution."""
    x = torch.cat([torch.full((1, MX_BLOCK), 1000.0), torch.linspace(0.01, 0.02, MX_BLOCK)[None]], dim=1)
    fmt = TensorFormat(QDType.mxfp6_e2m3, Granularity.per_group, group_size=MX_BLOCK, observer=None)
    assert fmt.dynamic
    y = numerics.fake_quantize_dynamic(x, fmt)
    assert float((y[0, MX_BLOCK:] - x[0, MX_BLOCK:]).abs().max()) < 0.02 / 8  # 3 mantissa bits
    codes, scale = torch.ops.qfx.quantize_blocks(x, fmt.dtype.value, MX_BLOCK)
    assert scale.shape == (1, 2) and float(scale[0, 0]) > 1000 * float(scale[0, 1])


@pytest.mark.parametrize("scheme, message", [
    ({"weight": {"dtype": "mxfp4", "granularity": "per_group", "group_size": 64}},
     "mxfp4 shares one E8M0 scale per 32 elements: set granularity: per_group, group_size: 32 \\(not 64\\)"),
    ({"weight": {"dtype": "mxfp6_e3m2", "granularity": "per_channel"}}, "group_size: 32"),
    ({"weight": {"dtype": "mxfp8", "granularity": "per_group", "group_size": 32, "symmetric": False}},
     "mxfp8 has no zero point"),
    ({"input": {"dtype": "mxfp4", "granularity": "per_group", "group_size": 32, "observer": "minmax"}},
     "quantized at run time, each block by its own absmax: remove `observer`"),
    ({"output": {"dtype": "mxfp4", "granularity": "per_group", "group_size": 32}}, "mxfp4 outputs are not supported"),
])
def test_mx_schemes_the_format_cannot_take_are_refused_at_their_line(tmp_path, scheme, message):
    spec = tiny_spec(tmp_path, default={"weight": {"dtype": "int8", "granularity": "per_channel"}},
                     rules=[{"match": ["*down_proj"], **scheme}])
    with pytest.raises(SpecError, match=message) as err:
        qfx.compile(spec=spec)
    assert "quantization.rules[0]" in str(err.value)
    assert not (tmp_path / "artifact").exists()


@pytest.mark.parametrize("layout", ["bitsandbytes", "gptq"])
def test_layouts_without_mx_refuse_it(tmp_path, layout):
    with pytest.raises(SpecError, match=f"the {layout} layout has no MX formats \\(weight mxfp4, input mxfp4\\); "
                                        "write output.layout: quark"):
        mx_build(tmp_path, layout, preset="w4a4-mxfp4")
    assert not (tmp_path / "artifact").exists()


@pytest.mark.parametrize("quantization, message", [
    ({"preset": "w6a6-mxfp6-e3m2"}, "compressed-tensors' FP6 is E2M3, not mxfp6_e3m2"),
    ({"preset": "w8a8-mxfp8"}, "computes mxfp8 input scales with FP4's mantissa width"),
    ({"preset": "w4a4-mxfp4", "default": {"input": {"dtype": "int8", "granularity": "per_token", "group_size": None}}},
     "compressed-tensors' MX formats quantize weights and inputs alike"),
])
def test_mx_compressed_tensors_cannot_hold_is_refused(tmp_path, quantization, message):
    with pytest.raises(SpecError, match=message):
        mx_build(tmp_path, "compressed-tensors", **quantization)
    assert not (tmp_path / "artifact").exists()


def test_mx_in_compressed_tensors_stores_quarks_bytes(tmp_path):
    """The same codes and E8M0 bytes as the Quark layout, under compressed-tensors' names."""
    quark = load_file(str(mx_build(tmp_path / "q", preset="w4a4-mxfp4", exclude=["lm_head"]).artifact_dir
                          / "model.safetensors"))
    ct = load_file(str(mx_build(tmp_path / "ct", "compressed-tensors", preset="w4a4-mxfp4",
                                exclude=["lm_head"]).artifact_dir / "model.safetensors"))
    prefix = "model.layers.0.mlp.down_proj."
    assert {k[len(prefix):] for k in ct if k.startswith(prefix)} == {"weight_packed", "weight_scale"}
    assert torch.equal(ct[prefix + "weight_packed"], quark[prefix + "weight"])
    assert torch.equal(ct[prefix + "weight_scale"], quark[prefix + "weight_scale"])


def test_mx_with_onnx_output_is_refused_before_any_work(tmp_path):
    with pytest.raises(SpecError, match="mxfp4, an MX format .* which qfx does not emit in ONNX") as err:
        mx_build(tmp_path, formats=["safetensors", "onnx"], preset="w4a4-mxfp4")
    assert "output.formats" in str(err.value) and not (tmp_path / "artifact").exists()


def test_a_nan_e8m0_scale_byte_is_refused(tmp_path):
    result = mx_build(tmp_path, preset="w4a4-mxfp4", exclude=["lm_head"])
    path = result.artifact_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.down_proj.weight_scale"][0, 0] = 255
    save_file(tensors, str(path))
    with pytest.raises(ArtifactError, match="holds the E8M0 byte 255, which is NaN"):
        qfx.runtime.load(result.artifact_dir, verify_hashes=False)


@pytest.mark.parametrize("fields, problem", [
    ({"group_size": 64}, "MX formats are symmetric per_group with group_size 32"),
    ({"granularity": "per_channel", "group_size": 0}, "MX formats are symmetric per_group with group_size 32"),
])
def test_a_manifest_with_an_mx_format_it_cannot_be_is_refused(fields, problem):
    from qfx.runtime.formats import LayerFormat, format_problem

    weight = TensorFormat(QDType.mxfp4, Granularity.per_group, group_size=MX_BLOCK).to_json()
    fmt = LayerFormat.from_json({"weight": {**weight, **fields}})
    assert problem in format_problem(fmt)


def test_mxfp8_warns_that_only_qfx_runtime_loads_it(tmp_path):
    from qfx.runtime.errors import QfxWarning

    with pytest.warns(QfxWarning, match="amd-quark 0.13 \\(transformers\\) cannot dequantize a per_group fp8_e4m3"):
        mx_build(tmp_path, preset="w8a8-mxfp8", exclude=["lm_head"])


def test_mx_inputs_over_a_static_preset_drop_its_observer(tmp_path):
    """The preset's input observer belongs to its static inputs; MX inputs are dynamic and take
    none, so overriding the dtype does not ask the user to unset a field they never wrote."""
    mx_input = {"dtype": "mxfp4", "granularity": "per_group", "group_size": MX_BLOCK}
    result = mx_build(tmp_path, preset="w8a8-int8", default={"input": mx_input}, exclude=["lm_head"])
    layer = result.manifest["layers"]["model.layers.0.mlp.down_proj"]["format"]
    assert layer["input"]["observer"] is None and layer["input"]["dtype"] == "mxfp4"


@pytest.mark.parametrize("scheme, message", [
    ({"weight": {"dtype": "mxfp4", "granularity": "per_group", "group_size": 32, "double_quant": True}},
     "mxfp4 scales are E8M0 exponents, one byte each already: drop double_quant"),
    ({"input": {"dtype": "mxfp6_e2m3", "granularity": "per_group", "group_size": 32, "double_quant": True}},
     "default.input: mxfp6_e2m3 scales are E8M0 exponents"),
])
def test_double_quantized_mx_scales_are_refused(tmp_path, scheme, message):
    with pytest.raises(SpecError, match=message):
        mx_build(tmp_path, default=scheme)
    assert not (tmp_path / "artifact").exists()


def test_mx_layers_vllm_does_not_run_are_named_at_build(tmp_path):
    from qfx.runtime.errors import QfxWarning

    with pytest.warns(QfxWarning, match="weight mxfp4, input float: vLLM's Quark loader runs MX only where weight "
                                        "and input are both MX fp4 / fp6"):
        mx_build(tmp_path, default={"weight": {"dtype": "mxfp4", "granularity": "per_group", "group_size": 32}},
                 exclude=["lm_head"])
