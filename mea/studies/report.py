"""The experiment report (docs/results/<name>.md): tables and plots from the runs, and a reading of the
paper's claims against them. Every number is read from the runs' files; nothing is typed in."""
from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mea.plotting import plt, save_figure
from mea.run_directory import write_synced
from mea.runs import made_with, metrics_rows
from mea.scaling.effects import Multipliers, difference
from mea.scaling.sweep import SweepError, at_largest_size, read_results
from mea.studies.claims import Evidence, read_claims
from mea.studies.protocol import standard_error
from mea.studies.trust import (
    TRAINS_WITHIN,
    bracket_claim,
    bracket_plot,
    bracket_table,
    held_out_table,
    init_table,
    loss_choice_table,
    multiplier_plot,
    multiplier_readings,
    multiplier_table,
    noise_of,
    own_bests,
    read_brackets,
    row_of,
    side_of_noise,
    size_losses,
    stable_up_to,
    two_readings,
)
from mea.tools.compare import DYNAMICS_NOTE, FALL_NOTE, fmt


def largest_size_runs(results: Path, stability: Path | None) -> dict[str, dict[float, dict]]:
    """arm -> LR -> the run at the sweep's largest size, the stability probe's LRs included."""
    grid: dict[str, dict[float, dict]] = {}
    for r in at_largest_size(read_results(*filter(None, (results, stability)))):
        grid.setdefault(r["variant"], {})[float(r["lr"])] = r
    return grid


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


READING_KINDS = ("an LR-sweep run", "a from-scratch run")  # the runs whose step counts "What changed" sets side by side


def readings(p, f: Findings, out: Path) -> dict:
    """The report's readings as data, written beside it (<report>/readings.json) and read by a later report's
    "What changed": each corpus's comparison rows, and the steps of one LR-sweep and one from-scratch run."""
    steps = {kind: int(next(o for o in example[1] if o.startswith("trainer.max_steps=")).split("=", 1)[1])
             for kind in READING_KINDS if (example := example_run(out, RUN_KINDS[kind]))}
    return {"format": 1, "baseline": p.baseline, "steps": steps, "corpora": {corpus: comp["rows"] for corpus, comp in f.comparisons.items()}}


def readings_file(report: Path) -> Path:
    return report.with_suffix("") / "readings.json"


def check_previous_report(report: Path) -> None:
    """A previous report is read from its readings.json (before any compute: the sitting would end on it)."""
    if not readings_file(report).is_file():
        raise SweepError(f"previous_report={report} has no {readings_file(report)}, which its comparison is read from; "
                         "make that report again with mea-experiment (--from-archive where it has runs.tar.xz), or leave previous_report out")


def side_of_baseline(row: dict | None, base: dict | None) -> str:
    """Where an arm's loss lies against the baseline's at 2 standard errors: lower, higher or within noise."""
    if row is None or base is None or row is base or row["seeds"] < 2 or base["seeds"] < 2:
        return "–"
    return side_of_noise(row["final_val_loss"] - base["final_val_loss"], standard_error(row, base))


def what_changed(p, now: dict, report: Path, init_audit: str | None) -> list[str]:
    """This report's readings beside the previous report's (p.previous_report): each arm's Δ and its side of the baseline then and now."""
    lines = ["## What changed since the previous report", ""]
    if init_audit:
        lines += [init_audit, ""]
    previous = Path(p.previous_report)
    if not previous.is_file():
        return lines
    check_previous_report(previous)
    before = json.loads(readings_file(previous).read_text())
    then, rows = {r["variant"]: r for r in before["corpora"]["main"]}, now["corpora"]["main"]
    budget = "; ".join(f"{kind.split(' ', 1)[1]}s: {before['steps'].get(kind, '?')} steps then, {now['steps'].get(kind, '?')} now" for kind in READING_KINDS)
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
    lines = [f"| arm | seeds | final val loss | Δ vs {baseline} | Δ 95% interval (Welch) | seeds to resolve Δ | "
             f"fall over the last fifth | tokens to {baseline}'s loss | tokens/s (median over seeds) |",
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


def title_and_where(p, made: dict, out: Path, target_n: float) -> list[str]:
    """The title, and where and how the sitting was made: the driver's machine, and the machines its runs trained on
    (their summaries' `device`), with GPU-hours. A sitting made before runs recorded their device says so as it did."""
    if "device" not in made:
        return [f"# {p.name}: the paper's claims at small scale", "",
                f"Made by `mea-experiment` on {made['date']} · {made['machine']} CPU, {made['cores']} cores, torch {made['torch']}, {made['threads']} threads · "
                f"{training_time(out)} · "]
    summaries = [json.loads(f.read_text()) for f in out.rglob("summary.json")]
    kinds = Counter(s.get("device", "a machine not recorded") for s in summaries)
    gpu_hours = {kind: sum(s["wall_time_s"] * s["world_size"] for s in summaries if s.get("device") == kind) / 3600 for kind in kinds}
    where = "; ".join(f"{n} on {kind}" + ("" if "CPU" in kind else f" ({gpu_hours[kind]:,.1f} GPU-hours)") for kind, n in kinds.most_common())
    return [f"# {p.name}: the paper's claims at {target_n:.3g} non-embedding parameters", "",
            f"Made by `mea-experiment` on {made['date']}, driven from {made['device']} (torch {made['torch']}) · runs: {where} · {training_time(out)} · "]


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
    """The first run matching pattern under out that has a Hydra record (not submitit's or SLURM's folders), with
    the overrides it was started with."""
    return next(((run, overrides) for run in sorted(out.glob(pattern)) if (overrides := made_with(run)) is not None), None)


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


def lr_law_section(p, f: Findings) -> list[str]:
    """Each arm's law and the LR its seeds train at, and the LR range near each size's optimum."""
    lines = ["## LR laws", "", "| arm | a | b (95% interval) | sizes fitted | LR at the target (95% interval) | source |", "|---|---|---|---|---|---|"]
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
    return lines


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
    lines = [*title_and_where(p, made, out, f.target_n),
             f"wall time of this sitting {made['wall_s'] / 60:.1f} min (a re-run skips finished steps). "
             f"Its runs' configs, summaries and metrics are in [{assets.name}/runs.tar.xz]({assets.name}/runs.tar.xz): `mea-experiment {p.spec} --from-archive "
             f"{path.with_suffix('')}/runs.tar.xz` makes this report again from them alone.", "",
             *commands(p, out), "",
             "## Reading against the paper", ""] + [f"- {c}" for c in trust_claims + read_claims(p.claims, Evidence(p, f.fit, f.lrs, rows, f.compression, grid))] + [""]
    now = readings(p, f, out)
    write_synced(readings_file(path), json.dumps(now, indent=1))
    lines += what_changed(p, now, path, made['init_audit'])
    lines += lr_law_section(p, f)
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
              "The protocol runs at GPU scale from `sweeps/paper_gpu_small.yaml` (targets near 125M) and `sweeps/paper_gpu.yaml` (350M–1.3B, FineWeb-Edu): "
              "`mea-experiment SPEC --plan` prices a sitting in GPU-hours before it starts, and `mea-experiment SPEC --slurm` runs every stage as SLURM jobs "
              "(docs/cluster.md).", ""]
    write_synced(path, "\n".join(lines) + "\n")
    return path
