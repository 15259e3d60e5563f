"""Orthogonal matrices for rotations: Hadamard matrices of the sizes transformers use, and
seeded random orthogonal ones.

A Hadamard matrix of order n exists for n = 1, 2 and (conjecturally) every multiple of 4, but
no single construction gives them all. Layer widths are almost always 2^k · m with m small,
so order m comes from Paley's constructions (m = q + 1 for a prime q ≡ 3 mod 4: 12, 20, 24,
44, ...; m = 2(q + 1) for a prime q ≡ 1 mod 4: 12, 28, 36, ...) and the power of two from
Sylvester's doubling. Orders reachable neither way get a clear error naming `kind: random`.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

KINDS = ("hadamard", "random")


class NoHadamardError(ValueError):
    """No construction here gives a Hadamard matrix of this order."""


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = the Legendre symbol of (j - i) mod q, for a prime q."""
    squares = torch.zeros(q, dtype=torch.float64)
    squares[torch.tensor(sorted({(x * x) % q for x in range(1, q)}))] = 1
    chi = 2 * squares - 1
    chi[0] = 0
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def _paley(m: int) -> torch.Tensor | None:
    """An unnormalized Hadamard matrix of order m from Paley's constructions, or None."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: H = I + S, S the skew conference matrix
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II: C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


SYLVESTER_FACTOR = 64  # the power-of-two part is applied as Kronecker factors of at most this order


@functools.lru_cache(maxsize=32)
def hadamard_factors(n: int) -> tuple[torch.Tensor, ...]:
    """Unnormalized Hadamard matrices whose Kronecker product is one of order n: a Paley
    matrix of order m (if m > 1) and Sylvester matrices of the power of two, n = m · 2^k.
    Applying them one axis at a time costs n · (sum of their orders) instead of n²."""
    power = 1
    while n % (2 * power) == 0:
        power *= 2
    # Try the largest power of two first, then move factors of two into m.
    while power >= 1:
        m = n // power
        base = None if m == 1 else _paley(m)
        if m == 1 or base is not None:
            factors = [] if base is None else [base]
            while power > 1:
                order = min(power, SYLVESTER_FACTOR)
                factors.append(_sylvester(order))
                power //= order
            return tuple(factors) or (torch.ones(1, 1, dtype=torch.float64),)
        power //= 2
    raise NoHadamardError(f"no Hadamard matrix of order {n} is built here (orders 2^k · m with m = 1 or "
                          "a Paley order: 12, 20, 24, 28, 36, 44, ...)")


def _sylvester(order: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h


def _hadamard(n: int) -> torch.Tensor:
    """An unnormalized Hadamard matrix (entries ±1, H Hᵀ = n I) of order n."""
    return functools.reduce(torch.kron, hadamard_factors(n))


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ H / sqrt(n) over the last dimension, H = _hadamard(n), one Kronecker factor at a time.

    Each factor contracts one axis of x viewed as (-1, order, rest): the sequence the ONNX
    emitter writes (Reshape, Transpose, MatMul, Transpose), so both compute the same sums."""
    n = x.shape[-1]
    y = x
    rest = n
    for f in hadamard_factors(n):
        order = f.shape[0]
        rest //= order
        # one GEMM over every (row, rest) pair: many small batched products are far slower
        y = (y.reshape(-1, order, rest).transpose(1, 2).reshape(-1, order) @ f.to(x.device, x.dtype))
        y = y.reshape(-1, rest, order).transpose(1, 2)
    return y.reshape(x.shape) * (1.0 / n ** 0.5)


@dataclasses.dataclass(frozen=True)
class Orthogonal:
    """An n × n orthogonal matrix Q: diag(signs) · H / sqrt(n) for a Hadamard H (applied one
    Kronecker factor at a time, n · Σ orders operations a row instead of n²), or a dense one."""

    n: int
    signs: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Q over the last dimension."""
        if self.dense is not None:
            return x @ self.dense.to(x.dtype)
        return hadamard_transform(x * self.signs.to(x.dtype))

    def matrix(self) -> torch.Tensor:
        return self.apply(torch.eye(self.n, dtype=torch.float64))


def orthogonal(n: int, kind: str, seed: int) -> Orthogonal:
    """An n × n orthogonal matrix (applied in the dtype of what it multiplies).

    hadamard: H / sqrt(n) with its rows' signs flipped at random (seeded), which spreads every
    channel evenly over all the others while keeping the matrix's structure; random: a seeded
    uniformly random orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "hadamard":
        hadamard_factors(n)  # refuse an order without a construction now
        return Orthogonal(n, signs=torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1)
    if kind == "random":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return Orthogonal(n, dense=q * torch.sign(torch.diagonal(r))[None, :])
    raise ValueError(f"rotation kind must be one of {', '.join(KINDS)}, got {kind!r}")
