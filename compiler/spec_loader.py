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


def _marks(node: yaml.Node, loc: Loc, marks: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = loc + (key_node.value,)
            marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _marks(value_node, child, marks)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            marks[loc + (i,)] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _marks(item, loc + (i,), marks)


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


def _explain(err: dict) -> str:
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden" and loc:
        model = _model_at(loc[:-1])
        allowed = ", ".join(model.model_fields) if isinstance(model, type) and issubclass(model, pydantic.BaseModel) else "?"
        return f"unknown field {loc[-1]!r}; allowed here: {allowed}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], (dict, list)):
        message += f" (got {err['input']!r})"
    return message


def _clean_loc(loc: Loc) -> Loc:
    """Drop pydantic's validator and union tags (e.g. 'function-before[...]', 'list[str]') from a loc."""
    return tuple(p for p in loc if isinstance(p, int) or not p.endswith("]"))


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


def _resolve_paths(spec: Spec, base: Path) -> Spec:
    def rel(p: str | None) -> str | None:
        return None if p is None else str((base / os.path.expanduser(p)).resolve())

    updates = {
        "model": spec.model and spec.model.model_copy(update={"path": rel(spec.model.path)}),
        "calibration": spec.calibration.model_copy(update={"text": rel(spec.calibration.text),
                                                          "tokens": rel(spec.calibration.tokens)}),
    }
    if spec.output is not None:
        updates["output"] = spec.output.model_copy(update={"dir": rel(spec.output.dir)})
    return spec.model_copy(update=updates)


def load_spec(spec) -> LoadedSpec:
    """A Spec from a path (YAML or JSON), a dict, or a Spec; relative paths made absolute."""
    if isinstance(spec, Spec):
        return LoadedSpec(_resolve_paths(spec, Path.cwd()), SpecSource(), spec.model_dump_json().encode())
    if isinstance(spec, dict):
        source = SpecSource()
        return LoadedSpec(_resolve_paths(validate(spec, source), Path.cwd()), source,
                          Spec.model_validate(spec).model_dump_json().encode())
    if not isinstance(spec, (str, os.PathLike)):
        raise SpecError(f"a spec is a path, a dict or a qfx.Spec, got {type(spec).__name__}")
    path = Path(spec)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}", hint="give the path of a .yaml or .json spec")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise SpecError(f"{where}: not valid YAML: {exc.problem}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec is a mapping with version, model, quantization, ... "
                        f"(got {type(data).__name__})")
    marks: dict = {}
    _marks(node, (), marks)
    source = SpecSource(str(path), marks)
    base = path.resolve().parent
    return LoadedSpec(_resolve_paths(validate(data, source), base), source, raw)
