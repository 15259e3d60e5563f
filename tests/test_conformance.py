"""qfx artifacts load in Hugging Face transformers through amd-quark (the Quark layout that
vLLM loads with quantization='quark'), and compute what qfx.runtime computes.

amd-quark runs in its own environment (make conformance-setup; `make test` does it), pointed
to by QFX_QUARK_PYTHON, so its many dependencies never touch qfx's."""
import json
import os
import subprocess

import pytest
import torch
from conftest import ROOT, TINYSTORIES, TINYSTORIES_TEXT, tiny_spec
from safetensors.torch import load_file, save_file

import qfx
import qfx.runtime

pytestmark = pytest.mark.conformance
QUARK_PYTHON = os.environ.get("QFX_QUARK_PYTHON")
requires_quark = pytest.mark.skipif(not QUARK_PYTHON, reason="QFX_QUARK_PYTHON is not set: run `make test`, "
                                    "which installs amd-quark into .venv-quark")


def quark_logits(artifact, ids, tmp_path):
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    run = subprocess.run([QUARK_PYTHON, str(ROOT / "tests" / "quark_load.py"), str(artifact),
                          str(tmp_path / "ids.safetensors"), str(tmp_path / "logits.safetensors")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    return load_file(str(tmp_path / "logits.safetensors"))["logits"], report


SCHEMES = {
    # with folds: rotated (the tied head untied) and smoothed weights are ordinary weights
    "w8a8-int8-static-folded": {"target": "cpu", "quantization": {"preset": "w8a8-int8", "exclude": ["lm_head"]},
                                "algorithms": [{"rotation": {}}, {"smoothquant": {"alpha": "auto"}}]},
    # int4 groups of 64 (packed as Quark packs them) whose codes GPTQ chose
    "w4a16-g64-gptq": {"target": "cpu", "quantization": {"preset": "w4a16-g64", "exclude": ["lm_head"]},
                       "algorithms": [{"gptq": {}}]},
    "fp8-gfx950": {"target": "gfx950", "quantization": {"preset": "w8a8-fp8", "exclude": ["lm_head"]}},
    "fp8-kv-gfx942": {"target": "gfx942", "quantization": {
        "preset": "w8a8-fp8", "exclude": ["lm_head"],
        "rules": [{"match": ["*k_proj", "*v_proj"], "output": {"dtype": "fp8_e4m3"}}]}},
}


def model_spec():
    if TINYSTORIES.is_dir():  # the real model when it is here; the built-in tiny one otherwise
        return {"model": {"path": str(TINYSTORIES)},
                "calibration": {"text": str(TINYSTORIES_TEXT), "samples": 8, "seq_len": 128}}, 512
    return {"model": {"factory": "qfx.examples:tiny_llama"},
            "calibration": {"synthetic": True, "samples": 8, "seq_len": 64}}, 256


@requires_quark
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_artifact_loads_in_transformers_through_amd_quark(scheme, tmp_path):
    base, vocab = model_spec()
    spec = dict(tiny_spec(), **base, **SCHEMES[scheme])
    result = qfx.compile(spec=spec, output_dir=tmp_path / "artifact")
    ids = torch.randint(0, vocab, (2, 96), generator=torch.Generator().manual_seed(0))
    theirs, report = quark_logits(result.artifact_dir, ids, tmp_path)
    assert report["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                      "error_msgs": []}, report
    assert report["k_proj_type"] == "QParamsLinear"
    assert report["k_proj_has_output_quantizer"] == (scheme == "fp8-kv-gfx942")
    with torch.no_grad():
        ours = qfx.runtime.load(result.artifact_dir)(ids).logits
    rel = float((theirs - ours).abs().max() / ours.abs().max())
    # measured on TinyStories: 0 for all (bit-identical logits)
    print(f"{scheme}: max relative logits difference {rel:.3g}")
    assert rel <= 1e-3, rel
