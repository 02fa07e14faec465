"""The experiment report (docs/results/<name>.md): tables and plots from the runs, and a reading of the
paper's claims against them. Every number is read from the runs' files; nothing is typed in."""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from mea.plotting import plt, save_figure
from mea.runs import made_with
from mea.scaling.sweep import at_largest_size, load_spec, read_results
from mea.studies.init_audit import REFERENCE, finding
from mea.scaling.effects import difference
from mea.studies.protocol import reading, standard_error, verdict, within_noise
from mea.tools.compare import DYNAMICS_NOTE, FALL_NOTE, fmt


def row_of(rows: list[dict], arm: str) -> dict | None:
    return next((r for r in rows if r["variant"] == arm), None)


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


def stability_table(grid: dict[str, dict[float, dict]]) -> list[str]:
    lrs = sorted({lr for runs in grid.values() for lr in runs})
    lines = ["| arm | " + " | ".join(f"{lr:.3g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for arm, runs in grid.items():
        limit = stable_up_to(runs)
        lines.append(f"| {arm} | " + " | ".join(stability_cell(runs, lr, limit) for lr in lrs) + " |")
    return lines + ["", f"✗: fails to train — at or above the first LR whose loss ends more than {TRAINS_WITHIN:.0%} over the arm's best here."]


def bracket_claim(brackets: dict[str, dict], rows: list[dict], baseline: str) -> str:
    """Whether any bracketed arm's law LR missed its optimum by more than the smallest gap the comparison reads."""
    regrets = {arm: b["bracket"].regret for arm, b in brackets.items()}
    worst = max(regrets, key=regrets.get)
    gaps = {r["variant"]: abs(r["delta_vs_baseline"]) for r in rows if r["variant"] != baseline}
    smallest = min(gaps, key=gaps.get) if gaps else None
    open_edges = [arm for arm, b in brackets.items() if b["bracket"].extend]
    said = (f"**Were the laws' LRs near each arm's optimum at the target?** Bracketed ({', '.join(brackets)}): the largest regret of a law's LR is "
            f"{worst}'s, {regrets[worst]:+.4f} (its seeds' σ {next(r for r in rows if r['variant'] == worst)['final_val_loss_std']:.4f}).")
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


def claims(p, fit: dict, lrs: dict, rows: list[dict], compression: list[dict], grid: dict[str, dict[float, dict]], lr_checks: dict[str, dict], brackets: dict[str, dict]) -> list[str]:
    out = [bracket_claim(brackets, rows, p.baseline)] if brackets else []
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
        out.append(f"**+GroupNorm alone carries part of the gain.** Δ(mha_gn) = {d_gn:+.4f} against Δ(mea) = {d_mea:+.4f} (share {share:.2f}): "
                   f"{'agrees' if d_mea < 0 and 0 < share < 1 else 'does not show here'} ({reading(gn, base)} for mha_gn alone).")
    diff, nonorm = row_of(rows, "diff"), row_of(rows, "diff_nonorm")
    if diff and nonorm and base:
        gap, gap_nonorm = diff["final_val_loss"] - base["final_val_loss"], nonorm["final_val_loss"] - base["final_val_loss"]
        closer = abs(gap_nonorm) - abs(gap)  # the two arms' distance apart is what the seeds must resolve
        out.append(f"**DFA without its norm drifts toward standard attention.** Distance to {p.baseline}: diff {gap:+.4f}, diff without norm {gap_nonorm:+.4f}: "
                   f"{verdict(closer, standard_error(diff, nonorm))} (the loss of diff without norm is {'closer to' if closer < 0 else 'further from'} the baseline's).")
    virtual, gqa = row_of(rows, "mea_virtual"), row_of(rows, "mha_gqa")
    if virtual and gqa:
        delta = virtual["final_val_loss"] - gqa["final_val_loss"]
        costs = []
        for half, full in ((virtual, mea), (gqa, base)):
            if full:
                cost = half["final_val_loss"] - full["final_val_loss"]
                costs.append(f"{half['variant']} {cost:+.4f} against {full['variant']} ({'within' if within_noise(cost, standard_error(half, full)) else 'beyond'} 2 standard errors)")
        said = (f"**At half the KV cache, MEA's virtual heads beat grouped-query attention (both trained from scratch).** Δ(mea_virtual − mha_gqa) = {delta:+.4f}: "
                f"{reading(virtual, gqa)}. What halving the cache costs each against its full-cache arm: {'; '.join(costs)}.")
        if check := lr_checks.get("mha_gqa"):
            fair = virtual["final_val_loss"] - check["row"]["final_val_loss"]
            said += f" Against mha_gqa trained at {check['other']}'s LR ({lrs[check['other']]['lr']:.3g}): Δ = {fair:+.4f}, {reading(virtual, check['row'])}."
        out.append(said)
    if len(compression) > 1:
        control = compression[0]  # the uncompressed model after the same continued pretraining
        parts = [f"{c['setting']}: {c['val_after_conversion'] - control['val_after_conversion']:+.4f} right after conversion, "
                 f"{c['val_after_recovery'] - control['val_after_recovery']:+.4f} after recovery against the uncompressed model recovered alike, "
                 f"{c['kv_bytes_per_token'] / control['kv_bytes_per_token']:.2f}× the KV bytes" for c in compression[1:]]
        out.append("**A 50% KV cache costs little after continued pretraining.** " + "; ".join(parts) + ". "
                   f"(The control itself moved {control['val_after_recovery'] - control['val_after_conversion']:+.4f} in its {control['recover_steps']} steps.)")
    for arm, check in lr_checks.items():
        own, at = row_of(rows, arm), check["row"]
        if own:
            d = at["final_val_loss"] - own["final_val_loss"]
            outcome = ("within noise (|Δ| ≤ 2 standard errors)" if within_noise(d, standard_error(at, own))
                       else f"its own law's LR handicapped it: read the claims on {arm} with this" if d < 0 else "its own law's LR is the better one")
            out.append(f"**Checked: did its law's LR handicap {arm}?** Trained at {check['other']}'s LR ({lrs[check['other']]['lr']:.3g}) instead of its own ({lrs[arm]['lr']:.3g}): "
                       f"{at['final_val_loss']:.4f} ± {at['final_val_loss_std']:.4f} against {own['final_val_loss']:.4f} ± {own['final_val_loss_std']:.4f} "
                       f"({at['seeds']} vs {own['seeds']} seeds): Δ = {d:+.4f}, {outcome}.")
    return out


def previous_results(path: Path) -> tuple[dict[str, float], dict[str, int]]:
    """An earlier report's main-corpus deltas against its baseline, and the steps of its LR-sweep and from-scratch runs,
    read from its text (its table and the command lines it printed)."""
    text = path.read_text()
    main = text.split("### main corpus", 1)[-1].split("###", 1)[0]
    deltas = {arm: float(d) for arm, d in re.findall(r"^\| (\S+) \| \d+ \| [\d.]+ ± [\d.]+ \| ([+-][\d.]+) \|", main, re.M)}
    steps = {kind: int(m.group(1)) for kind in ("an LR-sweep run", "a from-scratch run")
             if (m := re.search(rf"# {kind}\npython train.py [^\n]*trainer.max_steps=(\d+)", text))}
    return deltas, steps


def what_changed(p, rows: list[dict], out: Path, report: Path) -> list[str]:
    lines = ["## What changed since the first report", ""]
    if p.init_audit:
        lines += [finding(load_spec(Path(p.init_audit)), REFERENCE), ""]
    previous = Path(p.previous_report)
    if not previous.is_file():
        return lines
    deltas, steps = previous_results(previous)
    now = {kind: int(next(o for o in example[1] if o.startswith("trainer.max_steps=")).split("=", 1)[1])
           for kind in ("an LR-sweep run", "a from-scratch run") if (example := example_run(out, RUN_KINDS[kind]))}
    budget = "; ".join(f"{kind.split(' ', 1)[1]}s: {steps.get(kind, '?')} steps then, {now.get(kind, '?')} now" for kind in ("an LR-sweep run", "a from-scratch run"))
    lines += [f"The [previous report]({os.path.relpath(previous, report.parent)}) against this one ({budget}):", "",
              f"| arm | Δ vs {p.baseline} then | Δ vs {p.baseline} now |", "|---|---|---|"]
    for arm in sorted({*deltas, *(r["variant"] for r in rows)}):
        mine, then = row_of(rows, arm), f"{deltas[arm]:+.4f}" if arm in deltas else "–"
        lines.append(f"| {arm} | {then} | {mine['delta_vs_baseline']:+.4f} |" if mine else f"| {arm} | {then} | – |")
    return lines + [""]


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
        rows = [json.loads(line) for line in (compression_dir / c["run"] / "metrics.jsonl").read_text().splitlines()]
        val = [(0, c["val_after_conversion"])] + [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
        ax.plot(*zip(*val), "o-", label=c["setting"])
    ax.set(xlabel="tokens of continued pretraining", ylabel="validation loss", title="Recovery after conversion to G stored heads")
    ax.legend(fontsize=7)
    return save_figure(fig, out / "compression_recovery")


def write_report(p, fit: dict, lrs: dict, comparisons: dict, lr_checks: dict[str, dict], brackets: dict[str, dict], compression: list[dict], results: Path, stability: Path | None,
                 wall_s: float, path: Path) -> Path:
    out = Path(p.out)
    grid = largest_size_runs(results, stability)
    assets = path.with_suffix("")
    assets.mkdir(parents=True, exist_ok=True)
    plots = [out / "fit" / "lr_curves.png", out / "fit" / "lr_law.png", *comparisons["main"]["plots"]]
    plots += [recovery_plot(assets, out / "compression", compression)]
    for corpus, comp in comparisons.items():
        if corpus != "main":
            for plot in comp["plots"]:
                shutil.copy(plot, assets / f"{corpus}_{plot.name}")
    for plot in plots:
        if plot.parent != assets:
            shutil.copy(plot, assets / plot.name)
    rel = lambda name: f"{assets.name}/{name}"  # noqa: E731
    lines = [f"# {p.name}: the paper's claims at small scale", "",
             f"Made by `mea-experiment` on {time.strftime('%Y-%m-%d')} · {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads · {training_time(out)} · wall time of this sitting {wall_s / 60:.1f} min (a re-run skips finished steps).", "",
             *commands(p, out), "",
             "## Reading against the paper", ""] + [f"- {c}" for c in claims(p, fit, lrs, comparisons["main"]["rows"], compression, grid, lr_checks, brackets)] + [""]
    lines += what_changed(p, comparisons["main"]["rows"], out, path)
    lines += ["## LR laws", "", "| arm | a | b (95% interval) | sizes fitted | LR at the target (95% interval) | source |", "|---|---|---|---|---|---|"]
    for arm, chosen in lrs.items():
        g = fit["groups"].get(arm, {})
        ci = "–" if chosen["ci"] is None else f"{chosen['ci'][0]:.3g} – {chosen['ci'][1]:.3g}"
        law = (f"{g['a']:.4g}", f"{g['b']:.3f} ({g['b_ci'][0]:.3f} – {g['b_ci'][1]:.3f})") if "a" in g else ("–", "–")
        fitted = f"{sum('lr' in c for c in g.get('cells', []))} of {len(g.get('cells', []))}"
        lines.append(f"| {arm} | {law[0]} | {law[1]} | {fitted} | {chosen['lr']:.3g} ({ci}) | {chosen['source']} |")
    if fit["messages"]:  # a size left out of a law: its LR rests on fewer points, read it with that in mind
        lines += [""] + [f"> {m}" for m in fit["messages"]]
    lines += ["", f"LR range within {p.margin:.0%} of each size's optimum (decades):", "", "| arm | " + " | ".join(f"N = {s['n']:.3g}" for s in next(iter(fit["groups"].values()))["cells"]) + " |",
              "|---|" + "---|" * len(next(iter(fit["groups"].values()))["cells"])]
    for arm, g in fit["groups"].items():
        lines.append(f"| {arm} | " + " | ".join(f"{s['sensitivity_decades']:.2f}" if "sensitivity_decades" in s else "–" for s in g["cells"]) + " |")
    lines += ["", f"![LR curves]({rel('lr_curves.png')}) ![LR law]({rel('lr_law.png')})", "",
              f"Final validation loss against LR at the largest swept size{', the grid continued to where each arm fails to train' if stability else ''}:", ""]
    lines += stability_table(grid) + [""]
    if brackets:
        lines += ["## LR brackets at the target", "", f"Each bracketed arm trained at the target at its law's LR × {', '.join(f'{f:g}' for f in sorted(p.lr_bracket.factors))} "
                  f"(seed {p.target.seeds[0]}; ×1 is its comparison run), one factor further where the best lay at an edge. Best LR: the vertex of a quadratic in log LR "
                  "through the lowest run and its neighbours; regret: the loss at the law's LR minus the best. Final validation loss:", ""] + bracket_table(brackets) + [""]
    lines += ["## From-scratch comparison", "",
                                     "Validation loss at equal tokens, each arm at its own law's LR. Tokens/s are the runs' own, on whatever else "
                                     "the machine was doing; speed ratios measured side by side are in BENCHMARKS.md.", ""]
    for corpus, comp in comparisons.items():
        lines += [f"### {'main corpus' if corpus == 'main' else 'second corpus'}", "", budget(out / f"compare-{corpus}"), ""] + table(comp["rows"], comp["baseline"]) + [""]
        prefix = "" if corpus == "main" else f"{corpus}_"
        lines += [f"![loss]({rel(prefix + 'loss_vs_tokens.png')}) ![delta]({rel(prefix + 'delta_vs_baseline.png')})", ""]
        if comp["notes"]:
            lines += [f"> {n}" for n in comp["notes"]] + [""]
    if comparisons["main"]["dynamics"]:
        lines += ["### Training dynamics (main corpus)", "", DYNAMICS_NOTE, ""]
        lines += [" ".join(f"![{p.stem}]({rel(p.name)})" for p in comparisons["main"]["dynamics"]), ""]
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
