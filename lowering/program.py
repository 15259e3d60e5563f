"""Write the lowered program: model.pt2, a torch.export program of the lowered graph."""
from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path

import torch

from qfx.runtime.artifact_files import PROGRAM_FILE

SERIALIZATION_ID = "/.data/serialization_id"
GRAPH_ID = re.compile(rb'(graph_id\\?": )(\d+)')


def _numbered_graph_ids(data: bytes) -> bytes:
    numbers: dict[bytes, bytes] = {}
    return GRAPH_ID.sub(lambda m: m.group(1) + numbers.setdefault(m.group(2), str(len(numbers)).encode()), data)


def write_program(folder: Path, lowered: torch.fx.GraphModule, example: tuple, dynamic_shapes) -> str:
    """model.pt2 with `lowered` exported on `example` (dynamic as `dynamic_shapes` say), without the
    sample inputs torch would store pickled: its readers (runtime/program.py) refuse those."""
    program = torch.export.export(lowered, example, dynamic_shapes=dynamic_shapes, strict=False)
    program._example_inputs = None
    torch.export.save(program, folder / PROGRAM_FILE)
    _make_reproducible(folder / PROGRAM_FILE)
    return PROGRAM_FILE


def _make_reproducible(path: Path) -> None:
    """Rewrite the archive so that two builds of one spec write the same bytes: the ids of Python
    graph objects that the program's node provenance records (`graph_id`, a memory address) are
    numbered in order of appearance, and the serialization id torch draws per save is replaced by
    a digest of the other records."""
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    records = [(name, _numbered_graph_ids(data) if name.endswith(".json") else data) for name, data in records]
    digest = hashlib.sha256()
    for name, data in records:
        if not name.endswith(SERIALIZATION_ID):
            digest.update(name.encode() + b"\0" + data)
    serialization_id = str(int(digest.hexdigest()[:30], 16)).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            archive.writestr(zipfile.ZipInfo(name), serialization_id if name.endswith(SERIALIZATION_ID) else data)
