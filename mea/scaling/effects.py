"""How much a comparison can be trusted, as numbers: an arm's LR bracket at the target and the law's regret, the
law tested on a size it did not see, each arm's parameter multiplier across sizes, and every Δ with its interval.

- Bracket: the arm trained at its law's LR × factors around 1 (one seed). Its best LR is the vertex of a
  quadratic in log LR where the lowest loss is interior; at an edge, the bracket must be extended that way
  before anything is read. The law's regret is the loss at the law's LR (factor 1) minus the bracket's best
  (Step Law, arXiv 2503.04715, scores laws by this gap at held-out points).
- Multiplier: the baseline's L(N) = E + A·N^(−α), and for an arm of loss L at size N,
  M = ((L_base(N) − E)/(L − E))^(1/α), the factor of baseline parameters that reaches the arm's loss.
- Δ between two arms: Welch's t interval over seeds (scipy.stats), and the seeds per arm that would resolve
  the observed Δ at the measured noise (a two-sided 5% test with 80% power).
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from .laws import FitError, fit_quadratic

POWER = 0.8
LEVEL = 0.95


def check_factors(factors: list[float]) -> None:
    """Bracket factors multiply the law's LR: all positive, 1 among them (the comparison's own run)."""
    if not factors or any(not f > 0 for f in factors) or 1 not in factors:
        raise FitError(f"factors [{', '.join(f'{f:g}' for f in factors)}]: give positive factors of the law's LR that include 1 (e.g. [0.5, 1, 2])")


@dataclass
class Bracket:
    """One arm's LR bracket at the target."""

    law_lr: float
    best_lr: float  # the quadratic's vertex where the lowest loss is interior, else the lowest run's LR
    best_loss: float
    regret: float  # loss at the law's LR minus best_loss (≥ 0)
    flat: bool  # the losses differ by no more than twice the noise: every LR of the bracket is as good
    extend: str | None  # "lower" / "higher": the lowest loss sits at that edge, so the best is not known yet
    next_factor: float | None  # the factor of the law's LR to run next, one bracket step beyond that edge
    coeffs: tuple[float, float, float] | None = None  # loss = c0 + c1·x + c2·x², x = ln(lr), where the vertex was read
    fitted_lrs: tuple[float, float] | None = None  # the LRs that quadratic was fitted across


def lr_bracket(law_lr: float, factors: list[float], losses: list[float], noise: float = 0.0) -> Bracket:
    """The bracket's reading from its runs' losses (one per factor, NaN where a run diverged)."""
    check_factors(factors)
    order = np.argsort(factors)
    f, y = np.asarray(factors, float)[order], np.asarray(losses, float)[order]
    at_law = float(y[list(f).index(1.0)])
    if not math.isfinite(at_law):
        raise FitError(f"the run at the law's LR {law_lr:.3g} diverged: the law's LR is unstable for this arm; bracket it below")
    finite = np.isfinite(y)
    f, y = f[finite], y[finite]
    best = int(np.argmin(y))
    flat = bool(y.max() - y.min() <= 2 * noise) if noise > 0 else False
    extend, step = None, None
    if not flat and best in (0, len(y) - 1) and len(y) > 1:
        extend = "lower" if best == 0 else "higher"
        ratio = f[1] / f[0] if best == 0 else f[-1] / f[-2]
        step = float(f[0] / ratio if best == 0 else f[-1] * ratio)
    best_lr, best_loss, curve = law_lr * f[best], float(y[best]), {}
    if extend is None and not flat and len(y) >= 3:
        window = slice(max(0, best - 1), best + 2)
        c0, c1, c2 = fit_quadratic(np.log(law_lr * f[window]), y[window])
        if c2 > 0:
            x = -c1 / (2 * c2)
            best_lr, best_loss = math.exp(x), min(best_loss, c0 + c1 * x + c2 * x * x)
            curve = {"coeffs": (float(c0), float(c1), float(c2)), "fitted_lrs": (float(law_lr * f[window][0]), float(law_lr * f[window][-1]))}
    return Bracket(law_lr, float(best_lr), float(best_loss), max(0.0, at_law - best_loss), flat, extend, step, **curve)


