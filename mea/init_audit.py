"""`mea-init-audit`: which initialisation scheme handicaps no attention variant, as one resumable command.

    mea-init-audit sweeps/init_audit.yaml      # the sweep, a seed check, docs/results/init_audit.md

The spec is a sweep spec (`mea-sweep`) whose arms cross attention variants with `model.init.scheme`; each run's
variant and scheme are read from its own config. Then every arm is trained again at its best LR of the smallest
size with other seeds (`--seeds`), evaluating every tenth of the run: the spread between seeds is the noise the
comparison is read against, and those runs' training dynamics are drawn. A scheme passes when, at every size,
no variant's best loss under it is worse than under the scheme that suits that variant best by more than
2·√2 seed standard deviations (two single-seed values); so `mha` loses nothing measurable against the reference
scheme (the default before the audit) under a passing one either. Every number of the report is read from
the runs.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mea.compare import DYNAMICS_NOTE, plot_dynamics
from mea.config import load_config
from mea.experiment import train
from mea.models import LM
from mea.plotting import plt, save_figure
from mea.runs import read_run
from mea.scaling.sweep import SweepError, SweepSpec, compose_run, load_spec, lr_grid, read_results, run_sweep, shared_overrides, trained
from mea.models.dynamics import measure

LINESTYLES = ("-", "--", ":", "-.")


def audit_rows(results: Path) -> list[dict]:
    """results.csv's trained runs, each with the variant and init scheme read from its config."""
    rows = []
    for r in trained(read_results(results)):
        cfg = load_config(Path(r["run_dir"]) / "config.yaml")
        rows.append({**r, "attention": cfg.attention.name, "scheme": cfg.model.init.scheme, "lr": float(r["lr"]), "loss": float(r["final_val_loss"])})
    return rows


def best_cells(rows: list[dict], seed: int) -> dict[tuple[str, str, str], dict]:
    """(size, variant, scheme) -> the run of lowest validation loss over the LR grid, for one seed."""
    best: dict[tuple[str, str, str], dict] = {}
    for r in rows:
        key = (r["size"], r["attention"], r["scheme"])
        if int(r["seed"]) == seed and (key not in best or r["loss"] < best[key]["loss"]):
            best[key] = r
    return best


def seed_runs(spec: SweepSpec, rows: list[dict], seeds: list[int], out: Path) -> dict[str, list[Path]]:
    """Each arm again at its best LR of the smallest size, with other seeds; arm -> run directories (seed 0's first)."""
    size = spec.sizes[0]
    runs: dict[str, list[Path]] = {}
    for arm, arm_overrides in spec.arm_overrides().items():
        mine = [r for r in rows if r["size"] == size.label and r["variant"] == arm and int(r["seed"]) == 0]
        if not mine:
            continue  # every run of the arm diverged
        best = min(mine, key=lambda r: r["loss"])
        shared = [o for o in shared_overrides(spec, size, arm, arm_overrides) if not o.startswith("trainer.eval_every=")]
        steps = compose_run(shared).trainer.max_steps
        runs[arm] = [Path(best["run_dir"])]
        for seed in seeds:
            run_dir = out / "seeds" / size.label / arm / f"s{seed}"
            train(run_dir, [*shared, f"optim.lr={best['lr']}", f"trainer.seed={seed}", f"trainer.eval_every={max(1, steps // 10)}"])
            runs[arm].append(run_dir)
    return runs


def seed_noise(runs: dict[str, list[Path]]) -> float:
    """Pooled standard deviation of the final validation loss between seeds of the same arm and LR."""
    variances = [np.var([read_run(p).summary["final_val_loss"] for p in dirs], ddof=1) for dirs in runs.values() if len(dirs) > 1]
    return float(math.sqrt(np.mean(variances))) if variances else math.nan


def verdicts(best: dict, tolerance: float) -> dict[str, list[str]]:
    """scheme -> the variants it handicaps beyond the tolerance, against each one's best scheme (empty: it passes).
    That covers the baseline losing against the reference scheme too: the reference is one of the schemes."""
    schemes = sorted({s for _, _, s in best})
    out: dict[str, list[str]] = {s: [] for s in schemes}
    for size, variant in sorted({(z, v) for z, v, _ in best}):
        losses = {s: best[size, variant, s]["loss"] for s in schemes if (size, variant, s) in best}
        top = min(losses.values())
        for s, loss in losses.items():
            if loss - top > tolerance:
                out[s].append(f"{variant} at {size} is {loss - top:+.3f} above its best scheme")
    return out


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
    schemes = sorted({r["scheme"] for r in rows})
    variants = sorted({r["attention"] for r in rows})
    colors = dict(zip(variants, plt.cm.tab10.colors))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for variant in variants:
            for k, scheme in enumerate(schemes):
                pts = sorted((r["lr"], r["loss"]) for r in rows if r["size"] == size and r["attention"] == variant and r["scheme"] == scheme and int(r["seed"]) == 0)
                if pts:
                    ax.plot(*zip(*pts), marker="o", ls=LINESTYLES[k % len(LINESTYLES)], color=colors[variant], label=f"{variant}, {scheme}")
        ax.set(xscale="log", xlabel="learning rate", ylabel="final validation loss", title=f"{size}: {' / '.join(f'{s} {LINESTYLES[k]}' for k, s in enumerate(schemes))}")
        ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, out / "lr_curves")


