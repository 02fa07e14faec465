"""The experiment report (docs/results/<name>.md): tables and plots from the runs, and a reading of the
paper's claims against them. Every number is read from the runs' files; nothing is typed in."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mea.plotting import plt, save_figure
from mea.runs import made_with, metrics_rows
from mea.scaling.sweep import at_largest_size, read_results
from mea.scaling.effects import Multipliers, difference
from mea.studies.protocol import reading, standard_error, verdict, within_noise
from mea.studies.trust import (bracket_claim, bracket_plot, bracket_table, held_out_table, init_table, loss_choice_table, multiplier_plot, multiplier_readings,
                               multiplier_table, noise_of, own_bests, read_brackets, reads, row_of, size_losses, two_readings)
from mea.tools.compare import DYNAMICS_NOTE, FALL_NOTE, fmt


def largest_size_runs(results: Path, stability: Path | None) -> dict[str, dict[float, dict]]:
    """arm -> LR -> the run at the sweep's largest size, the stability probe's LRs included."""
    grid: dict[str, dict[float, dict]] = {}
    for r in at_largest_size(read_results(*filter(None, (results, stability)))):
        grid.setdefault(r["variant"], {})[float(r["lr"])] = r
    return grid


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


def stability_cell(runs: dict[float, dict], lr: float, limit: float) -> str:
    if lr not in runs:
        return "–"
    if runs[lr]["diverged"] == "True":
        return "diverged"
    return f"{float(runs[lr]['final_val_loss']):.3f}" + ("" if lr <= limit else " ✗")


def lr_columns(lrs: list[float]) -> list[str]:
    """The header of a table with a column per LR."""
    return ["| arm | " + " | ".join(f"{lr:.3g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]


def stability_table(grid: dict[str, dict[float, dict]]) -> list[str]:
    lrs = sorted({lr for runs in grid.values() for lr in runs})
    lines = lr_columns(lrs)
    for arm, runs in grid.items():
        limit = stable_up_to(runs)
        lines.append(f"| {arm} | " + " | ".join(stability_cell(runs, lr, limit) for lr in lrs) + " |")
    return lines + ["", f"✗: fails to train — at or above the first LR whose loss ends more than {TRAINS_WITHIN:.0%} over the arm's best here."]


def first_step_under(rows: list[dict], loss: float) -> int | None:
    """The first logged step whose training loss is at or under `loss` (None: none is)."""
    return next((r["step"] for r in rows if r["loss"] <= loss), None)


def early_phase_table(grid: dict[str, dict[float, dict]]) -> list[str]:
    """How the runs that fail to train fail: the step at which each run's training loss first falls under the middle
    of the grid's fall (from the mean first logged loss to the best final one), one threshold for the whole grid so
    that the arms' steps compare. A failed run that gets there later than its arm's runs that train lost its steps in
    the early phase; one that gets there as soon fell behind afterwards. Nothing failed to explain: no table."""
    curves = {arm: {lr: metrics_rows(Path(r["run_dir"])) for lr, r in runs.items()} for arm, runs in grid.items()}
    first = float(np.mean([x for runs in curves.values() for rows in runs.values() if math.isfinite(x := rows[0]["loss"])]))
    best = min(float(r["final_train_loss"]) for runs in grid.values() for r in runs.values() if r["diverged"] != "True")
    middle = (first + best) / 2
    some = next(rows for runs in curves.values() for rows in runs.values() if len(rows) > 1)
    lrs = sorted({lr for runs in grid.values() for lr in runs})
    lines = [f"Step at which the training loss first falls under {middle:.2f}, half-way from the first logged loss ({first:.2f}, mean over these runs) "
             f"to the best final one ({best:.3f}), logged every {some[1]['step'] - some[0]['step']} steps: how a run that fails to train fails.", "", *lr_columns(lrs)]
    readings = []
    for arm, runs in grid.items():
        limit = stable_up_to(runs)
        steps = {lr: first_step_under(curves[arm][lr], middle) for lr in runs}
        lines.append(f"| {arm} | " + " | ".join("–" if lr not in steps else ("never" if steps[lr] is None else str(steps[lr])) + ("" if lr <= limit else " ✗") for lr in lrs) + " |")
        trains = [step for lr, step in steps.items() if lr <= limit and step is not None]
        fails = [step for lr, step in steps.items() if lr > limit]
        if fails and trains:
            readings.append(f"{arm}: {steps_range(fails)} where it fails, {steps_range(trains)} where it trains")
    return lines + ["", "Where each arm fails and where it trains: " + "; ".join(readings) + ". A failed run that gets there later than the arm's runs "
                        "that train lost its steps in the early phase; one that gets there as soon fell behind afterwards."] if readings else []


def steps_range(steps: list[int | None]) -> str:
    """'step 100', 'steps 225–625 (never in 1)', 'never': the steps of early_phase_table's runs, None for never."""
    reached = sorted(s for s in steps if s is not None)
    never = len(steps) - len(reached)
    if not reached:
        return "never"
    span = f"step {reached[0]}" if reached[0] == reached[-1] else f"steps {reached[0]}–{reached[-1]}"
    return span + (f" (never in {never})" if never else "")


