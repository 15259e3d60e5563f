"""The files of a qfx artifact, read as hostile input: an artifact may come from someone else.

Sizes are checked before anything is allocated for them, each field a reader uses is
validated, and every failure is an ArtifactError naming the file (and tensor) with how to fix
it. manifest.json vouches for every other file by sha256, and its own `manifest_sha256` for it.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qfx.runtime.errors import ArtifactError
from qfx.runtime.formats import LayerFormat, format_problem
from qfx.runtime.hashing import MANIFEST_HASH_KEY, manifest_sha256, sha256_file
from qfx.runtime.layouts import DEFAULT_LAYOUT, layouts

MODEL_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
PROGRAM_FILE = "model.pt2"  # the lowered torch.export program (output.formats: program)
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
HF_KINDS = ("causal_lm", "encoder")
KINDS = HF_KINDS + ("module",)
REBUILD = "rebuild the artifact with `qfx build`; qfx will not run files it cannot vouch for"

# A manifest or config.json of a real model is kilobytes to a few megabytes; this bounds what
# reading a hostile one can allocate.
MAX_JSON_BYTES = 64 << 20
# safetensors' own limit on its JSON header.
MAX_HEADER_BYTES = 100_000_000
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_json_file(path: Path, what: str):
    """A JSON file of the artifact, bounded in size; ArtifactError naming it if absent or unparsable."""
    if not path.is_file():
        raise ArtifactError(f"{path.parent} has no {path.name}", hint=REBUILD)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ArtifactError(f"{what} is {size} bytes, over qfx's limit of {MAX_JSON_BYTES} for it", where=str(path),
                            hint="this is not a file qfx wrote; " + REBUILD)
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ArtifactError(f"{what} is not valid JSON: {str(exc)[:200]}", where=str(path), hint=REBUILD) from None


def read_manifest(folder: Path, sealed: bool = True) -> dict:
    """manifest.json, checked: a JSON object written by qfx, with every field the readers use
    well-formed, and (when `sealed`) its self-hash matching its contents."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a qfx artifact (no {MANIFEST_FILE})",
                            hint="point at the output.dir of a `qfx build`")
    manifest = read_json_file(path, MANIFEST_FILE)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{MANIFEST_FILE} holds a JSON {type(manifest).__name__}, not an object",
                            where=str(path), hint=REBUILD)
    if manifest.get("generator") != "qfx":
        raise ArtifactError(f"{path} was not written by qfx", hint="point at the output.dir of a `qfx build`")
    if sealed:
        check_manifest_seal(folder, manifest)
    _check_manifest_fields(manifest, path)
    return manifest


def check_manifest_seal(folder: Path, manifest: dict) -> None:
    """The manifest's `manifest_sha256` must be the sha256 of the rest of it (see
    `qfx.runtime.hashing.manifest_sha256`): the manifest vouches for every other file, this for it."""
    path = Path(folder) / MANIFEST_FILE
    recorded = manifest.get(MANIFEST_HASH_KEY)
    if recorded is None:
        raise ArtifactError(f"{MANIFEST_FILE} has no {MANIFEST_HASH_KEY}, so nothing vouches for it: a qfx from "
                            "before manifests were sealed wrote it, or it was edited", where=str(path), hint=REBUILD)
    try:
        actual = manifest_sha256(manifest)
    except (ValueError, TypeError) as exc:  # NaN or Infinity, which qfx never writes
        raise ArtifactError(f"{MANIFEST_FILE} holds a value qfx never writes: {exc}", where=str(path),
                            hint=REBUILD) from None
    if recorded != actual:
        raise ArtifactError(f"{MANIFEST_FILE} was edited after the build: its {MANIFEST_HASH_KEY} does not match "
                            "its contents", where=str(path), hint=REBUILD)


