"""Write an artifact directory atomically: into a temp directory beside it, renamed at the end.

A failed build leaves nothing; a directory that qfx did not write is never replaced without
`force`."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from qfx.runtime.errors import OutputError

GENERATOR = "qfx"


def made_by_qfx(path: Path) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


class AtomicDir:
    """`with AtomicDir(target) as tmp: ...write into tmp...; commit()` publishes it."""

    def __init__(self, target: Path, force: bool = False):
        self.target = Path(target).resolve()
        self.force = force
        self.tmp: Path | None = None
        self.committed = False

    def __enter__(self) -> "AtomicDir":
        target = self.target
        if target.exists() and not target.is_dir():
            raise OutputError(f"output path {target} exists and is a file", hint="choose a directory path")
        if target.is_dir() and any(target.iterdir()) and not made_by_qfx(target):
            if not self.force:
                raise OutputError(f"output directory {target} exists and was not written by qfx",
                                  hint="choose another output.dir, or pass --force (force: true) to replace it")
            if Path.cwd().resolve().is_relative_to(target) or target == Path(target.anchor):
                raise OutputError(f"refusing to replace {target}: it holds the current directory",
                                  hint="give output.dir a directory of its own")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.qfx-tmp-", dir=target.parent))
        except OSError as exc:
            raise OutputError(f"cannot write the output directory {target}: {exc.strerror}",
                              hint="choose a writable output.dir (or -o DIR)") from None
        return self

    def commit(self) -> None:
        old = None
        if self.target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.qfx-old-", dir=self.target.parent))
            os.rename(self.target, old / "replaced")
        try:
            os.rename(self.tmp, self.target)
        except OSError:
            if old is not None:  # put the previous artifact back
                os.rename(old / "replaced", self.target)
                old.rmdir()
            raise
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        if not self.committed and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
