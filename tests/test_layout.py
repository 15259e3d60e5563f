"""Package shape: one import package `qfx`, imports pointing one way, nothing generic installed."""
import ast
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT

# folder -> the qfx packages it may import (compiler -> passes -> lowering -> runtime)
LAYERS = {"runtime": {"qfx.runtime"},
          "lowering": {"qfx.runtime", "qfx.lowering"},
          "passes": {"qfx.runtime", "qfx.lowering", "qfx.passes"}}


def qfx_imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qfx"):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("qfx"))


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_imports_point_one_way(folder):
    allowed = LAYERS[folder]
    bad = [(p.name, m) for p in (ROOT / folder).rglob("*.py") for m in qfx_imports(p)
           if not any(m == a or m.startswith(a + ".") for a in allowed)]
    assert not bad, f"{folder}/ may import only {sorted(allowed)}: {bad}"


def test_wheel_installs_only_the_qfx_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("qfx-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"qfx"}
    names = zipfile.ZipFile(wheel).namelist()
    assert {"qfx/build.py", "qfx/passes/convert.py", "qfx/lowering/emit.py", "qfx/runtime/loader.py",
            "qfx/runtime/layouts/gptq.py"} <= set(names)


def test_imports_from_another_directory(tmp_path):
    code = ("import qfx, qfx.runtime, importlib.util as u; "
            "assert all(u.find_spec(n) is None for n in ('compiler', 'passes', 'lowering', 'runtime')); "
            "print(qfx.__version__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