GN_CLAIM = "+GroupNorm alone carries part of the gain"
DFA_CLAIM = "DFA without its norm drifts toward standard attention"
HALF_CACHE_CLAIM = "At half the KV cache, MEA's virtual heads beat grouped-query attention"
CLAIM_ARMS = {GN_CLAIM: ("mha_gn",), DFA_CLAIM: ("diff", "diff_nonorm"), HALF_CACHE_CLAIM: ("mea_virtual", "mha_gqa")}  # the claims that need arms besides mha and mea


def claims(p, fit: dict, lrs: dict, rows: list[dict], compression: list[dict], grid: dict[str, dict[float, dict]]) -> list[str]:
    out = []
    base = row_of(rows, p.baseline)
    mea, gn = row_of(rows, "mea"), row_of(rows, "mha_gn")
    if "mea" in lrs and p.baseline in lrs:
        ratio = lrs["mea"]["lr"] / lrs[p.baseline]["lr"]
        widths = {arm: [s["sensitivity_decades"] for s in g["cells"] if "sensitivity_decades" in s] for arm, g in fit["groups"].items()}
        mean = {arm: sum(w) / len(w) for arm, w in widths.items() if w}
        width_text = f"; mean LR range within {p.margin:.0%} of the optimum: mea {mean.get('mea', math.nan):.2f} vs {p.baseline} {mean.get(p.baseline, math.nan):.2f} decades"
        stable = {arm: stable_up_to(grid[arm]) for arm in ("mea", p.baseline) if arm in grid}
        signs = [ratio > 1, mean.get("mea", 0) >= mean.get(p.baseline, math.inf), stable.get("mea", 0) > stable.get(p.baseline, math.inf)]
        out.append(f"**MEA tolerates larger learning rates.** At the target size mea's LR is {ratio:.2f}× {p.baseline}'s{width_text}; "
                   f"largest LR that still trains (within {TRAINS_WITHIN:.0%} of the arm's best loss) at the largest swept size: mea {stable.get('mea', math.nan):.3g}, {p.baseline} {stable.get(p.baseline, math.nan):.3g}. "
                   f"{'Agrees' if all(signs) else 'Partly agrees' if any(signs) else 'Disagrees'} at this scale ({sum(signs)} of these 3 point MEA's way).")
    if mea and base:
        delta = mea["final_val_loss"] - base["final_val_loss"]
        out.append(f"**MEA reaches a lower validation loss than the Transformer.** Δ = {delta:+.4f} ({mea['seeds']} vs {base['seeds']} seeds): {reading(mea, base)}.")
    if gn and mea and base:
        d_gn, d_mea = gn["final_val_loss"] - base["final_val_loss"], mea["final_val_loss"] - base["final_val_loss"]
        share = d_gn / d_mea if d_mea else math.nan
        out.append(f"**{GN_CLAIM}.** Δ(mha_gn) = {d_gn:+.4f} against Δ(mea) = {d_mea:+.4f} (share {share:.2f}): "
                   f"{'agrees' if d_mea < 0 and 0 < share < 1 else 'does not show here'} ({reading(gn, base)} for mha_gn alone).")
    diff, nonorm = row_of(rows, "diff"), row_of(rows, "diff_nonorm")
    if diff and nonorm and base:
        gap, gap_nonorm = diff["final_val_loss"] - base["final_val_loss"], nonorm["final_val_loss"] - base["final_val_loss"]
        closer = abs(gap_nonorm) - abs(gap)  # the two arms' distance apart is what the seeds must resolve
        out.append(f"**{DFA_CLAIM}.** Distance to {p.baseline}: diff {gap:+.4f}, diff without norm {gap_nonorm:+.4f}: "
                   f"{verdict(closer, standard_error(diff, nonorm))} (the loss of diff without norm is {'closer to' if closer < 0 else 'further from'} the baseline's).")
    virtual, gqa = row_of(rows, "mea_virtual"), row_of(rows, "mha_gqa")
    if virtual and gqa:
        delta = virtual["final_val_loss"] - gqa["final_val_loss"]
        costs = []
        for half, full in ((virtual, mea), (gqa, base)):
            if full:
                cost = half["final_val_loss"] - full["final_val_loss"]
                costs.append(f"{half['variant']} {cost:+.4f} against {full['variant']} ({'within' if within_noise(cost, standard_error(half, full)) else 'beyond'} 2 standard errors)")
        said = (f"**{HALF_CACHE_CLAIM} (both trained from scratch).** Δ(mea_virtual − mha_gqa) = {delta:+.4f}: "
                f"{reading(virtual, gqa)}. What halving the cache costs each against its full-cache arm: {'; '.join(costs)}.")
        out.append(said)
    if len(compression) > 1:
        control = compression[0]  # the uncompressed model after the same continued pretraining
        parts = [f"{c['setting']}: {c['val_after_conversion'] - control['val_after_conversion']:+.4f} right after conversion, "
                 f"{c['val_after_recovery'] - control['val_after_recovery']:+.4f} after recovery against the uncompressed model recovered alike, "
                 f"{c['kv_bytes_per_token'] / control['kv_bytes_per_token']:.2f}× the KV bytes" for c in compression[1:]]
        out.append("**A 50% KV cache costs little after continued pretraining.** " + "; ".join(parts) + ". "
                   f"(The control itself moved {control['val_after_recovery'] - control['val_after_conversion']:+.4f} in its {control['recover_steps']} steps.)")
    if unread := [f"{claim} (needs {', '.join(a for a in arms if not row_of(rows, a))})" for claim, arms in CLAIM_ARMS.items() if not all(row_of(rows, a) for a in arms)]:
        out.append("**Not read: this spec lacks their arms.** " + "; ".join(unread) + ".")
    return out