def write_report(spec: SweepSpec, rows: list[dict], runs: dict[str, list[Path]], reference: str, seeds: list[int], path: Path, started: float) -> Path:
    assets = path.with_suffix("")
    assets.mkdir(parents=True, exist_ok=True)
    best = best_cells(rows, seed=0)
    sigma = seed_noise(runs)
    tolerance = 2 * math.sqrt(2) * sigma
    verdict = verdicts(best, tolerance)
    schemes = sorted({s for _, _, s in best})
    variants = sorted({v for _, v, _ in best})
    sizes = [s.label for s in spec.sizes]
    grid = lr_grid(spec)
    passing = [s for s in schemes if not verdict[s]]
    mean_best = {s: np.mean([best[k]["loss"] for k in best if k[2] == s]) for s in schemes}
    lines = ["# Init audit: a fair start for every variant", "",
             f"Made by `mea-init-audit {spec.name}` on {time.strftime('%Y-%m-%d')} · {platform.machine()} CPU, torch {torch.__version__} · "
             f"{len(rows)} sweep runs and {sum(len(d) - 1 for d in runs.values())} seed runs · wall time of this sitting {(time.perf_counter() - started) / 60:.1f} min.", "",
             f"Every variant × scheme {len(schemes)} × LR grid {', '.join(f'{lr:g}' for lr in grid)} × sizes {', '.join(sizes)}, "
             f"{spec.sizes[0].tokens:,} tokens a run; validation loss at the end. Seed noise: the arms again at their best LR of {sizes[0]} "
             f"with seeds {', '.join(map(str, seeds))}.", "",
             "## Verdict", "",
             f"Seed noise: σ = {sigma:.4f} (pooled over {len(runs)} arms); the tolerance for two single-seed values is 2·√2·σ = {tolerance:.4f}.", ""]
    for s in schemes:
        lines.append(f"- **{s}**: " + ("passes — no variant is handicapped beyond noise." if not verdict[s] else "fails — " + "; ".join(verdict[s]) + "."))
    if passing:
        chosen = min(passing, key=lambda s: mean_best[s])
        lines += ["", f"Passing, with the lowest mean best loss over variants and sizes: **{chosen}** ({mean_best[chosen]:.4f}; "
                  + ", ".join(f"{s} {mean_best[s]:.4f}" for s in schemes if s != chosen) + ")."]
    else:
        lines += ["", "No scheme meets the criterion at every size."]
    for size in sizes:
        lines += ["", f"## {size}: best validation loss over the LR grid (seed 0)", "",
                  "| variant | " + " | ".join(schemes) + " | best scheme − " + reference + " |", "|---|" + "---|" * (len(schemes) + 1)]
        for variant in variants:
            cells = {s: best.get((size, variant, s)) for s in schemes}
            top = min((c["loss"] for c in cells.values() if c), default=math.nan)
            shown = []
            for s, c in cells.items():
                if c is None:
                    shown.append("all diverged")
                    continue
                edge = " (edge)" if c["lr"] in (grid[0], grid[-1]) else ""
                shown.append(("**" if c["loss"] == top else "") + f"{c['loss']:.4f} @ {c['lr']:g}{edge}" + ("**" if c["loss"] == top else ""))
            ref = cells.get(reference)
            gain = f"{top - ref['loss']:+.4f}" if ref else "–"
            lines.append(f"| {variant} | " + " | ".join(shown) + f" | {gain} |")
    lines += ["", "(edge): the best LR is at the end of the grid, so the best loss may be lower still; bold: the variant's best scheme.", "",
              f"![LR curves]({assets.name}/{plot_lr_curves(rows, sizes, assets).name})", "",
              "## At initialisation", "", "The mechanism the audit tests: how much the attention branch writes into the residual stream before any step "
              "(mea/models/dynamics.py, one batch of random tokens, seed 0).", ""] + initial_ratios(spec)
    groups = {arm: [read_run(p) for p in dirs[1:]] for arm, dirs in runs.items() if len(dirs) > 1}
    dynamics = plot_dynamics(groups, assets) if groups else []
    if dynamics:
        lines += ["", f"## Training dynamics at {sizes[0]} (the seed runs)", "", DYNAMICS_NOTE, ""] + [f"![{p.stem}]({assets.name}/{p.name})" for p in dynamics]
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mea-init-audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="a sweep spec whose arms cross variants with model.init.scheme")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="extra seeds at the smallest size, each arm at its best LR")
    parser.add_argument("--reference", default="gpt2", help="the scheme the default was before the audit")
    parser.add_argument("--report", type=Path, default=Path("docs/results/init_audit.md"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        spec = load_spec(args.spec)
        results = run_sweep(spec)
        rows = audit_rows(results)
        runs = seed_runs(spec, rows, args.seeds, Path(spec.out))
        path = write_report(spec, rows, runs, args.reference, args.seeds, args.report, started)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
