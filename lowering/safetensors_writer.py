"""Write a .safetensors file tensor by tensor.

safetensors' own `save_file` assembles the whole file in memory first, which for a model
artifact doubles its size in peak RSS; this streams each tensor's bytes to disk instead.
The format: an 8-byte little-endian header length, a JSON header (names, dtypes, shapes, byte
offsets; padded with spaces to 8-byte alignment), then the raw little-endian data."""
from __future__ import annotations

import hashlib
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from qfx.runtime.artifact_files import SAFETENSORS_DTYPES

DTYPES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write tensors in name order (the same tensors always give the same bytes); return the
    file's sha256, computed on the way out rather than by reading the file back."""
    names = sorted(tensors)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise ValueError(f"safetensors cannot store {name} of dtype {t.dtype}")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    # Hashing and writing both release the GIL: each chunk is hashed on a helper thread while
    # the main thread writes it, so the digest costs no wall time next to the disk.
    with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="qfx-sha256") as hasher:
        pending = None
        for chunk in _chunks(text, names, tensors):
            if pending is not None:
                pending.result()
            pending = hasher.submit(digest.update, chunk)
            f.write(chunk)
        pending.result()
    return digest.hexdigest()


# One write() of a 100+ MB buffer ran at a tenth of the speed of the same bytes written in
# 4 MiB pieces on these machines (1.46 s against 0.11 s for 357 MB, measured).
CHUNK_BYTES = 4 << 20


def _chunks(text: bytes, names: list[str], tensors: dict[str, torch.Tensor]):
    yield struct.pack("<Q", len(text)) + text
    for name in names:
        t = tensors[name].detach().contiguous().reshape(-1)
        data = t.view(torch.uint8).numpy().data
        for start in range(0, len(data), CHUNK_BYTES):
            yield data[start:start + CHUNK_BYTES]
