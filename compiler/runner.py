"""Run a pipeline of passes over a graph: check requirements, verify the IR after each pass,
and turn a failing pass into a PassFailure that names it and leaves a reproducer."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from qfx.errors import PassFailure, QfxError
from qfx.passes.base import Pass, PassContext
from qfx.passes.meta import ROLE_KEY
from qfx.passes.registry import CALIBRATE, PipelineSyntaxError, facts_after, format_pipeline


def verify_graph(gm: torch.fx.GraphModule) -> None:
    """The IR invariants every pass keeps: a linted graph whose targets exist, and whose
    nodes carry `val` and (for nodes qfx made) their source module."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner, _, attr = node.target.rpartition(".")
            if not hasattr(gm.get_submodule(owner), attr):
                raise PassFailure(f"get_attr {node.target} reads nothing", where=node.name)
        if node.op == "call_function" and "val" not in node.meta:
            raise PassFailure(f"node {node.name} ({node.target}) has no 'val' meta", where=node.name)
        if ROLE_KEY in node.meta and node.op != "get_attr" and "nn_module_stack" not in node.meta:
            raise PassFailure(f"node {node.name} made by qfx has no nn_module_stack", where=node.name)


def write_reproducer(gm: torch.fx.GraphModule, pipeline: str, spec_json: str | None, failed: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"qfx-repro-{failed}-"))
    (folder / "pipeline.txt").write_text(pipeline + "\n")
    (folder / "graph.py").write_text(gm.print_readable(print_output=False))
    if spec_json is not None:
        (folder / "spec.json").write_text(spec_json)
    (folder / "README.txt").write_text(
        f"Pass '{failed}' failed. graph.py is the graph it was given. spec.json is the build's spec\n"
        "without its output (a model passed to qfx.compile is not in it); rerun with\n"
        f"  qfx build spec.json -o /tmp/qfx-repro-out --pipeline '{pipeline}'\n")
    return folder


def run_pipeline(gm: torch.fx.GraphModule, items: list[Pass | str], ctx: PassContext,
                 spec_json: str | None = None, verify: bool = True) -> torch.fx.GraphModule:
    pipeline = format_pipeline(items)
    for item in items:
        try:
            after = facts_after(item, frozenset(ctx.facts))
        except PipelineSyntaxError as exc:
            raise PassFailure(f"{exc.message}; pipeline: {pipeline}") from None
        if item == CALIBRATE:
            start = time.perf_counter()
            try:
                stats = ctx.run_data(gm)
            except QfxError:
                raise
            except Exception as exc:
                folder = write_reproducer(gm, pipeline, spec_json, CALIBRATE)
                raise PassFailure(f"calibration failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}",
                                  hint=f"the reproducer is in {folder}") from exc
            ctx.stats[CALIBRATE] = dict(stats, seconds=round(time.perf_counter() - start, 3))
            ctx.facts = set(after)
            continue
        start = time.perf_counter()
        try:
            result = item.run(gm, ctx)
            if verify:
                verify_graph(result.gm)
        except QfxError as exc:
            if isinstance(exc, PassFailure):
                exc.message = f"pass {item.name} failed: {exc.message}"
                exc.hint = (exc.hint + "; " if exc.hint else "") + \
                    f"reproducer: {write_reproducer(gm, pipeline, spec_json, item.name)}"
                exc.args = (exc.render(),)
            raise
        except Exception as exc:
            folder = write_reproducer(gm, pipeline, spec_json, item.name)
            first = (str(exc).strip().splitlines() or [""])[0]
            raise PassFailure(f"pass {item.name} failed: {type(exc).__name__}: {first}",
                              hint=f"this is a qfx bug; the reproducer is in {folder}") from exc
        gm = result.gm
        ctx.facts = set(after)
        ctx.stats[item.name] = {"modified": result.modified, **result.stats,
                                "seconds": round(time.perf_counter() - start, 3)}
    return gm
