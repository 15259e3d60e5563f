"""Lowering: the fused ops' CPU implementations against the QDQ arithmetic, and the lower pass on
built graphs."""
from __future__ import annotations

import io
import shutil
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_spec
from hypothesis import given, settings
from hypothesis import strategies as st

import qfx
from qfx.passes.annotate import linear_nodes
from qfx.runtime import numerics, ops
from qfx.runtime.artifact_files import PROGRAM_FILE
from qfx.runtime.errors import ArtifactError, QfxWarning, UserError
from qfx.runtime.evaluate import float64_matmuls, relative_error
from qfx.runtime.formats import QDType
from qfx.runtime.layouts.quark import pack_quark_int4
from qfx.runtime.program import check_program_archive, load_program
from qfx.runtime.qlinear import (
    QLINEAR_FP8,
    QLINEAR_W4A16,
    QLINEAR_W8A8,
    exact_integer_matmul,
    fbgemm_weight,
    qlinear_fp8,
    qlinear_w4a16,
    qlinear_w8a8,
    quantized_input,
    triton_kernels,
)
from qfx.runtime.verify import check_program, verify_artifact


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
    return torch.nn.functional.linear(xd, numerics.dequantize(weight, weight_scale, None, q), bias)


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


@pytest.mark.parametrize("qdtype", ["fp8_e4m3fn", "fp8_e4m3fnuz"])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qlinear_fp8_computes_the_qdq_linear(qdtype, per_token, per_channel):
    gen = torch.Generator().manual_seed(0)
    q = QDType(qdtype)
    x = torch.randn(2, 7, 96, generator=gen)
    weight = (torch.randn(40, 96, generator=gen) * 50).clamp(-q.qmax, q.qmax).to(q.storage)
    w_scale = torch.rand(40, generator=gen) * 0.01 + 1e-3 if per_channel else torch.tensor(0.004)
    args = (x, weight, w_scale, torch.randn(40, generator=gen), None if per_token else torch.tensor(0.03))
    # torch's schema check compares inputs with allclose, which FP8 tensors lack; what it checks
    # (the op neither mutates nor returns its inputs) is asserted below
    torch.library.opcheck(qlinear_fp8, (*args, qdtype),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    weight_bits = weight.view(torch.uint8).clone()
    fused = QLINEAR_FP8(*args, qdtype)
    assert torch.equal(weight.view(torch.uint8), weight_bits) and fused.data_ptr() != x.data_ptr()
    # on CPU the op runs the QDQ graph's own arithmetic
    assert torch.equal(fused, _qdq_linear(*args, None, qdtype))


def test_qlinear_w4a16_passes_opcheck():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (24, 64), generator=gen, dtype=torch.uint8)
    scale, zeros = torch.rand(24, 2, generator=gen) + 0.01, torch.randint(0, 16, (24, 2), generator=gen).to(torch.uint8)
    packed, scale_t, zeros_packed = pack_quark_int4(codes, scale, zeros)
    x, bias = torch.randn(3, 5, 64, generator=gen), torch.randn(24, generator=gen)
    torch.library.opcheck(qlinear_w4a16, (x, packed, scale_t, zeros_packed, bias, "uint4", 32))
    reference = torch.nn.functional.linear(x, numerics.dequantize(codes, scale, zeros, QDType.uint4, 1, 32), bias)
    assert torch.equal(QLINEAR_W4A16(x, packed, scale_t, zeros_packed, bias, "uint4", 32), reference)


LOWERED_SCHEMES = {
    "w8a8-int8": {"preset": "w8a8-int8"},  # exact float32 sums on CPU
    "w8a8-int8-reduce-range": {"preset": "w8a8-int8", "default": {"weight": {"reduce_range": True}}},  # FBGEMM
    "w8a8-int8-dynamic": {"preset": "w8a8-int8-dynamic"},
    "w4a16-g32": {"preset": "w4a16-g32"},  # on CPU the op's arithmetic is the QDQ graph's: equal
    "w4a16-g32-uint4": {"preset": "w4a16-g32", "default": {"weight": {"dtype": "uint4", "symmetric": False}}},
    "w8a8-fp8": {"preset": "w8a8-fp8"},  # E4M3FN; the QDQ graph's own arithmetic on CPU: equal
    "fp8-per-token-gfx942": {"default": {"weight": {"dtype": "fp8_e4m3", "granularity": "per_channel"},
                                         "input": {"dtype": "fp8_e4m3", "granularity": "per_token"}}},  # E4M3FNUZ
}
LOWERED_OPS = {"fp8": QLINEAR_FP8, "w4a16": QLINEAR_W4A16, "w8a8": QLINEAR_W8A8}  # first match names the op


