"""The spec loader against anything a file can hold: it returns a Spec or raises a SpecError that
names the file (never another exception, never a hang), and `qfx build` of a broken spec exits 2
with one message, no traceback and no output directory.

Hypothesis runs derandomized (the same examples every run) and without its example database,
so a failure here is reproducible and never depends on an earlier run."""
import copy
import json
import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, tiny_spec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qfx.errors import SpecError
from qfx.spec_loader import MAX_DEPTH, MAX_VALUES, load_spec

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

GOOD = "version: 1\nmodel: {factory: 'qfx.examples:tiny_llama'}\nquantization: {preset: w8a8-int8}\n"

# Field names and values of real specs, so random documents reach past the top-level checks.
FIELD_NAMES = ["version", "model", "path", "factory", "target", "calibration", "text", "tokens", "synthetic",
               "samples", "seq_len", "batch_size", "split", "seed", "quantization", "preset", "default", "rules",
               "exclude", "match", "weight", "input", "output", "dtype", "granularity", "group_size",
               "symmetric", "observer", "reduce_range", "dir", "force", "formats", "onnx", "opset", "verify",
               "algorithms", "algorithm", "gptq", "hqq", "smoothquant", "rotation", "iterations", "lp_norm"]
WORDS = ["int8", "uint8", "int4", "uint4", "fp8_e4m3", "per_tensor", "per_channel", "per_group", "per_token",
         "minmax", "percentile", "mse", "w8a8-int8", "w4a16-g32", "gfx942", "cpu", "safetensors", "onnx",
         "document", "lines", "*", "*k_proj", "lm_head", "qfx.examples:tiny_llama", "no-colon", "", "~/x", ".",
         "rtn", "gptq", "hqq"]

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=16)  # UTF-8-encodable
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**80, max_value=2**80)
           | st.floats() | TEXT | st.sampled_from(WORDS))
KEYS = st.sampled_from(FIELD_NAMES) | TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=20)
ODD_KEYS = st.integers() | st.floats(allow_nan=False) | st.booleans() | st.none()  # YAML allows them, specs don't

# Pieces of YAML, joined at random: reaches the parser's and constructors' corners (anchors,
# tags, flow collections, malformed scalars, control characters) that dumped documents never do.
FRAGMENTS = ["version: 1\n", "model:\n", "  factory: qfx.examples:tiny_llama\n", "  path: ", "quantization:\n",
             "  preset: w8a8-int8\n", "  rules:\n", "    - match: '*'\n", "      weight: {dtype: int8}\n",
             "calibration: ", "{synthetic: true}\n", "output: {dir: out}\n", "  ", "    ", "- ", ": ", "? ", ", ",
             "&a ", "*a ", "&b [*a, *a, *a, *a]\n", "<<: *a\n", "!!python/object:os.getcwd ", "!!int ", "!!float ",
             "!!bool ", "!!timestamp ", "!!binary ", "!!set ", "!!str ", "!!map ", "!!seq ", "!local ", "[", "]",
             "{", "}", "'", '"', "#", "|\n", ">-\n", "---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n",
             "~", "null", ".nan", "-.inf", "1e999", "0x", "0b2", "0o9", "1_000", "2001-13-45", "2001-12-14 25:00:00",
             "190:20:30", "=: 1\n", "9" * 4500,
             "\t", "\x00", "\x07", "\x85", "\u2028", "\ufeff", "\\", "\\x00", "\n", "é"]
FRAGMENT_SOUP = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=30).map("".join)


def _laughs(levels: int = 9) -> str:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n" + GOOD


