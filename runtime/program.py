"""The lowered program of an artifact (model.pt2): a torch.export program whose linears are the
fused ops of qfx.runtime.qlinear.

torch.export.load unpickles what an archive marks as pickled (payloads, custom objects, sample
inputs that fail torch's safe loader), and runs AOTInductor code an archive may carry. qfx
writes none of these, so before anything is loaded the archive is checked to hold none, and
its sha256 to be the one manifest.json records.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch

from qfx.runtime.artifact_files import PROGRAM_FILE, REBUILD, check_hashes, read_manifest
from qfx.runtime.errors import ArtifactError

MAX_CONFIG_BYTES = 64 << 20


def check_program_archive(path: Path) -> None:
    """ArtifactError unless `path` is a PT2 archive that torch.export.load reads without pickle or
    native code: every weight and constant a plain tensor, and no sample inputs."""
    def bad(message: str) -> ArtifactError:
        return ArtifactError(f"{PROGRAM_FILE} {message}", where=str(path), hint=REBUILD)

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise bad(f"is not a PT2 archive: {exc}") from None
    with archive:
        for info in archive.infolist():
            name = info.filename
            if "/aotinductor/" in name or name.endswith((".so", ".dll", ".dylib")):
                raise bad(f"carries compiled code ({name}), which qfx never writes")
            if "/sample_inputs/" in name and info.file_size:
                raise bad(f"carries sample inputs ({name}), which torch would unpickle; qfx writes none")
            if name.endswith(("_weights_config.json", "_constants_config.json")):
                if info.file_size > MAX_CONFIG_BYTES:
                    raise bad(f"has a {info.file_size}-byte {name}")
                try:
                    entries = json.loads(archive.read(name))["config"].items()
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise bad(f"has an unreadable {name}: {str(exc)[:100]}") from None
                for fqn, payload in entries:
                    if not isinstance(payload, dict) or payload.get("use_pickle", True) or \
                            (name.endswith("_constants_config.json")
                             and not str(payload.get("path_name", "")).startswith("tensor_")):
                        raise bad(f"stores {fqn} as a pickled or custom object; qfx stores plain tensors only")


def load_program(folder: str | Path, verify_hashes: bool = True, device: str | torch.device | None = None
                 ) -> torch.nn.Module:
    """The artifact's lowered program as a module: call it as the captured model (input ids and,
    for encoders, the attention mask), with any batch and sequence length the model allows.
    `device` moves every tensor the program holds there (e.g. "cuda": its fused ops then run
    their Triton kernels)."""
    import qfx.runtime.qlinear  # noqa: F401  (registers the fused ops the program calls)

    folder = Path(folder)
    manifest = read_manifest(folder)
    path = folder / PROGRAM_FILE
    if PROGRAM_FILE not in manifest["artifact"]:
        raise ArtifactError(f"{folder} has no lowered program", where=str(folder),
                            hint="build with output.formats: [safetensors, program]")
    if verify_hashes:
        check_hashes(folder, manifest)
    check_program_archive(path)
    try:
        program = torch.export.load(path)
    except Exception as exc:  # torch raises many kinds on a damaged archive; all mean the same
        raise ArtifactError(f"torch cannot load {PROGRAM_FILE}: {type(exc).__name__}: {str(exc)[:200]}",
                            where=str(path), hint=REBUILD) from None
    if device is not None:
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program.module()
