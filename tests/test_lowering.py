"""Lowering: the fused ops' CPU implementations against the QDQ arithmetic, and the lower pass on
built graphs."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from conftest import tiny_spec
from hypothesis import given, settings
from hypothesis import strategies as st

import qfx
from qfx.passes.annotate import linear_nodes
from qfx.runtime import numerics, ops
from qfx.runtime.errors import QfxWarning
from qfx.runtime.formats import QDType
from qfx.runtime.qlinear import QLINEAR_W8A8, exact_integer_matmul, qlinear_w8a8


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 9), k=st.integers(1, 3000), a_max=st.sampled_from([128, 255, 383]),
       extreme=st.booleans(), seed=st.integers(0, 2**16))
def test_exact_integer_matmul_is_exact(m, n, k, a_max, extreme, seed):
    """Equal to the int64 product, also where every partial sum is as large as the codes allow
    (a float32 GEMM over all of K would round those)."""
    gen = torch.Generator().manual_seed(seed)
    if extreme:
        a, b = torch.full((m, k), -a_max), torch.full((n, k), -128)
    else:
        a, b = torch.randint(-a_max, a_max + 1, (m, k), generator=gen), torch.randint(-128, 128, (n, k), generator=gen)
    got = exact_integer_matmul(a.float(), b.float(), a_max, 128)
    assert torch.equal(got, (a @ b.T).double())


def _qdq_linear(x, weight, weight_scale, bias, input_scale, input_zero_point, qdtype):
    """The QDQ graph's arithmetic: dequantized float operands into a float linear."""
    q = QDType(qdtype)
    if input_scale is None:
        codes, scale = numerics.quantize_per_token(x, q)
        xd = numerics.dequantize(codes, scale, None, q, -1)
    else:
        xd = numerics.dequantize(numerics.quantize(x, input_scale, input_zero_point, q), input_scale,
                                 input_zero_point, q)
    return torch.nn.functional.linear(xd, numerics.dequantize(weight, weight_scale, None, QDType.int8), bias)


def w8a8_cases():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 96, generator=gen)
    weight = torch.randint(-127, 128, (40, 96), generator=gen, dtype=torch.int8)
    per_channel = torch.rand(40, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(40, generator=gen)
    scale = torch.tensor(0.03)
    return {
        "int8 static": (x, weight, per_channel, bias, scale, None, "int8"),
        "uint8 static with zero point": (x, weight, per_channel, None, scale, torch.tensor(131, dtype=torch.uint8),
                                         "uint8"),
        "int8 per token": (x, weight, per_channel, bias, None, None, "int8"),
        "per-tensor weight scale": (x, weight, torch.tensor(0.004), bias, scale, None, "int8"),
    }


@pytest.mark.parametrize("case", sorted(w8a8_cases()))
def test_qlinear_w8a8_computes_the_qdq_linear(case):
    args = w8a8_cases()[case]
    torch.library.opcheck(qlinear_w8a8, args)
    fused, reference = QLINEAR_W8A8(*args), _qdq_linear(*args)
    # Same codes; only where float rounding happens differs (measured 2.1e-7 .. 4.2e-7 on AVX2)
    error = float((fused - reference).abs().max() / reference.abs().max())
    assert fused.shape == reference.shape and error < 2e-6


@pytest.mark.parametrize("preset", ["w8a8-int8", "w8a8-int8-dynamic"])
def test_lowered_llama_gives_the_qdq_graphs_logits(preset):
    result = qfx.compile(spec=tiny_spec(preset=preset, exclude=["lm_head"]))
    gm, stats = result.lowered()
    quantized = [p for p, layer in result.plan.items() if layer.fmt is not None and layer.fmt.weight is not None]
    assert sorted(stats["lowered"]) == sorted(quantized) and not stats["kept"]
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert QLINEAR_W8A8 in targets and ops.DEQUANTIZE not in targets  # every dequantize went with its linear
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        qdq, fused = result.graph(ids), gm(ids)
    error = float((fused - qdq).norm() / qdq.norm())
    print(f"{preset}: lowered vs QDQ logits, relative {error:.2e}")  # measured 1.7e-7 static, 2.0e-7 per token
    assert error <= 1e-5
    # a standard torch.export program: dynamic batch and sequence, saved and loaded
    dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", min=2, max=512)}
    program = torch.export.export(gm, (ids,), dynamic_shapes=(dims,), strict=False)
    saved = io.BytesIO()
    torch.export.save(program, saved)
    saved.seek(0)
    longer = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(torch.export.load(saved).module()(longer), gm(longer))


def test_layers_without_a_fused_op_keep_their_ops_and_are_named():
    result = qfx.compile(spec=tiny_spec(preset="w4a16-g32", exclude=["lm_head"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm, stats = result.lowered()
    assert not stats["lowered"] and len(stats["kept"]) == len(linear_nodes(result.graph)) - 1  # lm_head is float
    messages = [str(w.message) for w in caught if issubclass(w.category, QfxWarning)]
    assert len(messages) == len(stats["kept"]) and "model.layers.0.self_attn.q_proj keeps its reference ops" \
        in "\n".join(messages)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(gm(ids), result.graph(ids))
