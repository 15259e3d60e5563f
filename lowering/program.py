"""Write the lowered program: model.pt2, a torch.export program of the lowered graph."""
from __future__ import annotations

from pathlib import Path

import torch

from qfx.runtime.artifact_files import PROGRAM_FILE


def write_program(folder: Path, lowered: torch.fx.GraphModule, example: tuple, dynamic_shapes) -> str:
    """model.pt2 with `lowered` exported on `example` (dynamic as `dynamic_shapes` say), without the
    sample inputs torch would store pickled: its readers (runtime/program.py) refuse those."""
    program = torch.export.export(lowered, example, dynamic_shapes=dynamic_shapes, strict=False)
    program._example_inputs = None
    torch.export.save(program, folder / PROGRAM_FILE)
    return PROGRAM_FILE