@pytest.mark.parametrize("scheme", sorted(LOWERED_SCHEMES))
def test_lowered_llama_gives_the_qdq_graphs_logits(scheme):
    spec = tiny_spec(**LOWERED_SCHEMES[scheme], exclude=["lm_head"])
    spec["target"] = "gfx942" if scheme.endswith("gfx942") else "cpu"
    result = qfx.compile(spec=spec)
    gm, stats = result.lowered()
    quantized = [p for p, layer in result.plan.items() if layer.fmt is not None and layer.fmt.weight is not None]
    assert sorted(stats["lowered"]) == sorted(quantized) and not stats["kept"]
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert LOWERED_OPS[next(op for op in LOWERED_OPS if op in scheme)] in targets
    assert ops.DEQUANTIZE not in targets  # every dequantize went with its linear
    if "w4a16" in scheme:  # the program carries the packed codes only
        assert not [name for name, _ in gm.named_buffers() if name.endswith("q_proj.weight")]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        qdq, fused = result.graph(ids), gm(ids)
    error = relative_error(qdq, fused)
    print(f"{scheme}: lowered vs QDQ logits, relative {error:.2e}")
    assert error <= 1e-5  # measured 1.7e-7 (static), 1.7e-7 (FBGEMM), 2.0e-7 (per token), 0 (w4a16, fp8)
    with float64_matmuls():
        exact = result.graph(ids)
    assert relative_error(exact, fused) <= 1e-5
    # a standard torch.export program: dynamic batch and sequence, saved and loaded
    dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", min=2, max=512)}
    program = torch.export.export(gm, (ids,), dynamic_shapes=(dims,), strict=False)
    saved = io.BytesIO()
    torch.export.save(program, saved)
    saved.seek(0)
    longer = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(torch.export.load(saved).module()(longer), gm(longer))


@pytest.mark.parametrize("qdtype", ["int8", "uint8", "int8 per token"])
@pytest.mark.parametrize("bits", [7, 8])
def test_w8a8_runs_fbgemm_exactly(qdtype, bits):
    """Weight codes within -64..63 (reduce_range) run on FBGEMM as they are, full 8-bit ones as two
    halves: the same integer sums as the exact path, also at the worst case of FBGEMM's int16 pair
    sums (inputs at the top code, weights at the ends of their range)."""
    gen = torch.Generator().manual_seed(1)
    top = 2 ** (bits - 1)
    x = torch.randn(3, 5, 256, generator=gen)
    x[0, 0] = 1e3  # every code at the top of the range
    weight = torch.randint(-top, top, (48, 256), generator=gen, dtype=torch.int8)
    weight[0], weight[1] = -top, top - 1
    w_scale, bias = torch.rand(48, generator=gen) * 0.01 + 1e-3, torch.randn(48, generator=gen)
    scale = None if "per token" in qdtype else torch.tensor(0.02)
    zero_point = torch.tensor(100, dtype=torch.uint8) if qdtype == "uint8" else None
    qdtype = qdtype.split()[0]
    packed = fbgemm_weight(weight, w_scale)
    assert (packed.codes is not None) == (bits == 7) and len(packed.halves) == (0 if bits == 7 else 1)
    values, x_scale, largest = quantized_input(x, scale, zero_point, QDType(qdtype))
    scaled = exact_integer_matmul(values, weight.float(), largest, 128) * x_scale.double() * w_scale.double()
    exact = scaled + bias.double()
    fused = QLINEAR_W8A8(x, weight, w_scale, bias, scale, zero_point, qdtype)
    if bits == 8:  # the halves' exact sums, scaled in float64: the exact path's result, bit for bit
        assert torch.equal(fused, scaled.float() + bias)
    error = float((fused.double() - exact).abs().max() / exact.abs().max())
    # float32 epilogue only (measured on AVX2: 2.5e-8 .. 4.3e-8 for 7 bits); a saturated pair sum
    # would be off by far more
    assert error < 1e-6


def test_w8a8_halves_over_k_blocks_give_the_exact_path():
    """K longer than a block of the halves (whose FBGEMM sums must stay below 2^24): two blocks,
    the worst-case codes, the exact path's result bit for bit."""
    from qfx.runtime.qlinear import HALVES_BLOCK

    gen = torch.Generator().manual_seed(2)
    k = HALVES_BLOCK + 300
    x = torch.full((2, k), 1e3)  # every code at the top: each half's sum at its largest
    x[1] = torch.randn(k, generator=gen)
    weight = torch.randint(-128, 128, (6, k), generator=gen, dtype=torch.int8)
    weight[0] = -128
    w_scale, scale = torch.rand(6, generator=gen) * 0.01 + 1e-3, torch.tensor(0.02)
    assert len(fbgemm_weight(weight, w_scale).halves) == 2
    values, x_scale, largest = quantized_input(x, scale, None, QDType.int8)
    exact = exact_integer_matmul(values, weight.float(), largest, 128) * x_scale.double() * w_scale.double()
    assert torch.equal(QLINEAR_W8A8(x, weight, w_scale, None, scale, None, "int8"), exact.float())


