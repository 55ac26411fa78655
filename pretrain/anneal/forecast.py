"""The forecast fitted to anneal probes: annealed loss as a power law of tokens seen, with a band.

Law: `L(D) = E + A * D^(-alpha)`, D = tokens the annealed model has seen (parent + decay branch),
L = its validation loss. A score where higher is better (a downstream accuracy) is fitted as its
negative, `-S(D) = E + A * D^(-alpha)`, i.e. `S = S_max - A * D^(-alpha)`, with E free in sign.

Fitting (numpy only): for each alpha on a grid (0.02 to 2, 120 log-spaced values, then a finer
grid of 40 around the best), E and A are the linear least-squares solution with `A >= 0` (and
`E >= 0` for a loss), found exactly by comparing the unconstrained solution with those on each
bound; the alpha of least squared error wins. D is divided by the largest probe's D first, so the
grid does not depend on the units. At least 3 points with 3 distinct D are needed.

Uncertainty: a parametric residual bootstrap. The probes' D are chosen, not sampled, so the
bootstrap keeps them and redraws each loss as the fitted curve plus Gaussian noise, then refits
(`replicates` times). Case resampling is not used: with 3 to 6 probes, a resample often holds
fewer than 3 distinct D and cannot be fitted. The noise's sigma is the fit's residual standard
deviation (`sqrt(SSE / (n - 3))`), redrawn per replicate from its chi-square law (so a sigma
measured on few points widens the band, as a t interval would), and never below the
leave-one-out error (each point predicted from the others, E and A refitted at the fitted alpha)
nor `noise_floor`: with exactly 3 probes the curve passes through all of them and leaves no
residual to measure, but how far each probe lies from the curve through the others still shows
how much the points disagree with the law.
A band is the central `level` quantile range of the replicates' predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.9
NOISE_FLOOR = 0.01  # the least noise assumed on one probe's value (nats for a loss)
_COARSE = np.geomspace(0.02, 2.0, 120)
_FINE = np.linspace(-1.0, 1.0, 41)  # around the coarse best, in units of the coarse grid's step


class NoForecast(Exception):
    """The points cannot carry a forecast; the message says why in one line."""


@dataclass(frozen=True)
class Law:
    """`E + A * (D / d_ref)^(-alpha)` (A is in units of `d_ref`; `sign` -1 for a higher-is-better score)."""

    e: float
    a: float
    alpha: float
    d_ref: float
    sign: float = 1.0

    def __call__(self, tokens: np.ndarray | float) -> np.ndarray:
        return self.sign * (self.e + self.a * (np.asarray(tokens, dtype=float) / self.d_ref) ** -self.alpha)


@dataclass(frozen=True)
class Band:
    """A point value and its `level` band; `math.inf` where it is never reached."""

    value: float
    low: float
    high: float
    level: float = LEVEL


@dataclass(frozen=True)
class Forecast:
    """The fitted law and its bootstrap replicates (arrays of E, A, alpha, one value per replicate)."""

    law: Law
    e: np.ndarray
    a: np.ndarray
    alpha: np.ndarray
    points: int
    level: float = LEVEL

    def _replicates(self, tokens: np.ndarray) -> np.ndarray:
        x = (np.asarray(tokens, dtype=float)[None, :] / self.law.d_ref) ** -self.alpha[:, None]
        return self.law.sign * (self.e[:, None] + self.a[:, None] * x)

    def curve(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fitted values at `tokens` and the band's low and high edges."""
        tail = (1 - self.level) / 2
        low, high = np.quantile(self._replicates(tokens), [tail, 1 - tail], axis=0)
        return self.law(tokens), low, high

    def at(self, tokens: float) -> Band:
        """The predicted value at `tokens` with its band."""
        value, low, high = self.curve(np.array([tokens]))
        return Band(float(value[0]), float(low[0]), float(high[0]), self.level)

    def tokens_to_reach(self, target: float) -> Band:
        """Tokens at which the curve reaches `target` (`math.inf`: never), with the band's range."""
        goal = self.law.sign * target  # in the fitted (lower-is-better) orientation
        reps = _crossing(goal, self.e, self.a, self.alpha) * self.law.d_ref
        point = _crossing(goal, np.array([self.law.e]), np.array([self.law.a]), np.array([self.law.alpha]))
        tail = (1 - self.level) / 2
        low, high = np.quantile(reps, [tail, 1 - tail], method="inverted_cdf")  # no inf - inf
        return Band(float(point[0] * self.law.d_ref), float(low), float(high), self.level)


