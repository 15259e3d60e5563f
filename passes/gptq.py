"""gptq: quantize weights column by column, spreading each column's rounding error over the
columns not yet quantized so that the layer's output on the calibration data moves least
(GPTQ, Frantar et al. 2022): argmin ||W X - Q X|| column by column, through the inverse of
the input Hessian H = mean(X^T X).

- Static groups: each group's scale and zero point are RTN's (the format's observer, min-max
  or mse), computed from the float weight before any column changes. With `act_order` the
  columns are visited in order of decreasing H diagonal (the inputs that carry most energy
  first) while every column keeps its own group's parameters, so the stored layout is the
  plain grouped one: no permutation index, and every reader of grouped weights loads it.
- Damping: `damp` x mean(diag H) is added to the diagonal; a Hessian that is still not
  positive definite gets ten times more, up to DAMP_MAX, and the layer's record says so.
  Input channels that are zero on every row get H_jj = 1: their columns are rounded to
  nearest and spread no error.
- Hessians: X^T X of each HESSIAN_ROWS rows is a float32 product (each entry a sum over those
  rows, relative error <= rows x 2^-24 by the standard bound: 2.4e-4 for 4096 rows, below the
  1e-2 damping), and the products are summed in float64, so the bound does not grow with the
  calibration set. The mean is rounded to float32 once: the factorization runs in float32, as
  the reference GPTQ's does (the damping bounds the condition number).
- The layers are visited by the sequential engine (passes/sequential.py): with `sequential`,
  each layer's Hessian comes from the activations of the model whose earlier layers are
  already quantized. The same pass over the data calibrates the activation observers, unless
  a pass before it (smoothquant, calibrate) did.

The pass leaves the graph's float weights as they are (the build's float reference) and hands
each layer's codes and static qparams to convert through the context: one byte per weight
held until convert, not a float copy.
"""
from __future__ import annotations

import dataclasses

import torch

from qfx.passes.annotate import linear_nodes
from qfx.passes.base import Pass, PassContext, PassResult
from qfx.passes.dataflow import get_tensor
from qfx.passes.meta import get_quant
from qfx.passes.sequential import run_sequential
from qfx.passes.weight_algorithm import taken_and_left
from qfx.runtime.errors import PassFailure
from qfx.runtime.evaluate import relative_error
from qfx.runtime.formats import Granularity, TensorFormat
from qfx.runtime.memory import release_memory
from qfx.runtime.numerics import fake_quantize, quantize, weight_axis, weight_qparams

DAMP_MAX = 1.0
# Rows of each layer's input (evenly spaced over the calibration data) on which its output
# error is recorded: the error of a product needs far fewer rows than the Hessian does.
ERROR_ROWS = 128


# Rows per float32 product X^T X; the products are summed in float64 (see the module docstring).
HESSIAN_ROWS = 4096
# Column blocks of X^T X: only the blocks on and above the diagonal are multiplied.
GRAM_BLOCK = 256
# Columns per rank-1 sub-block inside a GPTQ block: the error of each sub-block reaches the rest
# of its block in one matrix product, where rank-1 updates over the whole block would stream it
# through memory once per column (measured: 20-25% less column-loop time at K = 1024 and 2816).
SUB_BLOCK = 32


def add_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """total += x^T x on total's upper block triangle (the blocks on and above the diagonal): two
    thirds of the full product's work, accumulated in place with no K x K temporary."""
    for i in range(0, x.shape[1], GRAM_BLOCK):
        total[i:i + GRAM_BLOCK, i:].addmm_(x[:, i:i + GRAM_BLOCK].T, x[:, i:])


