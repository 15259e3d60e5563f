"""hqq: fit each group's scale (and zero point) to its weights without calibration data
(Half-Quadratic Quantization, Badri & Shaji 2023).

HQQ splits the weight's error into a sparse part E, found by the proximal (shrinkage) step of
an lp norm with p < 1, and the rest, which the grid should fit: it alternates rounding on the
grid, shrinking the residual W - Q into E, and refitting the grid to W - E by least squares.
The outliers of a group then stop dragging its grid, which min-max rounding lets them do.

Where qfx departs from the published loop, and why:
- Zero points stay integers: every layout stores them as codes (Quark's uint4 / uint8 zero
  points, GPTQ's qzeros), so the refit is a line fit (scale, offset) per group whose offset is
  rounded to a code. Symmetric formats have no zero point, so their refit is the scale alone;
  the published loop refits only the (float) zero point and never the scale.
- Each group keeps, of its starting qparams (the format's observer: minmax or mse) and every
  iterate, the one with the least squared error: no group ends worse than where it started,
  and the loop stops once an iteration improves no group.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from qfx.passes.base import Pass, PassContext, PassResult
from qfx.passes.dataflow import get_tensor
from qfx.passes.meta import get_quant
from qfx.passes.weight_algorithm import taken_and_left
from qfx.runtime.evaluate import relative_error
from qfx.runtime.formats import Granularity, TensorFormat
from qfx.runtime.numerics import MIN_SCALE, dequantize, fake_quantize, quantize, weight_axis, weight_qparams


def _units(w: torch.Tensor, fmt: TensorFormat) -> torch.Tensor:
    """w as [units, elements]: one row per scale (group, output channel, or the whole tensor)."""
    if fmt.granularity is Granularity.per_group:
        return w.reshape(-1, fmt.group_size)
    return w.reshape(w.shape[0], -1) if fmt.granularity is Granularity.per_channel else w.reshape(1, -1)


def shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The proximal step of the lp norm (p <= 1) with weight 1/beta: entries below
    beta^(-1/(2-p)) in size go to zero, larger ones keep most of their size (the sparse outliers)."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().add(1e-8).pow(p - 1) / beta)


def shrink_cutoff(beta: float, p: float) -> float:
    """A size below which shrink() gives exactly 0: |x| - |x|^(p-1) / beta > 0 iff |x|^(2-p) > 1/beta,
    lowered by 0.1% for the 1e-8 in shrink() and float32 rounding near the boundary."""
    return beta ** (-1 / (2 - p)) * (1 - 1e-3)


def hqq_qparams(w: torch.Tensor, fmt: TensorFormat, iterations: int = 20, lp_norm: float = 0.7,
                beta: float = 10.0, kappa: float = 1.01, start: tuple | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(scale, zero point, iterations run) of a [out, in] weight, shaped as weight_qparams gives them,
    from `start` (default: weight_qparams's, the format's observer).

    Each iteration refits the grid to the weight less its sparse outliers, rounds on the new grid
    and keeps, per group, whichever grid has the smaller squared error. The residual of the
    rounding is reused by the next refit, and the shrink step is skipped when no residual
    reaches its cutoff (for LLM weights, most iterations): both exact, together they cut the
    work about fivefold."""
    scale0, zero0 = start or weight_qparams(w, fmt)
    x = _units(w.float(), fmt)
    n = x.shape[1]
    qmin, qmax = fmt.qmin, fmt.qmax

    def round_on(s, z):  # -> (codes less the zero point, residual x - dequantized, squared error)
        c = torch.div(x, s).round_()
        c = c.clamp_(qmin, qmax) if z is None else c.add_(z).clamp_(qmin, qmax).sub_(z)
        residual = torch.sub(x, c * s)
        return c, residual, torch.linalg.vecdot(residual, residual).unsqueeze(1)

    s = scale0.reshape(-1, 1).expand(x.shape[0], 1).float().clone()
    z = None if zero0 is None else zero0.reshape(-1, 1).expand(x.shape[0], 1).float().clone()
    c, residual, best = round_on(s, z)
    best_s, best_z = s, z
    x_sum = x.sum(1, keepdim=True)
    for ran in range(1, iterations + 1):
        # The grid is refitted to target = x - shrink(residual) = (c - z) s + (residual - shrink(residual)).
        if bool((residual.abs() > shrink_cutoff(beta, lp_norm)).any()):
            target = x - shrink(residual, beta, lp_norm)
            t_sum = target.sum(1, keepdim=True)
        else:
            target, t_sum = x, x_sum
        ct = torch.linalg.vecdot(c, target).unsqueeze(1)
        cc = torch.linalg.vecdot(c, c).unsqueeze(1)
        if z is None:  # target ~ s c
            s = torch.where(cc > 0, ct / cc.clamp_min(1e-30), s)
        else:  # target ~ s c + b, then z = -b / s rounded to a code
            c_sum = c.sum(1, keepdim=True)
            spread = n * cc - c_sum * c_sum
            slope = (n * ct - c_sum * t_sum) / spread.clamp_min(1e-30)
            fit = (spread > 0) & (slope > 0)
            s = torch.where(fit, slope, s)
            offset = (t_sum - s * c_sum) / n  # b for codes less the old zero point
            z = torch.where(fit, (z - offset / s).round_().clamp_(qmin, qmax), z)
        s = fmt.representable_scale(s.clamp_min(MIN_SCALE))
        beta *= kappa
        c, residual, error = round_on(s, z)
        better = error < best
        if not bool(better.any()):
            break
        best = torch.where(better, error, best)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    scale = best_s.reshape(scale0.shape)
    zero = None if zero0 is None else best_z.reshape(zero0.shape).to(zero0.dtype)
    return scale, zero, ran


@dataclasses.dataclass(frozen=True)
class Hqq(Pass):
    name = "hqq"
    requires = frozenset({"annotated"})
    produces = frozenset({"weights_quantized"})
    conflicts = frozenset({"qdq", "weights_quantized"})

    iterations: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"lp_norm must be in (0, 1], got {self.lp_norm}")
        if self.beta <= 0 or self.kappa < 1:
            raise ValueError(f"beta must be > 0 and kappa >= 1, got beta {self.beta}, kappa {self.kappa}")

    def run(self, gm, ctx: PassContext) -> PassResult:
        from tqdm import tqdm

        records = {}
        taken, skipped = taken_and_left(gm, self.name)
        for node in tqdm(taken, desc=self.name, unit="layer", disable=not sys.stderr.isatty(), leave=False):
            quant = get_quant(node)
            fmt = quant.fmt.weight
            w = get_tensor(gm, node.args[1].target).detach()
            start = weight_qparams(w, fmt)  # RTN's grid: the start, and the record's reference
            scale, zero, ran = hqq_qparams(w, fmt, self.iterations, self.lp_norm, self.beta, self.kappa, start)
            axis = weight_axis(fmt)
            rtn = fake_quantize(w, *start, fmt.dtype, axis, fmt.group_size)
            codes = quantize(w, scale, zero, fmt.dtype, axis, fmt.group_size)
            ctx.keep_codes(quant.module, codes, scale, zero, fmt.dtype)
            ours = dequantize(codes, scale, zero, fmt.dtype, axis, fmt.group_size)
            records[quant.module] = {"name": self.name, "options": self.options(), "iterations": ran,
                                     "weight_error": {"rtn": round(relative_error(w, rtn), 6),
                                                      self.name: round(relative_error(w, ours), 6)}}
        return PassResult(gm, modified=bool(records), stats={"layers": records, "rounded_to_nearest": skipped})

