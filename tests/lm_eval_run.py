"""Run by the lm-evaluation-harness environment (not qfx's): evaluate a qfx artifact with
lm-eval's model type `qfx` on tasks defined in a local folder, no hub download.

usage: python lm_eval_run.py ARTIFACT BACKEND TASK_DIR TASK[,TASK...] BATCH_SIZE
Prints JSON: each task's metrics, and per sample the model's responses (loglikelihoods or text)."""
import json
import sys

import lm_eval
from lm_eval.tasks import TaskManager

import qfx.lm_harness  # noqa: F401  (registers the model type `qfx`)

artifact, backend, task_dir, tasks, batch_size = sys.argv[1:6]
out = lm_eval.simple_evaluate(model="qfx", model_args=f"artifact={artifact},backend={backend},max_length=128",
                              tasks=tasks.split(","), task_manager=TaskManager(include_path=task_dir),
                              batch_size=int(batch_size), log_samples=True)
responses = {task: [sample["resps"] for sample in samples] for task, samples in out["samples"].items()}
print(json.dumps({"results": out["results"], "responses": responses}, default=str))
