"""Run by the amd-quark environment (not qfx's): load a qfx artifact the way a user of
transformers + amd-quark would, and write its logits for the given token ids.

usage: python quark_load.py ARTIFACT_DIR IDS.safetensors OUT.safetensors
Prints JSON: what transformers reported while loading, and the module type of one layer."""
import json
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

artifact, ids_path, out_path = sys.argv[1:4]
model, info = AutoModelForCausalLM.from_pretrained(artifact, output_loading_info=True)
model.eval()
ids = load_file(ids_path)["input_ids"]
with torch.no_grad():
    logits = model(input_ids=ids, use_cache=False).logits
save_file({"logits": logits.contiguous()}, out_path)
layer = model.model.layers[0].self_attn.k_proj
print(json.dumps({"loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
                  "k_proj_type": type(layer).__name__,
                  "k_proj_has_output_quantizer": getattr(layer, "output_quantizer", None) is not None}))
