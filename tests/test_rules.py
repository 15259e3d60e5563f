"""Rule semantics: exclude wins, rules overlay field by field in file order, null switches off,
and a pattern that matches nothing is an error with the spec line and the nearest names."""
import pytest

from qfx.errors import SpecError
from qfx.rules import LinearInfo, resolve_plan
from qfx.runtime.formats import Granularity, QDType
from qfx.runtime.layouts import DEFAULT_LAYOUT, layout_named
from qfx.spec_loader import load_spec

LAYERS = [LinearInfo(f"model.layers.{i}.{name}", 64, 64) for i in range(2)
          for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + [LinearInfo("lm_head", 64, 256)]

HEAD = "version: 1\nmodel: {factory: 'qfx.examples:tiny_llama'}\nquantization:\n"


def plan_of(tmp_path, body: str, target: str = "cpu"):
    path = tmp_path / "spec.yaml"
    path.write_text(HEAD.replace("version: 1", f"version: 1\ntarget: {target}") + body)
    loaded = load_spec(path)
    return resolve_plan(loaded.spec.quantization, loaded.spec.target, LAYERS, loaded.source, layout_named(DEFAULT_LAYOUT))


def test_default_applies_to_every_layer_and_exclude_wins(tmp_path):
    plan = plan_of(tmp_path, "  preset: w8a8-int8\n  rules:\n    - match: '*'\n      output: {dtype: int8}\n"
                             "  exclude: [lm_head, '*layers.1.mlp*']\n")
    assert "lm_head" not in plan and "model.layers.1.mlp.up_proj" not in plan
    assert len(plan) == 14 - 3
    q = plan["model.layers.0.self_attn.q_proj"].fmt
    assert q.weight.granularity is Granularity.per_channel and q.input.dtype is QDType.int8
    assert q.output is not None  # the '*' rule reached it


def test_rules_overlay_field_by_field_later_over_earlier(tmp_path):
    plan = plan_of(tmp_path, """\
  default:
    weight: {dtype: int8, granularity: per_channel}
    input: {dtype: int8}
  rules:
    - match: ["*k_proj", "*v_proj"]
      output: {dtype: int8}
      weight: {symmetric: false}
    - match: "*k_proj"
      output: {dtype: fp8_e4m3}
      input: {observer: percentile}
""")
    k = plan["model.layers.0.self_attn.k_proj"]
    v = plan["model.layers.0.self_attn.v_proj"]
    assert k.fmt.output.dtype is QDType.fp8_e4m3fn  # rule 1 over rule 0
    assert v.fmt.output.dtype is QDType.int8
    assert k.fmt.weight.symmetric is False and k.fmt.weight.granularity is Granularity.per_channel
    assert k.fmt.input.observer.value == "percentile" and v.fmt.input.observer.value == "minmax"
    assert k.rules == ("default", "rules[0] (*k_proj)", "rules[1] (*k_proj)")
    assert plan["model.layers.0.self_attn.q_proj"].rules == ("default",)


def test_null_switches_a_tensor_off_and_all_null_leaves_float(tmp_path):
    plan = plan_of(tmp_path, """\
  preset: w8a8-int8
  rules:
    - match: "*down_proj"
      input: null
    - match: "*o_proj"
      weight: null
      input: null
""")
    down = plan["model.layers.0.mlp.down_proj"].fmt
    assert down.input is None and down.weight is not None
    assert "model.layers.0.self_attn.o_proj" not in plan


def test_fp8_variant_follows_target(tmp_path):
    fnuz = plan_of(tmp_path, "  preset: w8a8-fp8\n  exclude: [lm_head]\n", target="gfx942")
    fn = plan_of(tmp_path, "  preset: w8a8-fp8\n  exclude: [lm_head]\n", target="gfx950")
    assert fnuz["model.layers.0.mlp.up_proj"].fmt.weight.dtype is QDType.fp8_e4m3fnuz
    assert fn["model.layers.0.mlp.up_proj"].fmt.input.dtype is QDType.fp8_e4m3fn


@pytest.mark.parametrize("body, where, near", [
    ("  preset: w8a8-int8\n  rules:\n    - match: ['*q_proj', '*k_prj']\n      output: {dtype: int8}\n",
     "spec.yaml:7:26: quantization.rules[0].match[1]", "model.layers.0.self_attn.k_proj"),
    ("  preset: w8a8-int8\n  exclude: [lm_haed]\n", "spec.yaml:6:13: quantization.exclude[0]", "lm_head"),
])
def test_pattern_matching_nothing_is_an_error_with_line_and_nearest_names(tmp_path, body, where, near):
    with pytest.raises(SpecError) as info:
        plan_of(tmp_path, body)
    msg = str(info.value)
    assert where in msg and "matches no linear layer" in msg and near in msg


def test_rule_making_an_invalid_scheme_points_at_the_rule(tmp_path):
    with pytest.raises(SpecError) as info:
        plan_of(tmp_path, "  preset: w8a8-int8\n  rules:\n    - match: '*up_proj'\n      input: {dtype: int4}\n")
    assert "spec.yaml:8:7: quantization.rules[0].input" in str(info.value)
    assert "int4 activations are not supported" in str(info.value)


def test_group_size_must_divide_in_features(tmp_path):
    with pytest.raises(SpecError) as info:
        plan_of(tmp_path, "  default:\n    weight: {dtype: int4, granularity: per_group, group_size: 48}\n")
    assert "group_size 48 does not divide in_features 64" in str(info.value)


def test_changing_granularity_drops_the_inherited_group_size(tmp_path):
    # An int4 per_group preset, one layer moved to int8 per_channel: the preset's group_size no
    # longer applies and goes, rather than failing "group_size applies to per_group only".
    plan = plan_of(tmp_path, "  preset: w4a16-g32\n  rules:\n    - match: '*down_proj'\n"
                             "      weight: {dtype: int8, granularity: per_channel}\n  exclude: [lm_head]\n")
    down = plan["model.layers.0.mlp.down_proj"].fmt.weight
    up = plan["model.layers.0.mlp.up_proj"].fmt.weight
    assert (down.dtype, down.granularity, down.group_size) == (QDType.int8, Granularity.per_channel, 0)
    assert (up.dtype, up.granularity, up.group_size) == (QDType.int4, Granularity.per_group, 32)


def test_default_changing_the_presets_granularity_drops_its_group_size(tmp_path):
    plan = plan_of(tmp_path, "  preset: w4a16-g128\n  default:\n    weight: {dtype: int8, granularity: per_tensor}\n")
    assert {(q.fmt.weight.granularity, q.fmt.weight.group_size) for q in plan.values()} == {(Granularity.per_tensor, 0)}


def test_switching_an_input_to_per_token_drops_the_inherited_observer(tmp_path):
    plan = plan_of(tmp_path, "  preset: w8a8-int8\n  rules:\n    - match: '*up_proj'\n"
                             "      input: {granularity: per_token}\n")
    up = plan["model.layers.0.mlp.up_proj"].fmt.input
    assert up.granularity is Granularity.per_token and up.observer is None
    assert plan["model.layers.0.mlp.down_proj"].fmt.input.observer.value == "minmax"


def test_group_size_set_with_another_granularity_in_one_patch_is_still_an_error(tmp_path):
    with pytest.raises(SpecError) as info:
        plan_of(tmp_path, "  preset: w4a16-g32\n  rules:\n    - match: '*up_proj'\n"
                          "      weight: {dtype: int8, granularity: per_channel, group_size: 32}\n")
    assert "group_size applies to per_group only, not per_channel" in str(info.value)
    assert "spec.yaml:8:7: quantization.rules[0].weight" in str(info.value)
    # A later rule back to per_group must name its group size: the dropped one does not return.
    with pytest.raises(SpecError, match="per_group needs group_size"):
        plan_of(tmp_path, "  preset: w4a16-g32\n  rules:\n    - match: '*proj'\n"
                          "      weight: {granularity: per_channel}\n"
                          "    - match: '*up_proj'\n      weight: {dtype: int4, granularity: per_group}\n")