# Inputs that once crashed or hung the loader, or silently lost a value: (id, file content,
# what the SpecError must say). Each is fed to load_spec directly and several to the CLI below.
HOSTILE = [
    ("yaml-syntax", "version: 1\nmodel: [unclosed\n", "not valid YAML"),
    ("not-utf8", b"version: 1\nmodel: {factory: '\xff\xfe'}\n", "not UTF-8 text"),
    ("not-a-mapping", "- version: 1\n", "a spec is a mapping"),
    ("empty-file", "", "a spec is a mapping"),
    ("two-documents", GOOD + "---\n" + GOOD, "not valid YAML"),
    ("unknown-field", GOOD + "wieght: {dtype: int8}\n", "unknown field 'wieght'"),
    ("wrong-type", GOOD + "calibration: {synthetic: true, samples: many}\n", "calibration.samples"),
    ("python-object-tag", "version: !!python/object/apply:os.getcwd []\n", "could not determine a constructor"),
    ("python-name-tag", GOOD + "target: !!python/name:os.system\n", "could not determine a constructor"),
    ("nul-character", GOOD.replace("version: 1", "version: 1\x00"), "control character U+0000"),
    ("huge-integer", GOOD + "calibration: {synthetic: true, samples: " + "9" * 5000 + "}\n",
     "an integer of 5000 digits is too large"),
    ("malformed-date", GOOD.replace("version: 1", "version: 2001-13-45"), "is not a valid YAML timestamp"),
    ("malformed-tagged-int", GOOD.replace("version: 1", "version: !!int abc"), "is not a valid YAML int"),
    ("malformed-tagged-bool", GOOD.replace("version: 1", "version: !!bool maybe"), "is not a valid YAML bool"),
    ("billion-laughs", _laughs(), f"expands to more than {MAX_VALUES} values"),
    ("self-referencing-anchor", GOOD + "exclude: &a [*a]\n", f"nested more than {MAX_DEPTH} levels deep"),
    ("deep-nesting", GOOD + "x: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("nesting-past-the-limit", GOOD + "x: " + "[" * 100 + "]" * 100 + "\n", f"nested more than {MAX_DEPTH}"),
    ("duplicate-key", GOOD + "quantization: {preset: w4a16-g32}\n", "duplicate key 'quantization' (first on line 3)"),
    ("nul-in-path", GOOD + 'output: {dir: "out\\0put"}\n', "output.dir: a path cannot contain a NUL"),
    ("surrogate-in-path", GOOD.replace("{factory: 'qfx.examples:tiny_llama'}", '{path: "a\\ud800"}'),
     "model.path: a path must be valid Unicode"),
    ("seed-out-of-range", GOOD + "calibration: {synthetic: true, seed: 99999999999999999999}\n",
     "calibration.seed: Input should be less than or equal to 9223372036854775807"),
    ("float-key", GOOD.replace("quantization: {", "quantization: {2.5: x, "), "Keys should be strings"),
    ("nan-for-an-int", GOOD + "calibration: {synthetic: true, samples: .nan}\n", "finite number (got nan)"),
]


def write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def load_or_error(path):
    """load_spec's LoadedSpec, or its SpecError; any other exception fails the calling test."""
    try:
        return load_spec(path)
    except SpecError as exc:
        assert str(path) in str(exc), f"the error must name the spec file: {exc}"
        return exc


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("content, says", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_hostile_spec_file_is_a_spec_error(tmp_path, content, says):
    path = write(tmp_path / "spec.yaml", content)
    outcome = load_or_error(path)
    assert isinstance(outcome, SpecError), "the broken spec loaded"
    assert says in str(outcome)
    assert len(str(outcome)) < 2000, "an error message, not a dump of the input"


def _cyclic_list() -> list:
    cycle: list = []
    cycle.append(cycle)
    return cycle


@pytest.mark.parametrize("spec, says", [
    ({"version": 10**5000}, "int too large to show"),  # its repr raises ValueError
    ({"version": 1, "quantization": {"preset": "w8a8-int8", "exclude": _cyclic_list()}}, "quantization.exclude[0]"),
    ({"version": 1, "model": {"path": "a\x00b"}, "quantization": {"preset": "w8a8-int8"}}, "model.path"),
    ({"version": 1, "quantization": {"preset": "w8a8-int8"}, "target": "x" * 10**6}, "..."),  # cut short
], ids=["huge-int", "cyclic-list", "nul-in-path", "megabyte-string"])
def test_hostile_python_dict_is_a_spec_error(spec, says):
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert "<spec>" in str(info.value) and says in str(info.value) and len(str(info.value)) < 2000


@FUZZ
@given(doc=st.dictionaries(KEYS, VALUES, max_size=6) | VALUES | st.dictionaries(ODD_KEYS, VALUES, max_size=3))
@example(doc={None: 1, 1.5: 2, True: 3})
@example(doc={"version": 1, "quantization": {"preset": "w8a8-int8"}, "calibration": {"seed": 2**70}})
def test_random_yaml_documents_load_or_raise_spec_errors(scratch, doc):
    load_or_error(write(scratch / "doc.yaml", yaml.safe_dump(doc)))


@FUZZ
@given(doc=st.dictionaries(KEYS, VALUES, max_size=6) | VALUES)
@example(doc={"version": float("nan")})
def test_random_json_documents_load_or_raise_spec_errors(scratch, doc):
    load_or_error(write(scratch / "doc.json", json.dumps(doc)))


@FUZZ
@given(text=FRAGMENT_SOUP)
@example(text="a: !!int ''")
@example(text="a: 2001-12-14t21:59:43.10-25:00")
def test_yaml_fragments_load_or_raise_spec_errors(scratch, text):
    load_or_error(write(scratch / "soup.yaml", text))


@FUZZ
@given(content=st.text() | st.binary())
@example(content="\ud800")
@example(content=b"\xef\xbb\xbfversion: 1\n")
def test_random_text_and_bytes_load_or_raise_spec_errors(scratch, content):
    data = content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass")
    load_or_error(write(scratch / "noise.yaml", data))


def _valid_specs() -> list[dict]:
    specs = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "specs").glob("*.yaml"))]
    specs += [tiny_spec(), dict(tiny_spec(), output={"dir": "out", "formats": ["safetensors", "onnx"]}),
              tiny_spec(default={"weight": {"dtype": "int4", "granularity": "per_group", "group_size": 32}},
                        rules=[{"match": ["*k_proj", "*v_proj"], "output": {"dtype": "int8"}},
                               {"match": "*o_proj", "weight": None}], exclude=["lm_head"]),
              {"version": 1, "model": {"factory": "qfx.examples:tiny_llama"},
               "calibration": {"tokens": "ids.npy", "samples": 4}, "quantization": {"preset": "w4a16-g32"}}]
    return specs


