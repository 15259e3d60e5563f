"""Write an artifact directory atomically: into a temp directory beside it, renamed at the end.

A failed build leaves nothing; a directory that qfx did not write is never replaced without
`force`. Every file and the directory are fsynced before the rename, and the parent after it,
so a crash (or power loss) publishes either the old artifact or the whole new one. An existing
artifact is swapped with the new one in one step (Linux renameat2 RENAME_EXCHANGE), so there
is no moment when the output name is missing; where the kernel or file system cannot exchange,
two renames are used and that window (microseconds) remains.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import socket
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
            remove_stale_scratch(target)
            self.tmp = Path(tempfile.mkdtemp(prefix=_scratch_prefix(target, "tmp"), dir=target.parent))
        except OSError as exc:
            raise OutputError(f"cannot write the output directory {target}: {exc.strerror}",
                              hint="choose a writable output.dir (or -o DIR)") from None
        return self

    def retarget(self, target: Path) -> None:
        """Publish at `target` instead: a directory beside the first one (the scratch directory is
        in their common folder), which qfx wrote or which does not exist."""
        target = Path(target).resolve()
        if target.parent != self.target.parent:
            raise ValueError(f"{target} is not beside {self.target}")
        if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not made_by_qfx(target))):
            raise OutputError(f"{target} exists and was not written by qfx, so the build cannot put its artifact "
                              "there", hint="move it away")
        self.target = target

    def commit(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp made it private; publish it as mkdir would
        sync_tree(self.tmp)
        if self.target.exists() and exchange(self.tmp, self.target):
            self.committed = True  # self.tmp now holds the previous artifact: __exit__ removes it
            fsync_path(self.target.parent)
            return
        old = None
        if self.target.exists():
            old = Path(tempfile.mkdtemp(prefix=_scratch_prefix(self.target, "old"), dir=self.target.parent))
            os.rename(self.target, old / "replaced")
        try:
            os.rename(self.tmp, self.target)
        except OSError:
            if old is not None:  # put the previous artifact back
                os.rename(old / "replaced", self.target)
                old.rmdir()
            raise
        self.committed = True
        self.tmp = old
        fsync_path(self.target.parent)

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:  # the unpublished build, or after a commit the replaced artifact
            shutil.rmtree(self.tmp, ignore_errors=True)


# Scratch directories beside the output are named for the process that made them, so that a
# later build can remove those of a build that was killed (on this host: a process on another
# host sharing the folder cannot be checked, and its scratch is left alone).
def _scratch_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.qfx-{kind}-{os.getpid()}@{socket.gethostname()}~"


def remove_stale_scratch(target: Path) -> list[Path]:
    """Remove the scratch directories of earlier builds of `target` on this host whose process
    is gone (a build killed mid-write, or after publishing but before removing the artifact it
    replaced); return them."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.qfx-(?:tmp|old)-(\d+)@(.+)~[^~]*")
    removed = []
    for entry in target.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and m.group(2) == socket.gethostname() and not _alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves (their entries)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically; False where this system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
