"""sha256 of files and tensors, as the manifest records them and the loader checks them."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import torch


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tensors(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Each label, then its tensor's bytes (hashed in place, no copy)."""
    digest = hashlib.sha256()
    for label, t in items:
        digest.update(label.encode())
        digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