def _require(ok: bool, path: Path, message: str) -> None:
    if not ok:
        raise ArtifactError(f"{MANIFEST_FILE} {message}", where=str(path), hint=REBUILD)


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_plain_name(name) -> bool:
    """A file name inside the artifact directory: no folder, no `..`, nothing absolute."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _check_manifest_fields(manifest: dict, path: Path) -> None:
    """Every field the loader, verify, eval and inspect read, with the type they expect."""
    for key in ("model", "layers", "artifact"):
        _require(key in manifest, path, f"has no {key!r}")
    source = manifest["model"]
    _require(isinstance(source, dict), path, "'model' is not an object")
    _require(source.get("kind") in KINDS, path, f"model.kind is {source.get('kind')!r}, not one of {', '.join(KINDS)}")
    for key in ("factory", "path", "name"):
        _require(isinstance(source.get(key, ""), str), path, f"model.{key} is not a string")
    layers = manifest["layers"]
    _require(isinstance(layers, dict), path, "'layers' is not an object")
    layout_name = manifest.get("layout", DEFAULT_LAYOUT)
    _require(layout_name in layouts(), path, f"names the layout {layout_name!r}, not one of {', '.join(layouts())}")
    layout = layouts()[layout_name]
    for name, record in layers.items():
        _require(bool(name) and isinstance(record, dict) and isinstance(record.get("format"), dict), path,
                 f"layer {name!r} has no format object")
        _require(_is_str_list(record.get("rules", [])), path, f"layer {name}'s rules are not a list of strings")
        try:
            fmt = LayerFormat.from_json(record["format"])
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"the format of layer {name} does not parse: {type(exc).__name__}: {exc}",
                                where=str(path), hint=REBUILD) from None
        problem = format_problem(fmt) or layout.refusal(fmt)
        _require(problem is None, path, f"gives layer {name} a format qfx cannot run: {problem}")
    files = manifest["artifact"]
    _require(isinstance(files, dict), path, "'artifact' is not an object")
    for name, digest in files.items():
        _require(_is_plain_name(name), path, f"lists {name!r}, which is not a file name inside the artifact")
        _require(isinstance(digest, str) and _SHA256.fullmatch(digest) is not None, path,
                 f"gives {name} the hash {digest!r}, not a sha256")
    needed = [MODEL_FILE] + ([CONFIG_FILE] if source["kind"] in HF_KINDS else [])
    for name in needed:
        _require(name in files, path, f"does not list {name} among the artifact's files, so no hash covers it")
    _require(_is_str_list(manifest.get("excluded", [])), path, "'excluded' is not a list of layer names")
    tied = manifest.get("tied", {})
    _require(isinstance(tied, dict) and all(isinstance(v, str) for v in tied.values()), path,
             "'tied' is not an object of tensor names")
    unused = manifest.get("unused_layers", [])
    _require(_is_str_list(unused) and set(unused) <= set(layers), path,
             "'unused_layers' is not a list of the manifest's layers")


def check_hashes(folder: Path, manifest: dict) -> None:
    for name, expected in manifest.get("artifact", {}).items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{folder} is missing {name}, which the manifest lists",
                                hint="copy the whole artifact directory, or " + REBUILD)
        if sha256_file(path) != expected:
            raise ArtifactError(f"{path} changed after the build (sha256 differs from manifest.json)",
                                hint="rebuild the artifact; qfx will not run files it cannot vouch for")


def read_safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in a .safetensors file, after checking that the
    header fits the file (its length is read before anything is allocated for it) and that each
    tensor's bytes lie inside the file and match its dtype and shape."""
    if not path.is_file():
        raise ArtifactError(f"{path.parent} is missing {path.name}, which the manifest lists",
                            hint="copy the whole artifact directory, or " + REBUILD)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path.name} is {size} bytes, too short for a safetensors file (truncated)",
                                where=str(path), hint=REBUILD)
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > MAX_HEADER_BYTES:
            raise ArtifactError(f"{path.name}'s header claims {length} bytes, but the file has {size - 8} after "
                                f"its length field (and safetensors allows at most {MAX_HEADER_BYTES}): the file "
                                "is truncated or not safetensors", where=str(path), hint=REBUILD)
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path.name}'s header is not valid JSON ({str(exc)[:200]}): the file is corrupted or "
                            "not safetensors", where=str(path), hint=REBUILD) from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path.name}'s header is not a JSON object", where=str(path), hint=REBUILD)
    data_bytes = size - 8 - length
    return {name: _tensor_entry(path, name, info, data_bytes) for name, info in header.items()
            if name != "__metadata__"}


def _tensor_entry(path: Path, name: str, info, data_bytes: int) -> tuple[torch.dtype, tuple[int, ...]]:
    def bad(message: str) -> ArtifactError:
        return ArtifactError(f"tensor {name} of {path.name} {message}", where=str(path), hint=REBUILD)

    if not isinstance(info, dict):
        raise bad("has no header entry object")
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise bad(f"has dtype {info.get('dtype')!r}, which qfx does not write")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise bad(f"has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end]")
    if offsets[1] > data_bytes:
        raise bad(f"ends at byte {offsets[1]} of the data, which has only {data_bytes} bytes (truncated file)")
    numel = 1
    for d in shape:
        numel *= d  # Python ints: a hostile shape cannot overflow
    if numel * dtype.itemsize != offsets[1] - offsets[0]:
        raise bad(f"claims shape {shape} of {info['dtype']} ({numel * dtype.itemsize} bytes) in "
                  f"{offsets[1] - offsets[0]} bytes")
    return dtype, tuple(shape)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file (checked with `read_safetensors_header` first)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"safetensors cannot read {path.name}: {str(exc)[:300]}", where=str(path),
                            hint=REBUILD) from None


def hf_config(path: Path):
    """config.json as a transformers config, without its quantization_config or any remote code
    it names; ArtifactError if transformers does not know its model_type or refuses its fields."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = read_json_file(path, CONFIG_FILE)
    if not isinstance(data, dict):
        raise ArtifactError(f"{CONFIG_FILE} holds a JSON {type(data).__name__}, not an object", where=str(path),
                            hint=REBUILD)
    data = {k: v for k, v in data.items() if k not in ("quantization_config", "auto_map")}
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ArtifactError(f"{CONFIG_FILE} names model_type {model_type!r}, which transformers "
                            f"{transformers.__version__} does not know", where=str(path),
                            hint="load with the transformers version that built it (manifest.json versions), "
                                 "or " + REBUILD)
    architectures = data.get("architectures") or []
    if not _is_str_list(architectures) or any(not hasattr(transformers, a) for a in architectures):
        raise ArtifactError(f"{CONFIG_FILE} names architectures {architectures!r}, which transformers "
                            f"{transformers.__version__} does not have", where=str(path), hint=REBUILD)
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # a config class validates its fields its own way; any refusal means a bad file
        raise ArtifactError(f"transformers refuses {CONFIG_FILE} as a {model_type} config: "
                            f"{type(exc).__name__}: {str(exc)[:300]}", where=str(path), hint=REBUILD) from None
