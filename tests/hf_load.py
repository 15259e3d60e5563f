"""Run by a consumer's environment (amd-quark's, GPTQModel's, compressed-tensors' or bitsandbytes', not qfx's):
load a qfx artifact the way a user of transformers would, and write its logits for the given
token ids.

usage: python hf_load.py ARTIFACT_DIR IDS.safetensors OUT.safetensors [GPTQ_BACKEND | bfloat16]
GPTQ_BACKEND (GPTQ checkpoints): the gptqmodel kernel to load with; `torch` computes in the
model's dtype, where the default CPU kernel rounds activations to bfloat16. `bfloat16`: load the
model in bfloat16.
bitsandbytes: `logits` come from its exact CPU path (dequantize, then a float matmul) and
`fast_logits` from the bfloat16 kernel it switches to on CPUs with AVX512-BF16 (the same path
where the CPU lacks it).
bitsandbytes 8-bit (LLM.int8): `a:NAME` is each linear's input as bitsandbytes quantizes it
(int8_vectorwise_quant of the float16 input: codes x row absmax / 127, outlier columns as they
came), for a comparison that a code flipped by float rounding cannot cascade through.
Prints JSON: what transformers reported while loading, and the module type of one layer. Writes
the logits and, for GPTQ's and bitsandbytes' linears, the [out, in] weight each one computes with
(`w:NAME`)."""
import json
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

artifact, ids_path, out_path = sys.argv[1:4]
options = {}
if len(sys.argv) > 4 and sys.argv[4] == "bfloat16":  # compressed-tensors unpacks MX weights to bfloat16 only
    options = {"dtype": torch.bfloat16}
elif len(sys.argv) > 4:
    from transformers import GPTQConfig

    config = json.load(open(f"{artifact}/config.json"))["quantization_config"]
    options = {"quantization_config": GPTQConfig(bits=config["bits"], backend=sys.argv[4]), "device_map": "cpu",
               "dtype": torch.float32}
model, info = AutoModelForCausalLM.from_pretrained(artifact, output_loading_info=True, **options)
model.eval()
ids = load_file(ids_path)["input_ids"]
captured = {}


def capture_llm_int8_input(name, threshold):
    def hook(module, args):
        import bitsandbytes.functional as F

        x = args[0]
        rows = x.reshape(-1, x.shape[-1])
        codes, row_absmax, columns = F.int8_vectorwise_quant(rows.to(torch.float16), threshold=threshold)
        value = codes.float() * (row_absmax / 127).unsqueeze(1)
        if columns is not None and columns.numel():
            value[:, columns] = rows[:, columns].float()
        captured[f"a:{name}"] = value.reshape(x.shape).contiguous()
    return hook


for name, m in model.named_modules():
    if type(m).__name__ == "Linear8bitLt":
        m.register_forward_pre_hook(capture_llm_int8_input(name, m.state.threshold))
four_bit = {name: m for name, m in model.named_modules() if hasattr(m, "support_avx512bf16_for_cpu")}
fast = {m: m.support_avx512bf16_for_cpu for m in four_bit.values()}
for m in four_bit.values():
    m.support_avx512bf16_for_cpu = False
with torch.no_grad():
    logits = model(input_ids=ids, use_cache=False).logits
extra = dict(captured)
if four_bit:
    import bitsandbytes.functional as F

    extra = {f"w:{name}": F.dequantize_4bit(m.weight.data, m.weight.quant_state) for name, m in four_bit.items()}
    for m, was in fast.items():
        m.support_avx512bf16_for_cpu = was
    with torch.no_grad():
        extra["fast_logits"] = model(input_ids=ids, use_cache=False).logits.float().contiguous()
weights = {f"w:{name}": module.dequantize_weight().T.contiguous() for name, module in model.named_modules()
           if hasattr(module, "dequantize_weight")}
save_file({"logits": logits.float().contiguous(), **weights, **extra}, out_path)
layer = model.model.layers[0].self_attn.k_proj
print(json.dumps({"loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
                  "k_proj_type": type(layer).__name__,
                  "k_proj_has_output_quantizer": getattr(layer, "output_quantizer", None) is not None}))
