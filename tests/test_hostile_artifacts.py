"""Hostile artifacts: every reader (load, verify, eval, inspect) answers each bad input with a
specific ArtifactError (exit 2 on the command line), allocates nothing the file does not hold,
and runs no code the artifact names unless told to.

A real attacker re-seals what they edit: most cases below rewrite the manifest's file hashes and
its self-hash after the edit (`reseal`), so that the deeper check, not the hash, is what fires.
"""
import json
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_spec
from onnx import numpy_helper
from safetensors.torch import load_file, save_file

import qfx
import qfx.runtime
from qfx.cli import main as cli_main
from qfx.evaluation import evaluate_artifact
from qfx.runtime.errors import ArtifactError
from qfx.runtime.hashing import canonical_json, manifest_sha256, sha256_file
from qfx.runtime.loader import check_factory_trusted
from qfx.runtime.quant_linear import QuantLinear
from qfx.runtime.verify import META_INPUTS, verify_artifact

LAYER = "model.layers.0.self_attn.q_proj"  # int8 per-channel weight, static int8 input
INT4 = "model.layers.0.mlp.up_proj"  # int4 groups of 32, packed eight to an int32
WEIGHT_ONLY = "model.layers.1.mlp.down_proj"  # int8 weight, float activations
TEXT = "once upon a time there was a little cat who liked to sit in the sun " * 8


# --- the base artifact, and edits as an attacker makes them -----------------------------------

def char_tokenizer(path: Path, ids: dict[str, int] | None = None) -> None:
    """A character-level tokenizer.json: eval needs one, and tiny_llama has none."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = ids or {"<unk>": 0, " ": 27, **{chr(97 + i): i + 1 for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(path))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One tiny artifact holding each layer kind the readers check (int8 with static
    activations, packed int4, weight-only int8) in safetensors and ONNX, plus a tokenizer:
    built once, copied per case."""
    out = tmp_path_factory.mktemp("hostile") / "base"
    int4 = {"dtype": "int4", "granularity": "per_group", "group_size": 32}
    spec = tiny_spec(preset="w8a8-int8", exclude=["lm_head"], rules=[
        {"match": "*down_proj", "input": None}, {"match": "*up_proj", "weight": int4, "input": None}])
    spec["output"] = {"dir": str(out), "formats": ["safetensors", "onnx"]}
    qfx.compile(spec=spec)
    char_tokenizer(out / "tokenizer.json")
    reseal(out, add=["tokenizer.json"])
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def reseal(folder: Path, manifest: dict | None = None, add: tuple = ()) -> None:
    """Make every hash agree again, as someone editing an artifact on purpose would: each
    listed file's sha256, then the manifest's own."""
    manifest = manifest if manifest is not None else manifest_of(folder)
    for name in [*manifest["artifact"], *add]:
        if (folder / name).is_file():
            manifest["artifact"][name] = sha256_file(folder / name)
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    (folder / "manifest.json").write_text(canonical_json(manifest))


def edit_manifest(folder: Path, change: Callable[[dict], None]) -> None:
    manifest = manifest_of(folder)
    change(manifest)
    reseal(folder, manifest)


def edit_json(folder: Path, name: str, change: Callable[[dict], None]) -> None:
    data = json.loads((folder / name).read_text())
    change(data)
    (folder / name).write_text(json.dumps(data))
    reseal(folder)


def st_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def st_write(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b" " * (-len(text) % 8) + data)