def previous_results(path: Path) -> tuple[dict[str, dict], dict[str, int]]:
    """An earlier report's main-corpus rows (seeds, final validation loss mean and std, Δ against its baseline), and
    the steps of its LR-sweep and from-scratch runs, read from its text (its table and the command lines it printed)."""
    text = path.read_text()
    main = text.split("### main corpus", 1)[-1].split("###", 1)[0]
    rows = {arm: {"seeds": int(n), "final_val_loss": float(mean), "final_val_loss_std": float(std), "delta_vs_baseline": float(d)}
            for arm, n, mean, std, d in re.findall(r"^\| (\S+) \| (\d+) \| ([\d.]+) ± ([\d.]+) \| ([+-][\d.]+) \|", main, re.M)}
    steps = {kind: int(m.group(1)) for kind in ("an LR-sweep run", "a from-scratch run")
             if (m := re.search(rf"# {kind}\npython train.py [^\n]*trainer.max_steps=(\d+)", text))}
    return rows, steps


def side_of_baseline(row: dict | None, base: dict | None) -> str:
    """Where an arm's loss lies against the baseline's at 2 standard errors: lower, higher or within noise."""
    if row is None or base is None or row is base or row["seeds"] < 2 or base["seeds"] < 2:
        return "–"
    return reads(row["final_val_loss"] - base["final_val_loss"], standard_error(row, base))


