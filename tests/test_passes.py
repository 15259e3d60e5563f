"""Per-pass checks on the built-in tiny Llama: node counts, ops, meta, verification, pipeline text."""
import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import tiny_spec

import qfx
from qfx.build import _linears
from qfx.calib_data import calibration_set, run_calibration
from qfx.capture import export, wrap_module
from qfx.errors import PassFailure
from qfx.examples import tiny_llama
from qfx.passes import PassContext, format_pipeline, parse_pipeline
from qfx.passes.base import Pass, PassResult
from qfx.passes.meta import get_quant, get_role
from qfx.passes.registry import PipelineSyntaxError
from qfx.rules import resolve_plan
from qfx.runner import run_pipeline, verify_graph
from qfx.runtime import ops
from qfx.runtime.layouts import DEFAULT_LAYOUT, layout_named
from qfx.spec_loader import load_spec


@pytest.fixture()
def setup():
    loaded = load_spec(tiny_spec(preset="w8a8-int8", exclude=["lm_head"],
                                 rules=[{"match": ["*k_proj", "*v_proj"], "output": {"dtype": "int8"}}]))
    bundle = wrap_module(tiny_llama())
    data = calibration_set(loaded.spec.calibration, bundle)
    gm = export(bundle, tuple(t[:2] for t in data.inputs))
    plan = resolve_plan(loaded.spec.quantization, loaded.spec.target, _linears(gm, bundle.root_prefix), loaded.source,
                        layout_named(DEFAULT_LAYOUT))
    ctx = PassContext(plan=plan, root_prefix=bundle.root_prefix, run_data=lambda g: run_calibration(g, data, 2))
    return gm, ctx, data


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def test_each_pass_does_its_one_job(setup):
    gm, ctx, data = setup
    linear = torch.ops.aten.linear.default
    nodes_before = len(gm.graph.nodes)
    gm = run_pipeline(gm, parse_pipeline("annotate"), ctx)
    assert len(gm.graph.nodes) == nodes_before  # meta only
    annotated = [n for n in gm.graph.nodes if get_quant(n)]
    assert len(annotated) == 14 and ctx.stats["annotate"]["annotated"] == 14
    assert all(n.target is linear for n in annotated)

    gm = run_pipeline(gm, parse_pipeline("observe,calibrate"), ctx)
    observers = [n for n in gm.graph.nodes if get_role(n) == "observer"]
    # One per distinct input tensor (q/k/v share one, gate/up another; o and down their own),
    # per layer, plus the k/v outputs: 4 * 2 + 4.
    assert len(observers) == 12
    stats = ctx.stats["calibrate"]
    assert (stats["batches"], stats["samples"]) == (2, 4)
    assert stats["nodes_run"] < stats["nodes_in_graph"]  # the float LM head after the last observer is cut

    gm = run_pipeline(gm, parse_pipeline("convert,freeze"), ctx)
    assert not [n for n in gm.graph.nodes if get_role(n) == "observer"]
    assert not [n for n, _ in gm.named_children() if n.startswith("qfx_observer")]
    assert count(gm, ops.QUANTIZE) == 14 + 4 and count(gm, ops.DEQUANTIZE) == 14 + 14 + 4
    q_proj = gm.get_submodule("hf.model.layers.0.self_attn.q_proj")
    assert q_proj.weight.dtype == torch.int8 and q_proj.weight_scale.shape == (64,)
    assert not isinstance(q_proj.weight, torch.nn.Parameter)
    assert gm.get_submodule("hf.model.layers.0.self_attn.k_proj").output_scale.ndim == 0
    for node in gm.graph.nodes:  # every node qfx made says where it came from
        if get_role(node) in ("quantize", "dequantize"):
            assert "nn_module_stack" in node.meta and "val" in node.meta


def test_freeze_reports_unmodified_when_nothing_changes(setup):
    gm, ctx, _ = setup
    gm = run_pipeline(gm, parse_pipeline("annotate,observe,calibrate,convert,freeze"), ctx)
    ctx2 = dataclasses.replace(ctx, facts={"qdq"}, stats={})
    run_pipeline(gm, parse_pipeline("freeze"), ctx2)
    assert ctx2.stats["freeze"]["modified"] is False


def test_pass_requirements_are_checked(setup):
    gm, ctx, _ = setup
    with pytest.raises(PassFailure, match="convert needs .*annotated"):
        run_pipeline(gm, parse_pipeline("convert"), ctx)
    with pytest.raises(PassFailure, match="calibrate needs observers"):
        run_pipeline(gm, parse_pipeline("annotate,calibrate"), ctx)


def test_pipeline_text_round_trips():
    for text in ("annotate,observe,calibrate,convert,freeze",
                 "annotate,observe{percentile=99.9},calibrate,convert,freeze",
                 "annotate,observe{percentile=99.5,averaging_constant=0.2},calibrate,convert"):
        assert format_pipeline(parse_pipeline(text)) == text
    assert parse_pipeline("observe{percentile=99.5}")[0].percentile == 99.5
    with pytest.raises(PipelineSyntaxError, match="unknown pass 'smooth'"):
        parse_pipeline("annotate,smooth")
    with pytest.raises(PipelineSyntaxError, match="no option 'alpha'"):
        parse_pipeline("observe{alpha=1}")


@dataclasses.dataclass(frozen=True)
class Broken(Pass):
    name = "broken"

    def run(self, gm, ctx):
        raise RuntimeError("boom")


@dataclasses.dataclass(frozen=True)
class Corrupting(Pass):
    name = "corrupting"

    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        del node.meta["val"]
        return PassResult(gm, modified=True)


def test_failing_pass_is_named_and_leaves_a_reproducer(setup):
    gm, ctx, _ = setup
    with pytest.raises(PassFailure) as info:
        run_pipeline(gm, [Broken()], ctx, spec_json="{}")
    msg = str(info.value)
    assert "pass broken failed: RuntimeError: boom" in msg
    folder = Path(msg.split("reproducer is in ")[1].strip())
    assert (folder / "graph.py").is_file() and (folder / "pipeline.txt").read_text().strip() == "broken"


def test_verification_catches_a_pass_that_breaks_the_ir(setup):
    gm, ctx, _ = setup
    verify_graph(gm)
    with pytest.raises(PassFailure, match="has no 'val' meta"):
        run_pipeline(gm, [Corrupting()], ctx)


def test_a_weight_only_build_runs_no_model_node_to_calibrate():
    """Nothing observes a weight-only graph, so calibration runs none of it: not even the nodes
    torch keeps through dead-code elimination (export's metadata asserts, attention)."""
    result = qfx.compile(spec=tiny_spec(preset="w4a16-g32", exclude=["lm_head"]))
    stats = result.stats["calibrate"]
    assert stats["nodes_in_graph"] > 100
    assert stats["nodes_run"] <= 3, stats  # the inputs and the output
