"""The maths of choosing a learning rate by scaling law, and of the Chinchilla loss law.

- Each cell's optimal LR, a cell being one model size N trained for one token budget D: a quadratic in log LR
  fitted to the runs at the LRs around the best one, kept only when its vertex lies within a grid step of the
  best LR and its loss is near the losses seen there.
- η*(N) = a·N^b when every size has one budget, η*(N, D) = c·N^α·D^β across cells when budgets vary, least
  squares in log space.
- L(N, D) = E + A/N^α + B/D^β by a Huber loss on log residuals, L-BFGS from a grid of starts (Hoffmann et
  al. 2022, approach 3).
Intervals come from bootstrap resampling of the runs.

How this follows published LR-law studies. Step Law (Li et al. 2025, arXiv 2503.04715) sweeps a grid per
(N, D) cell, takes each cell's optimum and fits η* = c·N^α·D^β by least squares on logs: the same unit (the
cell) and the same law. DeepSeek LLM (Bi et al. 2024) fits η* against compute C instead, from the runs within
0.25% of each budget's best loss; naming a compute column with `--n-col` fits η*(C) here, from each cell's
optimum rather than from such a band. Where this differs: the optimum is the vertex of a quadratic in log LR
through the best grid point and its neighbours, not the best grid point itself, so it falls between grid
points (a √2- or √10-spaced grid is coarse next to the law's slope); a vertex that the data do not bracket
is refused rather than extrapolated.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch


class FitError(ValueError):
    """Data from which no fit can be made; the message names the group and why."""


@dataclass
class Optimum:
    lr: float
    loss: float
    ci: tuple[float, float]
    curvature: float  # of loss against ln(lr)
    coeffs: tuple[float, float, float]  # loss = c0 + c1·x + c2·x², x = ln(lr)
    fitted: tuple[float, float]  # the LRs the quadratic was fitted across (the runs near the best)

    def sensitivity_width(self, margin: float) -> float:
        """Decades of LR whose fitted loss lies within (1 + margin) × the optimum's."""
        return 2 * math.sqrt(margin * self.loss / self.curvature) / math.log(10)