def what_changed(p, rows: list[dict], out: Path, report: Path, init_audit: str | None) -> list[str]:
    lines = ["## What changed since the previous report", ""]
    if init_audit:
        lines += [init_audit, ""]
    previous = Path(p.previous_report)
    if not previous.is_file():
        return lines
    then, steps = previous_results(previous)
    now = {kind: int(next(o for o in example[1] if o.startswith("trainer.max_steps=")).split("=", 1)[1])
           for kind in ("an LR-sweep run", "a from-scratch run") if (example := example_run(out, RUN_KINDS[kind]))}
    budget = "; ".join(f"{kind.split(' ', 1)[1]}s: {steps.get(kind, '?')} steps then, {now.get(kind, '?')} now" for kind in ("an LR-sweep run", "a from-scratch run"))
    lines += [f"The [previous report]({os.path.relpath(previous, report.parent)}) against this one ({budget}); each reading is the arm's "
              f"loss against {p.baseline}'s at 2 standard errors:", "",
              f"| arm | Δ vs {p.baseline} then | reading then | Δ vs {p.baseline} now | reading now |", "|---|---|---|---|---|"]
    moved = []
    for arm in sorted({*then, *(r["variant"] for r in rows)}):
        old, mine = then.get(arm), row_of(rows, arm)
        read_then, read_now = side_of_baseline(old, then.get(p.baseline)), side_of_baseline(mine, row_of(rows, p.baseline))
        lines.append(f"| {arm} | {fmt(old and old['delta_vs_baseline'], '+.4f', '')} | {read_then} | {fmt(mine and mine['delta_vs_baseline'], '+.4f', '')} | {read_now} |")
        if "–" not in (read_then, read_now) and read_then != read_now:
            moved.append(f"{arm} ({read_then} then, {read_now} now)")
    return lines + ["", f"The reading moved for {', '.join(moved)}." if moved else "No arm's reading against the baseline moved.", ""]


def table(rows: list[dict], baseline: str) -> list[str]:
    base = row_of(rows, baseline)
    lines = [f"| arm | seeds | final val loss | Δ vs {baseline} | Δ 95% interval (Welch) | seeds to resolve Δ | fall over the last fifth | tokens to {baseline}'s loss | tokens/s (median over seeds) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "–" if not math.isfinite(r["tokens_to_baseline_ratio"]) else f"{r['tokens_to_baseline_ratio']:.2f}×"
        d = difference(r["final_val_losses"], base["final_val_losses"]) if base and r is not base else None
        interval = "–" if d is None or d.interval is None else f"{d.interval[0]:+.4f} to {d.interval[1]:+.4f}"
        resolve = "–" if d is None or d.seeds_to_resolve is None else str(d.seeds_to_resolve)
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['final_val_loss']:.4f} ± {r['final_val_loss_std']:.4f} | {r['delta_vs_baseline']:+.4f} | {interval} | {resolve} | "
                     f"{fmt(r['fall_last_fifth'], '+.4f', '')} | {ratio} | {r['tokens_per_s']:,.0f} |")
    return lines + ["", "Seeds to resolve Δ: per arm, for a two-sided 5% test with 80% power at the noise these seeds measured.", FALL_NOTE]


def budget(runs: Path) -> str:
    """Each run's steps and tokens, and how often that repeats the corpus's training split."""
    s = json.loads(next(iter(sorted(runs.glob("*/*/summary.json")))).read_text())
    passes = f": {s['passes']:.1f} passes over the corpus's training split" if "passes" in s else ""
    return f"Each run: {s['steps']:,} steps, {s['tokens']:,} tokens{passes}."


def training_time(out: Path) -> str:
    """How many runs, their training time, and the code they ran (git commits, with how many runs each)."""
    summaries = [json.loads(f.read_text()) for f in out.rglob("summary.json")]
    code = Counter(s.get("code", "not recorded") for s in summaries)
    versions = ", ".join(f"{c} ({n} runs)" for c, n in code.most_common())
    return f"{len(summaries)} training runs took {sum(s.get('wall_time_s', 0.0) for s in summaries) / 60:.1f} min in all · code: {versions}"


RUN_KINDS = {"an LR-sweep run": "sweep/*/*/*", "a stability-probe run": "stability/*/*/*", "a from-scratch run": "compare-main/*/*",
             "an LR-bracket run": "lr-bracket/*/*", "an init-check run": "init-check/*/*",
             "a second-corpus run": "compare-second/*/*", "a recovery run": "compression/*-recover"}


def example_run(out: Path, pattern: str) -> tuple[Path, list[str]] | None:
    """The first run matching pattern under out, with the overrides it was started with (its Hydra record)."""
    run = next(iter(sorted(out.glob(pattern))), None)
    overrides = None if run is None else made_with(run)
    return None if overrides is None else (run, overrides)


def commands(p, out: Path) -> list[str]:
    """The one command, and the exact command line of one run of each kind."""
    lines = ["How it was made — the one command, resumable:", "", "```bash", f"mea-experiment {p.spec}", "```", "",
             "which runs, for example:", "", "```bash"]
    lines += [f"# {kind}\npython train.py {' '.join(example[1])} hydra.run.dir={example[0]}" for kind, pattern in RUN_KINDS.items() if (example := example_run(out, pattern))]
    return lines + ["```"]


