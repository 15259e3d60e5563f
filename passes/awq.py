"""awq: activation-aware weight quantization (AWQ, Lin et al. 2023), folded exactly.

Weight-only quantization hurts most where the input is loud: a weight column that meets large
activations carries its rounding error into the output at their size. AWQ scales those input
channels up in the weight (down in the producer, so the float model is unchanged) before
rounding, which gives their columns finer steps relative to their size:

1. Scales. Per fold group (passes/dataflow.py, as SmoothQuant's), s_c = mean|X_c|^α,
   normalized to a geometric mean of 1 over the usable channels; α is searched on a grid by
   the consumers' quantized output error on rows sampled from the calibration data, and a
   group no α improves stays as it was. The fold machinery, the explicit multiply where no
   producer absorbs the factors and the records are SmoothQuant's (passes/smoothquant.py).
2. Clipping. Each integer weight (folded or not) then gets, per output channel and group, the
   clip ratio of CLIP_RATIOS that minimizes that group's share of the layer's output error on
   the sampled rows, ||X_g (Q(W_g) - W_g)^T||: like `observer: mse`, but weighing each column by
   its input, which a weight-only search cannot see.

The clipped grids' codes go to convert through the context, like GPTQ's; the graph keeps the
folded float weights, the build's reference.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from qfx.passes.base import PassContext, PassResult
from qfx.passes.dataflow import get_tensor
from qfx.passes.meta import get_quant
from qfx.passes.smoothquant import SmoothQuant
from qfx.passes.weight_algorithm import taken_and_left, why_rounded_to_nearest
from qfx.runtime.evaluate import relative_error
from qfx.runtime.formats import Granularity, TensorFormat
from qfx.runtime.numerics import (
    best_clip,
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantize,
    weight_axis,
    weight_qparams,
    weight_range,
)

CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.00 .. 0.50


def clipped_qparams(w: torch.Tensor, x: torch.Tensor, fmt: TensorFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The qparams of [out, in] weight `w` whose range, per output channel and group, is the
    min-max range shrunk by the ratio of CLIP_RATIOS with the least output error on rows `x`
    (group by group: the error of X_g (Q(W_g) - W_g)^T, other groups' errors left out)."""
    lo, hi = weight_range(w, fmt)
    g = fmt.group_size if fmt.granularity is Granularity.per_group else w.shape[1]
    xg = x.float().reshape(x.shape[0], -1, g)  # [rows, groups, g]

    def cost(scale, zero_point):  # each (output channel, group)'s share of the output error
        diff = fake_quantize(w, scale, zero_point, fmt.dtype, weight_axis(fmt), fmt.group_size).sub_(w)
        error = torch.einsum("rgk,ngk->rgn", xg, diff.reshape(w.shape[0], -1, g)).square_().sum(0).T
        return error.reshape(lo.shape)  # [out, groups], or [out] per channel

    return qparams_from_range(*best_clip(lo, hi, fmt, CLIP_RATIOS, cost), fmt)


@dataclasses.dataclass(frozen=True)
class Awq(SmoothQuant):
    name = "awq"
    produces = frozenset({"smoothed", "calibrated", "weights_quantized"})
    conflicts = frozenset({"qdq", "weights_quantized"})

    clip: bool = True  # search each group's clip ratio on the output error after the scales

    def reads(self, linear: torch.fx.Node) -> bool:
        return why_rounded_to_nearest(linear, self.name) is None

    def factors(self, alpha, x_max, w_max, x_mean):
        usable = x_mean > 0
        s = x_mean.clamp(min=1e-12) ** alpha
        return s / torch.exp(torch.log(s[usable]).mean()) if bool(usable.any()) else s

    def run(self, gm, ctx: PassContext) -> PassResult:
        taken, skipped = taken_and_left(gm, self.name)
        groups, not_folded, stale, stats, factors = self.smooth_groups(gm, ctx, taken)
        from tqdm import tqdm

        layers = {}
        for node in tqdm(taken, desc=f"{self.name} clip", unit="layer", disable=not sys.stderr.isatty(), leave=False):
            quant = get_quant(node)
            fmt = quant.fmt.weight
            w = get_tensor(gm, node.args[1].target).detach()  # folded: W diag(t)
            t = factors.get(node)
            rows = stats[node.args[0]].rows(self.rows)  # the input before the fold
            x = rows if t is None else rows / t.float()  # the input the folded weight meets
            params = clipped_qparams(w, x, fmt) if self.clip else weight_qparams(w, fmt)
            axis = weight_axis(fmt)
            codes = quantize(w, *params, fmt.dtype, axis, fmt.group_size)
            ctx.keep_codes(quant.module, codes, *params, fmt.dtype)
            unfolded = w.float() if t is None else w.float() / t.float()
            rtn = fake_quantize(unfolded, *weight_qparams(unfolded, fmt), fmt.dtype, axis, fmt.group_size)
            ours = dequantize(codes, *params, fmt.dtype, axis, fmt.group_size)
            reference = rows @ unfolded.T
            layers[quant.module] = {"name": self.name, "options": self.options(), "output_error": {
                "rtn": round(relative_error(reference, rows @ rtn.T), 6),
                self.name: round(relative_error(reference, x @ ours.T), 6)}}
        return PassResult(gm, modified=bool(layers), stats={
            "groups": groups, "not_folded": not_folded, "observers_recalibrated": stale, "layers": layers,
            "rounded_to_nearest": skipped})