def fit_quadratic(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    c2, c1, c0 = np.polyfit(x, y, 2)
    return c0, c1, c2


def lr_optimum(lrs: np.ndarray, losses: np.ndarray, label: str, window: int = 2, n_boot: int = 200, seed: int = 0) -> Optimum:
    """The optimal LR of one cell from its finite runs (several seeds per LR are averaged to pick the best LR
    and all kept in the fit), with a bootstrap interval. Raises FitError, naming the cell, where the data do
    not determine an optimum."""
    if len(lrs) == 0:
        raise FitError(f"{label}: every run diverged; lower the LR grid")
    grid = np.unique(lrs)
    means = np.array([losses[lrs == lr].mean() for lr in grid])
    if len(grid) < 3:
        raise FitError(f"{label}: {len(lrs)} finite run(s) at {len(grid)} LR(s), fewer than the 3 LRs a quadratic needs; add LRs to the grid")
    spread = means.max() - means.min()
    if spread <= 1e-9 * max(1.0, abs(means.mean())):
        raise FitError(f"{label}: the loss is the same ({means.mean():.4g}) at every LR; the runs did not train, or the loss column is wrong")
    best = int(np.argmin(means))
    if best == 0 or best == len(grid) - 1:
        side = "lower" if best == 0 else "higher"
        raise FitError(f"{label}: the best LR {grid[best]:.3g} is on the edge of the grid; extend the grid to {side} LRs")
    # A steep wall (runs near divergence) would bend the parabola away from the optimum: LRs whose loss rises more
    # than 8x the larger neighbour's rise are left out (a parabola sampled on a uniform grid rises at most 6.25x).
    rise = max(means[best - 1], means[best + 1]) - means[best]
    near = np.array([lr for lr, m in zip(grid[max(0, best - window) : best + window + 1], means[max(0, best - window) : best + window + 1]) if m - means[best] <= 8 * rise])
    pick = np.isin(lrs, near)
    x, y = np.log(lrs[pick]), losses[pick]
    c0, c1, c2 = fit_quadratic(x, y)
    if c2 <= 0:
        raise FitError(f"{label}: the loss is not convex around the best LR; add runs or seeds near {grid[best]:.3g}")
    x_star = -c1 / (2 * c2)
    loss_star = c0 + c1 * x_star + c2 * x_star**2
    # Sampled on a grid, a parabola's vertex lies within a step (the larger one beside it) of its lowest grid point,
    # and at most a quarter of the larger neighbour's rise below it; a fit that says otherwise does not describe
    # these runs.
    step = np.log(grid[best + 1] / grid[best - 1]) - min(np.log(grid[best] / grid[best - 1]), np.log(grid[best + 1] / grid[best]))
    if abs(x_star - math.log(grid[best])) > step:
        raise FitError(f"{label}: the fitted optimum {math.exp(x_star):.3g} lies more than a grid step from the best LR, {grid[best]:.3g}, "
                       "outside the LRs that bracket it (a lopsided or noisy curve); add LRs or seeds near it")
    if not loss_star > max(0.0, means[best] - rise):
        raise FitError(f"{label}: the fitted loss at the optimum, {loss_star:.4g}, is far below every loss seen near it "
                       f"({means[best]:.4g}–{means[best] + rise:.4g}); add LRs or seeds near {grid[best]:.3g}")
    # Three runs fix the parabola exactly, so resampling them cannot move it and would give a zero-width interval;
    # what they do say, by convexity, is that the optimum lies between the best LR's neighbours.
    bracket = (math.log(grid[best - 1]), math.log(grid[best + 1]))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if len(x) > 3 else 0):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < 3:
            continue
        b0, b1, b2 = fit_quadratic(x[idx], y[idx])
        if b2 > 0:
            boots.append(np.clip(-b1 / (2 * b2), x.min(), x.max()))
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else bracket
    return Optimum(float(math.exp(x_star)), float(loss_star), (float(math.exp(lo)), float(math.exp(hi))), float(c2), (c0, c1, c2), (float(np.exp(x.min())), float(np.exp(x.max()))))


@dataclass
class PowerLaw:
    """y = coef · Π x_i^exponent_i, fitted in log space."""

    coef: float
    exponents: list[float]
    coef_ci: tuple[float, float]
    exponents_ci: list[tuple[float, float]]
    bootstrap: np.ndarray  # refitted (log coef, exponents...) per bootstrap sample

    def __call__(self, *xs: float) -> float:
        return self.coef * math.prod(x**e for x, e in zip(xs, self.exponents))

    def interval(self, *xs: float) -> tuple[float, float]:
        """95% interval of the prediction at xs, from the bootstrap refits."""
        draws = np.exp(self.bootstrap @ np.array([1.0, *np.log(xs)]))
        lo, hi = np.percentile(draws, [2.5, 97.5])
        return float(lo), float(hi)


def fit_power_law(xs: list[np.ndarray], y: np.ndarray, y_samples: np.ndarray, label: str) -> PowerLaw:
    """log y = log c + Σ e_i log x_i by least squares; intervals from refits on bootstrap samples of y."""
    design = np.column_stack([np.ones_like(y)] + [np.log(x) for x in xs])
    if len(y) < design.shape[1]:
        raise FitError(f"{label}: {len(y)} points for {design.shape[1]} parameters; add sizes")
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise FitError(f"{label}: the sizes and budgets do not vary independently; the law cannot separate them")
    solve = lambda target: np.linalg.lstsq(design, np.log(target), rcond=None)[0]  # noqa: E731
    beta = solve(y)
    boots = np.array([solve(sample) for sample in y_samples])
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
    return PowerLaw(float(math.exp(beta[0])), [float(b) for b in beta[1:]], (float(math.exp(lo[0])), float(math.exp(hi[0]))), [(float(a), float(b)) for a, b in zip(lo[1:], hi[1:])], boots)


