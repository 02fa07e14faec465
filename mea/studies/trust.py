"""How far the experiment report's readings can be trusted, each as a table, a line and a plot: every arm's LR
bracket at the target (the law's regret), its init checks (the default's handicap), the two readings (one default
against each arm's own best), the LR law held out on the largest swept size, the parameter multipliers across
sizes, and which loss picks the LR. Every number is read from the runs (mea.scaling.effects does the statistics)."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from mea.plotting import mark_diverged, panels, plt, save_figure
from mea.scaling.effects import Multipliers, fit_size_law, held_out_miss, lr_bracket, multipliers
from mea.scaling.laws import FitError
from mea.scaling.sweep import not_diverged, read_results
from mea.studies.protocol import NO_NOISE_ESTIMATE, within_noise

TRAINS_WITHIN = 0.10  # a run "trains" when its loss is within 10% of the arm's best at that size


def stable_up_to(runs: dict[float, dict]) -> float:
    """The largest LR below the first that fails to train: diverged (non-finite), or, since gradient clipping keeps
    most failures finite, ending more than TRAINS_WITHIN above the arm's best loss at that size."""
    finite = [float(r["final_val_loss"]) for r in runs.values() if r["diverged"] != "True"]
    best = min(finite, default=math.inf)
    stable = math.nan
    for lr in sorted(runs):
        if runs[lr]["diverged"] == "True" or float(runs[lr]["final_val_loss"]) > best * (1 + TRAINS_WITHIN):
            break
        stable = lr
    return stable


def row_of(rows: list[dict], arm: str) -> dict | None:
    return next((r for r in rows if r["variant"] == arm), None)


def noise_of(rows: list[dict], arm: str) -> float:
    """One run's seed noise σ for an arm: its own seeds' where it has several, else the pooled σ of the others."""
    own = row_of(rows, arm)
    if own and own["seeds"] > 1:
        return own["final_val_loss_std"]
    spread = [r["final_val_loss_std"] ** 2 for r in rows if r["seeds"] > 1]
    return math.sqrt(sum(spread) / len(spread)) if spread else 0.0


def read_brackets(brackets: dict[str, dict], rows: list[dict]) -> dict[str, dict]:
    """The brackets read with each arm's seed noise (the runs were extended before the comparison had measured
    it): flat where every LR of it is within noise of the best."""
    return {arm: b | {"bracket": lr_bracket(b["law_lr"], b["factors"], b["losses"], noise_of(rows, arm))} for arm, b in brackets.items()}


def bracket_claim(brackets: dict[str, dict], rows: list[dict], baseline: str) -> str:
    """Whether any bracketed arm's law LR missed its optimum by more than the smallest gap the comparison reads."""
    regrets = {arm: b["bracket"].regret for arm, b in brackets.items()}
    worst = max(regrets, key=regrets.get)
    gaps = {r["variant"]: abs(r["delta_vs_baseline"]) for r in rows if r["variant"] != baseline}
    smallest = min(gaps, key=gaps.get) if gaps else None
    open_edges = [arm for arm, b in brackets.items() if b["bracket"].extend]
    said = (f"**Were the laws' LRs near each arm's optimum at the target?** Bracketed ({', '.join(brackets)}): the largest regret of a law's LR is "
            f"{worst}'s, {regrets[worst]:+.4f} (one run's seed noise σ {noise_of(rows, worst):.4f}).")
    if smallest is not None:
        moved = [arm for arm, regret in regrets.items() if regret >= gaps[smallest]]
        said += (f" The smallest gap to {baseline} read here is {smallest}'s, {gaps[smallest]:.4f}: "
                 + (f"the regret of {', '.join(moved)} is as large, so a verified LR could change that reading." if moved else "every regret is smaller, so no reading rests on a missed LR."))
    if open_edges:
        said += f" Still at the bracket's edge after one extension: {', '.join(open_edges)} (their best LR lies further out; read their regret as a lower bound)."
    return said


def bracket_table(brackets: dict[str, dict]) -> list[str]:
    factors = sorted({f for b in brackets.values() for f in b["factors"]})
    lines = ["| arm | law's LR | " + " | ".join(f"×{f:g}" for f in factors) + " | best LR | regret of the law's LR | reading |", "|---|---|" + "---|" * len(factors) + "---|---|---|"]
    for arm, b in brackets.items():
        loss = dict(zip(b["factors"], b["losses"]))
        br = b["bracket"]
        state = "flat within noise" if br.flat else f"best at the {br.extend} edge" if br.extend else "interior"
        lines.append(f"| {arm} | {br.law_lr:.3g} | " + " | ".join(f"{loss[f]:.4f}" if f in loss and math.isfinite(loss[f]) else ("diverged" if f in loss else "–") for f in factors)
                     + f" | {br.best_lr:.3g} | {br.regret:+.4f} | {state} |")
    return lines


