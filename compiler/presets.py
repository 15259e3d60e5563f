"""Named schemes that `quantization.preset` expands to (a default that `default` may overlay)."""
from __future__ import annotations

from qfx.runtime.formats import MX_BLOCK
from qfx.spec import Preset

_INT8_W = {"dtype": "int8", "granularity": "per_channel"}
_INT8_A = {"dtype": "int8", "granularity": "per_tensor", "observer": "minmax"}
_FP8 = {"dtype": "fp8_e4m3", "granularity": "per_tensor"}


def _w4(group: int, symmetric: bool = True) -> dict:
    return {"weight": {"dtype": "int4" if symmetric else "uint4", "granularity": "per_group",
                       "group_size": group, "symmetric": symmetric}}


def _mx(dtype: str) -> dict:
    """OCP MX weights and inputs (Quark's W/A MX schemes): inputs take their scales at run time."""
    block = {"dtype": dtype, "granularity": "per_group", "group_size": MX_BLOCK}
    return {"weight": block, "input": block}


PRESETS: dict[Preset, dict] = {
    Preset.w8a8_int8: {"weight": _INT8_W, "input": _INT8_A},
    Preset.w8a8_int8_dynamic: {"weight": _INT8_W, "input": {"dtype": "int8", "granularity": "per_token"}},
    Preset.w8a8_fp8: {"weight": _FP8, "input": {**_FP8, "observer": "minmax"}},
    Preset.w8a16_int8: {"weight": _INT8_W},
    Preset.w4a16_g32: _w4(32),
    Preset.w4a16_g64: _w4(64),
    Preset.w4a16_g128: _w4(128),
    Preset.w4a16_g128_asym: _w4(128, symmetric=False),
    # LLM.int8 (bitsandbytes' load_in_8bit): per-token int8 inputs whose columns holding a value
    # of magnitude 6 or more stay in float
    Preset.llm_int8: {"weight": _INT8_W, "input": {"dtype": "int8", "granularity": "per_token",
                                                   "outlier_threshold": 6.0}},
    Preset.w4a4_mxfp4: _mx("mxfp4"),
    Preset.w6a6_mxfp6_e2m3: _mx("mxfp6_e2m3"),
    Preset.w6a6_mxfp6_e3m2: _mx("mxfp6_e3m2"),
    Preset.w8a8_mxfp8: _mx("mxfp8"),
}