def mirror_upper_blocks(t: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper block triangle `t` holds."""
    for i in range(0, t.shape[0], GRAM_BLOCK):
        t[i + GRAM_BLOCK:, i:i + GRAM_BLOCK] = t[i:i + GRAM_BLOCK, i + GRAM_BLOCK:].T
    return t


def accumulate_hessian(inputs: list[torch.Tensor]) -> torch.Tensor:
    """mean(X^T X) over all rows of all batches: float32 sums over chunks of at most HESSIAN_ROWS
    rows, the chunks summed in float64, the mean rounded to float32."""
    k = inputs[0].shape[-1]
    chunk, total, chunk_rows, rows = torch.zeros(k, k), None, 0, 0
    for x in inputs:
        for part in x.reshape(-1, k).float().split(HESSIAN_ROWS):
            if chunk_rows + part.shape[0] > HESSIAN_ROWS:
                total = chunk.double() if total is None else total.add_(chunk)
                chunk.zero_()
                chunk_rows = 0
            add_gram(chunk, part)
            chunk_rows, rows = chunk_rows + part.shape[0], rows + part.shape[0]
    if total is not None:
        chunk = total.add_(chunk).float()
    return mirror_upper_blocks(chunk.div_(max(rows, 1)))


def damping_steps(damp: float) -> list[float]:
    """The relative dampings tried in turn: the asked one, then tenfold steps up to DAMP_MAX."""
    steps, next_step = [damp], max(damp * 10, 0.01)
    while next_step <= DAMP_MAX * (1 + 1e-9):
        steps.append(next_step)
        next_step *= 10
    return steps


def invert_hessian(hessian: torch.Tensor, damp: float, act_order: bool, where: str) -> tuple:
    """(order, upper Cholesky factor of the damped inverse, damp used, dead channels).

    float32 like the reference GPTQ (the damping bounds the condition number), in place where it
    can be: for the MLP's wide input these are the pass's largest temporaries."""
    diagonal = hessian.diagonal().float()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    order = torch.argsort(diagonal, descending=True, stable=True) if act_order else None
    h = hessian.float().clone() if order is None else hessian[order[:, None], order].float()
    del hessian  # the caller's temporary: freed here when the caller holds no other reference
    h.diagonal().copy_(diagonal if order is None else diagonal[order])
    mean, added = float(h.diagonal().mean()), 0.0
    for tried in damping_steps(damp):
        h.diagonal().add_((tried - added) * mean)
        added = tried
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info):
            continue
        h = None  # at most two K x K matrices live from here on
        factor = torch.cholesky_inverse(lower)
        info = torch.linalg.cholesky_ex(factor, upper=True, out=(factor, torch.empty((), dtype=torch.int32)))[1]
        if int(info) == 0 and bool(torch.isfinite(factor.diagonal()).all()):
            return order, factor, tried, int(dead.sum())
        del factor
        h = lower @ lower.T  # the damped Hessian again, for the next step
    raise PassFailure(f"the Hessian of {where}'s input is not positive definite even with damping {DAMP_MAX} "
                      "(relative to its mean diagonal)",
                      hint="check that the calibration data reaches this layer with finite values, or keep the "
                           "layer out of gptq (weights that are not integer, or excluded, are rounded to nearest)")


@dataclasses.dataclass
class StaticGrid:
    """The static qparams of a (stacked) [out, in] weight, as the column loop reads them: row g
    of `scales` / `zeros` ([groups, out], float32) holds every output row's parameter in column
    group g, and `group_of[j]` is the group of input column j (0 without groups)."""

    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_of: list[int]


def static_grid(qparams: list[tuple[torch.Tensor, torch.Tensor | None]], rows: list[int], columns: int,
                fmt: TensorFormat) -> StaticGrid:
    """The grid of weights stacked along their rows, from each one's (scale, zero point)."""
    def by_row(t: torch.Tensor, n: int) -> torch.Tensor:  # -> [n, groups]
        return t.reshape(1, 1).expand(n, 1) if t.ndim == 0 else t.reshape(n, -1)

    def stack(tensors):
        return torch.cat([by_row(t, n) for t, n in zip(tensors, rows)]).float().T.contiguous()

    grouped = fmt.granularity is Granularity.per_group
    return StaticGrid(stack([s for s, _ in qparams]),
                      None if qparams[0][1] is None else stack([z for _, z in qparams]),
                      [j // fmt.group_size if grouped else 0 for j in range(columns)])


def gptq_columns(weights: list[torch.Tensor], factor: torch.Tensor, grid: StaticGrid, order: torch.Tensor | None,
                 fmt: TensorFormat, block_size: int) -> torch.Tensor:
    """The dequantized GPTQ weight of `weights` stacked along their rows ([out, in]), its columns
    visited in `order` (None: as they are; `factor` is in visiting order), each rounded on its
    own static grid.

    Works on the transpose, so that a column of w is a contiguous row: the rank-1 updates inside
    a block of columns then stream through memory, and the block's error reaches the columns
    after it in one matrix product. The working copy is built weight by weight and the result
    is written in the input's column order: no stacked copy and no permuted copy is made."""
    visit = list(range(weights[0].shape[1])) if order is None else order.tolist()
    wt = torch.cat([(w.T if order is None else w.T[order]).float() for w in weights], dim=1)
    out = torch.empty_like(wt)  # row j: input column j, whenever it is visited
    qmin, qmax = fmt.qmin, fmt.qmax
    k = wt.shape[0]
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = wt[start:end]
        errors = torch.empty_like(block)
        f = factor[start:end, start:end]
        for sub_start in range(0, end - start, SUB_BLOCK):
            sub_end = min(sub_start + SUB_BLOCK, end - start)
            for i in range(sub_start, sub_end):
                column, q, error = block[i], out[visit[start + i]], errors[i]
                group = grid.group_of[visit[start + i]]
                s = grid.scales[group]
                torch.div(column, s, out=q).round_()
                if grid.zeros is None:
                    q.clamp_(qmin, qmax).mul_(s)
                else:
                    z = grid.zeros[group]
                    q.add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)
                torch.sub(column, q, out=error).div_(f[i, i])
                block[i + 1:sub_end].addr_(f[i, i + 1:sub_end], error, alpha=-1)
            block[sub_end:].addmm_(f[sub_start:sub_end, sub_end:].T, errors[sub_start:sub_end], alpha=-1)
        wt[end:].addmm_(factor[start:end, end:].T, errors, alpha=-1)
    return out.T


def output_error(w: torch.Tensor, q: torch.Tensor, rows: torch.Tensor, reference: torch.Tensor | None = None) -> float:
    """||X (W - Q)^T|| / ||X W^T|| on the recorded rows (`reference`: X W^T, when already at hand)."""
    return relative_error(rows @ w.float().T if reference is None else reference, rows @ q.float().T)


def sample_rows(inputs: list[torch.Tensor], count: int) -> torch.Tensor:
    """`count` rows evenly spaced over all batches' rows (float32), gathered without joining them."""
    flat = [x.reshape(-1, x.shape[-1]) for x in inputs]
    starts = torch.tensor([0] + [f.shape[0] for f in flat]).cumsum(0)
    picked = torch.linspace(0, int(starts[-1]) - 1, min(count, int(starts[-1]))).long()
    batch_of = torch.searchsorted(starts[1:], picked, right=True)
    return torch.stack([flat[b][i - starts[b]] for b, i in zip(batch_of.tolist(), picked.tolist())]).float()


@dataclasses.dataclass(frozen=True)
class Gptq(Pass):
    name = "gptq"
    requires = frozenset({"annotated", "observed"})
    produces = frozenset({"calibrated", "weights_quantized"})
    conflicts = frozenset({"qdq", "weights_quantized"})

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    sequential: bool = True

    def __post_init__(self):
        if not 0 <= self.damp <= DAMP_MAX:
            raise ValueError(f"damp must be in [0, {DAMP_MAX}], got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")

    def run(self, gm, ctx: PassContext) -> PassResult:
        if ctx.calibration_batches is None:
            raise PassFailure("gptq needs calibration data, and this build has none")
        chosen, skipped = taken_and_left(gm, self.name)
        # Linears that read one input in one format (q/k/v, gate/up) share its Hessian and are
        # solved as one stacked weight: GPTQ treats the rows of a weight independently.
        siblings: dict[tuple, list[torch.fx.Node]] = {}
        for node in chosen:
            siblings.setdefault((node.args[0], get_quant(node).fmt.weight), []).append(node)
        solved: dict[torch.fx.Node, torch.Tensor] = {}
        records: dict[str, dict] = {}
        # Layers a rule keeps at round-to-nearest run rounded too, so that what follows them sees
        # the activations it will see at inference.
        rounded = [n for n in linear_nodes(gm) if self.sequential and (quant := get_quant(n)) is not None
                   and quant.algorithm == "rtn" and quant.module in skipped]

        def solve(linear: torch.fx.Node, inputs: list[torch.Tensor]) -> torch.Tensor:
            if linear in rounded:
                fmt = get_quant(linear).fmt.weight
                w = get_tensor(gm, linear.args[1].target).detach()
                return fake_quantize(w, *weight_qparams(w, fmt), fmt.dtype, weight_axis(fmt), fmt.group_size).to(w.dtype)
            if linear not in solved:
                group = siblings[(linear.args[0], get_quant(linear).fmt.weight)]
                solved.update(self.solve_group(gm, group, inputs, ctx, records))
            return solved.pop(linear)

        # Unless an earlier pass calibrated the observers, this pass over the data does.
        run_sequential(gm, list(ctx.calibration_batches()), chosen + rounded, solve, sequential=self.sequential,
                       calibrate="calibrated" not in ctx.facts, root_prefix=ctx.root_prefix, desc="gptq")
        return PassResult(gm, modified=bool(chosen), stats={"layers": records, "rounded_to_nearest": skipped})

    def solve_group(self, gm, group: list[torch.fx.Node], inputs: list[torch.Tensor], ctx: PassContext,
                    records: dict) -> dict[torch.fx.Node, torch.Tensor]:
        """Quantize the linears of `group` (one input, one weight format): their codes go to the
        context for convert, their records to `records`. Returns the dequantized weights, which
        the layers run with for the rest of the pass."""
        names = [get_quant(n).module for n in group]
        fmt = get_quant(group[0]).fmt.weight
        order, factor, damp, dead = invert_hessian(accumulate_hessian(inputs), self.damp, self.act_order,
                                                   " and ".join(names))
        release_memory()  # the Hessian's K x K temporaries, before the column loop's
        rows = sample_rows(inputs, ERROR_ROWS)
        weights = [get_tensor(gm, n.args[1].target).detach() for n in group]
        qparams = [weight_qparams(w, fmt) for w in weights]  # static groups: fixed before any column moves
        sizes = [w.shape[0] for w in weights]
        grid = static_grid(qparams, sizes, weights[0].shape[1], fmt)
        references = [rows @ w.float().T for w in weights]
        rtn_errors = [output_error(w, fake_quantize(w, *p, fmt.dtype, weight_axis(fmt), fmt.group_size), rows, ref)
                      for w, p, ref in zip(weights, qparams, references)]
        q = gptq_columns(weights, factor, grid, order, fmt, self.block_size)
        new = {}
        for node, name, w, params, q_rows, rtn_error, ref in zip(group, names, weights, qparams, q.split(sizes),
                                                                 rtn_errors, references):
            records[name] = {"name": self.name, "options": self.options(), "damp": damp, "dead_inputs": dead,
                             "output_error": {"rtn": round(rtn_error, 6),
                                              "gptq": round(output_error(w, q_rows, rows, ref), 6)}}
            codes = quantize(q_rows, *params, fmt.dtype, weight_axis(fmt), fmt.group_size)
            ctx.keep_codes(name, codes, *params, fmt.dtype)
            new[node] = q_rows.to(w.dtype)
        return new
