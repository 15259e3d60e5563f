"""A `qfx build` killed (SIGKILL) while it writes over an existing artifact: the previous
artifact stays intact and loadable, and nothing half-written ever appears under the output
name. Kills land at named points of the write (patched into the build's subprocess) and at
seeded random moments after the first artifact file appears."""
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import qfx.runtime
from qfx.runtime.artifact_files import check_hashes, read_manifest

# module, function, kill before or after it runs
KILL_POINTS = [
    ("qfx.lowering.emit", "write_safetensors", "before"),
    ("qfx.lowering.safetensors_writer", "_chunks", "during"),  # after two chunks of model.safetensors
    ("qfx.lowering.emit", "write_manifest", "before"),
    ("qfx.lowering.atomic", "sync_tree", "before"),
    ("qfx.lowering.atomic", "sync_tree", "after"),
    ("qfx.lowering.atomic", "exchange", "before"),
    ("qfx.lowering.atomic", "exchange", "after"),  # published, the replaced artifact not yet removed
]
ONNX_KILL_POINTS = [
    ("onnx", "save_model", "during"),  # model.onnx half written
    ("qfx.build", "verify_artifact", "before"),
]

KILLER = """
import importlib, os, signal, sys
module, name, when, spec, out = sys.argv[1:6]
mod = importlib.import_module(module)
real = getattr(mod, name)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def around(*args, **kwargs):
    if when == "before":
        die()
    result = real(*args, **kwargs)
    die()

def truncated(*args, **kwargs):  # the file half written, then the kill
    real(*args, **kwargs)
    path = args[1]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    die()

def chunks(*args, **kwargs):  # the kill after two pieces of a streamed write
    for i, chunk in enumerate(real(*args, **kwargs)):
        if i == 2:
            die()
        yield chunk

patched = {"before": around, "after": around}.get(when) or (chunks if name == "_chunks" else truncated)
setattr(mod, name, patched)
from qfx.cli import main
sys.exit(main(["build", spec, "-o", out]))
"""


def spec_file(folder: Path, name: str, preset: str, onnx: bool) -> Path:
    spec = {"version": 1, "model": {"factory": "qfx.examples:tiny_llama"}, "target": "cpu",
            "calibration": {"synthetic": True, "samples": 2, "seq_len": 16},
            "quantization": {"preset": preset, "exclude": ["lm_head"]},
            "output": {"dir": "unused", "formats": ["safetensors", "onnx"] if onnx else ["safetensors"],
                       "onnx": {"verify": True}}}
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    """The artifact that every killed build tries to replace, and the new build's specs."""
    folder = tmp_path_factory.mktemp("faults")
    old = folder / "old"
    qfx.compile(spec=spec_file(folder, "old.yaml", "w8a16-int8", onnx=False), output_dir=old)
    return {"old": old, "manifest": (old / "manifest.json").read_bytes(),
            "new": spec_file(folder, "new.yaml", "w8a8-int8", onnx=False),
            "new_onnx": spec_file(folder, "new-onnx.yaml", "w8a8-int8", onnx=True)}


def fresh_target(previous, tmp_path) -> Path:
    import shutil

    target = tmp_path / "artifact"
    shutil.copytree(previous["old"], target)
    return target


def assert_intact(previous, target: Path, allow_new: bool = False) -> str:
    """The output name holds the previous artifact (or, past the publishing step, the whole new
    one), its files match its manifest, and it loads; nothing else is visible beside it."""
    visible = sorted(p.name for p in target.parent.iterdir() if not p.name.startswith("."))
    assert visible == ["artifact"], visible
    manifest = read_manifest(target)
    check_hashes(target, manifest)
    which = "old" if (target / "manifest.json").read_bytes() == previous["manifest"] else "new"
    assert which == "old" or allow_new, "a build killed before publishing replaced the artifact"
    qfx.runtime.load(target)
    return which


def kill_at(point, spec: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, *point, str(spec), str(target)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: f"{p[1]}-{p[2]}")
def test_killed_at_a_write_step(point, previous, tmp_path):
    target = fresh_target(previous, tmp_path)
    result = kill_at(point, previous["new"], target)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    published = point == ("qfx.lowering.atomic", "exchange", "after")
    assert assert_intact(previous, target, allow_new=published) == ("new" if published else "old")


@pytest.mark.parametrize("point", ONNX_KILL_POINTS, ids=lambda p: f"{p[1]}-{p[2]}")
def test_killed_while_writing_or_verifying_onnx(point, previous, tmp_path):
    target = fresh_target(previous, tmp_path)
    result = kill_at(point, previous["new_onnx"], target)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert assert_intact(previous, target) == "old"


@pytest.mark.parametrize("seed", range(2))
def test_killed_at_a_random_moment_of_the_write(seed, previous, tmp_path):
    """SIGKILL a random 0-400 ms after the build's temp directory gets its first file."""
    target = fresh_target(previous, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "qfx.cli", "build", str(previous["new_onnx"]), "-o", str(target)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if any(any(p.iterdir()) for p in tmp_path.glob(".artifact.qfx-tmp-*")):
            break
        time.sleep(0.002)
    time.sleep(random.Random(seed).uniform(0, 0.4))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-build: the ONNX export alone takes seconds
    assert assert_intact(previous, target) == "old"


def test_the_next_build_removes_what_killed_builds_left(previous, tmp_path):
    """A kill leaves a scratch directory beside the output (a half-written build, or the artifact
    a published build replaced); the next build of that output removes them."""
    target = fresh_target(previous, tmp_path)
    left = []
    for point in [("qfx.lowering.emit", "write_manifest", "before"), ("qfx.lowering.atomic", "exchange", "after")]:
        assert kill_at(point, previous["new"], target).returncode == -signal.SIGKILL
        left.append({p.name for p in tmp_path.glob(".artifact.qfx-*")})
    assert len(left[0]) == len(left[1]) == 1 and not left[0] & left[1]  # the second build removed the first's
    kept = tmp_path / ".artifact.qfx-tmp-1@another-host~x"  # another host's build may still be running
    kept.mkdir()
    qfx.compile(spec=previous["new"], output_dir=target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["artifact", kept.name])
