"""Calibration inputs (text, token files, synthetic) and the observers that record ranges."""
import numpy as np
import pytest
import torch
from conftest import tiny_spec
from safetensors.torch import save_file

import qfx
from qfx.calib_data import MAX_SYNTHETIC_VALUES, calibration_set
from qfx.capture import load_hf, wrap_module
from qfx.errors import CalibrationError
from qfx.examples import tiny_llama
from qfx.passes.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageObserver,
    MseObserver,
    PercentileObserver,
)
from qfx.runtime import numerics
from qfx.runtime.formats import Granularity, ObserverKind, QDType, TensorFormat
from qfx.spec import Calibration

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


HISTOGRAM_DATA = {  # three batches each
    "uniform with a one-sided outlier": lambda g, i: torch.cat([torch.rand(16384, generator=g) * 4 - 1,
                                                                 torch.tensor([40.0 * (i + 1)])]),
    "gaussian, widening": lambda g, i: torch.randn(16384, generator=g) * (1 + i),
    "heavy-tailed": lambda g, i: torch.randn(16384, generator=g) ** 3,
}


@pytest.mark.parametrize("data", sorted(HISTOGRAM_DATA))
def test_histogram_observer_does_what_torchs_does(data):
    """Its range costs no more than min-max's and about what torch's HistogramObserver's costs
    (torch's own greedy search, on its own histogram) on everything seen."""
    import warnings

    from torch.ao.quantization import HistogramObserver as TorchHistogramObserver

    fmt = TensorFormat(QDType.uint8, Granularity.per_tensor, symmetric=False, observer=ObserverKind.histogram)
    ours = HistogramObserver(fmt, "x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        theirs = TorchHistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for i in range(3):
        x = HISTOGRAM_DATA[data](gen, i)
        ours(x), theirs(x)
        seen.append(x)
    seen = torch.cat(seen)

    def error(lo, hi):
        scale, zero_point = numerics.qparams_from_range(torch.tensor(float(lo)), torch.tensor(float(hi)), fmt)
        return float((numerics.fake_quantize(seen, scale, zero_point, fmt.dtype) - seen).square().mean())

    scale, zero_point = theirs.calculate_qparams()
    torch_range = (float((0 - zero_point) * scale), float((255 - zero_point) * scale))
    ours_error, torch_error = error(*ours.range()), error(*torch_range)
    print(f"{data}: error min-max {error(seen.min(), seen.max()):.5f}, torch {torch_error:.5f}, ours {ours_error:.5f}")
    # measured ours / torch: 0.997 (uniform + outlier), 0.951 (gaussian), 1.000 (heavy-tailed)
    assert ours_error <= error(seen.min(), seen.max()) and ours_error <= 1.01 * torch_error


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_observer_range_costs_less_error_than_min_max_on_everything_seen(symmetric):
    fmt = TensorFormat(QDType.int8 if symmetric else QDType.uint8, Granularity.per_tensor, symmetric=symmetric,
                       observer=ObserverKind.mse)
    mse, minmax = MseObserver(fmt, "x"), MinMaxObserver(fmt, "x")
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(4):  # each batch widens the range, so the histogram is re-binned
        x = torch.randn(4, 64, 32, generator=gen) * (1 + i)
        x[0, 0, 0] = 60.0 * (i + 1)
        mse(x), minmax(x)
        batches.append(x.flatten())
    seen = torch.cat(batches)
    assert float(mse.counts.sum()) == seen.numel()  # re-binning keeps every count

    def error(lo_hi):
        scale, zero_point = numerics.qparams_from_range(*lo_hi, fmt)
        return float((numerics.fake_quantize(seen, scale, zero_point, fmt.dtype) - seen).square().mean())

    lo, hi = minmax.range()
    best = min(error((lo * r, hi * r)) for r in numerics.MSE_CLIP_RATIOS)  # the search on the data itself
    print(f"error: min-max {error((lo, hi)):.4f}, mse observer {error(mse.range()):.4f}, best {best:.4f}")
    assert error(mse.range()) < error((lo, hi))
    assert error(mse.range()) <= 1.02 * best  # the histogram stands for the data well


def test_mse_observer_with_readers_keeps_what_they_weigh():
    """With its readers' weights, the range is chosen by their output error: a channel of large
    values that the readers weigh heavily is not clipped as the plain error of X would clip it."""
    fmt = TensorFormat(QDType.int8, Granularity.per_tensor, symmetric=True, observer=ObserverKind.mse)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 32, generator=gen)
    x[..., 0] = 8 + torch.rand(8, 64, generator=gen) * 4  # a systematic outlier channel, 8..12
    w = torch.randn(16, 32, generator=gen) * 0.05
    w[:, 0] = 1.0  # that every reader weighs
    observer = MseObserver(fmt, "x")
    for batch in x.split(2):
        observer(batch)

    def output_error(lo_hi):
        scale, zero_point = numerics.qparams_from_range(*lo_hi, fmt)
        return float((numerics.fake_quantize(x, scale, zero_point, fmt.dtype) @ w.T - x @ w.T).square().mean())

    plain, by_readers = observer.range(), observer.range(w)
    minmax = (x.min(), x.max())
    print(f"output error: min-max {output_error(minmax):.3e}, plain mse {output_error(plain):.3e}, "
          f"readers' mse {output_error(by_readers):.3e}")
    # measured: min-max 7.842e-04, plain mse 8.924e-04, readers' mse 7.842e-04
    assert float(plain[1]) < float(x[..., 0].max())  # the plain error of X clips into the channel
    assert output_error(by_readers) < output_error(plain) and output_error(by_readers) <= output_error(minmax)
    assert observer.sample.rows(MseObserver.OUTPUT_ROWS).shape[0] >= MseObserver.OUTPUT_ROWS


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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Hugging Face directory with weights: what model.path points at for a trained model."""
    folder = tmp_path_factory.mktemp("checkpoint") / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    return folder


NO_CALIBRATION = "version: 1\nmodel: {path: tiny-llama}\nquantization: {preset: w8a8-int8, exclude: [lm_head]}\n"


def test_trained_checkpoint_without_calibration_is_refused(checkpoint):
    spec = checkpoint.parent / "spec.yaml"
    spec.write_text(NO_CALIBRATION)
    out = checkpoint.parent / "artifact"
    with pytest.raises(CalibrationError) as info:
        qfx.compile(spec=spec, output_dir=out)
    msg = str(info.value)
    assert f"no calibration data given for the trained model {checkpoint}" in msg and "random token ids" in msg
    assert "calibration: {text: FILE}" in msg and "tokens:" in msg and "{synthetic: true} to accept random ids" in msg
    assert not out.exists()


def test_trained_checkpoint_with_explicit_synthetic_calibration_builds(checkpoint):
    spec = checkpoint.parent / "synthetic.yaml"
    spec.write_text(NO_CALIBRATION + "calibration: {synthetic: true, samples: 2, seq_len: 8}\n")
    result = qfx.compile(spec=spec)
    assert len(result.plan) == 14


def test_in_memory_model_from_pretrained_needs_calibration_but_one_from_a_config_does_not(checkpoint):
    from transformers import AutoModelForCausalLM

    no_calibration = {"version": 1, "quantization": {"preset": "w8a8-int8", "exclude": ["lm_head"]}}
    trained = AutoModelForCausalLM.from_pretrained(checkpoint)
    with pytest.raises(CalibrationError, match=f"no calibration data given for the trained model {checkpoint}"):
        qfx.compile(trained, no_calibration)
    default = Calibration(synthetic=True, samples=2, seq_len=8)
    assert calibration_set(default, wrap_module(tiny_llama()), given=False).samples == 2  # from_config: random weights
    with pytest.raises(CalibrationError, match="no calibration data given"):
        calibration_set(default, load_hf(checkpoint), given=False)
    assert calibration_set(default, load_hf(checkpoint), given=True).samples == 2


def test_the_build_knows_whether_the_spec_set_calibration(tmp_path):
    """The flag the build passes as `given`: path resolution must not mark calibration as set."""
    spec = {"version": 1, "model": {"path": "m"}, "quantization": {"preset": "w8a8-int8"}, "output": {"dir": "o"}}
    path = tmp_path / "s.yaml"
    path.write_text("version: 1\nmodel: {path: m}\nquantization: {preset: w8a8-int8}\noutput: {dir: o}\n")
    for source in (spec, path, qfx.Spec.model_validate(spec)):
        assert "calibration" not in qfx.load_spec(source).spec.model_fields_set
    given = dict(spec, calibration={"tokens": "ids.npy"})
    loaded = qfx.load_spec(given).spec
    assert "calibration" in loaded.model_fields_set and loaded.calibration.model_fields_set == {"tokens"}


def _token_file(tmp_path, shape):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) % 256)
    return path


def test_a_2d_token_file_gives_samples_and_seq_len_the_spec_leaves_out(tmp_path):
    bundle = wrap_module(tiny_llama())
    path = _token_file(tmp_path, (6, 20))
    whole = calibration_set(Calibration(tokens=str(path)), bundle)
    assert tuple(whole.inputs[0].shape) == (6, 20) and whole.description == "ids.npy (6 × 20)"
    rows = calibration_set(Calibration(tokens=str(path), samples=4), bundle)
    assert tuple(rows.inputs[0].shape) == (4, 20)
    cols = calibration_set(Calibration(tokens=str(path), seq_len=8), bundle)
    assert tuple(cols.inputs[0].shape) == (6, 8) and torch.equal(cols.inputs[0], whole.inputs[0][:, :8])
    with pytest.raises(CalibrationError, match=r"is \(6, 20\); samples × seq_len needs at least 6 × 32"):
        calibration_set(Calibration(tokens=str(path), seq_len=32), bundle)  # explicit values are still checked
    with pytest.raises(CalibrationError, match="samples of 1 token"):
        calibration_set(Calibration(tokens=str(_token_file(tmp_path, (6, 1)))), bundle)
    with pytest.raises(CalibrationError, match="fewer than samples × seq_len = 2048"):  # 1-D: the defaults
        calibration_set(Calibration(tokens=str(_token_file(tmp_path, (120,)))), bundle)


def test_a_2d_token_file_in_a_spec_file_builds_whole(tmp_path):
    _token_file(tmp_path, (3, 12))
    spec = tmp_path / "spec.yaml"
    spec.write_text("version: 1\nmodel: {factory: 'qfx.examples:tiny_llama'}\ncalibration: {tokens: ids.npy}\n"
                    "quantization: {preset: w8a8-int8-dynamic, exclude: [lm_head]}\n")
    calib = qfx.compile(spec=spec, output_dir=tmp_path / "a").manifest["calibration"]
    assert calib["samples"] == 3 and calib["description"] == "ids.npy (3 × 12)"


def test_synthetic_calibration_too_large_to_draw_is_an_error():
    too_many = Calibration(synthetic=True, samples=MAX_SYNTHETIC_VALUES // 64 + 1, seq_len=64)
    with pytest.raises(CalibrationError, match="lower calibration.samples or seq_len"):
        calibration_set(too_many, wrap_module(tiny_llama()))