def bracket_plot(brackets: dict[str, dict], out: Path) -> Path:
    """Per arm: the bracket's runs (dots; × diverged), the quadratic through the lowest and its neighbours, the law's LR."""
    fig, axes = panels(len(brackets))
    for ax, (arm, b) in zip(axes, brackets.items()):
        br = b["bracket"]
        lrs = np.array([br.law_lr * f for f in b["factors"]])
        losses = np.array(b["losses"], float)
        ok = np.isfinite(losses)
        ax.plot(lrs[ok], losses[ok], "o", color="C0", label="runs (seed 0)")
        mark_diverged(ax, list(lrs[~ok]), "C3")
        if br.coeffs:
            c0, c1, c2 = br.coeffs
            grid = np.linspace(*np.log(br.fitted_lrs), 40)
            ax.plot(np.exp(grid), c0 + c1 * grid + c2 * grid**2, color="C0", lw=1)
        ax.axvline(br.law_lr, color="k", ls="--", lw=0.8, label="law's LR")
        ax.plot([br.best_lr], [br.best_loss], "*", color="C1", ms=9, label=f"best {br.best_lr:.2g}")
        ax.set(xscale="log", title=f"{arm}: regret {br.regret:+.4f}", xlabel="learning rate", ylabel="final validation loss")
        ax.legend(fontsize=6)
    fig.suptitle("LR brackets at the target: validation loss against LR around each law's LR", fontsize=9)
    return save_figure(fig, out / "lr_brackets")


def verified_lrs(lrs: dict[str, dict], brackets: dict[str, dict]) -> dict[str, dict]:
    """Each bracketed arm's LR moved to its bracket's best. The seeds that would tell a flat bracket from a curved one
    are trained after it, at the LR chosen here; the report reads the bracket with their noise afterwards."""
    moved = dict(lrs)
    for arm, b in brackets.items():
        br = b["bracket"]
        if br.best_lr != br.law_lr:
            edge = f", still at the {br.extend} edge" if br.extend else ""
            moved[arm] = {"lr": br.best_lr, "ci": None, "source": f"verified: the LR bracket's best ({br.best_lr / br.law_lr:.2f}× the law's {br.law_lr:.3g}{edge})"}
    return moved


# --- the init, checked at the target ---------------------------------------------------------------------------

def init_table(checks: dict[str, dict[str, float]], rows: list[dict]) -> list[str]:
    """Per arm: the default's seeds against each other init (one run, seed 0), and whether the default handicapped it."""
    settings = sorted({s for by in checks.values() for s in by})
    lines = ["| arm | default (mean ± σ over seeds) | " + " | ".join(settings) + " | the default's handicap |", "|---|---|" + "---|" * len(settings) + "---|"]
    for arm, by in checks.items():
        own = row_of(rows, arm)
        best = min(by, key=by.get)
        handicap = own["final_val_loss"] - by[best]
        se = noise_of(rows, arm) * math.sqrt(1 + 1 / own["seeds"])  # one run against the seeds' mean
        said = f"{handicap:+.4f} against {best}: " + (NO_NOISE_ESTIMATE if not se > 0 else "beyond noise" if handicap > 0 and not within_noise(handicap, se)
                                                      else "within noise" if within_noise(handicap, se) else "none (the default is better)")
        lines.append(f"| {arm} | {own['final_val_loss']:.4f} ± {own['final_val_loss_std']:.4f} | " + " | ".join(f"{by[s]:.4f}" if s in by else "–" for s in settings) + f" | {said} |")
    return lines


def own_bests(rows: list[dict], brackets: dict[str, dict], checks: dict[str, dict[str, float]], lrs: dict[str, dict]) -> dict[str, tuple[float, str]]:
    """Each arm at its own best (init, LR) among the runs measured at the target: the default's seeds' mean at its
    trained LR, the bracket's other LRs and the other inits (one run each)."""
    out = {}
    for r in rows:
        arm = r["variant"]
        options = {f"default init, LR {lrs[arm]['lr']:.3g} ({r['seeds']} seeds)": r["final_val_loss"]}
        if arm in brackets:
            br = brackets[arm]
            options |= {f"default init, LR {br['law_lr'] * f:.3g} (1 run)": loss for f, loss in zip(br["factors"], br["losses"]) if f != 1 and math.isfinite(loss)}
        options |= {f"{setting}, LR {lrs[arm]['lr']:.3g} (1 run)": loss for setting, loss in checks.get(arm, {}).items() if math.isfinite(loss)}
        where = min(options, key=options.get)
        out[arm] = (options[where], where)
    return out


