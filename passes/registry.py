"""The one table of passes, and the textual pipeline format.

A pipeline is `name{key=value,...}` items joined by commas, e.g.
`annotate,observe,calibrate,convert,freeze`; `calibrate` is the phase boundary where the
calibration data runs, not a pass. `format_pipeline(parse_pipeline(s)) == s` for canonical s.
"""
from __future__ import annotations

import dataclasses
import re

from qfx.passes.annotate import Annotate
from qfx.passes.awq import Awq
from qfx.passes.base import Pass
from qfx.passes.convert import Convert
from qfx.passes.freeze import Freeze
from qfx.passes.gptq import Gptq
from qfx.passes.hqq import Hqq
from qfx.passes.lower import Lower
from qfx.passes.observe import Observe
from qfx.passes.rotation import Rotation
from qfx.passes.smoothquant import SmoothQuant
from qfx.runtime.errors import UserError

PASSES: dict[str, type[Pass]] = {p.name: p for p in (Annotate, Rotation, SmoothQuant, Observe, Gptq, Awq, Hqq,
                                                      Convert, Freeze, Lower)}
CALIBRATE = "calibrate"
DEFAULT_PIPELINE = "annotate,observe,calibrate,convert,freeze"

_ITEM = re.compile(r"\s*([a-z_]+)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


class PipelineSyntaxError(UserError):
    """A pipeline qfx cannot read or run: unknown pass, option or value, or a pass placed
    before what it needs."""


def _parse_value(text: str, kind: type, where: str):
    """`text` as the option's declared type (bool, int, float or str)."""
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise PipelineSyntaxError(f"{where} takes true or false, got {text!r}")
        return text.lower() == "true"
    try:
        return kind(text)
    except ValueError:
        raise PipelineSyntaxError(f"{where} takes a {kind.__name__}, got {text!r}") from None


def parse_pipeline(text: str) -> list[Pass | str]:
    items: list[Pass | str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineSyntaxError(f"cannot read the pipeline at column {pos + 1}: {text[pos:]!r}")
        name, opts = m.group(1), m.group(2)
        pos = m.end()
        if name == CALIBRATE:
            if opts:
                raise PipelineSyntaxError("calibrate takes no options (set them in the spec's calibration block)")
            items.append(CALIBRATE)
            continue
        if name not in PASSES:
            raise PipelineSyntaxError(f"unknown pass {name!r}; passes are: {', '.join(PASSES)}, {CALIBRATE}")
        cls = PASSES[name]
        types = {f.name: type(f.default) for f in dataclasses.fields(cls)}
        kwargs = {}
        for pair in filter(None, (p.strip() for p in (opts or "").split(","))):
            key, sep, value = (part.strip() for part in pair.partition("="))
            if not sep or key not in types:
                raise PipelineSyntaxError(f"pass {name} has no option {key!r}; options: {sorted(types) or 'none'}")
            kwargs[key] = _parse_value(value, types[key], f"option {name}{{{key}}}")
        try:
            items.append(cls(**kwargs))
        except ValueError as exc:
            raise PipelineSyntaxError(f"pass {name}: {exc}") from None
    if not items:
        raise PipelineSyntaxError("the pipeline is empty")
    return items


def facts_after(item: Pass | str, facts: frozenset[str]) -> frozenset[str]:
    """The facts that hold after `item` runs with `facts` holding, or a PipelineSyntaxError
    saying why it cannot run there. The runner applies the same rules as it goes; checking
    the whole pipeline first makes a wrong order fail before any model is loaded."""
    if item == CALIBRATE:
        if "observed" not in facts:
            raise PipelineSyntaxError("calibrate needs observers: put 'observe' before it")
        if "calibrated" in facts:
            raise PipelineSyntaxError("calibrate twice would feed every batch twice to the same observers",
                                      hint="put 'observe' again before a second 'calibrate'")
        return facts | {"calibrated"}
    if clash := item.conflicts & facts:
        raise PipelineSyntaxError(f"pass {item.name} cannot run after a pass that made the graph "
                                  f"{', '.join(sorted(clash))}", hint=f"put {item.name} earlier")
    missing = item.requires - facts
    if missing:
        raise PipelineSyntaxError(f"pass {item.name} needs {', '.join(sorted(missing))} first",
                                  hint="the default pipeline is " + DEFAULT_PIPELINE)
    return (facts - item.invalidates) | item.produces


def check_pipeline(items: list[Pass | str]) -> None:
    facts: frozenset[str] = frozenset()
    for i, item in enumerate(items):
        try:
            facts = facts_after(item, facts)
        except PipelineSyntaxError as exc:
            exc.message = f"pipeline {format_pipeline(items)!r}, item {i + 1}: {exc.message}"
            exc.args = (exc.render(),)
            raise


def format_pipeline(items: list[Pass | str]) -> str:
    parts = []
    for item in items:
        if isinstance(item, str):
            parts.append(item)
            continue
        defaults = type(item)()
        opts = {k: v for k, v in item.options().items() if getattr(defaults, k) != v}
        parts.append(item.name + ("{" + ",".join(f"{k}={v}" for k, v in opts.items()) + "}" if opts else ""))
    return ",".join(parts)
