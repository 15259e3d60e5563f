"""Builds that used to 'succeed' while doing the wrong thing, or fail late with a confusing
error: each now stops early with a specific error, or does the right thing."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_spec

import qfx
from qfx.errors import PassFailure, UserError
from qfx.lowering import atomic
from qfx.lowering.atomic import AtomicDir
from qfx.passes.observe import OBSERVER_PREFIX
from qfx.passes.observers import PercentileObserver
from qfx.passes.registry import PipelineSyntaxError
from qfx.runtime.formats import Granularity, ObserverKind, QDType, TensorFormat

TESTS = ROOT / "tests"


def no_output_left(tmp_path):
    return not [p for p in tmp_path.iterdir() if p.name == "artifact" or ".qfx-" in p.name]


def test_a_model_without_linear_layers_is_an_error_not_an_empty_build(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    spec = dict(tiny_spec(preset="w8a8-int8"), model={"factory": "models_for_tests:matmul_only"})
    with pytest.raises(UserError, match="has no linear layer") as info:
        qfx.compile(spec=spec, output_dir=tmp_path / "artifact")
    assert "aten.matmul" in str(info.value)  # the hint names what the graph multiplies with
    assert no_output_left(tmp_path)


def test_a_spec_that_excludes_every_layer_is_an_error(tmp_path):
    with pytest.raises(UserError, match="quantizes none of the"):
        qfx.compile(spec=tiny_spec(preset="w8a8-int8", exclude=["*"]), output_dir=tmp_path / "artifact")
    assert no_output_left(tmp_path)


def test_observe_twice_replaces_the_first_observers():
    pipeline = "annotate,observe,observe,calibrate,convert,freeze"
    twice = qfx.compile(spec=tiny_spec(), pipeline=pipeline)
    once = qfx.compile(spec=tiny_spec())
    assert twice.stats["observe"]["replaced"] == once.stats["observe"]["observers"] > 0
    assert not [name for name, _ in twice.graph.named_children() if name.startswith(OBSERVER_PREFIX)]
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(twice.graph(ids), once.graph(ids))


def test_observe_and_calibrate_again_gives_the_same_ranges():
    again = qfx.compile(spec=tiny_spec(), pipeline="annotate,observe,calibrate,observe,calibrate,convert,freeze")
    once = qfx.compile(spec=tiny_spec())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.graph(ids), once.graph(ids))


@pytest.mark.parametrize("pipeline, message", [
    ("annotate,observe,calibrate,calibrate,convert,freeze", "calibrate twice"),
    ("annotate,calibrate,convert,freeze", "calibrate needs observers"),
    ("annotate,observe,convert,freeze", "pass convert needs calibrated"),
    ("annotate,observe,calibrate,convert,calibrate", "calibrate needs observers"),
    ("observe,calibrate,convert,freeze", "pass observe needs annotated"),
])
def test_a_pipeline_out_of_order_fails_before_any_work(pipeline, message, tmp_path):
    with pytest.raises(PipelineSyntaxError, match=message):
        qfx.compile(spec=dict(tiny_spec(), model={"path": str(tmp_path / "never-loaded")}), pipeline=pipeline,
                    output_dir=tmp_path / "artifact")
    assert no_output_left(tmp_path)


def test_the_runner_refuses_a_second_calibrate_too():
    """Passes run from Python (not through qfx.compile) meet the same rule."""
    from qfx.passes import PassContext, parse_pipeline
    from qfx.runner import run_pipeline

    ctx = PassContext(plan={}, run_data=lambda gm: {}, facts={"annotated", "observed", "calibrated"})
    with pytest.raises(PassFailure, match="calibrate twice"):
        run_pipeline(torch.fx.symbolic_trace(torch.nn.Identity()), parse_pipeline("calibrate"), ctx)


def test_onnx_output_without_the_onnx_extra_says_what_to_install(tmp_path):
    """A missing package is simulated by a None entry in sys.modules (import then fails)."""
    spec = ROOT / "specs" / "tiny-w8a8-int8.yaml"
    code = ("import sys; sys.modules['onnx_ir'] = None; from qfx.cli import main; "
            f"sys.exit(main(['build', {str(spec)!r}, '-o', {str(tmp_path / 'artifact')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "needs the Python packages onnx_ir" in result.stderr and "pip install 'qfx[onnx]'" in result.stderr
    assert "internal error" not in result.stderr and no_output_left(tmp_path)


PCT = TensorFormat(QDType.int8, Granularity.per_tensor, observer=ObserverKind.percentile)


@pytest.mark.parametrize("batch_sizes", [(1, 3), (2, 5), (7, 10)])
def test_percentile_ranges_do_not_depend_on_batching(batch_sizes):
    """10 samples, heavy-tailed: any batching (short last batch included) gives the same bits."""
    x = torch.distributions.StudentT(2.0).sample((10, 6, 40))
    ranges = []
    for batch in batch_sizes:
        obs = PercentileObserver(PCT, "x", percentile=99.0)
        for start in range(0, 10, batch):
            obs(x[start:start + batch])
        ranges.append(tuple(float(v) for v in obs.range()))
    assert ranges[0] == ranges[1]
    per_sample = torch.quantile(x.reshape(10, -1).double(), 0.99, dim=1, interpolation="nearest")
    assert abs(ranges[0][1] - float(per_sample.mean())) < 0.05 * abs(float(per_sample.mean()))


def _renames_seen_without_target(monkeypatch, target):
    missing = []
    real = os.rename

    def spy(src, dst):
        real(src, dst)
        missing.append(not target.exists())

    monkeypatch.setattr(os, "rename", spy)
    return missing


def _write(target: os.PathLike, text: str):
    with AtomicDir(target) as out:
        (out.tmp / "manifest.json").write_text('{"generator": "qfx"}')
        (out.tmp / "payload.txt").write_text(text)
        out.commit()


def test_replacing_an_artifact_never_leaves_the_name_missing(tmp_path, monkeypatch):
    target = tmp_path / "artifact"
    _write(target, "old")
    missing = _renames_seen_without_target(monkeypatch, target)
    _write(target, "new")
    assert (target / "payload.txt").read_text() == "new"
    assert not any(missing), "the output name was missing between two renames"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # the old one is gone


def test_without_an_atomic_exchange_the_old_artifact_is_still_replaced_whole(tmp_path, monkeypatch):
    target = tmp_path / "artifact"
    _write(target, "old")
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    _write(target, "new")
    assert (target / "payload.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_every_file_and_both_directories_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    target = tmp_path / "artifact"
    _write(target, "first")
    tmp_files = [p for p in synced if p.endswith(("manifest.json", "payload.txt"))]
    assert len(tmp_files) == 2 and all(".qfx-tmp-" in p for p in tmp_files)  # before the rename
    assert synced[-1] == str(tmp_path)  # the parent, after it: the rename itself is durable
    assert any(".qfx-tmp-" in p and p.rsplit("/", 1)[-1].startswith(".artifact") for p in synced)


def test_a_published_artifact_is_readable_by_others(tmp_path):
    target = tmp_path / "artifact"
    _write(target, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