@dataclass
class HeldOut:
    """The law fitted without the largest size, against that size's measured curve."""

    predicted_lr: float
    measured_lr: float
    regret: float  # the measured curve at the predicted LR minus its optimum

    @property
    def ratio(self) -> float:
        return self.predicted_lr / self.measured_lr


def held_out_miss(sizes: list[float], optima: list[float], largest_lrs: list[float], largest_losses: list[float]) -> HeldOut:
    """η*(N) = a·N^b fitted on every size but the largest (sizes and optima sorted by size, the largest last; the
    largest's own optimum is not read), its prediction at the largest, and the regret read off the largest's
    measured curve: a quadratic in log LR through the runs given for it (the report gives those its fit used)."""
    if len(sizes) < 3:
        raise FitError(f"a held-out test of the law needs 3 sizes or more (2 to fit, 1 to test); this sweep has {len(sizes)}")
    b, log_a = np.polyfit(np.log(sizes[:-1]), np.log(optima[:-1]), 1)
    predicted = math.exp(log_a + b * math.log(sizes[-1]))
    x, y = np.log(largest_lrs), np.asarray(largest_losses, float)
    c0, c1, c2 = fit_quadratic(x, y)
    if c2 <= 0:
        raise FitError("the largest size's losses are not convex in log LR; its curve cannot score the law")
    curve = lambda lr: c0 + c1 * math.log(lr) + c2 * math.log(lr) ** 2  # noqa: E731
    measured = math.exp(-c1 / (2 * c2))
    return HeldOut(predicted, measured, curve(predicted) - curve(measured))


@dataclass
class SizeLaw:
    """L(N) = E + A·N^(−α)."""

    E: float
    A: float
    alpha: float

    def __call__(self, n):
        return self.E + self.A * np.asarray(n, float) ** (-self.alpha)


def fit_size_law(n: list[float], loss: list[float]) -> SizeLaw:
    if len(set(n)) < 3:
        raise FitError(f"a multiplier needs the baseline's loss at 3 sizes or more to fit L(N) = E + A·N^(−α); there are {len(set(n))}")
    n, loss = np.asarray(n, float), np.asarray(loss, float)
    scale = n.min()
    try:
        with warnings.catch_warnings():  # three sizes fix the three parameters exactly: no covariance to estimate
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            (E, A, alpha), _ = optimize.curve_fit(lambda x, E, A, a: E + A * (x / scale) ** (-a), n, loss, p0=(loss.min() * 0.9, loss.max() - loss.min() * 0.9, 0.3),
                                                  bounds=([0, 0, 1e-3], [loss.min(), np.inf, 5]), maxfev=20000)
    except RuntimeError as e:
        raise FitError(f"L(N) = E + A·N^(−α) does not fit the baseline's losses ({e})") from None
    return SizeLaw(float(E), float(A * scale**alpha), float(alpha))


def multiplier(law: SizeLaw, n: float, loss: float, base_loss: float | None = None) -> float:
    """The factor of baseline parameters that reaches `loss` from size n (inf at or below the floor). At a token
    budget the law was not fitted at, give the baseline's own loss there: under L = E + A·N^(−α) + B·D^(−β) another
    budget moves only the floor, to base_loss − A·n^(−α)."""
    floor = law.E if base_loss is None else base_loss - (law(n) - law.E)
    if loss <= floor:
        return math.inf
    log_m = math.log(float(law(n) - law.E) / (loss - floor)) / law.alpha
    return math.inf if log_m > math.log(sys.float_info.max) else math.exp(log_m)  # a loss a hair above the floor: beyond any size


@dataclass
class Multipliers:
    sizes: list[float]
    values: list[float]
    intervals: list[tuple[float, float] | None]
    trend: str  # one line: grows / shrinks with size, or cannot tell from noise


