"""Device-level differential privacy for sparse int8 deltas: clip, add Gaussian noise, account with RDP.

Pure functions and one small accountant; no I/O, no global RNG. The guarantee (central DP, trusted coordinator):
whoever sees the sequence of published models learns about one *device's* participation in a round (all of its
samples together) at most what (epsilon, delta)-DP allows. Neighbouring rounds differ by adding or removing one
device's whole delta.

Units. A delta arrives in integer weight units; one unit of tensor ``t``, output channel ``c`` is worth
``scale_t[c]`` in real units (int8 weights: ``s_w[c]``; int32 biases: ``s_x * s_w[c]``; the plan stores both as
the tensor's scales). Because QAS makes int8 weights and int32 biases move on wildly different integer scales,
clipping in integer units would let bias coordinates dominate the norm; so by default this module works in
**real units**: ``real = int * unit`` with :func:`support_units`, clips each device's delta to L2 norm ``clip``
there, adds ``N(0, (noise_multiplier * clip)^2)`` to the *sum* on every coordinate of the plan's fixed support
(also coordinates nobody sent: which coordinates a top-k device sent is itself private), divides by a public
``denominator`` (the round's goal, not the data-dependent count) and converts back to integer units. Passing
``units=None`` works in integer units instead (same code, unit 1). Rounding to integers afterwards is
post-processing and costs no privacy.

Accounting: :class:`RDPAccountant` composes the Rényi DP of the (Poisson-)subsampled Gaussian mechanism
(Mironov, Talwar, Zhang 2019, integer orders) over rounds and converts to (epsilon, delta) with the conversion
of Canonne, Kamath, Steinke 2020 (Prop. 12 as used by common DP libraries). It refuses a round that would take
epsilon past the budget (:class:`PrivacyBudgetExceeded`), leaving its state unchanged.

It refuses to pretend: the amplification by sampling (q < 1) holds only if devices are sampled independently
with probability q and the sample stays secret; with TinyFleet's deterministic, public selection use q = 1.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from device_agent.wire.secagg import SecAggError, flat_units
from fleet.aggregate import AggregationError, Mean

DEFAULT_ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (80, 96, 128, 160, 192, 256, 512, 1024)


class PrivacyBudgetExceeded(RuntimeError):
    """Spending this round would take epsilon above the configured budget; nothing was spent."""

    def __init__(self, epsilon_after: float, budget: float, rounds_spent: int):
        super().__init__(f"privacy budget exceeded: round {rounds_spent + 1} would reach epsilon "
                         f"{epsilon_after:.4g} > budget {budget:.4g} (delta fixed); stop training or raise the budget")
        self.epsilon_after, self.budget, self.rounds_spent = epsilon_after, budget, rounds_spent


class DPError(ValueError):
    """Invalid DP parameters (clip, noise multiplier, sampling rate, delta); the message names the bad one."""


@dataclass
class DPConfig:
    """Central DP for a fleet's rounds (the ``dp:`` section of a fleet config).

    ``clip`` is the L2 bound of one device's delta (real units unless ``units: int``), ``noise_multiplier`` the
    Gaussian noise std over ``clip``, ``epsilon_budget`` the (epsilon, ``delta``) budget at which the coordinator
    refuses further rounds (None: report epsilon, never refuse).
    """

    clip: float = 0.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float | None = None
    units: str = "real"  # real | int

    def validate(self) -> list[str]:
        errs = []
        if not (math.isfinite(self.clip) and self.clip > 0):
            errs.append(f"clip: must be a finite number > 0, got {self.clip}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            errs.append(f"noise_multiplier: must be finite and >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            errs.append(f"delta: must be in (0, 1), got {self.delta}")
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            errs.append(f"epsilon_budget: must be > 0 (or absent for no budget), got {self.epsilon_budget}")
        if self.units not in ("real", "int"):
            errs.append(f"units: expected real or int, got {self.units!r}")
        return errs


def round_rng(secret: bytes, round_id: int) -> np.random.Generator:
    """The noise generator of one round: seeded from the coordinator's secret and the round id, so a restarted
    coordinator adds exactly the same noise (bit-identical model) and nobody without the secret can remove it."""
    if len(secret) < 16:
        raise DPError("the noise secret must be at least 16 bytes")
    seed = hashlib.sha256(secret + round_id.to_bytes(8, "little")).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little")))


# --- units and clipping -------------------------------------------------------------------------------------


def support_units(plan) -> np.ndarray:
    """(D,) float64: the real value of one integer step of every coordinate of the plan's shared trainable set.

    Order = the coordinator's flattening (shared trainable tensors in plan order, row-major). Per-channel scales
    repeat over the channel's elements; a per-tensor scale covers the whole tensor.
    """
    try:  # NOTE: one definition, shared with the devices (distributed DP under secure aggregation clips there)
        return flat_units([t for t in plan.trainable if not t.personal])
    except SecAggError as e:
        raise DPError(str(e)) from None


def _units(units: np.ndarray | None, d: int) -> np.ndarray:
    if units is None:
        return np.ones(d)
    u = np.asarray(units, np.float64)
    if u.shape != (d,) or not (np.isfinite(u).all() and (u > 0).all()):
        raise DPError(f"units must be ({d},) finite and > 0, got shape {u.shape}")
    return u


def clip_deltas(values: np.ndarray, masks: np.ndarray, clip: float,
                units: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each device's delta in real units, scaled to L2 norm <= ``clip`` over the coordinates it sent.

    Returns ``(clipped (n, D) float64 real units, 0 where not sent; norms_before (n,))``.
    """
    values, masks = np.asarray(values), np.asarray(masks)
    if values.ndim != 2 or masks.shape != values.shape or masks.dtype != np.bool_:
        raise AggregationError(f"values (n, D) and bool masks (n, D) expected, got {values.shape}, {masks.shape}")
    if not (math.isfinite(clip) and clip > 0):
        raise DPError(f"clip must be finite and > 0, got {clip!r}")
    real = np.where(masks, values.astype(np.float64), 0.0) * _units(units, values.shape[1])[None, :]
    if not np.isfinite(real).all():
        raise AggregationError("values contain NaN or Inf")
    norms = np.sqrt((real * real).sum(axis=1))
    factor = np.minimum(1.0, clip / np.maximum(norms, np.finfo(np.float64).tiny))
    return real * factor[:, None], norms


