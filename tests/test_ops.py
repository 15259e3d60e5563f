"""The qfx:: custom ops: registered schemas, fake kernels and export round trips."""
import torch

from qfx.runtime import ops


def test_opcheck_quantize_dequantize_per_token():
    x = torch.randn(3, 8)
    scale = torch.tensor(0.05)
    torch.library.opcheck(ops.quantize, (x, scale, None, "int8", 0, 0))
    torch.library.opcheck(ops.quantize, (x, scale, None, "fp8_e4m3fnuz", 0, 0))
    codes = ops.quantize(x, scale, torch.tensor(3, dtype=torch.int8), "int8", 0, 0)
    torch.library.opcheck(ops.dequantize, (codes, scale, torch.tensor(3, dtype=torch.int8), "int8", 0, 0, torch.float32))
    torch.library.opcheck(ops.quantize_per_token, (x, "int8"))


def test_qdq_graph_exports_and_reloads(tmp_path):
    class QDQ(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.tensor(0.1))

        def forward(self, x):
            codes, s = ops.quantize_per_token(x, "int8")
            y = ops.dequantize(codes, s, None, "int8", -1, 0, torch.float32)
            q = ops.quantize(y, self.scale, None, "fp8_e4m3fn", 0, 0)
            return ops.dequantize(q, self.scale, None, "fp8_e4m3fn", 0, 0, torch.float32)

    x = torch.randn(2, 5, 8)
    program = torch.export.export(QDQ(), (x,))
    path = tmp_path / "qdq.pt2"
    torch.export.save(program, path)
    reloaded = torch.export.load(path)
    assert torch.equal(reloaded.module()(x), QDQ()(x))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"qfx.quantize.default", "qfx.dequantize.default", "qfx.quantize_per_token.default"} <= targets
