"""Accuracy budgets: a build judged on held-out data, published only within its budget."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import TINYSTORIES, TINYSTORIES_TEXT, WIKITEXT, minilm_dir, needs_minilm, needs_shared, tiny_spec

import qfx
from qfx.budget import over_budget, parse_budget
from qfx.errors import BudgetError, UserError
from qfx.runtime.evaluate import compare_lm, rolling_perplexity, rolling_windows


def _ids(path, count: int, seed: int):
    np.save(path, torch.randint(0, 256, (count,), generator=torch.Generator().manual_seed(seed)).numpy())
    return str(path)


def _spec(tmp_path, budget: dict, evaluation_ids=None) -> dict:
    spec = tiny_spec(preset="w8a8-int8", exclude=["lm_head"])
    spec["evaluate"] = {"tokens": evaluation_ids or _ids(tmp_path / "eval.npy", 1024, 7), "seq_len": 128,
                        "budget": budget}
    spec["output"] = {"dir": str(tmp_path / "a")}
    return spec


def test_budget_limits_and_verdicts():
    limits = parse_budget(["perplexity_increase=2%,top1_agreement=0.95", "logits_rel_error=0.1"])
    assert limits == {"perplexity_increase": 0.02, "top1_agreement": 0.95, "logits_rel_error": 0.1}
    figures = {"perplexity_increase": 0.021, "top1_agreement": 0.95, "logits_rel_error": float("nan")}
    failures = over_budget(figures, limits)
    assert len(failures) == 2 and failures[0] == "perplexity_increase +2.1% (budget: at most +2%)"
    assert failures[1].startswith("logits_rel_error nan")  # not a number is outside any budget
    for bad, message in [("perplexity_increase=2", "write .2%. for a percent"), ("top1=0.9", "top1"), ("top1_agreement", "NAME=VALUE")]:
        with pytest.raises(UserError, match=message):
            parse_budget([bad])


def test_rolling_windows_score_every_token_once_as_lm_eval_does():
    """lm-evaluation-harness's disjoint rolling windows over a stream [prefix] + tokens: each group
    of `size` predictions reads the `size` tokens before its last target."""
    assert rolling_windows(10, 4) == [(0, 4, 4), (4, 8, 4), (5, 9, 1)]
    assert rolling_windows(3, 8) == [(0, 2, 2)] and rolling_windows(1, 4) == []
    for n, size in [(257, 64), (300, 7), (64, 64)]:
        targets = [t for start, end, scored in rolling_windows(n, size) for t in range(end - scored + 1, end + 1)]
        assert targets == list(range(1, n))
        assert all(end - start <= size for start, end, _ in rolling_windows(n, size))


def test_compare_lm_is_the_perplexity_of_each_model():
    gen = torch.Generator().manual_seed(0)
    table, noise = torch.randn(50, 50, generator=gen), torch.randn(50, 50, generator=gen) * 0.1
    ids = torch.randint(0, 50, (300,), generator=gen)
    figures = compare_lm(lambda x: table[x], lambda x: (table + noise)[x], ids, window=64)
    assert figures["tokens"] == 299
    assert figures["float_perplexity"] == pytest.approx(rolling_perplexity(lambda x: table[x], ids, 64)["perplexity"])
    assert figures["quantized_perplexity"] == pytest.approx(
        rolling_perplexity(lambda x: (table + noise)[x], ids, 64)["perplexity"])
    same = compare_lm(lambda x: table[x], lambda x: table[x], ids, window=64)
    assert same["perplexity_increase"] == 0 and same["logits_rel_error"] == 0 and same["top1_agreement"] == 1


def test_build_within_its_budget_publishes_with_the_figures(tmp_path):
    result = qfx.compile(spec=_spec(tmp_path, {"perplexity_increase": "5%", "top1_agreement": 0.9}))
    record = result.manifest["evaluate"]
    assert record["passed"] and not record["failures"] and record["figures"]["tokens"] == 1023
    # measured: +0.005% perplexity, 0.9995 top-1 agreement, logits relative error 0.012
    assert record["figures"]["perplexity_increase"] < 0.05 and record["figures"]["top1_agreement"] >= 0.9
    assert (tmp_path / "a" / "model.safetensors").exists() and not (tmp_path / "a.over-budget").exists()
    assert "## Evaluation (quantized vs float, on eval.npy" in (tmp_path / "a" / "report.md").read_text()


def test_build_over_its_budget_exits_3_and_leaves_output_dir_alone(tmp_path):
    """The artifact a CI job publishes is never replaced by one over budget: that one goes beside
    it, named .over-budget, with its figures."""
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_spec(tmp_path, {"perplexity_increase": "5%"})))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_spec(tmp_path, {"perplexity_increase": "0.0001%", "top1_agreement": 0.5})))
    assert subprocess.run([sys.executable, "-m", "qfx.cli", "build", str(good)], capture_output=True).returncode == 0
    published = (tmp_path / "a" / "manifest.json").read_bytes()
    run = subprocess.run([sys.executable, "-m", "qfx.cli", "build", str(bad)], capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    assert "over its accuracy budget" in run.stderr and "perplexity_increase +" in run.stderr
    assert "(budget: at most +0.0001%)" in run.stderr and "top1_agreement" not in run.stderr  # only what failed
    assert (tmp_path / "a" / "manifest.json").read_bytes() == published
    kept = json.loads((tmp_path / "a.over-budget" / "manifest.json").read_text())["evaluate"]
    assert not kept["passed"] and kept["failures"][0].startswith("perplexity_increase")


def test_build_over_budget_without_an_output_dir_raises_with_the_figures(tmp_path):
    spec = _spec(tmp_path, {"logits_rel_error": 1e-6})
    del spec["output"]
    with pytest.raises(BudgetError, match="logits_rel_error") as caught:
        qfx.compile(spec=spec)
    assert caught.value.exit_code == 3 and caught.value.figures["figures"]["logits_rel_error"] > 1e-6
    assert "nothing was written" in caught.value.hint


def test_evaluation_data_that_overlaps_calibration_is_refused_before_calibrating(tmp_path):
    ids = _ids(tmp_path / "ids.npy", 4096, 3)
    spec = _spec(tmp_path, {"perplexity_increase": "5%"}, evaluation_ids=ids)
    spec["calibration"] = {"tokens": ids, "samples": 4, "seq_len": 64}  # the first 256 tokens
    with pytest.raises(UserError, match="overlaps the calibration data: its tokens 0..31") as caught:
        qfx.compile(spec=spec)
    assert "held-out" in caught.value.hint and not (tmp_path / "a").exists()


@pytest.mark.parametrize("budget, message", [
    ({"mean_cosine": 0.99}, "mean_cosine, which a causal lm does not have"),
    ({"perplexity_increase": 2}, "over 100%"),
])
def test_budget_a_model_cannot_have_is_refused(tmp_path, budget, message):
    with pytest.raises(UserError, match=message):
        qfx.compile(spec=_spec(tmp_path, budget))


@pytest.mark.slow
@needs_minilm
def test_encoder_budget_on_minilm_mean_cosine(tmp_path):
    """MiniLM W8A8 judged by the mean cosine of its mean-pooled embeddings on held-out lines."""
    lines = [line.strip() for line in WIKITEXT.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 20]
    (tmp_path / "calib.txt").write_text("\n".join(lines[:64]))
    (tmp_path / "eval.txt").write_text("\n".join(lines[1000:1064]))
    spec = {"version": 1, "model": {"path": str(minilm_dir())}, "target": "cpu",
            "calibration": {"text": str(tmp_path / "calib.txt"), "samples": 64, "seq_len": 128, "split": "lines"},
            "quantization": {"preset": "w8a8-int8"},
            "evaluate": {"text": str(tmp_path / "eval.txt"), "seq_len": 128, "budget": {"mean_cosine": 0.95}}}
    record = qfx.compile(spec=spec).stats["evaluate"]
    print(f"MiniLM W8A8: mean cosine {record['figures']['mean_cosine']:.4f}")
    assert record["passed"] and record["figures"]["lines"] == 64
    assert 0.95 <= record["figures"]["mean_cosine"] < 1  # measured 0.98
    spec["evaluate"]["budget"] = {"mean_cosine": 0.9999}
    with pytest.raises(BudgetError, match=r"mean_cosine 0\.9\d+ \(budget: at least 0\.9999\)"):
        qfx.compile(spec=spec)
    spec["evaluate"]["text"] = str(tmp_path / "calib.txt")
    with pytest.raises(UserError, match="evaluation line 1 is also a calibration sample"):
        qfx.compile(spec=spec)


@pytest.mark.slow
@needs_shared
def test_qfx_eval_budget_gates_an_existing_artifact(tmp_path):
    spec = {"version": 1, "model": {"path": str(TINYSTORIES)}, "target": "cpu",
            "calibration": {"text": str(TINYSTORIES_TEXT), "samples": 8, "seq_len": 128},
            "quantization": {"preset": "w8a8-int8", "exclude": ["lm_head"]}, "output": {"dir": str(tmp_path / "a")}}
    qfx.compile(spec=spec)
    command = [sys.executable, "-m", "qfx.cli", "eval", str(tmp_path / "a"), "--text", str(WIKITEXT),
               "--max-tokens", "1024"]
    within = subprocess.run(command + ["--budget", "perplexity_increase=25%,top1_agreement=0.7"],
                            capture_output=True, text=True)
    assert within.returncode == 0, within.stderr
    assert "within budget: perplexity_increase 0.25, top1_agreement 0.7" in within.stdout
    over = subprocess.run(command + ["--budget", "perplexity_increase=0.001%"], capture_output=True, text=True)
    assert over.returncode == 3 and "(budget: at most +0.001%)" in over.stderr
    bad = subprocess.run(command + ["--budget", "mean_cosine=0.9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "a causal lm does not have" in bad.stderr