def side_of_noise(delta: float, se: float) -> str:
    """Where Δ lies at 2 standard errors: lower, higher or within noise; no side without a standard error."""
    return NO_NOISE_ESTIMATE if not se > 0 else "within noise" if within_noise(delta, se) else "lower" if delta < 0 else "higher"


def two_readings(rows: list[dict], bests: dict[str, tuple[float, str]], baseline: str) -> tuple[list[str], str]:
    """Δ vs the baseline under the one default and with every arm at its own best; the line that says whether they
    disagree (a sign that flips, or a verdict that changes between beyond noise and within it)."""
    lines = [f"| arm | Δ vs {baseline}, every arm under the default | its own best (init, LR) | Δ vs {baseline}'s own best | readings |", "|---|---|---|---|---|"]
    disagree = []
    for r in rows:
        if r["variant"] == baseline:
            continue
        se = math.sqrt(noise_of(rows, r["variant"]) ** 2 + noise_of(rows, baseline) ** 2)  # at worst one run each
        a, b = r["delta_vs_baseline"], bests[r["variant"]][0] - bests[baseline][0]
        same = side_of_noise(a, se) == side_of_noise(b, se)
        if not same:
            disagree.append(f"{r['variant']} ({a:+.4f} under the default, {b:+.4f} at its own best)")
        lines.append(f"| {r['variant']} | {a:+.4f} | {bests[r['variant']][1]}: {bests[r['variant']][0]:.4f} | {b:+.4f} | {'agree' if same else '**disagree**'} |")
    said = ("**Do the claims hold with every arm at its own best (init, LR)?** "
            + (f"Not everywhere: the readings disagree for {'; '.join(disagree)}. That is a finding about the variants: the default init or the law's LR favours some of them."
               if disagree else f"The two readings agree for every arm (Δ vs {baseline} lower, higher or within noise alike)."))
    said += f" ({baseline}'s own best: {bests[baseline][1]}, {bests[baseline][0]:.4f}. A best of several one-run options is biased low by about a seed's σ; read small gaps with that.)"
    return lines, said


# --- the law held out, the multipliers ----------------------------------------------------------------------------

def held_out_table(fit: dict) -> list[str]:
    """Each arm's law fitted on every swept size but the largest, its prediction there against that size's measured curve."""
    lines = ["| arm | η* predicted at the largest size, law without it | measured η* there | ratio | regret of the prediction |", "|---|---|---|---|---|"]
    for arm, g in fit["groups"].items():
        cells = sorted(g["cells"], key=lambda c: c["n"])
        fitted = [c for c in cells[:-1] if "lr" in c]
        largest = cells[-1]
        window = [(lr, loss) for lr, loss in largest.get("points", []) if "fitted_lrs" not in largest or largest["fitted_lrs"][0] <= lr <= largest["fitted_lrs"][1]]
        try:
            if len(cells) < 3:
                raise FitError(f"a held-out test needs 3 swept sizes or more (2 to fit, 1 to test); this sweep has {len(cells)}")
            if len(fitted) < len(cells) - 1 or len(window) < 3:
                raise FitError("a smaller size or the largest has no fitted optimum")
            miss = held_out_miss([c["n"] for c in fitted] + [largest["n"]], [c["lr"] for c in fitted] + [math.nan], *map(list, zip(*window)))
            lines.append(f"| {arm} | {miss.predicted_lr:.3g} | {miss.measured_lr:.3g} | {miss.ratio:.2f}× | {miss.regret:+.4f} |")
        except FitError as e:
            lines.append(f"| {arm} | – | – | – | not tested: {e} |")
    return lines


def size_losses(results: Path, rows: list[dict], target_n: float) -> tuple[dict[str, dict[float, list[float]]], list[float]]:
    """arm -> N -> best losses: at each swept size the lowest final validation loss over its LRs (one run), at the
    target the comparison's seeds; N is the baseline-sized count of each size (the arms of a size differ by a few
    parameters). Also the swept sizes (one token budget), on which the baseline's L(N) is fitted."""
    sweep = not_diverged(read_results(results))
    n_of = {size: min(float(r["non_embedding_params"]) for r in sweep if r["size"] == size) for size in {r["size"] for r in sweep}}
    best: dict[str, dict[float, list[float]]] = defaultdict(dict)
    for r in sweep:
        at = best[r["variant"]].setdefault(n_of[r["size"]], [math.inf])
        at[0] = min(at[0], float(r["final_val_loss"]))
    for r in rows:
        best[r["variant"]][target_n] = list(r["final_val_losses"])
    return dict(best), sorted(n_of.values())


