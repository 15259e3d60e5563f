"""Run by another ONNX Runtime's environment (make conformance-setup: .venv-ort122): `qfx verify`
an artifact there, and write ONNX Runtime's logits for the given token ids.

usage: python ort_run.py ARTIFACT_DIR IDS.safetensors OUT.safetensors
Prints JSON: the ONNX Runtime version and verify's figures."""
import json
import sys

import onnxruntime
import torch
from safetensors.torch import load_file, save_file

from qfx.runtime.ort import session
from qfx.runtime.verify import verify_artifact

folder, ids_path, out_path = sys.argv[1:4]
figures = verify_artifact(folder)
ids = load_file(ids_path)["input_ids"]
logits = session(f"{folder}/model.onnx").run(None, {"input_ids": ids.numpy()})[0]
save_file({"logits": torch.from_numpy(logits).contiguous()}, out_path)
print(json.dumps({"onnxruntime": onnxruntime.__version__, "verify": figures}))
