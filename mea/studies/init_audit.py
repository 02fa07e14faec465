"""`mea-init-audit`: which initialisation handicaps no attention variant, as one resumable command.

    mea-init-audit sweeps/init_audit.yaml                # the sweep, a seed check, docs/results/init_audit.md
    mea-init-audit sweeps/init_audit.yaml --report-only  # the report from the runs finished so far
    mea-init-audit sweeps/init_audit.yaml --size d64     # one size's sweep (sizes side by side), the seeds, a report

The spec is a sweep spec (`mea-sweep`) whose arms cross attention variants with init settings (`model.init.*`);
each run's variant and init are read from its own config. A setting that changes nothing in a variant (a
head-norm scale where there is no head norm) needs no runs of its own: the variant's runs under the setting it
equals stand for it. Then arms are trained again at their best LR of the smallest size with other seeds
(`--seeds`, `--seed-arms`), evaluating every tenth of the run: the spread between seeds is the noise the
comparison is read against, and those runs' training dynamics are drawn. A setting passes when, at every size,
no variant's best loss under it is worse than under the setting that suits that variant best by more than
2·√2 seed standard deviations (two single-seed values); so `mha` loses nothing measurable against the reference
setting (the default before the audit) under a passing one either. Every number of the report is read from
the runs.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import fields
from functools import cache
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mea.config import load_config
from mea.models import LM, variant_class
from mea.models.attention.base import HeadNorm, HeadShape
from mea.models.dynamics import measure
from mea.models.init import InitConfig
from mea.plotting import panels, plt, save_figure
from mea.run_directory import write_synced
from mea.runs import read_run
from mea.scaling.plots import LINESTYLES
from mea.scaling.sweep import SweepError, SweepSpec, compose_run, load_spec, lr_grid, read_results, run_sweep, shared_overrides, not_diverged
from mea.studies.protocol import LocalRuns
from mea.tools.compare import DYNAMICS_NOTE, plot_dynamics

REFERENCE = "gpt2, head_norm_scale=1"  # the default init before the audit


@cache
def has_head_norm(variant: str) -> bool:
    with torch.device("meta"):
        return any(isinstance(m, HeadNorm) for m in variant_class(variant)(variant_class(variant).Config(), HeadShape(64, 4, 4), 0).modules())


def init_label(init: InitConfig, head_norm: bool = True) -> str:
    """The scheme, each knob set away from its default, and the head-norm scale always, but only for a variant with
    a head norm, whose model it alone changes (elsewhere two settings that differ only there train the same model)."""
    knobs = [f"{f.name}={getattr(init, f.name)}" for f in fields(InitConfig)
             if f.name not in ("scheme", "head_norm_scale") and getattr(init, f.name) != f.default]
    return ", ".join([init.scheme, *knobs, *([f"head_norm_scale={init.head_norm_scale:g}"] if head_norm else [])])


def audit_rows(results: Path) -> tuple[list[dict], dict[str, InitConfig]]:
    """results.csv's trained runs, each with its variant and the init its model had (read from its config); and
    the init settings the runs stand for, by label. A run of a variant without a head norm names a setting only where
    no head-norm run names one that differs from it in the head-norm scale alone: its config carries whatever scale
    was the default when it ran, which its model never used."""
    rows, settings, without_head_norm = [], {}, {}
    for r in not_diverged(read_results(results)):
        cfg = load_config(Path(r["run_dir"]) / "config.yaml")
        head_norm = has_head_norm(cfg.attention.name)
        (settings if head_norm else without_head_norm)[init_label(cfg.model.init)] = cfg.model.init
        rows.append({**r, "attention": cfg.attention.name, "init": init_label(cfg.model.init, head_norm), "lr": float(r["lr"]), "loss": float(r["final_val_loss"])})
    named = {init_label(init, False) for init in settings.values()}
    settings |= {label: init for label, init in without_head_norm.items() if init_label(init, False) not in named}
    return rows, dict(sorted(settings.items()))


def best_cells(rows: list[dict], settings: dict[str, InitConfig], seed: int = 0) -> dict[tuple[str, str, str], dict]:
    """(size, variant, setting) -> the run of lowest validation loss over the LR grid for one seed, with `lrs`, the
    LRs measured, under the init that setting gives the variant (a setting that changes nothing in it shares the
    runs of the one it equals)."""
    best: dict[tuple[str, str, str], dict] = {}
    for r in rows:
        key = (r["size"], r["attention"], r["init"])
        if int(r["seed"]) == seed:
            lrs = best.get(key, {}).get("lrs", 0) + 1
            best[key] = {**min(best.get(key, r), r, key=lambda x: x["loss"]), "lrs": lrs}
    return {(size, variant, label): best[size, variant, init_label(init, has_head_norm(variant))]
            for size, variant, _ in best for label, init in settings.items() if (size, variant, init_label(init, has_head_norm(variant))) in best}


def seed_runs(spec: SweepSpec, rows: list[dict], seeds: list[int], out: Path, arms: list[str] | None, train_missing: bool) -> dict[str, list[Path]]:
    """Arms again at their best LR of the smallest size, with other seeds; arm -> run directories (seed 0's first).
    train_missing=False uses only the seed runs already finished."""
    size = spec.sizes[0]
    runs: dict[str, list[Path]] = {}
    for arm, arm_overrides in spec.arm_overrides().items():
        mine = [r for r in rows if r["size"] == size.label and r["variant"] == arm and int(r["seed"]) == 0]
        if not mine or (arms and arm not in arms):  # diverged throughout, or not asked for
            continue
        best = min(mine, key=lambda r: r["loss"])
        shared = [o for o in shared_overrides(spec, size, arm, arm_overrides) if not o.startswith("trainer.eval_every=")]
        steps = compose_run(shared).trainer.max_steps
        runs[arm] = [Path(best["run_dir"])]
        for seed in seeds:
            run_dir = out / "seeds" / size.label / arm / f"s{seed}"
            if train_missing:
                LocalRuns().train(run_dir, [*shared, f"optim.lr={best['lr']}", f"trainer.seed={seed}", f"trainer.eval_every={max(1, steps // 10)}"])
            if (run_dir / "summary.json").is_file():
                runs[arm].append(run_dir)
    return runs


def seed_noise(runs: dict[str, list[Path]]) -> tuple[float, int]:
    """Pooled standard deviation of the final validation loss between seeds of one arm at one LR, and its degrees of freedom."""
    groups = [[read_run(p).summary["final_val_loss"] for p in dirs] for dirs in runs.values() if len(dirs) > 1]
    if not groups:
        return math.nan, 0
    dof = sum(len(g) - 1 for g in groups)
    return float(math.sqrt(sum(np.var(g, ddof=1) * (len(g) - 1) for g in groups) / dof)), dof


def verdicts(best: dict, tolerance: float) -> dict[str, list[str]]:
    """setting -> the variants it handicaps beyond the tolerance, against each one's best setting (empty: it passes).
    That covers the baseline losing against the reference setting too: the reference is one of the settings."""
    settings = sorted({s for _, _, s in best})
    out: dict[str, list[str]] = {s: [] for s in settings}
    for size, variant in sorted({(z, v) for z, v, _ in best}):
        losses = {s: best[size, variant, s]["loss"] for s in settings if (size, variant, s) in best}
        top = min(losses.values())
        for s, loss in losses.items():
            if loss - top > tolerance:
                out[s].append(f"{variant} at {size} is {loss - top:+.3f} above its best setting")
    return out


def finding(spec: SweepSpec, reference: str) -> str:
    """The audit's result in two sentences, read from its runs: what the reference setting cost the variants, and
    the largest handicap left under the default."""
    results = Path(spec.out) / "results.csv"
    if not results.is_file():
        return f"The init audit's runs ({spec.out}) are not on this machine; its report is docs/results/init_audit.md."
    rows, settings = audit_rows(results)
    best = best_cells(rows, settings)
    seeds = sorted({int(run.name[1:]) for run in Path(spec.out).glob("seeds/*/*/s*")})
    sigma, _ = seed_noise(seed_runs(spec, rows, seeds, Path(spec.out), None, train_missing=False))
    top = {(size, variant): min(c["loss"] for (z, v, _), c in best.items() if (z, v) == (size, variant)) for size, variant, _ in best}

    def gap(label: str) -> dict[tuple[str, str], float]:
        return {(z, v): best[z, v, label]["loss"] - top[z, v] for z, v in top if (z, v, label) in best}

    default = init_label(InitConfig())
    costs, left = gap(reference), gap(default)
    hurt = [d for (z, v), d in costs.items() if has_head_norm(v)]
    if not hurt or not left:
        return f"The init audit ({spec.out}) has no runs yet of {reference if not hurt else default} for a variant with a head norm; its report is docs/results/init_audit.md."
    worst = max(left, key=left.get)
    return (f"The init audit measured the earlier default ({reference}) costing the head-norm variants {min(hurt):+.3f} to {max(hurt):+.3f} nats of best "
            f"validation loss against the init that suits each best, at {', '.join(s.label for s in spec.sizes)} after {spec.sizes[0].tokens:,} tokens. "
            f"Under the new default ({default}) the largest handicap left is {worst[1]} at {worst[0]}, {left[worst]:+.3f}, against seed noise σ = {sigma:.3f}.")


def initial_ratios(spec: SweepSpec) -> list[str]:
    """The attention branch's RMS over the stream's, per layer, at initialisation (one batch of random tokens)."""
    lines = ["| size | arm | attention branch / residual stream, layers 0 … L−1 |", "|---|---|---|"]
    for size in spec.sizes:
        for arm, arm_overrides in spec.arm_overrides().items():
            cfg = compose_run([f"model={size.model}", *spec.overrides, *size.overrides, *arm_overrides])
            model_cfg = OmegaConf.to_object(cfg.model)
            model_cfg.vocab_size = cfg.data.vocab_size
            torch.manual_seed(0)
            model = LM(model_cfg, OmegaConf.to_object(cfg.attention))
            row = measure(model, torch.randint(0, cfg.data.vocab_size, (4, cfg.data.seq_len)))
            lines.append(f"| {size.label} | {arm} | " + " / ".join(f"{row[f'dyn/attn_ratio/L{i}']:.3f}" for i in range(model.cfg.n_layers)) + " |")
    return lines


def plot_lr_curves(rows: list[dict], sizes: list[str], out: Path) -> Path:
    inits = sorted({r["init"] for r in rows})
    variants = sorted({r["attention"] for r in rows})
    colors = dict(zip(variants, plt.cm.tab10.colors))
    fig, axes = panels(len(sizes), columns=2)
    for ax, size in zip(axes, sizes):
        for variant in variants:
            for k, init in enumerate(inits):
                pts = sorted((r["lr"], r["loss"]) for r in rows if r["size"] == size and r["attention"] == variant and r["init"] == init and int(r["seed"]) == 0)
                if pts:
                    ax.plot(*zip(*pts), marker="o", ls=LINESTYLES[k % len(LINESTYLES)], color=colors[variant], label=f"{variant}, {init}")
        ax.set(xscale="log", xlabel="learning rate", ylabel="final validation loss", title=f"{size}: final validation loss against LR")
        ax.legend(fontsize=6)
    return save_figure(fig, out / "lr_curves")


def size_table(size: str, best: dict, settings: dict[str, InitConfig], variants: list[str], reference: str, grid: list[float]) -> list[str]:
    """One size's table: each variant's best validation loss over the LR grid under each setting (seed 0)."""
    lines = ["", f"## {size}: best validation loss over the LR grid (seed 0)", "",
             "| variant | " + " | ".join(settings) + f" | best − {reference} |", "|---|" + "---|" * (len(settings) + 1)]
    for variant in variants:
        cells = {s: best.get((size, variant, s)) for s in settings}
        top = min((c["loss"] for c in cells.values() if c), default=math.nan)
        shown = []
        for s, c in cells.items():
            if c is None:
                shown.append("–")
                continue
            text = f"{c['loss']:.4f} @ {c['lr']:g}" + (" (edge)" if c["lr"] in (grid[0], grid[-1]) else "") + (f" ({c['lrs']} of {len(grid)} LRs)" if c["lrs"] < len(grid) else "")
            text = f"**{text}**" if c["loss"] == top else text
            shown.append(text + (f" (= {c['init']})" if c["init"] != s else ""))
        ref = cells.get(reference)
        lines.append(f"| {variant} | " + " | ".join(shown) + f" | {top - ref['loss']:+.4f} |" if ref else f"| {variant} | " + " | ".join(shown) + " | – |")
    return lines


def write_report(spec: SweepSpec, rows: list[dict], settings: dict[str, InitConfig], runs: dict[str, list[Path]], reference: str, path: Path, started: float) -> Path:
    assets = path.with_suffix("")
    assets.mkdir(parents=True, exist_ok=True)
    best = best_cells(rows, settings)
    sigma, dof = seed_noise(runs)
    tolerance = 2 * math.sqrt(2) * sigma if dof else math.inf  # no noise measured yet: nothing is judged
    verdict = verdicts(best, tolerance)
    variants = sorted({v for _, v, _ in best})
    sizes = [s.label for s in spec.sizes]
    grid = lr_grid(spec)
    missing = [f"{size}/{variant}/{label}" for size in sizes for variant in variants for label in settings
               if (size, variant, label) not in best or best[size, variant, label]["lrs"] < len(grid)]
    passing = [s for s in settings if dof and not verdict[s] and not any(m.endswith("/" + s) for m in missing)]
    mean_best = {s: np.mean([best[k]["loss"] for k in best if k[2] == s]) for s in settings}
    seeds = sorted({int(read_run(p).config.trainer.seed) for dirs in runs.values() for p in dirs[1:]})
    lines = ["# Init audit: a fair start for every variant", "",
             f"Made by `mea-init-audit {spec.name}` on {time.strftime('%Y-%m-%d')} · {platform.machine()} CPU, torch {torch.__version__} · "
             f"{len(rows)} sweep runs and {sum(len(d) - 1 for d in runs.values())} seed runs, "
             f"{(sum(float(r['wall_time_s']) for r in rows) + sum(read_run(p).summary['wall_time_s'] for d in runs.values() for p in d[1:])) / 3600:.1f} h of training "
             f"(two runs side by side on 2 cores) · this sitting {(time.perf_counter() - started) / 60:.1f} min.", "",
             f"Each variant under each init setting, LR grid {', '.join(f'{lr:g}' for lr in grid)}, sizes {', '.join(sizes)}, "
             f"{spec.sizes[0].tokens:,} tokens a run; validation loss at the end. Seed noise: arms again at their best LR of {sizes[0]} "
             f"with seeds {', '.join(map(str, seeds)) or '(none yet)'}.", "",
             "## Verdict", "",
             f"Seed noise: σ = {sigma:.4f} (pooled, {dof} degrees of freedom from {len([d for d in runs.values() if len(d) > 1])} arms); "
             f"the tolerance for two single-seed values is 2·√2·σ = {tolerance:.4f}.", ""]
    for s in settings:
        unmeasured = [m for m in missing if m.endswith("/" + s)]
        state = "not judged: no seed noise measured yet" if not dof else "passes — no variant is handicapped beyond noise" if not verdict[s] else "fails — " + "; ".join(verdict[s])
        lines.append(f"- **{s}**: {state}" + (f" (not yet measured on the whole grid: {', '.join(m.rsplit('/', 1)[0] for m in unmeasured)})" if unmeasured else "") + ".")
    if passing:
        chosen = min(passing, key=lambda s: mean_best[s])
        lines += ["", f"Passing at every size, with the lowest mean best loss over variants and sizes: **{chosen}** ({mean_best[chosen]:.4f}; "
                  + ", ".join(f"{s} {mean_best[s]:.4f}" for s in settings if s != chosen) + ")."]
    else:
        lines += ["", "No setting meets the criterion at every size."]
    for size in sizes:
        lines += size_table(size, best, settings, variants, reference, grid)
    lines += ["", "(edge): the best LR is at the end of the grid, so the best loss may be lower still; bold: the variant's best setting; "
              "(= …): the setting changes nothing in this variant, whose run under the setting named is shown; (k of n LRs): only part of the "
              "grid is measured yet, so the best loss may be lower; –: not measured yet.", "",
              f"![LR curves]({assets.name}/{plot_lr_curves(rows, sizes, assets).name})", "",
              "## At initialisation", "", "The mechanism the audit tests: how much the attention branch writes into the residual stream before any step "
              "(mea/models/dynamics.py, one batch of random tokens, seed 0).", ""] + initial_ratios(spec)
    groups = {arm: [read_run(p) for p in dirs[1:]] for arm, dirs in runs.items() if len(dirs) > 1}
    dynamics = plot_dynamics(groups, assets) if groups else []
    if dynamics:
        lines += ["", f"## Training dynamics at {sizes[0]} (the seed runs)", "", DYNAMICS_NOTE, ""] + [f"![{p.stem}]({assets.name}/{p.name})" for p in dynamics]
    write_synced(path, "\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mea-init-audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="a sweep spec whose arms cross variants with init settings (model.init.*)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="extra seeds at the smallest size, each arm at its best LR")
    parser.add_argument("--seed-arms", nargs="+", help="the arms that get the extra seeds (default: every arm)")
    parser.add_argument("--reference", default=REFERENCE, help="the setting the default was before the audit")
    parser.add_argument("--report", type=Path, default=Path("docs/results/init_audit.md"))
    parser.add_argument("--report-only", action="store_true", help="train nothing: the report from the runs finished so far")
    parser.add_argument("--size", action="append", help="train only this size of the spec (repeatable), as mea-sweep --size")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        spec = load_spec(args.spec)
        results = run_sweep(spec, collect_only=args.report_only, only_sizes=args.size)
        rows, settings = audit_rows(results)
        runs = seed_runs(spec, rows, args.seeds, Path(spec.out), args.seed_arms, train_missing=not args.report_only)
        path = write_report(spec, rows, settings, runs, args.reference, args.report, started)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