def recovery_plot(out: Path, compression_dir: Path, compression: list[dict]) -> Path:
    """Validation loss through continued pretraining, from right after conversion (tokens 0) on."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in compression:
        val = [(0, c["val_after_conversion"])] + [(r["tokens"], r["val_loss"]) for r in metrics_rows(compression_dir / c["run"]) if "val_loss" in r]
        ax.plot(*zip(*val), "o-", label=c["setting"])
    ax.set(xlabel="tokens of continued pretraining", ylabel="validation loss", title="Recovery after conversion to G stored heads")
    ax.legend(fontsize=7)
    return save_figure(fig, out / "compression_recovery")


@dataclass
class Findings:
    """What one sitting of the experiment measured, as the report reads it."""

    fit: dict  # the sweep's LR laws (by training loss)
    fit_val: dict  # the same laws by validation loss
    lrs: dict[str, dict]  # arm -> the LR its seeds trained at, and where it came from
    comparisons: dict[str, dict]  # corpus -> mea.tools.compare's result
    brackets: dict[str, dict]  # arm -> its LR bracket's runs (mea.studies.experiment.lr_brackets)
    init_checks: dict[str, dict[str, float]]  # arm -> init setting -> final validation loss
    compression: list[dict]
    results: Path
    stability: Path | None
    target_n: float


def trust_sections(p, f: Findings, rows: list[dict], brackets: dict[str, dict], assets: Path, rel) -> tuple[list[str], list[str]]:
    """The report's sections on how far its readings hold (mea.studies.trust), and its lines for the claims."""
    lines, said = [], []
    trained_at = ("each arm's law's LR" if p.lr_bracket.train_at == "law" else
                  "each bracketed arm's verified LR (its bracket's best; a bracket read flat below bought nothing measurable), the others' law's LR")
    if brackets:
        lines += ["## LR brackets at the target", "", f"Each bracketed arm trained at the target at its law's LR × {', '.join(f'{x:g}' for x in sorted(p.lr_bracket.factors))} "
                  f"(seed {p.target.seeds[0]}{'; ×1 is its comparison run' if p.lr_bracket.train_at == 'law' else ''}), one factor further where the best lay at an edge. "
                  "Best LR: the vertex of a quadratic in log LR through the lowest run and its neighbours; regret: the loss at the law's LR minus the best; "
                  "flat: every run of it within twice one run's seed noise of the best. Final validation loss:", ""] + bracket_table(brackets)
        lines += ["", f"The comparison's seeds train at {trained_at} (`lr_bracket.train_at={p.lr_bracket.train_at}`).", "", f"![LR brackets]({rel(bracket_plot(brackets, assets).name)})", ""]
        said.append(bracket_claim(brackets, rows, p.baseline))
    if f.init_checks:
        lines += ["## The init, checked at the target", "", f"Each checked arm also trained at its comparison LR under each other init (seed {p.target.seeds[0]}, one run): "
                  + "; ".join(f"{name}: `{' '.join(o)}`" for name, o in p.init_checks.settings.items())
                  + ". The default's handicap: its seeds' mean minus the best other init, beyond noise where over twice the standard error of one run against that mean.", ""]
        lines += init_table(f.init_checks, rows) + [""]
    if brackets or f.init_checks:
        table_lines, line = two_readings(rows, own_bests(rows, brackets, f.init_checks, f.lrs), p.baseline)
        lines += ["## Two readings: one default, and every arm at its own best", "", line, ""] + table_lines + [""]
        said.append(line)
    return lines, said