def edit_header(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / "model.safetensors"
    header, data = st_parts(path)
    change(header)
    st_write(path, header, data)
    reseal(folder)


def edit_tensors(folder: Path, changes: dict[str, torch.Tensor | None]) -> None:
    """Rewrite model.safetensors (with safetensors' own writer) with tensors replaced, added or
    (None) removed."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    for name, value in changes.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    reseal(folder)


def stored(folder: Path, name: str) -> torch.Tensor:
    return load_file(str(folder / "model.safetensors"))[name]


def edit_onnx(folder: Path, change: Callable[[onnx.ModelProto], None]) -> None:
    model = onnx.load(str(folder / "model.onnx"))
    change(model)
    onnx.save(model, str(folder / "model.onnx"))
    reseal(folder)


def set_onnx_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    next(p for p in model.metadata_props if p.key == key).value = value


def drop_layer_from_onnx(model: onnx.ModelProto, layer: str = WEIGHT_ONLY) -> None:
    """What an emitter bug could do: the layer's DequantizeLinear folded into a float weight
    (the same values, so ONNX Runtime's outputs do not change) and its quantized initializers gone."""
    inits = {t.name: t for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"hf.{layer}.weight")
    codes, scale, zero = (numpy_helper.to_array(inits[name]).astype(np.float32) for name in dq.input)
    model.graph.node.remove(dq)
    for name in dq.input:
        model.graph.initializer.remove(inits[name])
    model.graph.initializer.append(numpy_helper.from_array((codes - zero) * scale, name=dq.output[0]))


def point_initializer_outside(model: onnx.ModelProto) -> None:
    from onnx.external_data_helper import set_external_data

    tensor = next(t for t in model.graph.initializer if t.name == f"hf.{LAYER}.weight")
    set_external_data(tensor, location="../../outside.bin", offset=0, length=4096)
    tensor.ClearField("raw_data")


def flip_weight_byte(folder: Path) -> None:
    header, _ = st_parts(folder / "model.safetensors")
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0] + header[f"{LAYER}.weight"]["data_offsets"][0]
    raw[start + 3] ^= 0x01
    path.write_bytes(bytes(raw))  # not resealed: the manifest's hash now lies


def replace_header_text(folder: Path, text: bytes) -> None:
    """The header bytes replaced in place (same length), the length field left as it was."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(raw[:8] + text.ljust(length) + raw[8 + length:])
    reseal(folder)


def write_file(name: str, data: bytes) -> Callable[[Path], None]:
    """An edit that replaces one listed file's bytes and re-seals."""
    def edit(folder: Path) -> None:
        (folder / name).write_bytes(data)
        reseal(folder)
    return edit


def set_header_length(folder: Path, length: int) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", length) + path.read_bytes()[8:])
    reseal(folder)


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    reseal(folder)


# --- the cases ---------------------------------------------------------------------------------

@dataclass
class Case:
    edit: Callable[[Path], None]
    match: str  # regex the error message must contain
    entries: tuple[str, ...]
    matches: dict[str, str] = field(default_factory=dict)  # per-entry overrides

    def expected(self, entry: str) -> str:
        return self.matches.get(entry, self.match)


ALL = ("load", "verify", "eval", "inspect")
READERS = ("load", "verify", "eval")

CASES: dict[str, Case] = {
    # model.safetensors
    "safetensors-truncated": Case(truncate, r"model\.safetensors ends at byte \d+ of the data, which has only \d+ "
                                  r"bytes \(truncated file\)", READERS),
    "safetensors-header-length-2**60": Case(
        lambda f: set_header_length(f, 2**60),
        r"header claims 1152921504606846976 bytes, but the file has \d+", READERS),
    "safetensors-header-not-json": Case(lambda f: replace_header_text(f, b"{this is not json"),
                                        r"model\.safetensors's header is not valid JSON", ("load", "verify")),
    "safetensors-header-not-object": Case(lambda f: replace_header_text(f, b"[1, 2, 3]"),
                                          r"model\.safetensors's header is not a JSON object", ("load",)),
    "safetensors-offsets-past-end": Case(
        lambda f: edit_header(f, lambda h: h[f"{LAYER}.weight"]["data_offsets"].__setitem__(1, 2**40)),
        rf"tensor {LAYER}\.weight of model\.safetensors ends at byte 1099511627776", ("load", "verify")),
    "safetensors-shape-larger-than-bytes": Case(
        lambda f: edit_header(f, lambda h: h[f"{LAYER}.weight"].__setitem__("shape", [64, 2**40])),
        rf"tensor {LAYER}\.weight of model\.safetensors claims shape \[64, 1099511627776\]", ("load",)),
    "safetensors-unknown-dtype": Case(
        lambda f: edit_header(f, lambda h: h[f"{LAYER}.weight"].__setitem__("dtype", "Q7")),
        r"has dtype 'Q7', which qfx does not write", ("load",)),
    # layer tensors against the layer's format and features
    "int8-codes-stored-as-float32": Case(
        lambda f: edit_tensors(f, {f"{LAYER}.weight": stored(f, f"{LAYER}.weight").float()}),
        rf"tensor {LAYER}\.weight is float32 \[64, 64\], but its format and the layer's 64 -> 64 features need "
        r"int8 \[64, 64\]", READERS),
    "weight-scale-wrong-length": Case(
        lambda f: edit_tensors(f, {f"{LAYER}.weight_scale": torch.ones(63)}),
        rf"tensor {LAYER}\.weight_scale is float32 \[63\].* need float32 \[64\]", ("load", "verify")),
    "int4-packed-wrong-shape": Case(
        lambda f: edit_tensors(f, {f"{INT4}.weight": torch.zeros(64, 15, dtype=torch.int32)}),
        rf"tensor {INT4}\.weight is int32 \[64, 15\].* need int32 \[64, 16\]", ("load", "verify")),
    "scale-is-nan": Case(
        lambda f: edit_tensors(f, {f"{LAYER}.input_scale": torch.tensor(float("nan"))}),
        rf"tensor {LAYER}\.input_scale holds a scale that is not finite and positive", ("load",)),
    "layer-tensor-missing": Case(
        lambda f: edit_tensors(f, {f"{LAYER}.weight_zero_point": None}),
        rf"layer {LAYER} has no weight_zero_point for its format", ("load",)),
    "layer-tensor-extra": Case(
        lambda f: edit_tensors(f, {f"{WEIGHT_ONLY}.input_scale": torch.tensor(0.1)}),
        rf"layer {WEIGHT_ONLY} has unexpected input_scale for its format", ("load",)),
    "embedding-wrong-dtype": Case(
        lambda f: edit_tensors(f, {"model.embed_tokens.weight": stored(f, "model.embed_tokens.weight").half()}),
        r"tensor model\.embed_tokens\.weight is float16 \[256, 64\] in model\.safetensors, but the model's is "
        r"float32 \[256, 64\]", ("load", "eval")),
    "tensor-of-no-module": Case(
        lambda f: edit_tensors(f, {"model.evil.weight": torch.zeros(4)}),
        r"does not fit the model: missing \[\], unexpected \['model\.evil\.weight'\]", ("load",)),
    # manifest.json
    "manifest-hash-lies": Case(flip_weight_byte, r"model\.safetensors changed after the build", READERS,
                               {"verify": rf"tensor {LAYER}\.weight differs from model\.onnx initializer"}),
    "manifest-edited-not-resealed": Case(
        lambda f: (f / "manifest.json").write_text(canonical_json({**manifest_of(f), "target": "gfx942"})),
        r"manifest\.json was edited after the build", ALL),
    "manifest-without-self-hash": Case(
        lambda f: (f / "manifest.json").write_text(
            canonical_json({k: v for k, v in manifest_of(f).items() if k != "manifest_sha256"})),
        r"manifest\.json has no manifest_sha256", ALL),
    "manifest-not-json": Case(lambda f: (f / "manifest.json").write_text("{'layers': oops"),
                              r"manifest\.json is not valid JSON", ALL),
    "manifest-not-an-object": Case(lambda f: (f / "manifest.json").write_text("[1, 2]"),
                                   r"manifest\.json holds a JSON list, not an object", ALL),
    "manifest-without-layers": Case(lambda f: edit_manifest(f, lambda m: m.pop("layers")),
                                    r"manifest\.json has no 'layers'", ALL),
    "manifest-without-model": Case(lambda f: edit_manifest(f, lambda m: m.pop("model")),
                                   r"manifest\.json has no 'model'", ALL),
    "layer-format-does-not-parse": Case(
        lambda f: edit_manifest(f, lambda m: m["layers"][LAYER]["format"]["weight"].__setitem__("dtype", "int9")),
        rf"the format of layer {LAYER} does not parse: ValueError: 'int9'", ("load", "inspect")),
    "layer-format-impossible": Case(
        lambda f: edit_manifest(f, lambda m: m["layers"][LAYER]["format"]["input"].__setitem__(
            "granularity", "per_channel")),
        rf"gives layer {LAYER} a format qfx cannot run: input is int8 per_channel", ("load", "verify")),
    "input-transform-unknown": Case(
        lambda f: edit_manifest(f, lambda m: m["layers"][LAYER].__setitem__("input_transforms", ["rotate"])),
        rf"layer {LAYER} of manifest\.json has input_transforms \['rotate'\], which this qfx does not know",
        ("load",)),
    "scale-transform-without-its-factors": Case(
        lambda f: edit_manifest(f, lambda m: m["layers"][LAYER].__setitem__("input_transforms", ["scale"])),
        rf"layer {LAYER} has no pre_quant_scale for its format", ("load",)),
    "manifest-lists-a-file-outside": Case(
        lambda f: edit_manifest(f, lambda m: m["artifact"].__setitem__("../../etc/passwd", "0" * 64)),
        r"lists '\.\./\.\./etc/passwd', which is not a file name inside the artifact", ("load", "inspect")),
    "listed-file-missing": Case(lambda f: (f / "config.json").unlink(), r"(is missing|has no) config\.json", READERS),
    "layer-not-in-model": Case(
        lambda f: edit_manifest(f, lambda m: m["layers"].__setitem__("model.layers.7.mlp.up_proj", m["layers"][INT4])),
        r"layer model\.layers\.7\.mlp\.up_proj of the manifest is not in the model", ("load",)),
    "layer-not-a-linear": Case(
        lambda f: edit_manifest(f, lambda m: m["layers"].__setitem__("model.norm", m["layers"][INT4])),
        r"layer model\.norm of the manifest is a LlamaRMSNorm in the model, not a linear layer", ("load",)),
    "tied-weight-that-is-not": Case(
        lambda f: (edit_tensors(f, {"model.norm.weight": None}),
                   edit_manifest(f, lambda m: m["tied"].__setitem__("model.norm.weight", "model.embed_tokens.weight"))),
        r"says model\.norm\.weight is stored as model\.embed_tokens\.weight, but the model does not tie", ("load",)),
    "report-fields-missing": Case(lambda f: edit_manifest(f, lambda m: m.pop("pipeline")),
                                  r"manifest\.json lacks what the report shows \(KeyError: 'pipeline'\)", ("inspect",)),
    # config.json
    "config-not-json": Case(write_file("config.json", b"model_type: llama"),
                            r"config\.json is not valid JSON", READERS),
    "config-unknown-model-type": Case(lambda f: edit_json(f, "config.json", lambda c: c.update(model_type="evil_arch")),
                                      r"config\.json names model_type 'evil_arch', which transformers", READERS),
    "config-unknown-architecture": Case(
        lambda f: edit_json(f, "config.json", lambda c: c.update(architectures=["EvilForCausalLM"])),
        r"config\.json names architectures \['EvilForCausalLM'\]", ("load",)),
    "config-asks-for-a-huge-model": Case(
        lambda f: edit_json(f, "config.json", lambda c: c.update(intermediate_size=10**6)),
        r"config\.json describes a model of \d+ bytes in float, far more than", ("load", "eval")),
    "config-asks-for-a-million-layers": Case(
        lambda f: edit_json(f, "config.json", lambda c: c.update(num_hidden_layers=10**6)),
        r"config\.json asks for 1000000 layers", ("load",)),
    "config-of-another-shape": Case(
        lambda f: edit_json(f, "config.json", lambda c: c.update(hidden_size=128)),
        r"tensor model\.embed_tokens\.weight is float32 \[256, 64\] in model\.safetensors, but the model's is "
        r"float32 \[256, 128\]", ("load",)),
    "config-refused-by-transformers": Case(
        lambda f: edit_json(f, "config.json", lambda c: c.update(num_attention_heads=0)),
        r"transformers refuses config\.json as a llama config: ZeroDivisionError", ("load",)),
    "config-that-cannot-build": Case(
        lambda f: edit_json(f, "config.json", lambda c: c.update(hidden_act="evil_activation")),
        r"transformers cannot build a causal_lm model from config\.json: KeyError", ("load",)),
    # code the artifact names
    "factory-untrusted-module": Case(
        lambda f: edit_manifest(f, lambda m: m["model"].update(kind="module", factory="evil_factory:make")),
        r"names the model factory 'evil_factory:make'.*\n.*trust_factory=True", ("load", "verify")),
    "factory-untrusted-float-reference": Case(
        lambda f: edit_manifest(f, lambda m: m["model"].update(factory="evil_factory:make")),
        r"names the model factory 'evil_factory:make'.*\n.*--trust-factory", ("eval",)),
    # model.onnx (verify)
    "onnx-not-protobuf": Case(write_file("model.onnx", b"\x00\x01 not onnx " * 64),
                              r"model\.onnx is not an ONNX model", ("verify",)),
    "onnx-not-in-manifest": Case(lambda f: edit_manifest(f, lambda m: m["artifact"].pop("model.onnx")),
                                 r"manifest\.json does not list model\.onnx, so no hash covers it", ("verify",)),
    "onnx-inputs-of-2**40-elements": Case(
        lambda f: edit_onnx(f, lambda m: set_onnx_meta(m, META_INPUTS, json.dumps(
            [{"shape": [2**20, 2**20], "dtype": "int64", "high": 256}]))),
        r"asks for an input of 1099511627776 elements, over verify's limit", ("verify",)),
    "onnx-input-dtype-not-a-dtype": Case(
        lambda f: edit_onnx(f, lambda m: set_onnx_meta(m, META_INPUTS, json.dumps(
            [{"shape": [2, 16], "dtype": "load", "high": 256}]))),
        r"gives an input .* without a dtype verify can draw", ("verify",)),
    "onnx-token-ids-past-vocab": Case(
        lambda f: edit_onnx(f, lambda m: set_onnx_meta(m, META_INPUTS, json.dumps(
            [{"shape": [2, 16], "dtype": "int64", "high": 10**6}]))),
        r"draws token ids below 1000000, but the model has 256", ("verify",)),
    "onnx-layer-dropped": Case(
        lambda f: edit_onnx(f, drop_layer_from_onnx),
        rf"model\.onnx has none of layer {WEIGHT_ONLY}'s tensors .* yet the model's output uses that layer",
        ("verify",)),
    "onnx-external-data-outside": Case(
        lambda f: edit_onnx(f, point_initializer_outside),
        rf"model\.onnx keeps tensor hf\.{LAYER}\.weight in '\.\./\.\./outside\.bin', which is not a file of the "
        r"artifact", ("verify",)),
    # tokenizer (eval)
    "tokenizer-corrupted": Case(write_file("tokenizer.json", b'{"model": [oops'),
                                r"the artifact's tokenizer files cannot be loaded", ("eval",)),
    "tokenizer-added-after-the-build": Case(lambda f: (f / "vocab.json").write_text("{}"),
                                            r"vocab\.json is not among the files manifest\.json hashes", ("eval",)),
    "tokenizer-ids-past-vocab": Case(
        lambda f: char_tokenizer(f / "tokenizer.json", {"<unk>": 0, "a": 999}) or reseal(f),
        r"tokenizer gives token id 999, but its model has 256 embeddings", ("eval",)),
}


def run_entry(entry: str, folder: Path, text: Path, capsys) -> None:
    """One reader on `folder`; inspect runs through the CLI's main and must exit 2."""
    if entry == "load":
        qfx.runtime.load(folder)
    elif entry == "verify":
        verify_artifact(folder)
    elif entry == "eval":
        evaluate_artifact(folder, text, window=32, max_tokens=96)
    else:
        capsys.readouterr()
        code = cli_main(["inspect", str(folder)])
        err = capsys.readouterr().err
        assert code == 2, f"inspect exited {code}: {err}"
        raise ArtifactError(err)


def hostile_copy(base: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name.replace("*", "")
    shutil.copytree(base, folder)
    CASES[name].edit(folder)
    return folder


@pytest.mark.parametrize("name, entry", [(n, e) for n, c in CASES.items() for e in c.entries])
def test_a_hostile_artifact_gets_a_specific_artifact_error(name, entry, base, text, tmp_path, capsys):
    folder = hostile_copy(base, tmp_path, name)
    with pytest.raises(ArtifactError) as info:
        run_entry(entry, folder, text, capsys)
    message = str(info.value)
    assert re.search(CASES[name].expected(entry), message), message
    assert "hint:" in message, "every error says how to fix it"


def test_the_cases_are_many_and_distinct():
    """The README counts these: each is a different bad input, and each reader meets several."""
    assert len(CASES) >= 40
    for entry in ALL:
        assert sum(entry in c.entries for c in CASES.values()) >= 8, entry


@pytest.mark.parametrize("name, command", [
    ("manifest-not-json", "inspect"),
    ("manifest-edited-not-resealed", "inspect"),
    ("safetensors-header-length-2**60", "verify"),
    ("onnx-layer-dropped", "verify"),
    ("onnx-not-protobuf", "verify"),
    ("factory-untrusted-float-reference", "eval"),
    ("config-unknown-model-type", "eval"),
    ("safetensors-truncated", "eval"),
])
def test_the_cli_exits_2_with_the_error_and_no_traceback(name, command, base, text, tmp_path):
    folder = hostile_copy(base, tmp_path, name)
    args = [str(folder)] + (["--text", str(text), "--window", "32"] if command == "eval" else [])
    result = subprocess.run([sys.executable, "-m", "qfx.cli", command, *args], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    assert re.search(CASES[name].expected(command), result.stderr), result.stderr


def test_the_unedited_base_passes_every_reader(base, text, tmp_path, capsys):
    """The control: the cases fail because of their edit, not because the base is broken."""
    folder = tmp_path / "clean"
    shutil.copytree(base, folder)
    model = qfx.runtime.load(folder)
    assert isinstance(model.get_submodule(INT4), QuantLinear)
    assert verify_artifact(folder)["tensors_identical"] >= 50
    figures = evaluate_artifact(folder, text, window=32, max_tokens=96)
    assert figures["tokens"] == 95 and figures["float_perplexity"] is not None  # qfx.examples is trusted
    assert cli_main(["inspect", str(folder)]) == 0
    assert f"| `{INT4}` |" in capsys.readouterr().out


def test_inspect_shows_an_edited_manifest_but_fails(base, tmp_path, capsys):
    """inspect is how one looks at a suspect artifact: it prints what the manifest says, then
    exits 2 so that no script takes it for the build's record."""
    folder = hostile_copy(base, tmp_path, "manifest-edited-not-resealed")
    assert cli_main(["inspect", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert "- target: `gfx942`" in out and "edited after the build" in err


def test_the_manifest_seals_itself_canonically(base):
    text = (base / "manifest.json").read_text()
    manifest = json.loads(text)
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["manifest_sha256"])
    assert manifest_sha256(manifest) == manifest["manifest_sha256"]
    assert canonical_json(manifest) == text  # what a reader re-serializes is the file, byte for byte


# --- code the artifact names --------------------------------------------------------------------

EVIL = '''
import pathlib
pathlib.Path(__file__).with_name("ran.txt").write_text("imported")

def make():
    from qfx.examples import tiny_llama
    pathlib.Path(__file__).with_name("ran.txt").write_text("called")
    return tiny_llama()
'''


def test_a_factory_runs_only_when_trusted(base, tmp_path, monkeypatch):
    """Without trust_factory, the factory is neither imported nor called; with it, it rebuilds
    the model (here the artifact's own architecture, so the load succeeds)."""
    module_dir = tmp_path / "code"
    module_dir.mkdir()
    (module_dir / "evil_factory.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(module_dir))
    folder = hostile_copy(base, tmp_path, "factory-untrusted-module")
    with pytest.raises(ArtifactError, match="evil_factory:make"):
        qfx.runtime.load(folder)
    assert not (module_dir / "ran.txt").exists()
    model = qfx.runtime.load(folder, trust_factory=True)
    assert (module_dir / "ran.txt").read_text() == "called"
    assert isinstance(model.get_submodule(LAYER), QuantLinear)


@pytest.mark.parametrize("reference", [
    "qfx_evil:tiny_llama", "qfx.examples_evil:tiny_llama", "qfx.examplesx:tiny_llama", "qfx.examples.sub:tiny_llama",
    "qfx:compile", "qfx.examples:_private", "qfx.examples:torch", "qfx.examples:TinyMLP", "qfx.examples",
    "os:system",
])
def test_only_qfx_examples_functions_are_trusted_without_opt_in(reference, tmp_path):
    with pytest.raises(ArtifactError, match="trust_factory=True"):
        check_factory_trusted(tmp_path, reference, trust_factory=False)
    check_factory_trusted(tmp_path, reference, trust_factory=True)  # the caller's word is enough


@pytest.mark.parametrize("reference", ["qfx.examples:tiny_llama", "qfx.examples:tiny_mlp"])
def test_qfx_examples_factories_need_no_opt_in(reference, tmp_path):
    check_factory_trusted(tmp_path, reference, trust_factory=False)


def test_verify_and_eval_take_trust_factory_on_the_command_line(base, text, tmp_path, capsys):
    folder = tmp_path / "clean"
    shutil.copytree(base, folder)
    assert cli_main(["verify", str(folder), "--trust-factory", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors_identical"] >= 50
    hostile = hostile_copy(base, tmp_path, "factory-untrusted-float-reference")
    assert cli_main(["eval", str(hostile), "--text", str(text), "--window", "32"]) == 2
    assert "--trust-factory" in capsys.readouterr().err


# --- verify and layers the ONNX model does not compute ------------------------------------------

def test_a_layer_off_the_outputs_path_is_recorded_and_verify_accepts_its_absence(tmp_path):
    """A BERT pooler feeds pooler_output, not last_hidden_state: the build records it as unused,
    export drops it, and verify passes; any other missing layer fails (onnx-layer-dropped)."""
    spec = dict(tiny_spec(tmp_path, preset="w8a8-int8-dynamic"), model={"factory": "qfx.examples:tiny_bert"})
    spec["output"]["formats"] = ["safetensors", "onnx"]
    result = qfx.compile(spec=spec)
    assert result.manifest["unused_layers"] == ["pooler.dense"]
    inits = {t.name for t in onnx.load(str(result.artifact_dir / "model.onnx")).graph.initializer}
    assert not any(name.startswith("hf.pooler.") for name in inits)
    assert verify_artifact(result.artifact_dir)["output_rel_error"] < 1e-4
