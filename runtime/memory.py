"""Keep a build's resident memory close to what it really holds."""
from __future__ import annotations

import ctypes
import ctypes.util

_LIBC = ctypes.util.find_library("c")


def release_memory() -> None:
    """Hand freed heap back to the OS. glibc keeps freed blocks in per-thread arenas, so a
    build's RSS would otherwise keep every activation size it ever saw."""
    if _LIBC is None:
        return
    try:
        ctypes.CDLL(_LIBC).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
