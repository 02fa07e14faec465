"""mea.scaling.effects on given numbers: brackets, the held-out law, multipliers, intervals."""
import math
import warnings

import numpy as np
import pytest

from mea.scaling.effects import SizeLaw, check_factors, difference, fit_size_law, held_out_miss, lr_bracket, multiplier, multipliers
from mea.scaling.laws import FitError


def parabola(lr: float, best: float, curvature: float = 0.05, floor: float = 3.0) -> float:
    return floor + curvature * math.log(lr / best) ** 2


def test_a_bracket_with_an_interior_best_reads_the_vertex_and_the_laws_regret():
    law_lr, factors = 1e-3, [0.5, 1, 2]
    bracket = lr_bracket(law_lr, factors, [parabola(law_lr * f, best=1.4e-3) for f in factors])
    assert bracket.extend is None and not bracket.flat
    assert bracket.best_lr == pytest.approx(1.4e-3, rel=1e-6) and bracket.best_loss == pytest.approx(3.0, abs=1e-9)
    assert bracket.regret == pytest.approx(0.05 * math.log(1e-3 / 1.4e-3) ** 2, rel=1e-6)


def test_a_bracket_whose_best_is_at_an_edge_asks_to_be_extended_that_way():
    law_lr, factors = 1e-3, [0.5, 1, 2]
    bracket = lr_bracket(law_lr, factors, [parabola(law_lr * f, best=5e-3) for f in factors])
    assert bracket.extend == "higher" and bracket.next_factor == 4 and bracket.best_lr == pytest.approx(2e-3)
    low = lr_bracket(law_lr, factors, [parabola(law_lr * f, best=1e-4) for f in factors])
    assert low.extend == "lower" and low.next_factor == 0.25


def test_a_flat_bracket_says_so_and_charges_the_law_nothing_beyond_noise():
    bracket = lr_bracket(1e-3, [0.5, 1, 2], [3.001, 3.000, 3.002], noise=0.002)
    assert bracket.flat and bracket.extend is None and bracket.regret <= 0.004


def test_bad_bracket_factors_and_a_diverged_law_run_fail_in_one_line():
    for factors in ([0.5, 2], [0, 1, 2], [-1, 1], []):
        with pytest.raises(FitError, match="include 1"):
            check_factors(factors)
    with pytest.raises(FitError, match="diverged"):
        lr_bracket(1e-3, [0.5, 1, 2], [3.1, float("nan"), float("nan")])


def test_the_law_held_out_on_the_largest_size_reports_its_miss():
    sizes = [1e6, 4e6, 1.6e7]
    true = lambda n: 0.02 * n**-0.25  # noqa: E731
    optima = [true(n) for n in sizes]
    lrs = true(1.6e7) * np.array([0.25, 0.5, 1, 2, 4])
    exact = held_out_miss(sizes, optima, list(lrs), [parabola(lr, true(1.6e7)) for lr in lrs])
    assert exact.ratio == pytest.approx(1, rel=1e-6) and exact.regret == pytest.approx(0, abs=1e-9)
    shifted = held_out_miss(sizes, optima, list(lrs), [parabola(lr, 2 * true(1.6e7)) for lr in lrs])  # the largest's optimum moved ×2
    assert shifted.ratio == pytest.approx(0.5, rel=1e-6) and shifted.regret == pytest.approx(0.05 * math.log(2) ** 2, rel=1e-6)
    with pytest.raises(FitError, match="3 sizes or more"):
        held_out_miss(sizes[:2], optima[:2], list(lrs), [3.0] * 5)


def test_a_multiplier_is_recovered_from_losses_of_a_known_law():
    """The arm is the baseline at 1.5× its parameters: M = 1.5 at every size, within 2% over 4 sizes of 5 seeds
    of noise σ = 0.002, inside each size's interval."""
    law = SizeLaw(E=2.0, A=40.0, alpha=0.3)
    sizes = [1e5, 4e5, 1.6e6, 6.4e6]
    rng = np.random.default_rng(1)
    base = {n: list(law(n) + rng.normal(0, 0.002, 5)) for n in sizes}
    arm = {n: list(law(1.5 * n) + rng.normal(0, 0.002, 5)) for n in sizes}
    fitted = fit_size_law([n for n in sizes for _ in range(5)], [v for n in sizes for v in base[n]])
    assert fitted.alpha == pytest.approx(0.3, rel=0.2)
    result = multipliers(base, arm, n_boot=300)
    for value, (lo, hi) in zip(result.values, result.intervals):
        assert value == pytest.approx(1.5, rel=0.02) and lo < 1.5 < hi
    assert "cannot tell" in result.trend  # a constant multiplier neither grows nor shrinks
    assert multiplier(law, 1e5, law.E) == math.inf


