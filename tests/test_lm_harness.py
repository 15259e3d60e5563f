"""lm-evaluation-harness on qfx artifacts (`--model qfx`): tasks defined in local files, run by
lm-eval in its own environment (make lm-eval-setup; `make test` does it), pointed to by
QFX_LMEVAL_PYTHON, so that its many dependencies never touch qfx's."""
import json
import math
import os
import subprocess

import pytest
from conftest import ROOT, TINYSTORIES, TINYSTORIES_TEXT, WIKITEXT, needs_shared

import qfx
from qfx.evaluation import evaluate_artifact

pytestmark = pytest.mark.conformance
LMEVAL_PYTHON = os.environ.get("QFX_LMEVAL_PYTHON")
requires_lm_eval = pytest.mark.skipif(not LMEVAL_PYTHON, reason="QFX_LMEVAL_PYTHON is not set: run `make test`, "
                                      "which installs lm-evaluation-harness into .venv-lmeval")
WINDOW = 128  # the runs' max_length: qfx eval's --window on the same text
MC_ITEMS = [  # multiple choice over TinyStories-like sentences: the model should prefer the plain one
    {"question": "Once upon a time, there was a little", "choices": [" girl", " carburettor", " theorem"], "answer": 0},
    {"question": "She liked to play with her", "choices": [" toys", " mortgage", " isotopes"], "answer": 0},
    {"question": "The sun was", "choices": [" shining", " litigating", " compiling"], "answer": 0},
    {"question": "He was very", "choices": [" happy", " polynomial", " bureaucratic"], "answer": 0},
]


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    """A folder of lm-eval task YAMLs over local JSON files: multiple choice, wikitext-style rolling
    perplexity, and greedy generation."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "mc.json").write_text("\n".join(json.dumps(item) for item in MC_ITEMS))
    page = WIKITEXT.read_text(encoding="utf-8")[:6000]
    (folder / "page.txt").write_text(page, encoding="utf-8")
    (folder / "pages.json").write_text(json.dumps({"page": page}))
    (folder / "prompts.json").write_text("\n".join(json.dumps({"prompt": p, "target": ""}) for p in
                                                   ["Once upon a time", "Tom had a red ball", "The cat"]))
    common = "dataset_path: json\ntest_split: train\n"
    (folder / "mc.yaml").write_text(
        f"task: qfx_local_mc\n{common}dataset_kwargs: {{data_files: {{train: {folder / 'mc.json'}}}}}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    (folder / "rolling.yaml").write_text(
        f"task: qfx_local_wikitext\n{common}dataset_kwargs: {{data_files: {{train: {folder / 'pages.json'}}}}}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{page}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n")
    (folder / "generate.yaml").write_text(
        f"task: qfx_local_generate\n{common}dataset_kwargs: {{data_files: {{train: {folder / 'prompts.json'}}}}}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs: {until: ['.'], max_gen_toks: 12, do_sample: false}\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm") / "a"
    qfx.compile(spec={"version": 1, "model": {"path": str(TINYSTORIES)}, "target": "cpu",
                      "calibration": {"text": str(TINYSTORIES_TEXT), "samples": 8, "seq_len": 128},
                      "quantization": {"preset": "w8a8-int8", "exclude": ["lm_head"]},
                      "output": {"dir": str(folder), "formats": ["safetensors", "onnx"]}})
    return folder


def lm_eval(artifact, backend: str, task_dir, tasks: str, batch_size: int = 4) -> dict:
    run = subprocess.run([LMEVAL_PYTHON, str(ROOT / "tests" / "lm_eval_run.py"), str(artifact), backend, str(task_dir),
                          tasks, str(batch_size)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@needs_shared
@requires_lm_eval
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_lm_eval_runs_local_tasks_on_an_artifact(artifact, local_tasks, backend):
    out = lm_eval(artifact, backend, local_tasks, "qfx_local_mc,qfx_local_wikitext,qfx_local_generate")
    accuracy = out["results"]["qfx_local_mc"]["acc,none"]
    print(f"{backend}: multiple choice accuracy {accuracy}, word perplexity "
          f"{out['results']['qfx_local_wikitext']['word_perplexity,none']:.4g}")
    assert accuracy >= 0.75  # a story model prefers the plain word (measured 1.0)
    # the rolling loglikelihood of the page is qfx eval's perplexity, token for token
    figures = evaluate_artifact(artifact, local_tasks / "page.txt", window=WINDOW)
    loglikelihood = float(out["responses"]["qfx_local_wikitext"][0][0][0])
    rolling = math.exp(-loglikelihood / figures["tokens"])
    print(f"{backend}: lm-eval rolling perplexity {rolling:.8g}, qfx eval {figures['quantized_perplexity']:.8g}, "
          f"relative difference {abs(rolling / figures['quantized_perplexity'] - 1):.2g}")
    # measured on AVX2: torch 7.8e-16 (the same windows and arithmetic), ONNX Runtime 2.4e-5 (its float rounding)
    assert abs(rolling / figures["quantized_perplexity"] - 1) <= 1e-3
    texts = [resps[0][0] for resps in out["responses"]["qfx_local_generate"]]  # one greedy text per prompt
    assert len(texts) == 3 and all(isinstance(t, str) and "." not in t for t in texts) and any(t.strip() for t in texts)


@needs_shared
@requires_lm_eval
def test_lm_eval_command_line_runs_the_model_type_qfx(artifact, local_tasks, tmp_path):
    run = subprocess.run([LMEVAL_PYTHON, "-m", "qfx.lm_harness", "run", "--model", "qfx", "--model_args",
                          f"artifact={artifact},backend=torch", "--tasks", "qfx_local_mc", "--include_path",
                          str(local_tasks), "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "qfx_local_mc" in run.stdout and "acc" in run.stdout
