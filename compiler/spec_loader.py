"""Load a spec from YAML, JSON, a dict or a Spec, keeping where each field was written.

Every error names the file, line and column, the field path, and what is allowed. Relative
paths in a spec file are relative to that file.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path

import pydantic
import yaml

from qfx.errors import SpecError
from qfx.spec import Spec

Loc = tuple  # a field path: ("quantization", "rules", 0, "match", 1)


@dataclasses.dataclass(frozen=True)
class SpecSource:
    """Where a spec came from: its file (None for Python objects) and each field's position."""

    file: str | None = None
    marks: dict = dataclasses.field(default_factory=dict)  # Loc -> (line, column), 1-based

    def where(self, loc: Loc) -> str:
        dotted = format_loc(loc)
        origin = self.file or "<spec>"
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.marks:
                line, col = self.marks[loc[:end]]
                return f"{origin}:{line}:{col}: {dotted}" if dotted else f"{origin}:{line}:{col}"
        return f"{origin}: {dotted}" if dotted else origin


@dataclasses.dataclass(frozen=True)
class LoadedSpec:
    spec: Spec
    source: SpecSource
    raw_text: bytes = b""  # the spec file's bytes (hashed into the manifest)


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# A spec is a few dozen values a few levels deep. These bounds stop broken or hostile YAML
# (aliases of aliases, an anchor holding its own alias, deep nesting) before anything walks it.
MAX_DEPTH = 32
MAX_VALUES = 100_000
# Python refuses to read longer digit strings as an int (sys.get_int_max_str_digits, 4300).
MAX_INT_DIGITS = 4000
_MERGE = "tag:yaml.org,2002:merge"  # the `<<` key
_VALUE = "tag:yaml.org,2002:value"  # the `=` key; safe_load resolves both inside their mapping
_INT = "tag:yaml.org,2002:int"


def _at(file: str, node: yaml.Node) -> str:
    return f"{file}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _key(node: yaml.Node):
    """A mapping key as it appears in a field path (complex keys, which YAML allows and a spec
    never has, as '?')."""
    return node.value if isinstance(node, yaml.ScalarNode) else "?"


def _marks(root: yaml.Node, file: str) -> dict:
    """Each field path's (line, column), 1-based; on the way, refuse what would make loading hang
    or crash (see MAX_DEPTH, MAX_VALUES, MAX_INT_DIGITS) or silently drop a value (a duplicate key,
    which YAML resolves by keeping the last)."""
    marks: dict = {(): (root.start_mark.line + 1, root.start_mark.column + 1)}
    constructor = yaml.constructor.SafeConstructor()
    seen = 0

    def visit(node: yaml.Node, loc: Loc) -> None:
        nonlocal seen
        seen += 1
        if seen > MAX_VALUES:
            raise SpecError(f"the spec expands to more than {MAX_VALUES} values", where=_at(file, node),
                            hint="a spec is a few dozen values; look for aliases (*name) of lists of aliases")
        if len(loc) > MAX_DEPTH:
            raise SpecError(f"{format_loc(loc[:3])}...: nested more than {MAX_DEPTH} levels deep",
                            where=_at(file, node), hint="a spec is a few levels deep; an anchor (&name) that "
                                                        "holds its own alias (*name) nests without end")
        if isinstance(node, yaml.ScalarNode):
            _check_scalar(node, loc, file, constructor)
        elif isinstance(node, yaml.MappingNode):
            _no_duplicate_keys(node, loc, file)
            for key_node, value_node in node.value:
                child = loc + (_key(key_node),)
                marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                visit(key_node, child)
                visit(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                marks[loc + (i,)] = (item.start_mark.line + 1, item.start_mark.column + 1)
                visit(item, loc + (i,))

    visit(root, ())
    return marks


def _check_scalar(node: yaml.ScalarNode, loc: Loc, file: str, constructor) -> None:
    """Construct a scalar as safe_load will, at its position: for malformed tagged or date-like
    scalars (`2001-13-45`, `!!int abc`, `!!bool maybe`) PyYAML raises plain ValueError, KeyError,
    IndexError or AttributeError that say neither where nor that the YAML is at fault."""
    dotted = format_loc(loc) or "the document"
    if node.tag in (_MERGE, _VALUE):
        return
    if node.tag == _INT and len(node.value) > MAX_INT_DIGITS:
        raise SpecError(f"{dotted}: an integer of {len(node.value)} digits is too large", where=_at(file, node))
    try:
        constructor.construct_object(node)
    except yaml.YAMLError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        tag = node.tag.rsplit(":", 1)[-1]
        detail = f" ({exc})" if isinstance(exc, ValueError) else ""
        raise SpecError(f"{dotted}: {_shown(node.value)} is not a valid YAML {tag}{detail}", where=_at(file, node),
                        hint="fix the value, or quote it (and drop any !!tag) to make it a string") from None


def _no_duplicate_keys(node: yaml.MappingNode, loc: Loc, file: str) -> None:
    """YAML (and JSON) keep the last of two equal keys, so a second `quantization:` would
    silently replace the first: refuse it instead."""
    first_line: dict = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
            continue
        key = (key_node.tag, key_node.value)
        if key in first_line:
            raise SpecError(f"{format_loc(loc + (key_node.value,))}: duplicate key {key_node.value!r} "
                            f"(first on line {first_line[key]}); YAML would keep only the last",
                            where=_at(file, key_node), hint="remove or merge one of them")
        first_line[key] = key_node.start_mark.line + 1


def _model_at(loc: Loc):
    """The pydantic model class that the field path `loc` points into (for listing allowed fields)."""
    cls = Spec
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, pydantic.BaseModel) else None
        if field is None:
            return cls
        ann = field.annotation
        while True:
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            origin = typing.get_origin(ann)
            if origin in (typing.Union, types.UnionType, list) and args:
                ann = args[0]
            else:
                break
        cls = ann
    return cls


