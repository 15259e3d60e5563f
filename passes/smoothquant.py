"""smoothquant: move activation outliers into the weights, folded exactly (SmoothQuant).

For each fold group the dataflow proves (passes/dataflow.py), channel c gets
s_c = max|X_c|^α / max|W_c|^(1-α): the producer's channel c is divided by s_c and the
consumers' matching input columns multiplied by it, so the float model is unchanged while
the activations the quantizer sees lose their outliers. With `alpha=auto` each group takes
the α of a grid that minimizes its consumers' quantized output error on rows sampled from
the calibration data (the layer's own formats); a group no α improves stays as it was.

With `explicit_multiply`, the quantized inputs no group reaches (a post-LN LayerNorm that also
feeds a residual, an activation between two linears) form groups of their own whose "producer"
is an explicit multiply by 1/s inserted before their observer (passes/fold.py): searched and
recorded the same way, run at inference from each layer's stored `pre_quant_scale`.

It runs after `observe` and is the calibration: one pass over the data feeds the observers
and per-channel statistics of every group input. A min-max observer's range after the fold
follows exactly from those statistics (min_j lo_j / s_j, max_j hi_j / s_j); observers whose
range does not (percentile, moving average) make every observer see the data a second time.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import torch

from qfx.lowering.emit import nodes_reaching_output
from qfx.passes.annotate import LINEAR, linear_nodes
from qfx.passes.base import Pass, PassContext, PassResult
from qfx.passes.dataflow import FoldGroup, Unfoldable, concrete_values, find_fold_groups, get_tensor
from qfx.passes.fold import MULTIPLY, apply_fold, column_scales, multiply_group, shared_tensors
from qfx.passes.meta import copy_meta, get_quant, module_path
from qfx.passes.observe import observer_name
from qfx.passes.observers import RowSample
from qfx.runtime.errors import PassFailure
from qfx.runtime.formats import TensorFormat
from qfx.runtime.numerics import (
    fake_quantize,
    fake_quantize_dynamic,
    qparams_from_range,
    sqnr_db,
    sum_squares,
    weight_axis,
    weight_qparams,
)

# α search: the coarse grid, then the two points halfway to the best one's neighbours.
ALPHA_COARSE = (0.15, 0.35, 0.55, 0.75, 0.95)
ALPHA_STEP = 0.1
# Smoothing factors are kept within these bounds: a channel that is ~0 in X or W would
# otherwise get a factor that overflows its partner.
S_MIN, S_MAX = 1e-5, 1e5


class ChannelStats(torch.nn.Module):
    """Per-channel min, max and mean |x| of the activation flowing through, and an evenly spaced
    sample of its rows (between `rows` and 2 * rows once that many passed): what the α search
    runs the group's linears on."""

    _is_impure = True  # torch.fx keeps it through dead-code elimination

    def __init__(self, rows: int):
        super().__init__()
        self.lo = self.hi = self.abs_sum = None
        self.sample = RowSample(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            lo, hi = torch.aminmax(flat, dim=0)
            self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
            self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
            abs_sum = flat.abs().sum(0, dtype=torch.float64)
            self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
            self.sample.add(flat)
        return x

    def abs_mean(self) -> torch.Tensor:
        """mean |X| per channel (float64), over every row seen."""
        return self.abs_sum / max(self.sample.seen, 1)

    def rows(self, n: int) -> torch.Tensor:
        """About n rows, evenly spaced over everything seen."""
        return self.sample.rows(n)


@dataclasses.dataclass(frozen=True)
class SmoothQuant(Pass):
    name = "smoothquant"
    requires = frozenset({"annotated", "observed"})
    produces = frozenset({"smoothed", "calibrated"})
    conflicts = frozenset({"weights_quantized"})  # a weight algorithm chose codes for the unsmoothed weights
    alpha: str = "auto"  # a number in (0, 1), or auto: searched per group
    rows: int = 256  # activation rows per group input kept for the α search
    # Where no producer can absorb the factors (a LayerNorm that also feeds a residual, an
    # activation between two linears): multiply the quantized input by 1/s explicitly, a
    # `pre_quant_scale` per layer that the artifact's runtime must apply.
    explicit_multiply: bool = False

    def __post_init__(self):
        if self.alpha != "auto":
            try:
                value = float(self.alpha)
            except ValueError:
                raise ValueError(f"alpha takes a number in (0, 1) or auto, got {self.alpha!r}") from None
            if not 0 < value < 1:
                raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.rows < 1:
            raise ValueError(f"rows must be at least 1, got {self.rows}")

    def reads(self, linear: torch.fx.Node) -> bool:
        """Whether this pass smooths for `linear`: SmoothQuant for a quantized input."""
        return _input_format(linear) is not None

    def run(self, gm, ctx: PassContext) -> PassResult:
        records, not_folded, stale, _, _ = self.smooth_groups(gm, ctx, [])
        return PassResult(gm, modified=any(r["alpha"] is not None for r in records),
                          stats={"groups": records, "not_folded": not_folded, "observers_recalibrated": stale})

    def smooth_groups(self, gm, ctx: PassContext, also_record: list[torch.fx.Node]) -> tuple:
        """Search and fold every group; run the data once (plus once more if some observer's range
        cannot follow from the statistics). Returns the groups' records, the linears left
        unsmoothed, the number of observers recalibrated, the statistics of every group input and
        of the inputs of `also_record`, and each smoothed linear's column factors."""
        if ctx.run_data is None or ctx.example is None:
            raise PassFailure(f"{self.name} needs the calibration data and an example input in the pass context")
        groups, refused = find_fold_groups(gm, ctx.example, concrete_values(gm, ctx.example))
        chosen, skipped = [], []
        for group in groups:
            if not any(self.reads(c) for c in group.consumers):
                continue  # nothing quantizes what this group would smooth
            if reason := _cannot_edit(gm, group):
                skipped.append(Unfoldable(group.producer, group.consumers, reason))
                continue
            chosen.append(group)
        if self.explicit_multiply:
            multiplied, unmultiplied = _multiply_groups(gm, chosen, self.reads)
            chosen, skipped = chosen + multiplied, skipped + unmultiplied
        observers = [gm.get_submodule(n.target) for n in gm.graph.nodes if observer_name(n)]
        for observer in observers:  # whatever they saw before is replaced by this pass's data
            observer.reset()
        stats = _collect(gm, ctx, [c.args[0] for g in chosen for c in g.consumers] +
                         [n.args[0] for n in also_record], self.rows)
        from tqdm import tqdm

        records, stale, factors = [], [], {}
        for group in tqdm(chosen, desc=f"{self.name} search", unit="group", disable=not sys.stderr.isatty(), leave=False):
            record, scales = self._smooth(gm, group, stats, ctx.root_prefix)
            records.append(record)
            if scales is not None:
                stale += _rescale_observers(gm, group, scales, stats)
                factors.update(zip(group.consumers, column_scales(group, scales)))
        gm.recompile()
        if stale:  # some range follows from no statistic: every observer sees the smoothed data once
            for observer in observers:
                observer.reset()
            ctx.run_data(gm)
        not_folded = _not_folded(gm, chosen, refused + skipped, ctx.root_prefix, self.reads)
        return records, not_folded, len(stale), stats, factors

    def factors(self, alpha: float, x_max: torch.Tensor, w_max: torch.Tensor, x_mean: torch.Tensor) -> torch.Tensor:
        """Each producer channel's factor for `alpha` (float64): s = max|X|^α / max|W|^(1-α)."""
        return x_max.clamp(min=S_MIN) ** alpha / w_max.clamp(min=S_MIN) ** (1 - alpha)

    def search(self, evaluate: Callable[[float], float]) -> None:
        """Evaluate the α candidates: the coarse grid, then halfway to the best one's neighbours
        (or the one fixed α)."""
        if self.alpha != "auto":
            evaluate(float(self.alpha))
            return
        best = min(ALPHA_COARSE, key=evaluate)
        for a in (round(best - ALPHA_STEP, 2), round(best + ALPHA_STEP, 2)):
            if 0 < a < 1:
                evaluate(a)

    def _smooth(self, gm, group: FoldGroup, stats: dict, prefix: str) -> tuple[dict, torch.Tensor | None]:
        inputs = [stats[c.args[0]] for c in group.consumers]
        weights = [get_tensor(gm, c.args[1].target).detach().float() for c in group.consumers]
        x_max, w_max, x_mean = _channel_stats(group, inputs, weights)
        consumers = [_Consumer(c, stat, w, self.rows) for c, stat, w in zip(group.consumers, inputs, weights)]
        usable = group.foldable & (x_max > 0) & (w_max > 0)

        def scales(alpha: float) -> torch.Tensor:
            s = self.factors(alpha, x_max, w_max, x_mean).clamp(S_MIN, S_MAX)
            return torch.where(usable, s, torch.ones((), dtype=torch.float64))

        errors: dict = {}

        def evaluate(a: float | None) -> float:
            errors[a] = _group_errors(group, consumers, torch.ones_like(x_max) if a is None else scales(a), a)
            best = min((b for b in errors if b is not None), key=lambda b: _group_error(errors[b]), default=None)
            for c in consumers:  # the weight SQNR is reported for these two only
                c.keep({None, best})
            return _group_error(errors[a])

        evaluate(None)
        self.search(evaluate)
        alpha = min((a for a in errors if a is not None), key=lambda a: _group_error(errors[a]))
        if self.alpha == "auto" and _group_error(errors[alpha]) >= _group_error(errors[None]):
            alpha = None  # no α helps this group: leave it as it is
        chosen = torch.ones_like(x_max) if alpha is None else scales(alpha)
        if alpha is not None:
            apply_fold(gm, group, chosen)
        sqnr = {a: [c.weight_sqnr(a) for c in consumers] for a in (None, alpha)}
        layers = {module_path(c.node, prefix): {
            "error": [round(errors[a][i], 6) for a in (None, alpha)],
            "weight_sqnr_db": [_round(sqnr[a][i]) for a in (None, alpha)]} for i, c in enumerate(consumers)}
        record = {"producer": _describe_producer(group.producer, prefix), "kind": group.producer.kind,
                  "consumers": list(layers), "channels": [int(group.foldable.sum()), group.producer.channels],
                  "alpha": alpha, "error_before": round(_group_error(errors[None]), 6),
                  "error_after": round(_group_error(errors[alpha]), 6), "layers": layers,
                  # per producer channel, for the report's picture (not kept in the manifest)
                  "channel_max": [x_max.tolist(), (x_max / chosen).tolist()]}
        return record, None if alpha is None else chosen


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _cannot_edit(gm, group: FoldGroup) -> str | None:
    if shared := shared_tensors(gm, group):
        return f"{', '.join(shared)} is also read elsewhere (tied weights)"
    producer = group.producer.node
    quant = get_quant(producer) if group.producer.kind == "linear" else None
    if quant is not None and quant.fmt.output is not None:
        return "its output is quantized (KV cache), and the fold would change that range"
    return None


def _multiply_groups(gm, folded: list[FoldGroup], reads: Callable[[torch.fx.Node], bool]
                     ) -> tuple[list[FoldGroup], list[Unfoldable]]:
    """One explicit-multiply group per input that quantized linears no fold group reaches read
    (q/k/v of a post-LN block share theirs), and the inputs left alone with the reason."""
    covered = {c for g in folded for c in g.consumers}
    live = nodes_reaching_output(gm)
    feeds: dict[torch.fx.Node, list] = {}
    for node in linear_nodes(gm):
        if reads(node) and node not in covered:
            feeds.setdefault(node.args[0], []).append(node)
    groups, skipped = [], []
    for feed, consumers in feeds.items():
        group = multiply_group(feed, tuple(consumers), int(feed.meta["val"].shape[-1]))
        if not live.issuperset(consumers):
            # A BERT pooler under last_hidden_state: the frozen graph drops it, so no artifact
            # could record its multiply.
            reason = "the model's output does not depend on it"
        elif observer_name(feed) and set(feed.users) != set(consumers):
            reason = "its observer also feeds layers that a fold covers"
        elif shared := shared_tensors(gm, group):
            reason = f"{', '.join(shared)} is also read elsewhere (tied weights)"
        else:
            groups.append(group)
            continue
        skipped.append(Unfoldable(group.producer, group.consumers, reason))
    return groups, skipped


def _rescale_observers(gm, group: FoldGroup, s: torch.Tensor, stats: dict) -> list:
    """Set the range of each min-max observer on a group input from its channel statistics
    divided by the fold's factors; return the observers that need the data again."""
    stale = []
    for consumer, t in zip(group.consumers, column_scales(group, s)):
        source = consumer.args[0]
        if not observer_name(source):
            continue
        observer = gm.get_submodule(source.target)
        if not observer.channelwise_exact:
            stale.append(observer)
            continue
        stat = stats[source]
        observer.lo, observer.hi = (stat.lo.double() / t).min().float(), (stat.hi.double() / t).max().float()
    return stale


def _input_format(linear) -> TensorFormat | None:
    quant = get_quant(linear)
    return quant.fmt.input if quant is not None else None


def _collect(gm, ctx: PassContext, inputs: list[torch.fx.Node], rows: int) -> dict:
    """Run the calibration data once, with a ChannelStats on each of `inputs` (linears' inputs)."""
    recorders: dict = {}
    sources = dict.fromkeys(inputs)  # before any insertion
    for source in sources:
        consumer = next(u for u in source.users if u.target is LINEAR)
        name = f"qfx_channel_stats_{len(recorders)}"
        gm.add_submodule(name, ChannelStats(rows))
        with gm.graph.inserting_after(source):
            node = gm.graph.call_module(name, (source,))
        copy_meta(node, consumer, "statistics", source.meta.get("val"))
        source.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
        recorders[source] = node
    gm.recompile()
    ctx.run_data(gm)  # also the observers' calibration, so it runs even without a group
    found = {}
    for source, node in recorders.items():
        found[source] = gm.get_submodule(node.target)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.recompile()
    return found


def _channel_stats(group: FoldGroup, inputs: list[ChannelStats], weights: list[torch.Tensor]):
    """max|X|, max|W| and mean|X| per producer channel, over every consumer column that carries it."""
    x_max = torch.zeros(group.producer.channels, dtype=torch.float64)
    w_max, x_mean = torch.zeros_like(x_max), torch.zeros_like(x_max)
    for m, stat, w in zip(group.maps, inputs, weights):
        cols = m >= 0
        x_col = torch.maximum(-stat.lo, stat.hi).double()
        x_max.scatter_reduce_(0, m[cols], x_col[cols], "amax")
        w_max.scatter_reduce_(0, m[cols], w.abs().amax(dim=0).double()[cols], "amax")
        x_mean.scatter_reduce_(0, m[cols], stat.abs_mean()[cols], "amax")
    return x_max, w_max, x_mean


class _Consumer:
    """A consumer's sampled input rows, weight, float output and formats, for the α search."""

    def __init__(self, node, stat: ChannelStats, weight: torch.Tensor, rows: int):
        quant = get_quant(node)
        self.node = node
        self.x, self.w = stat.rows(rows), weight.float()
        self.lo, self.hi = stat.lo.double(), stat.hi.double()
        self.ref = self.x @ self.w.T
        self.energy = sum_squares(self.ref)
        self.fmt_in = quant.fmt.input if quant else None
        self.fmt_w = quant.fmt.weight if quant else None
        self._weights: dict = {}  # α -> (weight with its column factors, fake-quantized)

    def error(self, t: torch.Tensor, key) -> float:
        """With column factors t (those of α `key`): the quantized output's error relative to the
        float output."""
        xq = _fake_quant_input(self.x / t.float(), (self.lo / t).min(), (self.hi / t).max(), self.fmt_in)
        w = self.w * t.float()
        wq = _fake_quant_weight(w, self.fmt_w)
        self._weights[key] = (w, wq)
        return sum_squares(xq @ wq.T - self.ref) / max(self.energy, 1e-30)

    def keep(self, keys: set) -> None:
        """Drop the weights of every α tried but those in `keys` (the baseline and the best so
        far, whose SQNR is reported): keeping all would take that many copies of memory."""
        self._weights = {k: v for k, v in self._weights.items() if k in keys}

    def weight_sqnr(self, key) -> float | None:
        """The SQNR of the weight with α `key`'s factors (None when the weight stays float)."""
        return None if self.fmt_w is None else sqnr_db(*self._weights[key])


def _group_errors(group: FoldGroup, consumers: list[_Consumer], s: torch.Tensor, key) -> list[float]:
    return [c.error(t, key) for c, t in zip(consumers, column_scales(group, s))]


def _group_error(errors: list[float]) -> float:
    """The mean over consumers of each one's quantized output error relative to its float output.

    Each consumer counts alike: weighting by output energy would let q and k outvote v in an
    attention group, while v's error is the one that reaches the next layer unattenuated."""
    return sum(errors) / len(errors)


def _fake_quant_input(x, lo, hi, fmt: TensorFormat | None) -> torch.Tensor:
    if fmt is None:
        return x
    if fmt.dynamic:
        return fake_quantize_dynamic(x, fmt)
    scale, zero_point = qparams_from_range(lo, hi, fmt)  # static per tensor, as a min-max observer
    return fake_quantize(x, scale, zero_point, fmt.dtype)


def _fake_quant_weight(w, fmt: TensorFormat | None) -> torch.Tensor:
    if fmt is None:
        return w
    scale, zero_point = weight_qparams(w, fmt)
    return fake_quantize(w, scale, zero_point, fmt.dtype, weight_axis(fmt), fmt.group_size)


def _describe_producer(producer, prefix: str) -> str:
    if producer.kind == MULTIPLY:
        return "explicit multiply"
    if producer.kind == "vector":
        return producer.params[0].removeprefix(prefix)
    return module_path(producer.node, prefix) or producer.node.name


def _not_folded(gm, chosen: list[FoldGroup], refused: list[Unfoldable], prefix: str,
                reads: Callable[[torch.fx.Node], bool]) -> list[dict]:
    """Linears the pass would smooth for that no group smooths, with the reason found for each."""
    covered = {c for g in chosen for c in g.consumers}
    reasons = {}
    for r in refused:
        for c in r.consumers:
            reasons[c] = (f"no explicit multiply: {r.reason}" if r.producer.kind == MULTIPLY
                          else reasons.get(c, f"{_describe_producer(r.producer, prefix)} cannot fold: {r.reason}"))
    out = []
    for node in linear_nodes(gm):
        if reads(node) and node not in covered:
            out.append({"layer": module_path(node, prefix),
                        "reason": reasons.get(node, "no producer scales its input channels exactly (a "
                                                    "nonlinearity or a sum lies between them)")})
    return out
