"""sha256 of files, tensors and the manifest itself, as the build records them and the readers check them."""
from __future__ import annotations

import hashlib
import json
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


def canonical_json(data) -> str:
    """The one serialization of a manifest: what manifest.json holds, byte for byte, and what its
    self-hash covers. Floats print as repr, which parses back to the same float, so a manifest
    read back serializes to the same text."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


MANIFEST_HASH_KEY = "manifest_sha256"


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own hash field. It catches a manifest
    edited by hand or by a tool that did not re-seal it; it is not a signature (anyone can
    recompute it), so the readers validate every field they use as well."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_HASH_KEY}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()