def optimum_samples(opt: Optimum, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draws of an optimum consistent with its interval (log-normal), for propagating it into the law."""
    sigma = max(1e-6, (math.log(opt.ci[1]) - math.log(opt.ci[0])) / (2 * 1.96))
    return np.exp(rng.normal(math.log(opt.lr), sigma, n))


# ---- L(N, D) = E + A/N^α + B/D^β -------------------------------------------------------------------------

LOSS_LAW_STARTS = dict(e=[-1.0, -0.5, 0.0, 0.5, 1.0], a=[0.0, 5.0, 10.0, 15.0, 20.0, 25.0], b=[0.0, 5.0, 10.0, 15.0, 20.0, 25.0], alpha=[0.0, 0.5, 1.0, 1.5, 2.0], beta=[0.0, 0.5, 1.0, 1.5, 2.0])


def loss_law_objective(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor, log_loss: torch.Tensor, delta: float) -> torch.Tensor:
    """Huber loss of log residuals, for every row of theta = (e, a, b, α, β) at once."""
    e, a, b, alpha, beta = theta.unbind(-1)
    terms = torch.stack([e[:, None].expand(-1, len(log_n)), a[:, None] - alpha[:, None] * log_n, b[:, None] - beta[:, None] * log_d])
    residual = torch.logsumexp(terms, dim=0) - log_loss
    return torch.nn.functional.huber_loss(residual, torch.zeros_like(residual), delta=delta, reduction="none").sum(-1)


def fit_loss_law_once(n: np.ndarray, d: np.ndarray, loss: np.ndarray, start: np.ndarray | None = None, delta: float = 1e-3, keep: int = 8) -> np.ndarray:
    """(e, a, b, α, β) from the best `keep` points of the start grid, or from one given start."""
    data = [torch.tensor(np.log(v), dtype=torch.float64) for v in (n, d, loss)]
    if start is None:
        grid = torch.tensor(list(itertools.product(*LOSS_LAW_STARTS.values())), dtype=torch.float64)
        starts = grid[loss_law_objective(grid, *data, delta).argsort()[:keep]]
    else:
        starts = torch.tensor(start, dtype=torch.float64)[None]
    best, best_value = None, math.inf
    for start in starts:
        theta = start.clone()[None].requires_grad_(True)
        opt = torch.optim.LBFGS([theta], max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure(theta=theta, opt=opt):
            opt.zero_grad()
            value = loss_law_objective(theta, *data, delta).sum()
            value.backward()
            return value

        opt.step(closure)
        value = loss_law_objective(theta.detach(), *data, delta).item()
        if value < best_value:
            best, best_value = theta.detach()[0].numpy(), value
    return best


@dataclass
class LossLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    ci: dict[str, tuple[float, float]]

    def __call__(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta


def fit_loss_law(n: np.ndarray, d: np.ndarray, loss: np.ndarray, n_boot: int = 50, seed: int = 0, label: str = "loss-law") -> LossLaw:
    if len(loss) < 5:
        raise FitError(f"{label}: {len(loss)} runs for the 5 parameters of L(N, D); add runs")
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise FitError(f"{label}: N and D must each take at least 2 values to fit L(N, D)")
    to_law = lambda t: dict(E=math.exp(t[0]), A=math.exp(t[1]), B=math.exp(t[2]), alpha=float(t[3]), beta=float(t[4]))  # noqa: E731
    theta = fit_loss_law_once(n, d, loss)
    point = to_law(theta)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(loss), len(loss))
        if len(np.unique(n[idx])) > 1 and len(np.unique(d[idx])) > 1:
            samples.append(to_law(fit_loss_law_once(n[idx], d[idx], loss[idx], start=theta)))
    ci = {k: tuple(float(v) for v in np.percentile([s[k] for s in samples], [2.5, 97.5])) for k in point}
    return LossLaw(**point, ci=ci)