def law_checks(p, f: Findings) -> list[str]:
    """The law held out on the largest swept size, and which loss picks the LR."""
    lines = ["### The law on a size it did not see", "", "Each arm's law fitted on every swept size but the largest, its η* there against the quadratic "
             "through that size's runs near their best (by training loss, as the laws are fitted). Step Law (arXiv 2503.04715) scores laws by this regret.", ""]
    lines += held_out_table(f.fit) + ["", "### Which loss picks the LR", ""]
    lines += ["The laws are fitted to the training loss, each run's mean over the last tenth of its logged steps: it averages many more tokens than the "
              "final validation loss, read at one step on `trainer.eval_batches` batches, so its optimum is less noisy. Every table reads the validation loss. "
              "The same sweep with the optimum picked by the validation loss instead:", ""]
    if not f.fit_val["groups"]:
        return lines + [f"No law by validation loss: {'; '.join(f.fit_val['messages'])}", ""]
    table_lines, worst = loss_choice_table(f.fit, f.fit_val)
    at_target = "; ".join(f"{arm} {f.lrs[arm]['lr']:.3g} → {next(iter(g['predictions'].values()))['lr']:.3g}" for arm, g in f.fit_val["groups"].items()
                          if "predictions" in g and arm in f.lrs)
    return lines + table_lines + ["", f"The largest ratio between the two optima is {worst:.2f}× (the sweep's LR grid steps "
                                  f"{(p.sweep.lr_max / p.sweep.lr_min) ** (1 / max(1, p.sweep.lr_points - 1)):.2f}× a point). "
                                  f"At the target, the LR its seeds train at against the law by validation loss: {at_target or 'none fitted'}.", ""]


def multiplier_section(p, f: Findings, rows: list[dict], assets: Path, rel) -> list[str]:
    losses, swept = size_losses(f.results, rows, f.target_n)
    if p.baseline not in losses:
        return []
    noise = noise_of(rows, p.baseline)
    readings = multiplier_readings(losses, swept, p.baseline, noise)
    lines = ["## Parameter multipliers across sizes", "", f"The baseline's L(N) = E + A·N^(−α) fitted to {p.baseline}'s best final validation loss at each swept size "
             "(the lowest over its LRs, one token budget); each arm's multiplier M = ((L_base(N) − E)/(L_arm − E))^(1/α) is the factor of baseline parameters "
             "that reaches the arm's loss. At the target, trained on its own token budget, the floor moves by the baseline's loss there (the D term of "
             f"L(N, D) is additive). 95% intervals: the target's seeds resampled, one swept run redrawn with one run's seed noise (σ = {noise:.4f}, from the target).", ""]
    lines += multiplier_table(readings, f.target_n)
    if len(swept) == 3 and any(isinstance(m, Multipliers) for m in readings.values()):
        lines += ["", f"{len(swept)} swept sizes fix the law's three parameters exactly: a multiplier's interval rests on the seed noise alone, and a trend "
                  "over this few sizes is a weak reading; only one whose interval excludes no change says anything."]
    return lines + ["", f"![multipliers]({rel(multiplier_plot(losses, swept, readings, p.baseline, f.target_n, assets).name)})", ""]


