"""Every spec's ONNX artifact runs on ONNX Runtime 1.22, the last release with the ROCm execution
provider, as on the latest: `qfx verify` passes there, and its logits equal the torch artifact's
and the latest ORT's.

ORT 1.22 lives in its own environment (make conformance-setup: .venv-ort122), pointed to by
QFX_ORT122_PYTHON; it imports this checkout's qfx."""
import json
import os
import subprocess

import pytest
import torch
from conftest import ROOT, needs_shared
from safetensors.torch import load_file, save_file

import qfx
import qfx.runtime
from qfx.runtime.evaluate import compare_outputs
from qfx.runtime.ort import session
from qfx.runtime.verify import TOLERANCE
from qfx.spec import OutputFormat
from qfx.spec_loader import load_spec

pytestmark = pytest.mark.conformance
ORT122_PYTHON = os.environ.get("QFX_ORT122_PYTHON")
requires_ort122 = pytest.mark.skipif(not ORT122_PYTHON, reason="QFX_ORT122_PYTHON is not set: run `make test`, "
                                     "which installs onnxruntime 1.22 into .venv-ort122")
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def build_with_onnx(spec_path, out):
    """The spec as written, with model.onnx among its formats and its output in `out`."""
    spec = load_spec(spec_path).spec
    output = spec.output.model_copy(update={"dir": str(out), "formats": [OutputFormat.safetensors, OutputFormat.onnx]})
    return qfx.compile(spec=spec.model_copy(update={"output": output}))


def on_ort122(folder, ids, tmp_path) -> tuple[torch.Tensor, dict]:
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    run = subprocess.run([ORT122_PYTHON, str(ROOT / "tests" / "ort_run.py"), str(folder),
                          str(tmp_path / "ids.safetensors"), str(tmp_path / "logits.safetensors")],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(str(tmp_path / "logits.safetensors"))["logits"], json.loads(run.stdout.strip().splitlines()[-1])


@requires_ort122
@pytest.mark.parametrize("spec_path", [pytest.param(p, marks=[needs_shared] if "tinystories" in p.name else [])
                                       for p in SPECS], ids=lambda p: p.name)
def test_every_spec_verifies_on_ort_1_22_as_on_the_latest(spec_path, built_specs, tmp_path):
    result = built_specs.get(spec_path.name) or build_with_onnx(spec_path, tmp_path / "a")
    folder = result.artifact_dir
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    old, report = on_ort122(folder, ids, tmp_path)
    assert report["onnxruntime"].startswith("1.22.")
    latest = torch.from_numpy(session(folder / "model.onnx").run(None, {"input_ids": ids.numpy()})[0])
    with torch.no_grad():
        in_torch = qfx.runtime.load(folder)(input_ids=ids, use_cache=False).logits
    fed_old, fed_latest = report["verify"], result.manifest["verify"]
    vs_torch = compare_outputs(in_torch, old, top1=False)["rel_error"]
    vs_latest = compare_outputs(latest, old, top1=False)["rel_error"]
    print(f"{spec_path.name}: ORT {report['onnxruntime']} fed {fed_old['output_rel_error']:.3g}, latest fed "
          f"{fed_latest['output_rel_error']:.3g}; free-running vs torch {vs_torch:.3g}, vs latest ORT {vs_latest:.3g}")
    # verify raised if either ORT missed its tolerance; the figures are in the README (ONNX section)
    assert fed_old["output_rel_error"] <= fed_old["tolerance"] and fed_old["activation_values_differing"] <= 1e-3
    tolerance = TOLERANCE["fp8" if "fp8" in spec_path.name else "int"]
    # Measured on AVX2: 0 against the latest ORT (1.32) for every spec, FP8 (QDQ fusion off on
    # 1.22) included; against torch 8e-8 (FP8) to 3.1e-7 (int4 g128).
    assert vs_torch <= tolerance and vs_latest <= tolerance


def test_before_1_23_a_rejected_fp8_graph_is_reopened_without_qdq_fusion(monkeypatch, tmp_path):
    """The retry logic on this environment's ORT: an FP8 rejection as ORT 1.22 words it."""
    import onnxruntime

    import qfx.runtime.ort as qort

    opened = []

    class FakeSession:
        def __init__(self, source, options, providers):
            try:
                fused = options.get_session_config_entry("session.disable_quant_qdq") != "1"
            except RuntimeError:  # not set
                fused = True
            opened.append(fused)
            if fused:
                raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Type 'tensor(float8e4m3fn)' of input "
                                   "parameter (quantize) of operator (MatMulIntegerToFloat) is invalid")

    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    model = b"not read by the fake"
    monkeypatch.setattr(qort, "ort_version", lambda: (1, 22))
    assert isinstance(session(model), FakeSession) and opened == [True, False]
    monkeypatch.setattr(qort, "ort_version", lambda: (1, 23))
    with pytest.raises(RuntimeError, match="float8"):  # a newer ORT rejecting FP8 is a real error
        session(model)