VALID = _valid_specs()


def test_the_specs_that_mutations_start_from_are_valid():
    assert len(VALID) >= 10 and all(load_spec(copy.deepcopy(doc)).spec.version == 1 for doc in VALID)


def _slots(node):
    """Every (container, key) in a document, at any depth: the places a mutation can hit."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield node, key
        yield from _slots(value)


def _dicts(node):
    if isinstance(node, dict):
        yield node
    for value in (node.values() if isinstance(node, dict) else node if isinstance(node, list) else []):
        yield from _dicts(value)


@st.composite
def mutated_specs(draw):
    """A valid spec with one to three random edits: a value replaced by one of another type or by
    any value, a field or item deleted, or an unknown (or misplaced) field added, at any depth."""
    doc = copy.deepcopy(draw(st.sampled_from(VALID)))
    pick = draw(st.randoms(use_true_random=True)).choice  # uniform over places (sampled_from favours the first)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["retype", "replace", "delete", "add"]))
        slots = list(_slots(doc))
        if op == "add" or not slots:
            target = pick(list(_dicts(doc)))
            key = draw(KEYS.filter(lambda k: k not in target))
            target[key] = draw(VALUES)
            continue
        container, key = pick(slots)
        if op == "delete":
            del container[key]
        elif op == "retype":
            old = type(container[key])
            container[key] = draw(VALUES.filter(lambda v: type(v) is not old))
        else:
            container[key] = draw(VALUES)
    return doc


# An error line of a spec file: "<file>:<line>:<column>: ..."
_LOCATED = r":\d+:\d+: "


@FUZZ
@given(doc=mutated_specs())
@example(doc={"version": 1, "quantization": {"preset": "w4a16-g32"}, "calibration": {"tokens": "a\x00b"}})
@example(doc={**tiny_spec(), "calibration": {"synthetic": True, "seed": -2**63 - 1}})
def test_mutated_specs_load_or_name_the_line_and_field(scratch, doc):
    path = write(scratch / "mutated.yaml", yaml.safe_dump(doc, sort_keys=False))
    outcome = load_or_error(path)
    if isinstance(outcome, SpecError):
        lines = [line.strip() for line in str(outcome).splitlines() if line.strip().startswith(str(path))]
        assert lines and all(re.match(re.escape(str(path)) + _LOCATED, line) for line in lines), str(outcome)
    as_dict = None
    try:
        as_dict = load_spec(copy.deepcopy(doc))
    except SpecError as exc:
        assert "<spec>" in str(exc)
    assert (as_dict is None) == isinstance(outcome, SpecError), "a dict and its YAML must load alike"


# Broken specs given to the CLI: a subset of HOSTILE, plus a trained checkpoint without
# calibration data (a CalibrationError after the model loads, before the output is claimed).
CLI_CASES = ["yaml-syntax", "not-utf8", "unknown-field", "wrong-type", "python-object-tag", "billion-laughs",
             "deep-nesting", "huge-integer", "duplicate-key"]


def test_cli_exits_2_with_one_message_and_no_output_for_broken_specs(tmp_path):
    from qfx.examples import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "checkpoint")
    files = {name: write(tmp_path / f"{name}.yaml", content) for name, content, _ in HOSTILE if name in CLI_CASES}
    files["checkpoint-without-calibration"] = write(
        tmp_path / "checkpoint-without-calibration.yaml",
        "version: 1\nmodel: {path: checkpoint}\nquantization: {preset: w8a8-int8, exclude: [lm_head]}\n")
    assert len(files) == 10
    runs = {name: subprocess.Popen([sys.executable, "-m", "qfx.cli", "build", str(path), "-o", str(tmp_path / name)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, path in files.items()}  # in parallel: each run spends its seconds importing torch
    for name, run in runs.items():
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 2, f"{name}: exit {run.returncode}\n{stderr}"
        assert stderr.count("qfx: error: ") == 1 and "Traceback" not in stderr, f"{name}: {stderr}"
        assert "internal error" not in stderr, f"{name}: {stderr}"
        assert not (tmp_path / name).exists(), f"{name}: the failed build left its output directory"
        if name == "checkpoint-without-calibration":
            assert "no calibration data given" in stderr and "synthetic: true" in stderr