def multiplier_readings(losses: dict[str, dict[float, list[float]]], swept: list[float], baseline: str, noise: float) -> dict[str, Multipliers | str]:
    out: dict[str, Multipliers | str] = {}
    for arm, by in losses.items():
        if arm == baseline:
            continue
        try:
            out[arm] = multipliers(losses[baseline], by, fitted=swept, noise=noise)
        except FitError as e:
            out[arm] = str(e)
    return out


def multiplier_table(readings: dict[str, Multipliers | str], target_n: float) -> list[str]:
    sizes = sorted({n for m in readings.values() if isinstance(m, Multipliers) for n in m.sizes})
    if not sizes:
        return ["| arm | multiplier |", "|---|---|"] + [f"| {arm} | not read: {m} |" for arm, m in readings.items()]
    name = lambda n: f"N = {n:.3g}" + (" (target)" if n == target_n else "")  # noqa: E731
    lines = ["| arm | " + " | ".join(name(n) for n in sizes) + " | with size |", "|---|" + "---|" * len(sizes) + "---|"]
    for arm, m in readings.items():
        if isinstance(m, str):
            lines.append(f"| {arm} | " + " | ".join("–" for _ in sizes) + f" | not read: {m} |")
            continue
        cell = dict(zip(m.sizes, zip(m.values, m.intervals)))
        text = lambda v, ci: f"{v:.2f}×" + ("" if ci is None else f" ({ci[0]:.2f}–{'∞' if math.isinf(ci[1]) else f'{ci[1]:.2f}'})")  # noqa: E731
        lines.append(f"| {arm} | " + " | ".join(text(*cell[n]) if n in cell else "–" for n in sizes) + f" | {m.trend} |")
    return lines


def multiplier_plot(losses: dict[str, dict[float, list[float]]], swept: list[float], readings: dict[str, Multipliers | str], baseline: str, target_n: float, out: Path) -> Path:
    fig, (left, right) = panels(2, columns=2, height=3.8)
    colors = dict(zip(losses, plt.cm.tab10.colors))
    for arm, by in losses.items():
        ns = sorted(by)
        left.plot(ns, [float(np.mean(by[n])) for n in ns], "o" if arm != baseline else "s", color=colors[arm], ms=4, label=arm)
    try:
        law = fit_size_law(swept, [float(np.mean(losses[baseline][n])) for n in swept])
        grid = np.geomspace(min(swept) / 1.3, max(swept) * 1.3, 40)
        left.plot(grid, law(grid), "k-", lw=1, label=f"{baseline}: L = {law.E:.3g} + {law.A:.3g}·N^−{law.alpha:.2f}")
    except FitError:
        pass
    left.axvline(target_n, color="grey", ls=":", lw=0.8)
    left.set(xscale="log", xlabel="non-embedding parameters N", ylabel="best final validation loss", title="loss against N (dotted: the target, its own token budget)")
    left.legend(fontsize=6)
    for arm, m in readings.items():
        if isinstance(m, Multipliers):
            lo = [v - (ci[0] if ci else v) for v, ci in zip(m.values, m.intervals)]
            hi = [(ci[1] if ci else v) - v for v, ci in zip(m.values, m.intervals)]
            right.errorbar(m.sizes, m.values, yerr=[lo, hi], fmt="o-", color=colors[arm], ms=4, capsize=2, label=arm)
    right.axhline(1, color="k", lw=0.8)
    right.set(xscale="log", xlabel="non-embedding parameters N", ylabel=f"parameter multiplier over {baseline}", title="multiplier against N (95% bootstrap intervals)")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=6)
    return save_figure(fig, out / "multipliers")


def loss_choice_table(fit: dict, fit_val: dict) -> tuple[list[str], float]:
    """Each cell's η* picked by the training loss (the laws') and by the validation loss; the largest ratio."""
    lines = ["| arm | N | η* by training loss (95% interval) | η* by validation loss | ratio |", "|---|---|---|---|---|"]
    worst = 1.0
    for arm, g in fit["groups"].items():
        by_val = {c["n"]: c for c in fit_val["groups"].get(arm, {}).get("cells", [])}
        for c in g["cells"]:
            v = by_val.get(c["n"], {})
            if "lr" in c and "lr" in v:
                ratio = v["lr"] / c["lr"]
                worst = max(worst, ratio, 1 / ratio)
                lines.append(f"| {arm} | {c['n']:.3g} | {c['lr']:.3g} ({c['lr_ci'][0]:.3g} – {c['lr_ci'][1]:.3g}) | {v['lr']:.3g} | {ratio:.2f}× |")
            else:
                lines.append(f"| {arm} | {c['n']:.3g} | {c.get('lr', math.nan):.3g} | {v.get('lr', math.nan):.3g} | – |")
    return lines, worst
