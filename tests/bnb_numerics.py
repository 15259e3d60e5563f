"""Run by bitsandbytes' environment (not qfx's): its CPU quantize_4bit and dequantize_4bit on the
weights in IN.safetensors (`x:I`, with `blocksize:I`, `fp4:I` = 1 for its FP4 rather than NF4,
and `nested:I` = 1 for double quantization), and its dequantize_4bit of qfx's tensors for them (`packed:I`, `absmax:I`, and
when nested `nested_absmax:I`, `offset:I`).

LLM.int8 inputs (`act:I`, with `threshold:I`): its int8_vectorwise_quant of them in float16,
written as `act_codes:I`, `act_absmax:I` and `act_columns:I` (the outlier columns).

usage: python bnb_numerics.py IN.safetensors OUT.safetensors
Writes, per case I: `packed:I` and `absmax:I` (and when nested `nested_absmax:I`, `offset:I`):
bitsandbytes' own quantization; `deq:I`: its dequantization of qfx's; and `dynamic_map`, the
table of its nested codes."""
import sys

import bitsandbytes.functional as F
import torch
from safetensors.torch import load_file, save_file

cases = load_file(sys.argv[1])
out = {"dynamic_map": F.create_dynamic_map().float().contiguous()}
for key in [k for k in cases if k.startswith("x:")]:
    i = key[2:]
    x, blocksize, nested = cases[key], int(cases[f"blocksize:{i}"]), bool(cases[f"nested:{i}"])
    quant_type = "fp4" if bool(cases[f"fp4:{i}"]) else "nf4"
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    out[f"packed:{i}"], out[f"absmax:{i}"] = packed.contiguous(), state.absmax.contiguous()
    state.absmax = cases[f"absmax:{i}"]
    if nested:
        out[f"nested_absmax:{i}"], out[f"offset:{i}"] = state.state2.absmax.contiguous(), state.offset.reshape(1)
        state.state2.absmax, state.offset = cases[f"nested_absmax:{i}"], cases[f"offset:{i}"][0]
    out[f"deq:{i}"] = F.dequantize_4bit(cases[f"packed:{i}"], state).contiguous()
for key in [k for k in cases if k.startswith("act:")]:  # LLM.int8 inputs, with `threshold:I`
    i = key[4:]
    codes, row_absmax, columns = F.int8_vectorwise_quant(cases[key].to(torch.float16),
                                                         threshold=float(cases[f"threshold:{i}"]))
    out[f"act_codes:{i}"], out[f"act_absmax:{i}"] = codes.contiguous(), row_absmax.contiguous()
    out[f"act_columns:{i}"] = (columns if columns is not None else torch.zeros(0, dtype=torch.int64)).contiguous()
save_file(out, sys.argv[2])