def dp_mean(values: np.ndarray, masks: np.ndarray, *, clip: float, noise_multiplier: float, denominator: int,
            rng: np.random.Generator, units: np.ndarray | None = None) -> Mean:
    """Clip, sum, add ``N(0, (noise_multiplier * clip)^2)`` per coordinate, divide by ``denominator``.

    The result is in integer weight units (feed it to ``fleet.aggregate.to_int_delta``) and covers the whole
    fixed support. Devices are weighted equally: sample-count weights would multiply one device's sensitivity.
    ``rng`` must be seeded from a secret (whoever knows the seed can subtract the noise).
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise DPError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if denominator < 1:
        raise DPError(f"denominator must be a positive (public) device count, got {denominator}")
    clipped, _ = clip_deltas(values, masks, clip, units)
    d = clipped.shape[1]
    noisy = clipped.sum(axis=0) + rng.normal(0.0, noise_multiplier * clip, d)
    return Mean(noisy / denominator / _units(units, d), np.ones(d, bool))


# --- Rényi DP accounting ------------------------------------------------------------------------------------


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs)) if m > -math.inf else -math.inf


def rdp_gaussian(q: float, noise_multiplier: float, order: int) -> float:
    """RDP of one round of the sampled Gaussian mechanism (sensitivity 1, std ``noise_multiplier``) at ``order``.

    ``q = 1``: the closed form ``order / (2 sigma^2)``. ``0 < q < 1`` (Poisson sampling, add/remove neighbours,
    integer order a): ``log(sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 sigma^2))) / (a - 1)``.
    """
    if not 0 <= q <= 1:
        raise DPError(f"sampling rate q must be in [0, 1], got {q!r}")
    if int(order) != order or order < 2:
        raise DPError(f"orders must be integers >= 2, got {order!r}")
    if q == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    s2 = 2.0 * noise_multiplier**2
    if q == 1:
        return order / s2
    a = int(order)
    terms = [math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1) + (a - k) * math.log1p(-q)
             + k * math.log(q) + (k * k - k) / s2 for k in range(a + 1)]
    return _logsumexp(terms) / (a - 1)


def rdp_skellam(mu: float, l1: float, l2: float, order: int) -> float:
    """RDP of one round of the symmetric Skellam mechanism: ``Poisson(mu) - Poisson(mu)`` added to each
    coordinate of an integer sum whose L1 / L2 sensitivities are ``l1`` / ``l2`` (Agarwal, Kairouz, Liu, "The
    Skellam Mechanism for Differentially Private Federated Learning", NeurIPS 2021):
    ``a l2^2 / (4 mu) + min(((2a - 1) l2^2 + 6 l1) / (16 mu^2), 3 l1 / (4 mu))``. Its first term is the Gaussian
    mechanism's at the same variance (2 mu); the rest vanishes as mu grows. Checked against the exact Rényi
    divergence of shifted Skellam distributions in ``tests/pure/test_secagg_rounds.py``. No sampling (q = 1).
    """
    if int(order) != order or order < 2:
        raise DPError(f"orders must be integers >= 2, got {order!r}")
    if mu <= 0:
        return math.inf
    a = float(order)
    return a * l2 * l2 / (4 * mu) + min(((2 * a - 1) * l2 * l2 + 6 * l1) / (16 * mu * mu), 3 * l1 / (4 * mu))


@lru_cache(maxsize=256)
def _rdp_vector(q: float, noise_multiplier: float, orders: tuple[int, ...],
                skellam: tuple[float, float, float] | None = None) -> tuple[float, ...]:
    if skellam is not None:
        return tuple(rdp_skellam(*skellam, a) for a in orders)
    return tuple(rdp_gaussian(q, noise_multiplier, a) for a in orders)


def rdp_to_epsilon(rdp: np.ndarray, orders: tuple[int, ...], delta: float) -> tuple[float, int]:
    """``(epsilon, best order)``: ``min_a rdp_a + log((a-1)/a) - (log delta + log a) / (a - 1)``, at least 0."""
    if not 0 < delta < 1:
        raise DPError(f"delta must be in (0, 1), got {delta!r}")
    if not np.any(rdp):
        return 0.0, orders[0]  # NOTE: the conversion's slack term is not a cost: no mechanism ran, no loss
    best, arg = math.inf, orders[0]
    for r, a in zip(rdp, orders):
        eps = float(r) + math.log1p(-1.0 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if eps < best:
            best, arg = eps, a
    return max(best, 0.0), arg


@dataclass(frozen=True)
class RoundPrivacy:
    """What one spent round cost: cumulative epsilon after it, and the round's own epsilon alone."""

    round_index: int
    q: float
    noise_multiplier: float
    epsilon: float  # cumulative, at ``delta``
    epsilon_round: float  # this round alone
    order: int  # the RDP order that gave ``epsilon``


@dataclass
class RDPAccountant:
    """Composes rounds; ``spend`` refuses one that would exceed ``budget`` (None: no budget, only reporting)."""

    delta: float
    budget: float | None = None
    orders: tuple[int, ...] = DEFAULT_ORDERS
    # (q, noise_multiplier) per spent round; a distributed-Skellam round (secure aggregation) carries its
    # (mu, l1, l2) too: (q, noise_multiplier, mu, l1, l2)
    rounds: list[tuple[float, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise DPError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.budget is not None and not self.budget > 0:
            raise DPError(f"epsilon budget must be > 0, got {self.budget!r}")
        self._rdp = np.zeros(len(self.orders))
        for r in self.rounds:
            self._rdp += self._one(r[0], r[1], tuple(r[2:5]) if len(r) == 5 else None)  # type: ignore[arg-type]

    def _one(self, q: float, noise_multiplier: float,
             skellam: tuple[float, float, float] | None = None) -> np.ndarray:
        sk = None if skellam is None else tuple(float(v) for v in skellam)
        return np.array(_rdp_vector(float(q), float(noise_multiplier), tuple(self.orders), sk))

    def epsilon(self) -> float:
        """Cumulative epsilon (at ``delta``) of the rounds spent so far; 0 before any."""
        return rdp_to_epsilon(self._rdp, self.orders, self.delta)[0] if self.rounds else 0.0

    def preview(self, q: float, noise_multiplier: float, skellam: tuple[float, float, float] | None = None) -> float:
        """Epsilon after one more round with these parameters, without spending it."""
        return rdp_to_epsilon(self._rdp + self._one(q, noise_multiplier, skellam), self.orders, self.delta)[0]

    def spend(self, q: float, noise_multiplier: float,
              skellam: tuple[float, float, float] | None = None) -> RoundPrivacy:
        """Account one round; raises :class:`PrivacyBudgetExceeded` (and spends nothing) if over budget.
        ``skellam``: ``(mu, l1, l2)`` of a distributed-Skellam round (:func:`rdp_skellam`) instead of Gaussian."""
        one = self._one(q, noise_multiplier, skellam)
        eps, order = rdp_to_epsilon(self._rdp + one, self.orders, self.delta)
        if self.budget is not None and eps > self.budget:
            raise PrivacyBudgetExceeded(eps, self.budget, len(self.rounds))
        self._rdp += one
        self.rounds.append((float(q), float(noise_multiplier), *(float(v) for v in skellam or ())))
        alone = rdp_to_epsilon(one, self.orders, self.delta)[0]
        return RoundPrivacy(len(self.rounds), q, noise_multiplier, eps, alone, order)

    def to_json(self) -> str:
        """Persist with the coordinator's store: the spent rounds are the whole state."""
        return json.dumps({"delta": self.delta, "budget": self.budget, "orders": list(self.orders),
                           "rounds": self.rounds})

    @classmethod
    def from_json(cls, text: str) -> RDPAccountant:
        d = json.loads(text)
        return cls(d["delta"], d["budget"], tuple(d["orders"]), [tuple(r) for r in d["rounds"]])


def sample_rate(selected: int, total: int) -> float:
    """``q = selected / total`` (only meaningful with secret Poisson sampling; see the module docstring)."""
    if not 0 < selected <= total:
        raise DPError(f"need 0 < selected <= total devices, got {selected} of {total}")
    return selected / total


def noise_for_budget(epsilon: float, delta: float, q: float, rounds: int, orders: tuple[int, ...] = DEFAULT_ORDERS,
                     tol: float = 1e-3) -> float:
    """The smallest noise multiplier (to ``tol``) whose ``rounds`` rounds stay within ``epsilon``."""
    def eps(sigma: float) -> float:
        rdp = np.array([rounds * rdp_gaussian(q, sigma, a) for a in orders])
        return rdp_to_epsilon(rdp, orders, delta)[0]

    lo, hi = 1e-2, 1.0
    while eps(hi) > epsilon:
        hi *= 2
        if hi > 1e6:
            raise DPError(f"no noise multiplier reaches epsilon {epsilon} in {rounds} rounds")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > epsilon else (lo, mid)
    return hi
