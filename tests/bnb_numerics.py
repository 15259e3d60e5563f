"""Run by bitsandbytes' environment (not qfx's): its CPU quantize_4bit and dequantize_4bit on the
weights in IN.safetensors (`x:I`, with `blocksize:I`), and its dequantize_4bit of qfx's codes for
them (`packed:I`, `absmax:I`).

usage: python bnb_numerics.py IN.safetensors OUT.safetensors
Writes, per case I: `packed:I` and `absmax:I` (bitsandbytes' own quantization), `deq:I` (its
dequantization of qfx's)."""
import sys

import bitsandbytes.functional as F
from safetensors.torch import load_file, save_file

cases = load_file(sys.argv[1])
out = {}
for key in [k for k in cases if k.startswith("x:")]:
    i = key[2:]
    x, blocksize = cases[key], int(cases[f"blocksize:{i}"])
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    out[f"packed:{i}"], out[f"absmax:{i}"] = packed.contiguous(), state.absmax.contiguous()
    state.absmax = cases[f"absmax:{i}"]
    out[f"deq:{i}"] = F.dequantize_4bit(cases[f"packed:{i}"], state).contiguous()
save_file(out, sys.argv[2])