def test_layers_without_a_fused_op_keep_their_ops_and_are_named():
    result = qfx.compile(spec=tiny_spec(preset="w8a16-int8", exclude=["lm_head"]))
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


@pytest.fixture(scope="module")
def program_artifact(tmp_path_factory):
    spec = tiny_spec(preset="w8a8-int8", exclude=["lm_head"])
    spec["output"] = {"dir": str(tmp_path_factory.mktemp("program") / "a"), "formats": ["safetensors", "program"]}
    return qfx.compile(spec=spec)


def test_program_artifact_runs_the_lowered_graph(program_artifact):
    result = program_artifact
    record = result.manifest["program"]
    assert record["file"] == PROGRAM_FILE and PROGRAM_FILE in result.manifest["artifact"]
    assert len(record["lowered"]) == len(result.plan) and not record["kept"]
    assert record["check"]["rel_error_vs_float64_sums"] <= 1e-6  # measured 1.6e-7
    program = load_program(result.artifact_dir)
    ids = torch.randint(0, 256, (3, 33), generator=torch.Generator().manual_seed(5))  # another batch and length
    with torch.no_grad():
        got, qdq = program(ids), result.graph(ids)
    assert relative_error(qdq, got) <= 1e-5


def test_runtime_load_gives_the_program_on_a_device(program_artifact):
    """qfx.runtime.load(program=True) is load_program; `device` moves every tensor the program
    holds (to meta here: the fused ops' fake implementations then give the output's shape)."""
    import qfx.runtime

    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(qfx.runtime.load(program_artifact.artifact_dir, program=True)(ids),
                           load_program(program_artifact.artifact_dir)(ids))
        on_meta = qfx.runtime.load(program_artifact.artifact_dir, program=True, device="meta")
        out = on_meta(ids.to("meta"))
    assert out.device.type == "meta" and out.shape == (2, 9, 256)
    assert {t.device.type for t in on_meta.state_dict().values()} == {"meta"}


def _rewritten(source: Path, target: Path, edit) -> Path:
    """A copy of the PT2 archive `source` with each entry's bytes passed through edit(name, data)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, edit(info.filename, src.read(info.filename)))
    return target


@pytest.mark.parametrize("edit, message", [
    (lambda name, data: data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
     if name.endswith("_weights_config.json") else data, "pickled or custom object"),
    (lambda name, data: b"\x80\x04N." if "/sample_inputs/" in name else data, "sample inputs"),
])
def test_program_archive_that_torch_would_unpickle_is_refused(program_artifact, tmp_path, edit, message):
    crafted = _rewritten(program_artifact.artifact_dir / PROGRAM_FILE, tmp_path / PROGRAM_FILE, edit)
    with pytest.raises(ArtifactError, match=message):
        check_program_archive(crafted)


def test_program_edited_after_the_build_is_refused(program_artifact, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(program_artifact.artifact_dir, folder)
    with open(folder / PROGRAM_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="changed after the build"):
        load_program(folder)


def test_verify_checks_the_program(program_artifact):
    """`qfx verify` on an artifact whose only second form is the program runs check (c)."""
    figures = verify_artifact(program_artifact.artifact_dir)["program"]
    assert figures["rel_error_vs_float64_sums"] <= figures["bound"]
    assert figures["rel_error_vs_float64_sums"] <= 1e-6  # measured 1.6e-7


def test_program_check_refuses_a_wrong_output():
    reference = torch.randn(2, 8, 16)
    assert check_program(lambda: reference.clone(), reference, "x")["rel_error_vs_float64_sums"] == 0
    with pytest.raises(ArtifactError, match="differs from the QDQ model"):
        check_program(lambda: reference.clone(), reference * 1.001, "x")  # a 0.1% scale error


def test_program_for_a_scheme_nothing_lowers_is_refused(tmp_path):
    spec = tiny_spec(preset="w8a16-int8", exclude=["lm_head"])
    spec["output"] = {"dir": str(tmp_path / "a"), "formats": ["safetensors", "program"]}
    with pytest.raises(UserError, match="no layer can be lowered") as caught:
        qfx.compile(spec=spec)
    assert "weight-only" in str(caught.value) and not (tmp_path / "a").exists()


def test_fused_ops_on_a_gpu_without_triton_say_so(monkeypatch):
    import qfx.runtime

    monkeypatch.setitem(sys.modules, "triton", None)  # import triton then fails
    monkeypatch.delitem(sys.modules, "qfx.runtime.triton_kernels", raising=False)
    monkeypatch.delattr(qfx.runtime, "triton_kernels", raising=False)
    with pytest.raises(UserError, match="Triton, which cannot be imported") as caught:
        triton_kernels()
    assert "qfx[kernels]" in caught.value.hint
