"""Observers: identity modules that record the range of the activation flowing through them.

They are static per-tensor range estimators for activations (weights are static and get
their ranges straight from the tensor at convert time). A non-finite range stops the build
with the layer and the batch that produced it.
"""
from __future__ import annotations

import torch

from qfx.runtime import numerics
from qfx.runtime.errors import CalibrationError
from qfx.runtime.formats import ObserverKind, TensorFormat


class Observer(torch.nn.Module):
    _is_impure = True  # it records state, so dead-code elimination must keep it (torch.fx reads this)

    # Whether the range is the plain min and max of what it saw, so that a fold that scales
    # the channels of its input gives the new range from per-channel statistics exactly.
    channelwise_exact = False
    # Whether range() measures its error through the readers' weights (convert passes them).
    reads_readers = False

    def __init__(self, fmt: TensorFormat, where: str, **options):
        super().__init__()
        self.fmt, self.where = fmt, where
        self.reset()

    def reset(self) -> None:
        self.batches = 0
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            lo, hi = self.batch_range(x.detach())
            if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                raise CalibrationError(
                    f"calibration batch {self.batches} produced NaN or Inf at {self.where}",
                    hint="check the calibration data and the model in float first; a layer that "
                         "overflows in fp16/bf16 often needs fp32 for calibration")
            self.observe(x.detach(), lo.float(), hi.float())
            self.batches += 1
        return x

    def observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Take in one batch, whose range is lo..hi; range estimators need only that."""
        self.update(lo, hi)

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.aminmax(x)

    def update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def range(self, readers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The range to quantize with. `readers`: the weights ([out, in], stacked) of the linears
        that read this tensor, for observers whose objective is their output (others ignore it)."""
        if self.lo is None:
            raise CalibrationError(f"no calibration data reached {self.where}",
                                   hint="the layer is not on the path of the calibration inputs; "
                                        "exclude it or switch its activation quantization off")
        return self.lo, self.hi

    def extra_repr(self) -> str:
        return f"{self.where}, {self.fmt.describe()}"