def test_a_multiplier_says_plainly_when_three_sizes_of_one_seed_cannot_tell_noise():
    law = SizeLaw(E=2.0, A=40.0, alpha=0.3)
    sizes = [1e5, 4e5, 1.6e6]
    result = multipliers({n: [float(law(n))] for n in sizes}, {n: [float(law(2 * n))] for n in sizes})
    assert result.intervals == [None] * 3 and result.trend.startswith("cannot tell: 3 sizes of one seed")
    assert result.values == pytest.approx([2, 2, 2], rel=1e-3)
    with pytest.raises(FitError, match="3 sizes or more"):
        multipliers({1e5: [3.0], 4e5: [2.9]}, {1e5: [3.0], 4e5: [2.9]})


def test_a_multiplier_at_another_token_budget_moves_only_the_floor():
    """Losses from L = E + A·N^(−α) + B·D^(−β), the arm being the baseline at 1.5× its parameters: the baseline's
    law is fitted at one budget (three sizes, one run each) and the target, trained on 4× the tokens, still reads
    M = 1.5; with the seed noise given, every size gets an interval that holds 1.5."""
    chinchilla = lambda n, d: 2.0 + 40.0 * n**-0.3 + 300.0 * d**-0.3  # noqa: E731
    sweep, target, d = [1e5, 4e5, 1.6e6], 6.4e6, 2e6
    base = {n: [chinchilla(n, d)] for n in sweep} | {target: [chinchilla(target, 4 * d)] * 3}
    arm = {n: [chinchilla(1.5 * n, d)] for n in sweep} | {target: [chinchilla(1.5 * target, 4 * d)] * 3}
    exact = multipliers(base, arm, fitted=sweep, noise=0.002, n_boot=300)
    assert exact.values == pytest.approx([1.5] * 4, rel=1e-3)
    assert all(lo < 1.5 < hi for lo, hi in exact.intervals)
    pooled = multipliers(base, arm, noise=0.002, n_boot=50).values[-1]  # the target's budget read as if it were the sweep's
    assert not pooled == pytest.approx(1.5, rel=0.05)


def test_the_welch_interval_covers_the_true_difference_at_its_stated_rate():
    """Over 1000 draws of three seeds an arm (σ = 0.01, true Δ = 0.01), the 95% interval covers Δ at least 95%
    of the time (Welch's interval is a little conservative at three seeds: 97.7% here); the power line's seed
    count resolves the Δ it was computed for about 80% of the time."""
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(1000):
        d = difference(list(rng.normal(3.01, 0.01, 3)), list(rng.normal(3.0, 0.01, 3)))
        covered += d.interval[0] <= 0.01 <= d.interval[1]
    assert 0.94 <= covered / 1000 <= 0.985
    needed = difference([3.01 + 0.01 * z for z in (-1, 0, 1)], [3.0 + 0.01 * z for z in (-1, 0, 1)]).seeds_to_resolve
    assert needed == math.ceil(2 * ((1.959964 + 0.841621) * 0.01 / 0.01) ** 2)
    resolved = sum(difference(list(rng.normal(3.01, 0.01, needed)), list(rng.normal(3.0, 0.01, needed))).interval[0] > 0 for _ in range(500))
    assert 0.7 <= resolved / 500 <= 0.9
    single = difference([3.01], [3.0])
    assert single.delta == pytest.approx(0.01) and single.interval is None and single.seeds_to_resolve is None


def test_a_multiplier_interval_reaching_the_floor_reads_infinite_not_nan():
    """Seed noise as large as the losses' spread puts some redrawn arms at or under the baseline's floor: an
    infinite multiplier, whose interval must end at ∞ rather than at NaN."""
    law = SizeLaw(E=2.0, A=40.0, alpha=0.3)
    sizes = [1e5, 4e5, 1.6e6]
    result = multipliers({n: [float(law(n))] for n in sizes}, {n: [float(law(1.5 * n))] for n in sizes}, noise=0.3, n_boot=200)
    bounds = [v for interval in result.intervals for v in interval]
    assert not any(math.isnan(v) for v in bounds) and math.inf in bounds


def test_a_multiplier_past_any_float_reads_infinite_without_overflowing():
    """A small α turns a loss just above the floor into a factor beyond the largest float: it reads ∞, with no
    overflow raised or warned (the report's bootstrap meets such draws by the hundred)."""
    law = SizeLaw(E=2.0, A=40.0, alpha=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert multiplier(law, np.float64(1e5), 2.0 + 1e-9) == math.inf
        assert multiplier(law, 1e5, 2.0 + 1e-9) == math.inf
        assert multiplier(law, 1e5, float(law(2e5))) == pytest.approx(2.0)
