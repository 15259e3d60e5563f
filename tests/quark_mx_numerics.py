"""Run by amd-quark's environment (not qfx's): Quark's own MX fake quantization (the observer and
quantizer its OCP_MX specs build, scale_calculation_mode `even`) of the tensors in IN.safetensors.

usage: python quark_mx_numerics.py IN.safetensors OUT.safetensors
IN holds `x:I` (float32 [rows, K], blocks of 32 along K) and `dtype:I` (bytes of the Quark spec's
name: OCP_MXFP4Spec, ...). OUT holds `y:I`, Quark's dequantize(quantize(x)), and `scale:I`, its
block scales."""
import sys

import quark.torch.quantization.config.config as quark_config
from quark.torch.quantization.tensor_quantize import FakeQuantizeBase
from safetensors.torch import load_file, save_file

cases = load_file(sys.argv[1])
out = {}
for key in [k for k in cases if k.startswith("x:")]:
    i = key[2:]
    spec = getattr(quark_config, bytes(cases[f"dtype:{i}"].tolist()).decode())
    fake = FakeQuantizeBase.get_fake_quantize(spec(ch_axis=-1, is_dynamic=False).to_quantization_spec())
    fake.enable_observer()
    fake.enable_fake_quant()
    out[f"y:{i}"] = fake(cases[key]).contiguous()
    out[f"scale:{i}"] = fake.scale.float().contiguous()
save_file(out, sys.argv[2])