def _crossing(goal: float, e: np.ndarray, a: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Scaled D where `e + a * D^-alpha == goal`; inf where the curve never gets down to it."""
    out = np.full(e.shape, math.inf)
    ok = (goal > e) & (a > 0)
    out[ok] = (a[ok] / (goal - e[ok])) ** (1 / alpha[ok])
    return out


def _solve(x: np.ndarray, y: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E, A and squared error of `y ~ E + A x` with A >= 0 and E >= floor, for every leading index.

    x and y share their last axis (the points); every other axis is broadcast."""
    xm, ym = x.mean(-1, keepdims=True), y.mean(-1, keepdims=True)
    sxx = ((x - xm) ** 2).sum(-1)
    a_free = ((x - xm) * (y - ym)).sum(-1) / np.where(sxx > 0, sxx, np.inf)
    e_free = ym[..., 0] - a_free * xm[..., 0]
    e_flat = np.maximum(ym[..., 0], floor) * np.ones_like(a_free)
    candidates = [
        (e_free, a_free, (a_free >= 0) & (e_free >= floor)),
        (e_flat, np.zeros_like(a_free), np.ones_like(a_free, dtype=bool)),
    ]
    if math.isfinite(floor):  # on the bound E = floor
        a_on_floor = np.maximum(((x * (y - floor)).sum(-1)) / (x * x).sum(-1), 0.0)
        candidates.append((np.full_like(a_free, floor), a_on_floor, np.ones_like(a_free, dtype=bool)))
    best_e, best_a, best_sse = e_flat, np.zeros_like(a_free), np.full(a_free.shape, np.inf)
    for e, a, feasible in candidates:
        sse = ((e[..., None] + a[..., None] * x - y) ** 2).sum(-1)
        sse = np.where(feasible, sse, np.inf)
        better = sse < best_sse
        best_e, best_a = np.where(better, e, best_e), np.where(better, a, best_a)
        best_sse = np.where(better, sse, best_sse)
    return best_e, best_a, best_sse


def _fit_many(
    d: np.ndarray, y: np.ndarray, floor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit every row of `y` (rows x points) at scaled tokens `d`: E, A, alpha and squared error per row."""
    rows = np.arange(y.shape[0])
    x = d[None, :] ** -_COARSE[:, None]  # (grid, points)
    _, _, sse = _solve(x[None], y[:, None, :], floor)
    coarse = _COARSE[np.argmin(sse, axis=1)]
    step = np.log(_COARSE[1] / _COARSE[0])
    alphas = coarse[:, None] * np.exp(_FINE[None, :] * step)  # (rows, fine)
    x = d[None, None, :] ** -alphas[..., None]
    e, a, sse = _solve(x, y[:, None, :], floor)
    best = np.argmin(sse, axis=1)
    return e[rows, best], a[rows, best], alphas[rows, best], sse[rows, best]


def _check(tokens: np.ndarray, values: np.ndarray) -> None:
    """Refuse, in one line, points that cannot carry the three-parameter law."""
    if tokens.shape != values.shape or tokens.ndim != 1:
        raise NoForecast("tokens and values must be two lists of the same length")
    if not (np.isfinite(tokens).all() and np.isfinite(values).all()):
        raise NoForecast("a point is not a finite number (NaN or inf): no forecast")
    if (tokens <= 0).any():
        raise NoForecast("a point has no tokens (D <= 0): no forecast")
    distinct = len(np.unique(tokens))
    if distinct < 3:
        raise NoForecast(
            f"{distinct} distinct token count(s) among {len(tokens)} point(s): a forecast needs at least 3"
        )


def fit_forecast(
    tokens: np.ndarray | list[float],
    values: np.ndarray | list[float],
    *,
    higher_is_better: bool = False,
    replicates: int = 1000,
    level: float = LEVEL,
    noise_floor: float = NOISE_FLOOR,
    seed: int = 0,
) -> Forecast:
    """Fit the law to the points (module docstring) and bootstrap it; `NoForecast` when it cannot."""
    d, v = np.asarray(tokens, dtype=float), np.asarray(values, dtype=float)
    _check(d, v)
    sign = -1.0 if higher_is_better else 1.0
    floor = -np.inf if higher_is_better else 0.0
    d_ref = float(d.max())
    scaled, y = d / d_ref, sign * v
    e, a, alpha, sse = (float(value[0]) for value in _fit_many(scaled, y[None, :], floor))
    if a <= 0:
        trend = "rises" if higher_is_better else "falls"
        raise NoForecast(
            f"the probes' value never {trend} with tokens (flat or the wrong way): no power law to extrapolate"
        )
    law = Law(e, a, alpha, d_ref, sign)
    n = len(d)
    dof = n - 3
    rng = np.random.default_rng(seed)
    sigma = math.sqrt(sse / dof) if dof > 0 else 0.0
    if dof > 0:
        sigmas = sigma * np.sqrt(dof / rng.chisquare(dof, replicates))
    else:
        sigmas = np.zeros(replicates)
    sigmas = np.maximum(sigmas, max(noise_floor, _leave_one_out(scaled, y, alpha, floor)))
    fitted = e + a * scaled**-alpha
    noisy = fitted[None, :] + rng.standard_normal((replicates, n)) * sigmas[:, None]
    be, ba, balpha, _ = _fit_many(scaled, noisy, floor)
    return Forecast(law, be, ba, balpha, n, level)


def _leave_one_out(scaled: np.ndarray, y: np.ndarray, alpha: float, floor: float) -> float:
    """RMS error of predicting each point from the others (E and A refitted at `alpha`)."""
    x = scaled**-alpha
    errors = []
    for i in range(len(y)):
        others = np.arange(len(y)) != i
        e, a, _ = _solve(x[others], y[others], floor)
        errors.append(float(e + a * x[i] - y[i]))
    return math.sqrt(float(np.mean(np.square(errors))))


def format_band(band: Band, digits: int = 3) -> str:
    """'3.21 (90% band 3.05-3.40)': never a bare number."""
    return f"{band.value:.{digits}f} ({band.level:.0%} band {band.low:.{digits}f}-{band.high:.{digits}f})"
