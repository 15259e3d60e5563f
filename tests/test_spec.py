"""Spec loading: every error names file, line, column and field, and says what is allowed."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from qfx.errors import SpecError
from qfx.spec import spec_json_schema
from qfx.spec_loader import load_spec

SPECS = sorted((ROOT / "specs").glob("*.yaml"))

GOOD = """\
version: 1
model:
  factory: "qfx.examples:tiny_llama"
calibration: {synthetic: true}
quantization:
  preset: w8a8-int8
"""


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path, text) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    return str(info.value)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_spec_in_specs_validates(path):
    loaded = load_spec(path)
    assert loaded.spec.version == 1
    assert loaded.spec.output is not None and loaded.spec.output.dir.startswith(str(ROOT))


def test_schema_file_is_current():
    on_disk = json.loads((ROOT / "specs" / "schema.json").read_text())
    assert on_disk == spec_json_schema(), "regenerate with: qfx schema > specs/schema.json"


def test_paths_are_relative_to_the_spec_file(tmp_path):
    sub = tmp_path / "deep"
    sub.mkdir()
    spec = load_spec(write(sub, GOOD + "output: {dir: ../out/x}\n")).spec
    assert spec.output.dir == str(tmp_path / "out" / "x")


def test_unknown_field_names_line_column_and_allowed_fields(tmp_path):
    msg = error_of(tmp_path, GOOD + "  rules:\n    - match: '*q_proj'\n      wieght: {dtype: int8}\n")
    assert "spec.yaml:9:7: quantization.rules[0].wieght" in msg
    assert "unknown field 'wieght'" in msg and "match, weight, input, output" in msg


def test_wrong_type_and_bad_enum_name_the_field(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("calibration: {synthetic: true}",
                                          "calibration: {synthetic: true, samples: many}"))
    assert "spec.yaml:4:32: calibration.samples" in msg and "integer" in msg
    msg = error_of(tmp_path, GOOD.replace("preset: w8a8-int8", "default:\n    weight: {dtype: int9}"))
    assert "quantization.default.weight.dtype" in msg and "'int8'" in msg and "int9" in msg


def test_cross_field_errors(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("preset: w8a8-int8", "default:\n    weight: {dtype: int8, granularity: per_group}"))
    assert "per_group needs group_size" in msg or "group_size" in msg
    msg = error_of(tmp_path, GOOD.replace("model:\n  factory: \"qfx.examples:tiny_llama\"\n", "model: {}\n"))
    assert "spec.yaml:2:1: model" in msg and "exactly one of `path` or `factory`" in msg
    msg = error_of(tmp_path, GOOD.replace("{synthetic: true}", "{synthetic: true, text: a.txt}"))
    assert "exactly one of text, tokens or synthetic" in msg


def test_yaml_syntax_error_has_a_position(tmp_path):
    msg = error_of(tmp_path, "version: 1\nmodel: [unclosed\n")
    assert "spec.yaml:3:1: not valid YAML" in msg or "spec.yaml:2" in msg


def test_json_spec_and_python_object_load(tmp_path):
    data = {"version": 1, "model": {"factory": "qfx.examples:tiny_llama"}, "quantization": {"preset": "w4a16-g128"}}
    assert load_spec(write(tmp_path, json.dumps(data), "spec.json")).spec.quantization.preset.value == "w4a16-g128"
    assert load_spec(data).spec.target.value == "cpu"


def test_cli_schema_prints_the_schema():
    out = subprocess.run([sys.executable, "-m", "qfx.cli", "schema"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["title"] == "Spec"


def test_duplicate_key_is_an_error_not_a_silent_override(tmp_path):
    msg = error_of(tmp_path, GOOD + "quantization:\n  preset: w4a16-g32\n")
    assert "spec.yaml:7:1: quantization: duplicate key 'quantization' (first on line 5)" in msg


def test_missing_field_points_at_the_mapping_that_lacks_it(tmp_path):
    msg = error_of(tmp_path, "# a comment\nversion: 1\nmodel: {factory: 'qfx.examples:tiny_llama'}\n")
    assert "spec.yaml:2:1: quantization: Field required" in msg


def test_anchors_aliases_and_merge_keys_still_load(tmp_path):
    spec = load_spec(write(tmp_path, GOOD.replace("preset: w8a8-int8", """\
default:
    weight: &w {dtype: int8, granularity: per_channel}
    input: {<<: *w, granularity: per_tensor}
  rules:
    - {match: '*k_proj', weight: *w}""")))
    q = spec.spec.quantization
    assert q.rules[0].weight == q.default.weight and q.default.input.granularity.value == "per_tensor"


def test_seed_and_paths_the_build_could_not_use_are_spec_errors(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("{synthetic: true}", "{synthetic: true, seed: 18446744073709551616}"))
    assert "spec.yaml:4:32: calibration.seed: Input should be less than or equal to 9223372036854775807" in msg
    msg = error_of(tmp_path, GOOD + 'output: {dir: "a\\0b"}\n')
    assert "spec.yaml:7:10: output.dir: a path cannot contain a NUL character" in msg