class MinMaxObserver(Observer):
    channelwise_exact = True


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max (the first batch sets them)."""

    def __init__(self, fmt, where, averaging_constant: float = 0.1, **options):
        super().__init__(fmt, where)
        self.averaging_constant = averaging_constant

    def update(self, lo, hi):
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            c = self.averaging_constant
            self.lo, self.hi = self.lo + c * (lo - self.lo), self.hi + c * (hi - self.hi)


class PercentileObserver(Observer):
    """Mean over samples of each sample's lower and upper percentile (default 99.99).

    Pooled per sample, not per batch, so the range does not depend on `batch_size` or on a
    short last batch: every sample weighs the same, and the running sums are added one
    sample at a time in float64, so any batching gives the same bits. The first dimension is
    the sample (batch) dimension; a 1-D tensor is one sample."""

    def __init__(self, fmt, where, percentile: float = 99.99, **options):
        super().__init__(fmt, where)
        self.percentile = percentile

    def reset(self) -> None:
        super().reset()
        self.samples = 0
        self.lo_sum = self.hi_sum = None

    def batch_range(self, x):
        rows = x.float().reshape(x.shape[0] if x.ndim > 1 else 1, -1)
        n = rows.shape[1]
        k_hi = max(1, min(n, round(n * self.percentile / 100)))
        k_lo = max(1, n - k_hi + 1)
        return rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values

    def update(self, lo, hi):
        if self.lo_sum is None:
            self.lo_sum = self.hi_sum = torch.zeros((), dtype=torch.float64)
        for sample_lo, sample_hi in zip(lo.double(), hi.double()):
            self.lo_sum, self.hi_sum = self.lo_sum + sample_lo, self.hi_sum + sample_hi
            self.samples += 1
        self.lo, self.hi = (self.lo_sum / self.samples).float(), (self.hi_sum / self.samples).float()


class RowSample:
    """An evenly spaced sample of the rows seen: every `stride`-th row, the stride doubling (and
    every other kept row dropped) whenever more than 2 * max_rows are kept, so that between
    max_rows and 2 * max_rows remain, spread over all the data, in bounded memory."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.kept: list[torch.Tensor] = []
        self.stride, self.seen = 1, 0

    def add(self, flat: torch.Tensor) -> None:
        """Take in the rows of `flat` ([rows, channels], float32)."""
        self.kept.append(flat[(-self.seen) % self.stride::self.stride].clone())
        self.seen += flat.shape[0]
        if sum(t.shape[0] for t in self.kept) > 2 * self.max_rows:
            self.kept, self.stride = [torch.cat(self.kept)[::2]], self.stride * 2

    def rows(self, n: int) -> torch.Tensor:
        """About n rows, evenly spaced over everything seen."""
        kept = torch.cat(self.kept)
        return kept[::max(1, kept.shape[0] // n)]


class HistogramRecorder(Observer):
    """A histogram of every value seen (HISTOGRAM_BINS bins over the running min-max range,
    re-binned when a batch widens it), and the quantization error of a range over it."""

    HISTOGRAM_BINS = 2048

    def reset(self) -> None:
        super().reset()
        self.counts: torch.Tensor | None = None  # over [self.lo, self.hi]

    def observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        new_lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        new_hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        counts = torch.histc(x.float(), self.HISTOGRAM_BINS, float(new_lo), float(new_hi)).double()
        if self.counts is not None:  # move the old counts to the bins their centres fall in now
            counts += self._rebinned(new_lo, new_hi)
        self.lo, self.hi, self.counts = new_lo, new_hi, counts

    def _centres(self, lo, hi) -> torch.Tensor:
        edges = torch.linspace(float(lo), float(hi), self.HISTOGRAM_BINS + 1, dtype=torch.float64)
        return (edges[:-1] + edges[1:]) / 2

    def _rebinned(self, lo, hi) -> torch.Tensor:
        width = max(float(hi) - float(lo), 1e-30) / self.HISTOGRAM_BINS
        index = ((self._centres(self.lo, self.hi) - float(lo)) / width).long().clamp(0, self.HISTOGRAM_BINS - 1)
        return torch.zeros(self.HISTOGRAM_BINS, dtype=torch.float64).index_add_(0, index, self.counts)

    def cost(self, centres: torch.Tensor, lo, hi) -> float:
        """The squared quantization error of everything seen, with the range lo..hi."""
        scale, zero_point = numerics.qparams_from_range(lo, hi, self.fmt)
        error = (numerics.fake_quantize(centres, scale, zero_point, self.fmt.dtype) - centres).double().square()
        return float((error * self.counts).sum())


class MseObserver(HistogramRecorder):
    """The min-max range shrunk by the ratio of numerics.MSE_CLIP_RATIOS that costs least.

    Where linears read the tensor (convert passes their weights as `readers`), the cost is
    their output error, ||Q(X) W^T - X W^T||², on an evenly spaced sample of OUTPUT_ROWS rows of
    the calibration data: a channel that the readers weigh heavily keeps its range, and errors
    that cancel in the product cost nothing, where the plain error of X would clip them alike.
    Elsewhere the cost is the quantization error of everything seen, on the histogram. Either
    way an outlier costs its clipping error instead of every other value's resolution."""

    OUTPUT_ROWS = 256
    reads_readers = True
    # The output search tries every COARSE_STEP-th ratio, then the ratios between the best one's
    # neighbours: a fifth of the products of trying them all.
    COARSE_STEP = 5

    def reset(self) -> None:
        super().reset()
        self.sample = RowSample(self.OUTPUT_ROWS)

    def observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        super().observe(x, lo, hi)
        self.sample.add(x.reshape(-1, x.shape[-1]).float())

    def range(self, readers: torch.Tensor | None = None):
        lo, hi = super().range()
        if readers is None:
            centres = self._centres(lo, hi).float()
            return self._shrunk(lo, hi, self._least_costly(range(len(numerics.MSE_CLIP_RATIOS)),
                                                           lambda r: self.cost(centres, lo * r, hi * r)))
        x = self.sample.rows(self.OUTPUT_ROWS)
        w = readers.float()
        reference = x @ w.T

        def output_cost(ratio: float) -> float:
            scale, zero_point = numerics.qparams_from_range(lo * ratio, hi * ratio, self.fmt)
            return float((numerics.fake_quantize(x, scale, zero_point, self.fmt.dtype) @ w.T - reference).square().sum())

        count = len(numerics.MSE_CLIP_RATIOS)
        coarse = self._least_costly(range(0, count, self.COARSE_STEP), output_cost)
        return self._shrunk(lo, hi, self._least_costly(
            range(max(0, coarse - self.COARSE_STEP + 1), min(count, coarse + self.COARSE_STEP)), output_cost))

    @staticmethod
    def _least_costly(indices, cost) -> int:
        """The index (into numerics.MSE_CLIP_RATIOS) of the least costly ratio; larger ratios win ties."""
        costs = [(cost(numerics.MSE_CLIP_RATIOS[i]), i) for i in indices]
        return min(costs)[1]

    @staticmethod
    def _shrunk(lo, hi, index: int):
        ratio = numerics.MSE_CLIP_RATIOS[index]
        return lo * ratio, hi * ratio


class HistogramObserver(HistogramRecorder):
    """torch's HistogramObserver search on the histogram: the range's ends move inwards
    bin by bin, each step taking the end whose move drops less of the data (a quantile step of
    QUANTILE_STEP), for as long as the quantization error does not grow. Unlike mse's one
    shrink ratio, each end finds its own place: a one-sided outlier is clipped on its side only
    (which an asymmetric format turns into resolution; a symmetric one only gains where the
    larger end moves)."""

    QUANTILE_STEP = 1e-4

    def range(self, readers: torch.Tensor | None = None):
        lo, hi = super().range()
        centres = self._centres(lo, hi).float()
        edges = torch.linspace(float(lo), float(hi), self.HISTOGRAM_BINS + 1)
        cdf = self.counts.cumsum(0) / self.counts.sum().clamp_min(1e-30)
        start, end = 0, self.HISTOGRAM_BINS - 1  # the range is edges[start] .. edges[end + 1]
        alpha, beta = 0.0, 1.0  # the quantiles dropped below and kept below
        best = self.cost(centres, lo, hi)
        while alpha < beta:
            left = min(int(torch.searchsorted(cdf, alpha + self.QUANTILE_STEP)), end)
            right = max(int(torch.searchsorted(cdf, beta - self.QUANTILE_STEP, right=True)) - 1, start)
            new_start, new_end = start, end
            if left - start > end - right:
                new_end, beta = right, beta - self.QUANTILE_STEP
            else:
                new_start, alpha = left, alpha + self.QUANTILE_STEP
            if (new_start, new_end) == (start, end):
                continue
            cost = self.cost(centres, edges[new_start], edges[new_end + 1])
            if cost > best:
                break
            best, start, end = cost, new_start, new_end
        return edges[start].clone(), edges[end + 1].clone()


OBSERVERS: dict[ObserverKind, type[Observer]] = {
    ObserverKind.minmax: MinMaxObserver,
    ObserverKind.moving_average: MovingAverageObserver,
    ObserverKind.percentile: PercentileObserver,
    ObserverKind.mse: MseObserver,
    ObserverKind.histogram: HistogramObserver,
}


def make_observer(fmt: TensorFormat, where: str, **options) -> Observer:
    """An observer of `fmt.observer`'s kind; `options` are the observe pass's (each kind takes its own)."""
    try:
        cls = OBSERVERS[fmt.observer]
    except KeyError:
        raise CalibrationError(f"observer '{fmt.observer.value}' is not available yet at {where}",
                               hint=f"use one of {', '.join(k.value for k in OBSERVERS)}") from None
    return cls(fmt, where, **options)
