"""Run a GIL-releasing job (hashing, file writing) on a helper thread while the build goes on."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor


def in_background(job, *args) -> Future:
    pool = ThreadPoolExecutor(1, thread_name_prefix=f"qfx-{job.__name__}")
    future = pool.submit(job, *args)
    pool.shutdown(wait=False)  # the thread ends with the job
    return future


def settle(future: Future | None) -> None:
    """Wait for a job whose result nobody will read (the build failed), so it cannot write
    into a directory that is being removed."""
    if future is not None:
        future.exception()
