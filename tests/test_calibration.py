"""Calibration inputs (text, token files, synthetic) and the observers that record ranges."""
import numpy as np
import pytest
import torch
from conftest import tiny_spec
from safetensors.torch import save_file

import qfx
from qfx.errors import CalibrationError
from qfx.passes.observers import MinMaxObserver, MovingAverageObserver, PercentileObserver
from qfx.runtime.formats import Granularity, ObserverKind, QDType, TensorFormat

FMT = TensorFormat(QDType.int8, Granularity.per_tensor)


def test_minmax_and_moving_average_and_percentile():
    a, b = torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0])
    mm = MinMaxObserver(FMT, "x")
    mm(a), mm(b)
    assert [float(v) for v in mm.range()] == [-3.0, 2.0]
    ma = MovingAverageObserver(FMT, "x", averaging_constant=0.5)
    ma(a), ma(b)
    assert [float(v) for v in ma.range()] == [-2.0, 1.5]  # halfway from batch 1 to batch 2
    pc = PercentileObserver(TensorFormat(QDType.int8, Granularity.per_tensor, observer=ObserverKind.percentile),
                            "x", percentile=99.0)
    x = torch.arange(1, 1001, dtype=torch.float32)  # one outlier-free ramp
    pc(torch.cat([x, torch.tensor([1e6])]))
    lo, hi = pc.range()
    assert float(hi) < 1001 and float(lo) <= 11  # the 1e6 outlier is clipped away


def test_observer_without_data_says_so():
    with pytest.raises(CalibrationError, match="no calibration data reached layer.x"):
        MinMaxObserver(FMT, "layer.x").range()


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_token_file_calibration(tmp_path, suffix):
    ids = torch.randint(0, 256, (6, 20), generator=torch.Generator().manual_seed(3))
    path = tmp_path / f"ids{suffix}"
    if suffix == ".npy":
        np.save(path, ids.numpy())
    else:
        save_file({"input_ids": ids}, str(path))
    spec = dict(tiny_spec(), calibration={"tokens": str(path), "samples": 4, "seq_len": 16})
    result = qfx.compile(spec=spec, output_dir=tmp_path / "a")
    calib = result.manifest["calibration"]
    assert calib["samples"] == 4 and calib["description"] == f"ids{suffix} (4 × 16)"
    # The same ids (the first 4 rows, 16 columns) give the same scales; other ids do not.
    again = qfx.compile(spec=dict(spec, calibration={"tokens": str(path), "samples": 4, "seq_len": 16}))
    other = qfx.compile(spec=tiny_spec())
    scale = "hf.model.layers.0.mlp.down_proj"
    assert torch.equal(result.graph.get_submodule(scale).input_scale, again.graph.get_submodule(scale).input_scale)
    assert not torch.equal(result.graph.get_submodule(scale).input_scale, other.graph.get_submodule(scale).input_scale)


def test_token_file_errors(tmp_path):
    out_of_vocab = tmp_path / "big.npy"
    np.save(out_of_vocab, np.full((4, 16), 999, dtype=np.int64))
    with pytest.raises(CalibrationError, match=r"token ids outside \[0, 256\)"):
        qfx.compile(spec=dict(tiny_spec(), calibration={"tokens": str(out_of_vocab), "samples": 4, "seq_len": 16}))
    too_short = tmp_path / "short.npy"
    np.save(too_short, np.zeros(10, dtype=np.int64))
    with pytest.raises(CalibrationError, match="has 10 tokens, fewer than samples × seq_len = 64"):
        qfx.compile(spec=dict(tiny_spec(), calibration={"tokens": str(too_short), "samples": 4, "seq_len": 16}))
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros((4, 16), dtype=np.float32))
    with pytest.raises(CalibrationError, match="must hold integer token ids"):
        qfx.compile(spec=dict(tiny_spec(), calibration={"tokens": str(floats), "samples": 4, "seq_len": 16}))
