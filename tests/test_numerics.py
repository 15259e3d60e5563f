"""The reference arithmetic: rounding, ranges, FP8 variants, int4 packing."""
import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qfx.runtime import numerics
from qfx.runtime.formats import Granularity, ObserverKind, QDType, TensorFormat
from qfx.runtime.layouts.quark import pack_quark_int4, unpack_quark_int4

FORMATS = [TensorFormat(QDType.int8, Granularity.per_channel),
           TensorFormat(QDType.int8, Granularity.per_tensor, symmetric=False),
           TensorFormat(QDType.int4, Granularity.per_group, group_size=16),
           TensorFormat(QDType.uint4, Granularity.per_group, symmetric=False, group_size=32),
           TensorFormat(QDType.fp8_e4m3fn, Granularity.per_tensor),
           TensorFormat(QDType.fp8_e4m3fnuz, Granularity.per_tensor)]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.sampled_from([32, 64]), st.integers(0, 2**31 - 1), st.sampled_from(FORMATS))
def test_weight_roundtrip_error_is_within_half_a_step(rows, cols, seed, fmt):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    codes, scale, zp = numerics.quantize_weight(w, fmt)
    assert codes.dtype == fmt.dtype.storage
    dq = numerics.dequantize(codes, scale, zp, fmt.dtype, numerics.weight_axis(fmt), fmt.group_size)
    step = numerics.broadcast_scale(scale, 2, numerics.weight_axis(fmt), fmt.group_size)
    if fmt.dtype.is_float:
        # 3 mantissa bits: relative error at most 2^-4 of the value, plus subnormal spacing.
        bound = w.abs() * 2 ** -4 + step * 2 ** -9
    else:
        bound = step / 2 + 1e-6
    assert torch.all((dq - w).abs() <= bound)
    assert torch.isfinite(dq).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.sampled_from([32, 64]), st.integers(0, 2**31 - 1), st.sampled_from(FORMATS))
def test_fake_quantize_equals_the_codes_round_trip_bit_for_bit(rows, cols, seed, fmt):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    codes, scale, zp = numerics.quantize_weight(w, fmt)
    axis = numerics.weight_axis(fmt)
    expected = numerics.dequantize(codes, scale, zp, fmt.dtype, axis, fmt.group_size)
    assert torch.equal(numerics.fake_quantize(w, scale, zp, fmt.dtype, axis, fmt.group_size), expected)


def test_round_half_to_even_like_onnx():
    codes = numerics.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5]), torch.tensor(1.0), None, QDType.int8)
    assert codes.tolist() == [0, 2, 2, 0, -2]


def test_fp8_clamps_before_cast():
    big = torch.tensor([1e6, -1e6, 300.0])
    fnuz = numerics.quantize(big, torch.tensor(1.0), None, QDType.fp8_e4m3fnuz)
    fn = numerics.quantize(big, torch.tensor(1.0), None, QDType.fp8_e4m3fn)
    assert not torch.isnan(fnuz.float()).any()  # an unclamped cast gives NaN for e4m3fnuz
    assert fnuz.float().tolist() == [224.0, -224.0, 224.0]
    assert fn.float().tolist() == [448.0, -448.0, 288.0]


def test_fn_fnuz_conversion_is_exact_both_ways():
    all_fn = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn)
    finite = all_fn[torch.isfinite(all_fn.float())]
    scale = torch.tensor(0.37)
    fnuz, scale2 = numerics.fn_to_fnuz(finite, scale)
    assert torch.equal(fnuz.float() * scale2, finite.float() * scale)  # -0 became +0: same value
    back, scale3 = numerics.fnuz_to_fn(fnuz, scale2)
    assert torch.equal(back.float() * scale3, finite.float() * scale)


def test_quark_int4_packing_roundtrips_and_uses_quark_nibble_order():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(8, 2)  # [out 8, in 32]
    scale = torch.rand(8, 2)  # groups of 16
    zp = torch.randint(-8, 8, (8, 2), dtype=torch.int8)
    packed, pscale, pzp = pack_quark_int4(codes, scale, zp)
    assert packed.dtype == torch.int32 and packed.shape == (32, 1)  # transposed, 8 per int32 along out
    assert pscale.shape == (2, 8) and pzp.shape == (2, 1)
    back, bscale, bzp = unpack_quark_int4(packed, pscale, pzp, QDType.int4)
    assert torch.equal(back, codes) and torch.equal(bscale, scale) and torch.equal(bzp, zp)
    # Quark's "reorder": the nibbles of out-channels 0..7 are stored in the order 0,2,4,6,1,3,5,7.
    packed, _, _ = pack_quark_int4(torch.arange(8, dtype=torch.int8).view(8, 1),
                                   torch.ones(8, 1), torch.zeros(8, 1, dtype=torch.int8))
    word = int(packed[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


def test_per_token_scales_follow_each_row():
    x = torch.tensor([[1.0, -2.0], [100.0, 50.0]])
    codes, scale = numerics.quantize_per_token(x, QDType.int8)
    assert scale.shape == (2, 1)
    assert torch.allclose(scale.squeeze(), torch.tensor([2 / 127, 100 / 127]))
    assert codes[:, 0].tolist() == [64, 127] and codes[:, 1].tolist() == [-127, 64]


def test_sqnr_is_infinite_for_exact_and_finite_otherwise():
    w = torch.randn(4, 4)
    assert numerics.sqnr_db(w, w) == float("inf")
    assert 0 < numerics.sqnr_db(w, w + 0.01) < 100


def test_reduced_range_int8_weights_use_seven_bits():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for symmetric, bounds in ((True, (-63, 63)), (False, (-64, 63))):
        fmt = TensorFormat(QDType.int8, Granularity.per_channel, symmetric=symmetric, reduce_range=True)
        codes, scale, zero_point = numerics.quantize_weight(w, fmt)
        assert int(codes.min()) == bounds[0] or not symmetric  # each row reaches its extremes
        assert int(codes.min()) >= bounds[0] and int(codes.max()) <= bounds[1]
        back = numerics.dequantize(codes, scale, zero_point, QDType.int8, 0)
        assert float((back - w).abs().max()) <= float(scale.max()) / 2 + 1e-6  # half a step
    assert TensorFormat.from_json(fmt.to_json()) == fmt


MSE_FORMATS = [TensorFormat(QDType.int4, Granularity.per_group, group_size=32, observer=ObserverKind.mse),
               TensorFormat(QDType.uint4, Granularity.per_group, symmetric=False, group_size=32,
                            observer=ObserverKind.mse),
               TensorFormat(QDType.int8, Granularity.per_channel, observer=ObserverKind.mse),
               TensorFormat(QDType.fp8_e4m3fn, Granularity.per_tensor, observer=ObserverKind.mse)]


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1), st.sampled_from(MSE_FORMATS))
def test_mse_clipping_never_loses_to_min_max_in_any_channel_or_group(rows, seed, fmt):
    w = torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed)) * 2
    w[0, 0] = 12.0  # an outlier that min-max spends a whole range on

    def errors(f):
        codes, scale, zp = numerics.quantize_weight(w, f)
        dq = numerics.dequantize(codes, scale, zp, f.dtype, numerics.weight_axis(f), f.group_size)
        return (dq - w).square().reshape(rows, -1, f.group_size or 64).sum(-1)

    mse, minmax = errors(fmt), errors(dataclasses.replace(fmt, observer=ObserverKind.minmax))
    if fmt.granularity is Granularity.per_tensor:
        mse, minmax = mse.sum(), minmax.sum()
    assert bool((mse <= minmax).all())  # (equal where no ratio of the grid beats min-max)