def multipliers(base: dict[float, list[float]], arm: dict[float, list[float]], fitted: list[float] | None = None, noise: float = 0.0,
                n_boot: int = 1000, seed: int = 0) -> Multipliers:
    """Each size's multiplier of an arm over the baseline (losses per size, one per seed). The baseline's L(N) is
    fitted on the sizes `fitted` (one token budget; default: every size); any other size is read at its own
    budget, its floor moved by the baseline's loss there. Bootstrap intervals: a size's seeds are resampled where
    it has several; a single run is redrawn with the seed noise σ = `noise` measured elsewhere, else with the
    fit's residuals (which needs a fourth fitted size: three fix the three parameters exactly)."""
    sizes = sorted(set(base) & set(arm))
    fitted = sorted(set(fitted or sizes) & set(sizes))
    if len(fitted) < 3:
        raise FitError(f"a multiplier needs the baseline and the arm at 3 sizes or more of one token budget; they share {len(fitted)}")
    mean = {s: (float(np.mean(base[s])), float(np.mean(arm[s]))) for s in sizes}

    def reading(means: dict[float, tuple[float, float]]) -> list[float]:
        law = fit_size_law(fitted, [means[s][0] for s in fitted])
        return [multiplier(law, s, means[s][1], None if s in fitted else means[s][0]) for s in sizes]

    values = reading(mean)
    residuals = np.asarray([mean[s][0] for s in fitted]) - fit_size_law(fitted, [mean[s][0] for s in fitted])(fitted)
    if noise <= 0 and len(fitted) < 4 and all(len(base[s]) == 1 and len(arm[s]) == 1 for s in sizes):
        return Multipliers(sizes, values, [None] * len(sizes), f"cannot tell: {len(fitted)} sizes of one seed fix the baseline's law exactly, so nothing measures the noise; add seeds or sizes")
    rng = np.random.default_rng(seed)

    def redraw(losses: list[float]) -> float:
        if len(losses) > 1:
            return float(np.mean(rng.choice(losses, len(losses))))
        return losses[0] + float(rng.normal(0, noise) if noise > 0 else rng.choice(residuals))

    draws = []
    for _ in range(n_boot):
        try:
            draws.append(reading({s: (redraw(base[s]), redraw(arm[s])) for s in sizes}))
        except FitError:
            continue
    draws = np.asarray(draws)
    # nearest, not interpolated: a draw at or under the floor is an infinite multiplier, and inf − inf is NaN
    intervals = [tuple(float(v) for v in np.percentile(draws[:, i], [2.5, 97.5], method="nearest")) for i in range(len(sizes))]
    finite = np.all(np.isfinite(draws), axis=1)
    slopes = np.array([np.polyfit(np.log(sizes), np.log(row), 1)[0] for row in draws[finite]]) if finite.any() else np.array([])
    lo, hi = np.percentile(slopes, [2.5, 97.5]) if len(slopes) else (-math.inf, math.inf)
    trend = (f"grows with size (log-slope {np.median(slopes):+.2f}, 95% {lo:+.2f} to {hi:+.2f})" if lo > 0 else
             f"shrinks with size (log-slope {np.median(slopes):+.2f}, 95% {lo:+.2f} to {hi:+.2f})" if hi < 0 else
             f"cannot tell a trend from noise over {len(sizes)} sizes (log-slope 95% {lo:+.2f} to {hi:+.2f})")
    return Multipliers(sizes, values, intervals, trend)


@dataclass
class Difference:
    """Δ = mean(a) − mean(b) over seeds, with its Welch interval and what the noise lets this run see."""

    delta: float
    interval: tuple[float, float] | None
    seeds_to_resolve: int | None  # per arm, for a test at 5% with 80% power to tell the observed Δ from 0
    smallest_seen: float | None  # the Δ this run had 80% power to tell from 0


def difference(a: list[float], b: list[float]) -> Difference:
    a, b = np.asarray(a, float), np.asarray(b, float)
    delta = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return Difference(delta, None, None, None)
    interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(LEVEL)
    sigma = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    z = stats.norm.ppf(1 - (1 - LEVEL) / 2) + stats.norm.ppf(POWER)
    needed = math.ceil(2 * (z * sigma / delta) ** 2) if delta else None
    seen = z * sigma * math.sqrt(1 / len(a) + 1 / len(b))
    return Difference(delta, (float(interval.low), float(interval.high)), needed, float(seen))
