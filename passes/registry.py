"""The one table of passes, and the textual pipeline format.

A pipeline is `name{key=value,...}` items joined by commas, e.g.
`annotate,observe,calibrate,convert,freeze`; `calibrate` is the phase boundary where the
calibration data runs, not a pass. `format_pipeline(parse_pipeline(s)) == s` for canonical s.
"""
from __future__ import annotations

import dataclasses
import re

from qfx.passes.annotate import Annotate
from qfx.passes.base import Pass
from qfx.passes.convert import Convert
from qfx.passes.freeze import Freeze
from qfx.passes.observe import Observe

PASSES: dict[str, type[Pass]] = {p.name: p for p in (Annotate, Observe, Convert, Freeze)}
CALIBRATE = "calibrate"
DEFAULT_PIPELINE = "annotate,observe,calibrate,convert,freeze"

_ITEM = re.compile(r"\s*([a-z_]+)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


class PipelineSyntaxError(ValueError):
    pass


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


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
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for pair in filter(None, (p.strip() for p in (opts or "").split(","))):
            key, sep, value = pair.partition("=")
            if not sep or key.strip() not in fields:
                raise PipelineSyntaxError(f"pass {name} has no option {key.strip()!r}; options: {sorted(fields) or 'none'}")
            kwargs[key.strip()] = _parse_value(value.strip())
        items.append(cls(**kwargs))
    if not items:
        raise PipelineSyntaxError("the pipeline is empty")
    return items


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
