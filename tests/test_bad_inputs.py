"""Bad input: each gets a specific error (what, where, how to fix) and leaves no output directory."""
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINYSTORIES, needs_shared, tiny_spec

import qfx
from qfx.errors import CalibrationError, ExportError, ModelLoadError, OutputError, SpecError

TESTS = ROOT / "tests"


def build_fails(tmp_path, spec, error, match):
    out = tmp_path / "artifact"
    with pytest.raises(error, match=match):
        qfx.compile(spec=spec, output_dir=out)
    assert not out.exists(), "a failed build must not leave its output directory"
    assert not [p for p in tmp_path.iterdir() if ".qfx-tmp-" in p.name], "nor a temp directory"


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    return subprocess.run([sys.executable, "-m", "qfx.cli", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_unknown_field_gives_exit_2_and_no_output(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("version: 1\nmodel: {factory: 'qfx.examples:tiny_llama'}\nquantization: {preset: w8a8-int8}\n"
                    "output: {dir: out, formatz: [onnx]}\n")
    result = cli("build", str(spec))
    assert result.returncode == 2
    assert "s.yaml:4:20: output.formatz: unknown field 'formatz'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_wrong_type_gives_exit_2(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("version: 1\nmodel: {factory: 'qfx.examples:tiny_llama'}\nquantization: {preset: w8a8-int8}\n"
                    "calibration: {synthetic: true, seq_len: [1]}\n")
    result = cli("build", str(spec), "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "calibration.seq_len" in result.stderr and "integer" in result.stderr
    assert not (tmp_path / "out").exists()


def test_group_size_not_dividing_in_features(tmp_path):
    spec = tiny_spec(default={"weight": {"dtype": "int4", "granularity": "per_group", "group_size": 48}})
    build_fails(tmp_path, spec, SpecError, "group_size 48 does not divide in_features 64 of model.layers.0")


def test_int4_activations(tmp_path):
    spec = tiny_spec(default={"weight": {"dtype": "int8", "granularity": "per_channel"}, "input": {"dtype": "int4"}})
    build_fails(tmp_path, spec, SpecError, "int4 activations are not supported")


def test_missing_model_dir(tmp_path):
    spec = dict(tiny_spec(), model={"path": str(tmp_path / "no-such-model")})
    build_fails(tmp_path, spec, ModelLoadError, "model directory not found: .*no-such-model")


@needs_shared
def test_empty_calibration_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    spec = dict(tiny_spec(), model={"path": str(TINYSTORIES)}, calibration={"text": str(empty)})
    build_fails(tmp_path, spec, CalibrationError, "calibration text .*empty.txt is empty")


@needs_shared
def test_calibration_text_shorter_than_one_sample(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.")
    spec = dict(tiny_spec(), model={"path": str(TINYSTORIES)},
                calibration={"text": str(short), "samples": 2, "seq_len": 128})
    build_fails(tmp_path, spec, CalibrationError, r"gives \d+ tokens, fewer than samples × seq_len = 2 × 128 = 256")


def test_nan_or_inf_in_activations_during_calibration(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    spec = dict(tiny_spec(preset="w8a8-int8"), model={"factory": "models_for_tests:overflowing"})
    build_fails(tmp_path, spec, CalibrationError, r"batch 0 produced NaN or Inf at fc2 \(input\)")


def test_export_failure_names_module_and_hints(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    spec = dict(tiny_spec(preset="w8a8-int8"), model={"factory": "models_for_tests:data_dependent"})
    with pytest.raises(ExportError) as info:
        qfx.compile(spec=spec, output_dir=tmp_path / "artifact")
    msg = str(info.value)
    assert "torch.export failed in module <root> (_DataDependent)" in msg
    assert "models_for_tests.py" in msg and "if y.sum() > 0" in msg  # the user's line
    assert "hint:" in msg and len(msg.splitlines()) < 8
    assert not (tmp_path / "artifact").exists()


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write the output directory"):
        qfx.compile(spec=tiny_spec(), output_dir=blocker / "artifact")


def test_existing_dir_not_made_by_qfx_is_refused_without_force(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="exists and was not written by qfx"):
        qfx.compile(spec=tiny_spec(), output_dir=out)
    assert (out / "precious.txt").read_text() == "keep me"
    result = cli("build", str(ROOT / "specs" / "tiny-w8a8-int8-dynamic.yaml"), "-o", str(out))
    assert result.returncode == 2 and "--force" in result.stderr
    result = cli("build", str(ROOT / "specs" / "tiny-w8a8-int8-dynamic.yaml"), "-o", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert not (out / "precious.txt").exists() and (out / "manifest.json").is_file()


def test_a_qfx_artifact_is_replaced_whole(tmp_path):
    out = tmp_path / "artifact"
    qfx.compile(spec=tiny_spec(), output_dir=out)
    (out / "stale.txt").write_text("from before")
    qfx.compile(spec=tiny_spec(preset="w8a16-int8", exclude=["lm_head"]), output_dir=out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_bad_pipeline_is_a_user_error(tmp_path):
    spec = ROOT / "specs" / "tiny-w8a8-int8-dynamic.yaml"
    result = cli("build", str(spec), "-o", str(tmp_path / "a"), "--pipeline", "annotate,observ")
    assert result.returncode == 2 and "unknown pass 'observ'" in result.stderr
    result = cli("build", str(spec), "-o", str(tmp_path / "a"), "--pipeline",
                 "annotate,observe{percentile=abc},calibrate,convert,freeze")
    assert result.returncode == 2 and "option observe{percentile} takes a float, got 'abc'" in result.stderr
    with pytest.raises(qfx.UserError, match="has no convert"):
        qfx.compile(spec=tiny_spec(), output_dir=tmp_path / "b", pipeline="annotate,observe,calibrate")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
