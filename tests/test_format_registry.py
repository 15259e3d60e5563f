"""The format registry (runtime/formats.py: CODE_SPECS) is the one place that states a format's
properties; other modules ask it (`is_float`, `bits`, `is_signed`, `spec.onnx_type`, ...) rather
than comparing format names. A test reads the source, so a name comparison added anywhere else
fails here unless it is one of the places below, each with the reason it names a format."""
import re

import pytest
import torch
from conftest import ROOT

from qfx.runtime.formats import CODE_SPECS, QDType

# file -> why it may name formats
ALLOWED = {
    "compiler/spec.py": "validates the spec's user vocabulary (DType: `fp8_e4m3` is a family, resolved by target)",
    "compiler/rules.py": "resolves the user's fp8_e4m3 to the target's FP8 variant (FNUZ on gfx942)",
    "lowering/onnx_graph.py": "the CPU ONNX artifact re-encodes int8 codes as uint8 (a kernel quirk of that pair)",
    "runtime/verify.py": "checks that int8 -> uint8 re-encoding; ml_dtypes' int4 arrays are named by numpy",
    "runtime/formats.py": "the registry itself",
}
NAMES = "|".join([q.value for q in QDType] + ["fp8_e4m3"])
MEMBER = re.compile(rf"\bQ?DType\.({NAMES})\b")
COMPARED = re.compile(rf"""(==|!=|\bin|\bis)\s*\(?\s*["']({NAMES})["']|["']({NAMES})["']\s*(==|!=|\bin\b)""")
FOLDERS = ("compiler", "passes", "lowering", "runtime")


def test_no_module_outside_the_registry_compares_format_names():
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in ALLOWED:
                continue
            found += [f"{rel}: {line.strip()}" for line in hits(path)]
    assert not found, "ask the registry (runtime/formats.py) instead:\n" + "\n".join(found)


def hits(path) -> list[str]:
    return [line for line in path.read_text().splitlines()
            if MEMBER.search(line.split("#", 1)[0]) or COMPARED.search(line.split("#", 1)[0])]


@pytest.mark.parametrize("rel", sorted(ALLOWED))
def test_every_allowed_module_still_needs_it(rel):
    assert hits(ROOT / rel), f"{rel} names no format any more: take it off ALLOWED"


def test_the_scan_finds_what_it_looks_for():
    assert MEMBER.search("if q is QDType.fp8_e4m3fnuz:")
    assert COMPARED.search('if w_qdtype in ("int4", "uint4"):') and COMPARED.search('if x == "int8":')
    assert not COMPARED.search('QDType("int8")') and not MEMBER.search("QDType(name)")


@pytest.mark.parametrize("qdtype", list(QDType))
def test_every_format_is_registered_consistently(qdtype):
    spec = CODE_SPECS[qdtype]
    assert qdtype.bits == spec.bits and qdtype.storage == spec.storage
    if spec.table is not None:  # a code table: one entry per code, spanning [qmin, qmax]
        table = list(spec.table)
        assert len(table) == 2 ** spec.bits and (min(table), max(table)) == (qdtype.qmin, qdtype.qmax)
        assert len(set(table)) >= len(table) - 1 and not spec.is_float  # only 0 and -0 may repeat
        assert spec.min_exponent is None and spec.native_max is None
    elif spec.is_float:
        assert qdtype.qmin == -qdtype.qmax
    else:
        assert qdtype.qmin == (-(2 ** (spec.bits - 1)) if qdtype.is_signed else 0)
    if qdtype.is_integer:
        assert qdtype.qmax - qdtype.qmin == 2 ** spec.bits - 1
        assert spec.min_exponent is None and spec.native_max is None
    elif spec.is_float:  # the cap fits the type, and the type's own smallest normal is 2**min_exponent
        info = torch.finfo(spec.storage)
        assert qdtype.qmax <= info.max == (spec.native_max or qdtype.qmax)
        assert info.tiny == 2.0 ** spec.min_exponent
    if qdtype.is_mx:  # ONNX has no type with E8M0 block scales; 8-bit codes are checkpointed as they are
        ebits, mbits = spec.mx_element
        assert spec.onnx_type is None and spec.numpy_type is None and 1 + ebits + mbits == spec.bits
        assert (spec.checkpoint_dtype is None) == (spec.bits < 8)
    else:
        assert (spec.numpy_type is None) == (spec.checkpoint_dtype is None) == (spec.bits < 8)