def write_report(p, f: Findings, made: dict, path: Path) -> Path:
    """The report at path, its plots in the folder of its name; `made` is the sitting's record (experiment.made_now)."""
    out = Path(p.out)
    rows = f.comparisons["main"]["rows"]
    grid = largest_size_runs(f.results, f.stability)
    brackets = read_brackets(f.brackets, rows)
    assets = path.with_suffix("")
    assets.mkdir(parents=True, exist_ok=True)
    plots = [out / "fit" / "lr_curves.png", out / "fit" / "lr_law.png", *f.comparisons["main"]["plots"]]
    plots += [recovery_plot(assets, out / "compression", f.compression)]
    for corpus, comp in f.comparisons.items():
        if corpus != "main":
            for plot in comp["plots"]:
                shutil.copy(plot, assets / f"{corpus}_{plot.name}")
    for plot in plots:
        if plot.parent != assets:
            shutil.copy(plot, assets / plot.name)
    rel = lambda name: f"{assets.name}/{name}"  # noqa: E731
    trust, trust_claims = trust_sections(p, f, rows, brackets, assets, rel)
    lines = [f"# {p.name}: the paper's claims at small scale", "",
             f"Made by `mea-experiment` on {made['date']} · {made['machine']} CPU, {made['cores']} cores, torch {made['torch']}, "
             f"{made['threads']} threads · {training_time(out)} · wall time of this sitting {made['wall_s'] / 60:.1f} min (a re-run skips finished steps). "
             f"Its runs' configs, summaries and metrics are in [{assets.name}/runs.tar.xz]({assets.name}/runs.tar.xz): `mea-experiment {p.spec} --from-archive "
             f"{path.with_suffix('')}/runs.tar.xz` makes this report again from them alone.", "",
             *commands(p, out), "",
             "## Reading against the paper", ""] + [f"- {c}" for c in trust_claims + claims(p, f.fit, f.lrs, rows, f.compression, grid)] + [""]
    lines += what_changed(p, rows, out, path, made['init_audit'])
    lines += ["## LR laws", "", "| arm | a | b (95% interval) | sizes fitted | LR at the target (95% interval) | source |", "|---|---|---|---|---|---|"]
    for arm, chosen in f.lrs.items():
        g = f.fit["groups"].get(arm, {})
        ci = "–" if chosen["ci"] is None else f"{chosen['ci'][0]:.3g} – {chosen['ci'][1]:.3g}"
        law = (f"{g['a']:.4g}", f"{g['b']:.3f} ({g['b_ci'][0]:.3f} – {g['b_ci'][1]:.3f})") if "a" in g else ("–", "–")
        fitted = f"{sum('lr' in c for c in g.get('cells', []))} of {len(g.get('cells', []))}"
        lines.append(f"| {arm} | {law[0]} | {law[1]} | {fitted} | {chosen['lr']:.3g} ({ci}) | {chosen['source']} |")
    if f.fit["messages"]:  # a size left out of a law: its LR rests on fewer points, read it with that in mind
        lines += [""] + [f"> {m}" for m in f.fit["messages"]]
    cells = next(iter(f.fit["groups"].values()))["cells"]
    lines += ["", f"LR range within {p.margin:.0%} of each size's optimum (decades):", "", "| arm | " + " | ".join(f"N = {s['n']:.3g}" for s in cells) + " |", "|---|" + "---|" * len(cells)]
    for arm, g in f.fit["groups"].items():
        lines.append(f"| {arm} | " + " | ".join(f"{s['sensitivity_decades']:.2f}" if "sensitivity_decades" in s else "–" for s in g["cells"]) + " |")
    lines += ["", f"![LR curves]({rel('lr_curves.png')})", "", f"![LR law]({rel('lr_law.png')})", "",
              f"Final validation loss against LR at the largest swept size{', the grid continued to where each arm fails to train' if f.stability else ''}:", ""]
    lines += stability_table(grid) + [""] + (early_phase + [""] if (early_phase := early_phase_table(grid)) else []) + law_checks(p, f) + trust
    lines += ["## From-scratch comparison", "",
              f"Validation loss at equal tokens, each arm at {'its own law' if p.lr_bracket.train_at == 'law' else 'its verified'}'s LR. Tokens/s are the runs' own, on whatever else "
              "the machine was doing; speed ratios measured side by side are in BENCHMARKS.md.", ""]
    for corpus, comp in f.comparisons.items():
        lines += [f"### {'main corpus' if corpus == 'main' else 'second corpus'}", "", budget(out / f"compare-{corpus}"), ""] + table(comp["rows"], comp["baseline"]) + [""]
        prefix = "" if corpus == "main" else f"{corpus}_"
        lines += [f"![loss]({rel(prefix + 'loss_vs_tokens.png')}) ![delta]({rel(prefix + 'delta_vs_baseline.png')})", ""]
        if comp["notes"]:
            lines += [f"> {n}" for n in comp["notes"]] + [""]
    if f.comparisons["main"]["dynamics"]:
        lines += ["### Training dynamics (main corpus)", "", DYNAMICS_NOTE, ""]
        lines += [" ".join(f"![{d.stem}]({rel(d.name)})" for d in f.comparisons["main"]["dynamics"]), ""]
    lines += multiplier_section(p, f, rows, assets, rel)
    compression = f.compression
    lines += ["## KV-cache compression", "", f"Continued pretraining: {compression[0]['recover_steps']} steps, the same for every row. Validation loss here is "
              "`mea-eval`'s, over the first 256 validation windows (the trainer's own, in the table above, reads fewer).", "",
              "| setting | val loss after conversion | after continued pretraining | KV bytes/token (bf16) | decode ms/token (CPU, batch 4) |", "|---|---|---|---|---|"]
    for c in compression:
        lines.append(f"| {c['setting']} | {c['val_after_conversion']:.4f} | {c['val_after_recovery']:.4f} | {c['kv_bytes_per_token']:,} | {c['decode_ms']:.2f} |")
    lines += ["", f"![recovery]({rel('compression_recovery.png')})", "", "## Scaling up", "",
              "The same spec runs at GPU scale by overrides: larger `sweep.sizes` (model presets 25m–350m), `target.model=1.3b`, token budgets ×1000, "
              "`data=fineweb_edu`, `deepspeed=zero2`, and `mea-sweep --slurm` for the sweep's job arrays.", ""]
    path.write_text("\n".join(lines) + "\n")
    return path
