"""Observers: identity modules that record the range of the activation flowing through them.

They are static per-tensor range estimators for activations (weights are static and get
their ranges straight from the tensor at convert time). A non-finite range stops the build
with the layer and the batch that produced it.
"""
from __future__ import annotations

import torch

from qfx.runtime.errors import CalibrationError
from qfx.runtime.formats import ObserverKind, TensorFormat


class Observer(torch.nn.Module):
    _is_impure = True  # it records state, so dead-code elimination must keep it (torch.fx reads this)

    def __init__(self, fmt: TensorFormat, where: str, **options):
        super().__init__()
        self.fmt, self.where = fmt, where
        self.batches = 0
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            lo, hi = self.batch_range(x.detach())
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                raise CalibrationError(
                    f"calibration batch {self.batches} produced NaN or Inf at {self.where}",
                    hint="check the calibration data and the model in float first; a layer that "
                         "overflows in fp16/bf16 often needs fp32 for calibration")
            self.update(lo.float(), hi.float())
            self.batches += 1
        return x

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.aminmax(x)

    def update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise CalibrationError(f"no calibration data reached {self.where}",
                                   hint="the layer is not on the path of the calibration inputs; "
                                        "exclude it or switch its activation quantization off")
        return self.lo, self.hi

    def extra_repr(self) -> str:
        return f"{self.where}, {self.fmt.describe()}"


class MinMaxObserver(Observer):
    pass


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
    """Mean over batches of each batch's lower and upper percentile (default 99.99)."""

    def __init__(self, fmt, where, percentile: float = 99.99, **options):
        super().__init__(fmt, where)
        self.percentile = percentile

    def batch_range(self, x):
        flat = x.float().flatten()
        n = flat.numel()
        k_hi = max(1, min(n, round(n * self.percentile / 100)))
        k_lo = max(1, n - k_hi + 1)
        return flat.kthvalue(k_lo).values, flat.kthvalue(k_hi).values

    def update(self, lo, hi):
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            n = self.batches
            self.lo, self.hi = (self.lo * n + lo) / (n + 1), (self.hi * n + hi) / (n + 1)


OBSERVERS: dict[ObserverKind, type[Observer]] = {
    ObserverKind.minmax: MinMaxObserver,
    ObserverKind.moving_average: MovingAverageObserver,
    ObserverKind.percentile: PercentileObserver,
}


def make_observer(fmt: TensorFormat, where: str, **options) -> Observer:
    """An observer of `fmt.observer`'s kind; `options` are the observe pass's (each kind takes its own)."""
    try:
        cls = OBSERVERS[fmt.observer]
    except KeyError:
        raise CalibrationError(f"observer '{fmt.observer.value}' is not available yet at {where}",
                               hint=f"use one of {', '.join(k.value for k in OBSERVERS)}") from None
    return cls(fmt, where, **options)