def _shown(value, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: a 10 MB string or a 5000-digit int (whose repr
    Python refuses) must not become, or break, the error message."""
    try:
        text = repr(value)
    except ValueError:
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _explain(err: dict) -> str:
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden" and loc:
        model = _model_at(loc[:-1])
        allowed = ", ".join(model.model_fields) if isinstance(model, type) and issubclass(model, pydantic.BaseModel) else "?"
        return f"unknown field {_shown(loc[-1])}; allowed here: {allowed}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], (dict, list)):
        message += f" (got {_shown(err['input'])})"
    return message


def _clean_loc(loc: Loc) -> Loc:
    """Drop pydantic's validator and union tags (e.g. 'function-before[...]', 'list[str]') from a loc."""
    return tuple(p for p in loc if not (isinstance(p, str) and p.endswith("]")))


def validate(data, source: SpecSource) -> Spec:
    try:
        return Spec.model_validate(data)
    except pydantic.ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = _clean_loc(tuple(err["loc"]))
            err = dict(err, loc=loc)
            lines.append(f"{source.where(loc)}: {_explain(err)}")
        raise SpecError("invalid spec:\n  " + "\n  ".join(lines),
                        hint="`qfx schema` prints every field and its allowed values") from None


def _resolve_paths(spec: Spec, base: Path, source: SpecSource) -> Spec:
    """`spec` with its file paths made absolute (relative to `base`).

    Only fields that hold a path are replaced: model_copy(update=) marks what it replaces as
    set, and the build reads model_fields_set to tell a spec's own `calibration` from the default."""
    def absolute(part, name: str, loc: Loc):
        value = getattr(part, name) if part is not None else None
        if value is None:
            return {}
        try:
            return {name: str((base / os.path.expanduser(value)).resolve())}
        except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            raise SpecError(f"cannot resolve the path {_shown(value)}: {exc}", where=source.where(loc)) from None

    updates = {}
    for field, names in (("model", ("path",)), ("calibration", ("text", "tokens")), ("output", ("dir",))):
        part = getattr(spec, field)
        changes = {}
        for name in names:
            changes.update(absolute(part, name, (field, name)))
        if changes:
            updates[field] = part.model_copy(update=changes)
    return spec.model_copy(update=updates) if updates else spec


def load_spec(spec) -> LoadedSpec:
    """A Spec from a path (YAML or JSON), a dict, or a Spec; relative paths made absolute."""
    if isinstance(spec, Spec):
        return LoadedSpec(_resolve_paths(spec, Path.cwd(), SpecSource()), SpecSource(), spec.model_dump_json().encode())
    if isinstance(spec, dict):
        source = SpecSource()
        checked = validate(spec, source)
        return LoadedSpec(_resolve_paths(checked, Path.cwd(), source), source, checked.model_dump_json().encode())
    if not isinstance(spec, (str, os.PathLike)):
        raise SpecError(f"a spec is a path, a dict or a qfx.Spec, got {type(spec).__name__}")
    path = Path(spec)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}", hint="give the path of a .yaml or .json spec")
    raw = path.read_bytes()
    data, marks = _parse(path, raw)
    source = SpecSource(str(path), marks)
    base = path.resolve().parent
    return LoadedSpec(_resolve_paths(validate(data, source), base, source), source, raw)


def _parse(path: Path, raw: bytes) -> tuple[dict, dict]:
    """The spec file's mapping and each field's position; any reason it cannot be read is a SpecError.

    The composed node tree is checked (_marks) before anything is constructed from it."""
    try:
        text = raw.decode("utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        marks = _marks(node, str(path)) if node is not None else {}
        data = yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise SpecError(f"{where}: not valid YAML: {exc.problem}") from None
    except yaml.reader.ReaderError as exc:  # a control character such as NUL, which YAML forbids
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise SpecError(f"{path}:{line}:{column}: not valid YAML: control character U+{code:04X} is not allowed",
                        hint="YAML text cannot hold control characters; write them as escapes in double quotes"
                        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:  # nesting deep enough to exhaust PyYAML's recursive composer
        raise SpecError(f"{path}: nested too deeply to read (a spec is a few levels deep)") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec is a mapping with version, model, quantization, ... "
                        f"(got {type(data).__name__})")
    return data, marks
