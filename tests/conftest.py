import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
TINYSTORIES = SHARED / "tinystories-llama-64d"
TINYSTORIES_TEXT = SHARED / "text" / "tinystories-valid-sample.txt"
WIKITEXT = SHARED / "text" / "wikitext-2-raw-test.txt"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

needs_shared = pytest.mark.skipif(not TINYSTORIES.is_dir(), reason="../shared/data (TinyStories Llama) is not beside this checkout")


def tiny_spec(tmp_path=None, **quantization) -> dict:
    """A spec dict for the built-in tiny Llama with synthetic calibration."""
    spec = {"version": 1, "model": {"factory": "qfx.examples:tiny_llama"}, "target": "cpu",
            "calibration": {"synthetic": True, "samples": 4, "seq_len": 16},
            "quantization": quantization or {"preset": "w8a8-int8", "exclude": ["lm_head"]}}
    if tmp_path is not None:
        spec["output"] = {"dir": str(tmp_path / "artifact")}
    return spec
