"""`mea-compare` / `python -m mea.tools.compare`: loss curves, differences to a baseline, a table and a report.

    mea-compare runs/a runs/b runs/c --baseline mha --out report/
    mea-compare --results runs/sweeps/example/results.csv --out report/     # every run of a sweep, plus LR curves
    mea-compare --wandb my-entity/mea --group exp1 --stage target --out report/   # through W&B's public API (online), and
                                                                            # saves a W&B workspace of the group's curves
"""
from __future__ import annotations

import argparse
import html
import math
import socket
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from mea.plotting import mark_diverged, panels, plt, save_figure
from mea.run_directory import describe, write_synced
from mea.runs import Run, RunError, read_run
from mea.scaling.sweep import at_largest_size, best_by_arm, not_diverged, read_results


def ema(values: list[float], beta: float) -> np.ndarray:
    """Exponential moving average with bias correction (as W&B's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return np.array(out)


def train_curve(run: Run, beta: float) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in run.rows if math.isfinite(r["loss"])]
    return np.array([r["tokens"] for r in rows], dtype=float), ema([r["loss"] for r in rows], beta)


def val_curve(run: Run) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in run.rows if "val_loss" in r]
    return np.array([r["tokens"] for r in rows], dtype=float), np.array([r["val_loss"] for r in rows])


def tokens_to_reach(tokens: np.ndarray, loss: np.ndarray, target: float) -> float:
    """First token count at which the curve reaches target (linear interpolation); NaN if it never does."""
    below = np.nonzero(loss <= target)[0]
    if len(below) == 0:
        return math.nan
    i = below[0]
    if i == 0:
        return float(tokens[0])
    t0, t1, l0, l1 = tokens[i - 1], tokens[i], loss[i - 1], loss[i]
    return float(t0 + (t1 - t0) * (l0 - target) / (l0 - l1))


def fall_over_last_fifth(run: Run) -> float:
    """How much the validation loss fell over the last fifth of the run's tokens: near 0 once a run has flattened,
    so a reader sees whether a final loss is a plateau or a snapshot of a curve still going down."""
    tokens, loss = val_curve(run)
    return float(np.interp(0.8 * tokens[-1], tokens, loss) - loss[-1]) if len(tokens) > 1 else math.nan


def by_variant(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.variant].append(run)
    return dict(sorted(groups.items()))


def check_comparable(runs: list[Run]) -> list[str]:
    notes = []
    keys = {run.data_content for run in runs}
    if len(keys) > 1 and all(run.summary.get("data_content") for run in runs):
        notes.append(f"the runs were trained on different tokens ({', '.join(sorted(keys))}: other data or tokenizers); their losses are not comparable")
    elif len(keys) > 1:
        notes.append(f"the runs' corpora were prepared under different cache keys ({', '.join(sorted(keys))}) and some runs predate the "
                     "tokens' checksum in summary.json: compare the corpora's manifests (tokenizer and shard sha256) before reading their losses side by side")
    budgets = {run.summary.get("tokens") for run in runs}
    if len(budgets) > 1:
        notes.append(f"the runs saw different token budgets ({', '.join(map(str, sorted(budgets)))}); final losses compare unequal training")
    for run in runs:
        for amendment in run.amendments:
            changes = {k: tuple(v) for k, v in amendment["changes"].items()}
            notes.append(f"{run.path} was amended at step {amendment['step']} ({describe(changes)}); its curve is not one config's")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return notes


def table(groups: dict[str, list[Run]], baseline: str, beta: float) -> list[dict]:
    base_runs = groups[baseline]
    base_final = float(np.mean([r.summary["final_val_loss"] for r in base_runs]))
    base_tokens = float(np.mean([r.summary["tokens"] for r in base_runs]))
    rows = []
    for variant, runs in groups.items():
        finals = np.array([r.summary["final_val_loss"] for r in runs])
        reach = [tokens_to_reach(*val_curve(r), base_final) for r in runs]
        rows.append({
            "variant": variant,
            "seeds": len(runs),
            "final_val_loss": float(finals.mean()),
            "final_val_loss_std": float(finals.std(ddof=1)) if len(runs) > 1 else 0.0,
            "final_val_losses": finals.tolist(),  # one per seed: what an interval is computed from
            "final_train_loss": float(np.mean([train_curve(r, beta)[1][-1] for r in runs])),
            "tokens_to_baseline_ratio": float(np.mean(reach)) / base_tokens if all(math.isfinite(x) for x in reach) else math.nan,
            "tokens_per_s": float(np.median([r.summary["tokens_per_s"] for r in runs])),  # robust to one run slowed by a shared machine
            "delta_vs_baseline": float(finals.mean()) - base_final,
            "fall_last_fifth": float(np.mean([fall_over_last_fifth(r) for r in runs])),
        })
    return rows


def band(ax, curves: list[tuple[np.ndarray, np.ndarray]], label: str, color, style: str = "-"):
    """Mean over seeds on the first seed's token grid, with a min–max band."""
    grid = curves[0][0]
    ys = np.array([np.interp(grid, t, y) for t, y in curves])
    ax.plot(grid, ys.mean(0), style, color=color, label=label)
    if len(curves) > 1:
        ax.fill_between(grid, ys.min(0), ys.max(0), color=color, alpha=0.2)


def plot_curves(groups: dict[str, list[Run]], baseline: str, out: Path, beta: float, log_x: bool) -> list[Path]:
    colors = dict(zip(groups, plt.cm.tab10.colors))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, runs in groups.items():
        band(ax, [train_curve(r, beta) for r in runs], f"{variant} train (EMA {beta})", colors[variant])
        band(ax, [val_curve(r) for r in runs], f"{variant} val", colors[variant], "o--")
    ax.set(xlabel="tokens", ylabel="loss", title="Loss against tokens", xscale="log" if log_x else "linear")
    ax.legend(fontsize=7)
    paths = [save_figure(fig, out / "loss_vs_tokens")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    base_t, base_y = val_curve(groups[baseline][0])
    base = np.mean([np.interp(base_t, *val_curve(r)) for r in groups[baseline]], axis=0)
    for variant, runs in groups.items():
        ys = np.array([np.interp(base_t, *val_curve(r)) for r in runs]) - base
        ax.plot(base_t, ys.mean(0), "o-", color=colors[variant], label=variant)
    ax.axhline(0, color="black", lw=0.5)
    ax.set(xlabel="tokens", ylabel=f"val loss − {baseline}", title=f"Difference to {baseline} (negative is better)", xscale="log" if log_x else "linear")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "delta_vs_baseline"))
    return paths


def dynamics_curve(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """A `dyn/` quantity against tokens; `dyn/entropy/L<l>` is the mean over that layer's heads."""
    rows = [r for r in run.rows if any(k == key or k.startswith(key + "/") for k in r)]
    values = [np.mean([v for k, v in r.items() if k == key or k.startswith(key + "/")]) for r in rows]
    return np.array([r["tokens"] for r in rows], dtype=float), np.array(values)


def plot_dynamics(groups: dict[str, list[Run]], out: Path) -> list[Path]:
    """One figure per dynamics quantity (mea.models.dynamics), a panel per layer, a line per arm, seeds as a band."""
    per_layer: dict[str, set[int]] = defaultdict(set)
    for runs in groups.values():
        for row in runs[0].rows:
            for key in row:
                if key.startswith("dyn/"):
                    quantity, layer = key.split("/")[1:3]
                    per_layer[quantity].add(int(layer[1:]))
    colors = dict(zip(groups, plt.cm.tab10.colors))
    paths = []
    for quantity, layers in per_layer.items():
        layers = sorted(layers)
        fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), squeeze=False, sharey=True)
        for ax, layer in zip(axes[0], layers):
            for variant, runs in groups.items():
                curves = [dynamics_curve(r, f"dyn/{quantity}/L{layer}") for r in runs]
                if all(len(t) for t, _ in curves):
                    band(ax, curves, variant, colors[variant], "o-")
            ax.set(title=f"layer {layer}", xlabel="tokens")
        axes[0][0].set_ylabel(quantity + (" (mean over heads)" if quantity == "entropy" else ""))
        axes[0][-1].legend(fontsize=6)
        paths.append(save_figure(fig, out / f"dynamics_{quantity}"))
    return paths


def plot_lr_sensitivity(results: Path, out: Path) -> Path:
    rows = read_results(results)
    sizes = sorted({r["size"] for r in rows})
    fig, axes = panels(len(sizes))
    for ax, size in zip(axes, sizes):
        for variant in sorted({r["variant"] for r in rows}):
            pts = sorted((float(r["lr"]), float(r["final_train_loss"]), r["diverged"] == "True") for r in rows if r["size"] == size and r["variant"] == variant)
            line = ax.plot([p[0] for p in pts if not p[2]], [p[1] for p in pts if not p[2]], "o-", ms=3.5, label=variant)[0]
            mark_diverged(ax, [lr for lr, _, bad in pts if bad], line.get_color())
        ax.set(xscale="log", xlabel="learning rate", ylabel="final train loss", title=f"{size}: LR sensitivity (× diverged)")
        ax.legend(fontsize=6)
    return save_figure(fig, out / "lr_sensitivity")


def fmt(x: float, spec: str, suffix: str = "×") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec) + suffix


DYNAMICS_NOTE = ("Per layer, at eval steps (mea/models/dynamics.py): resid_rms, the residual stream entering the layer; attn_ratio and "
                 "mlp_ratio, each branch's output RMS over the stream it joins; head_norm_scale, mean |γ|; hlc_*/mix_* _dist and _offdiag, "
                 "how far MEA's and THA's head-mixing matrices moved from no mixing; lambda, DIFF's λ; entropy, of each head's attention "
                 "distribution (nats, mean over heads). A line per arm, the band spans the seeds.")


FALL_NOTE = ("Fall over the last fifth: validation loss at 80% of the run's tokens minus the final one, mean over seeds "
             "(interpolated between eval steps; – : fewer than two evals). Near 0: the run had flattened; large: the final loss is a snapshot of a curve still falling.")


def markdown(rows: list[dict], baseline: str, plots: list[Path], dynamics: list[Path], notes: list[str], runs: list[Run]) -> str:
    lines = ["# Comparison", ""]
    lines += [f"> **Warning:** {n}" for n in notes] + ([""] if notes else [])
    lines += [f"| variant | seeds | final val loss | Δ vs {baseline} | fall over the last fifth | "
              f"final train loss (EMA) | tokens to {baseline}'s final loss | tokens/s (median) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['final_val_loss']:.4f} ± {r['final_val_loss_std']:.4f} | {r['delta_vs_baseline']:+.4f} | "
                     f"{fmt(r['fall_last_fifth'], '+.4f', '')} | {r['final_train_loss']:.4f} | "
                     f"{fmt(r['tokens_to_baseline_ratio'], '.2f')} | {r['tokens_per_s']:,.0f} |")
    lines += ["", FALL_NOTE, "", "Tokens to the baseline's final loss: the first point of each run's validation curve at or below the baseline's mean final validation loss, "
              "as a share of the baseline's tokens (– : not reached).", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    if dynamics:
        lines += ["", "## Training dynamics", "", DYNAMICS_NOTE, ""] + [f"![{p.stem}]({p.name})" for p in dynamics]
    lines += ["", "Runs:", ""] + [f"- `{r.path}` ({r.variant}, lr {r.config.optim.lr:g}, seed {r.config.trainer.seed})" for r in runs]
    return "\n".join(lines) + "\n"


def to_html(rows: list[dict], baseline: str, plots: list[Path], notes: list[str]) -> str:
    head = ["variant", "seeds", "final val loss", f"Δ vs {baseline}", "fall over the last fifth", "tokens to baseline", "tokens/s (median)"]
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (r["variant"], r["seeds"], f"{r['final_val_loss']:.4f} ± {r['final_val_loss_std']:.4f}",
                                                                      f"{r['delta_vs_baseline']:+.4f}", fmt(r["fall_last_fifth"], "+.4f", ""),
                                                                      fmt(r["tokens_to_baseline_ratio"], ".2f"), f"{r['tokens_per_s']:,.0f}")) + "</tr>"
        for r in rows
    )
    warn = "".join(f"<p><b>Warning:</b> {html.escape(n)}</p>" for n in notes)
    imgs = "".join(f'<p><img src="{p.with_suffix(".svg").name}" width="700"></p>' for p in plots)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Comparison</title></head><body><h1>Comparison</h1>{warn}"
            f"<table border='1'><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>{body}</table>{imgs}</body></html>\n")


def wandb_filters(group: str | None, stage: str | None) -> dict | None:
    """W&B's run filter (MongoDB's syntax) for one group and, within an experiment's group, one stage's runs."""
    filters = ({"group": group} if group else {}) | ({"tags": {"$in": [f"stage:{stage}"]}} if stage else {})
    return filters or None


def wandb_runs(path: str, group: str | None, stage: str | None, cache: Path) -> list[Path]:
    """Fetch a W&B project's runs (one group, one stage of it) into local run directories, through W&B's public API."""
    import json

    import wandb

    base = urlparse(wandb.env.get_base_url() or "https://api.wandb.ai")
    try:
        socket.create_connection((base.hostname, base.port or (443 if base.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        raise RunError(f"cannot reach W&B at {base.geturl()} ({e.strerror or e}); this machine is offline — compare the local run directories instead: mea-compare RUN_DIR ...") from None
    api = wandb.Api(timeout=30)
    paths = []
    for remote in api.runs(path, filters=wandb_filters(group, stage)):
        local = cache / remote.id
        local.mkdir(parents=True, exist_ok=True)
        rows = [{k: v for k, v in row.items() if not k.startswith("_")} | {"step": row["_step"]} for row in remote.scan_history()]
        (local / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (local / "summary.json").write_text(json.dumps(dict(remote.summary)))
        from omegaconf import OmegaConf

        (local / "config.yaml").write_text(OmegaConf.to_yaml({k: v for k, v in remote.config.items() if not k.startswith("_")}))
        paths.append(local)
    return paths


def best_runs(results: Path) -> list[Path]:
    """From a sweep: each variant's best-LR run (lowest smoothed train loss, not diverged) at the largest size."""
    if not results.is_file():
        raise RunError(f"{results} does not exist; give a sweep's results.csv")
    rows = not_diverged(read_results(results))
    if not rows:
        raise RunError(f"{results} holds no finished, non-diverged run")
    return [Path(r["run_dir"]) for r in best_by_arm(at_largest_size(rows)).values()]


def compare(run_dirs: list[Path], out: Path, baseline: str | None, results: Path | None = None, beta: float = 0.9, log_x: bool = False) -> dict:
    runs = [read_run(p) for p in run_dirs]
    if not runs:
        raise RunError("no runs to compare; give run directories, --results or --wandb")
    groups = by_variant(runs)
    baseline = baseline or ("mha" if "mha" in groups else next(iter(groups)))
    if baseline not in groups:
        raise RunError(f"--baseline {baseline} has no runs; the variants here are {', '.join(groups)}")
    notes = check_comparable(runs)
    out.mkdir(parents=True, exist_ok=True)
    rows = table(groups, baseline, beta)
    plots = plot_curves(groups, baseline, out, beta, log_x)
    if results is not None:
        plots.append(plot_lr_sensitivity(results, out))
    dynamics = plot_dynamics(groups, out)
    write_synced(out / "report.md", markdown(rows, baseline, plots, dynamics, notes, runs))
    write_synced(out / "report.html", to_html(rows, baseline, plots + dynamics, notes))
    return {"rows": rows, "plots": plots + dynamics, "dynamics": dynamics, "notes": notes, "baseline": baseline}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mea-compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run directories")
    parser.add_argument("--results", type=Path, help="a sweep's results.csv: compare its runs and plot LR sensitivity")
    parser.add_argument("--wandb", help="ENTITY/PROJECT to read through W&B's public API (online)")
    parser.add_argument("--group", help="with --wandb: the experiment's group")
    parser.add_argument("--stage", help="with --wandb: one stage of an experiment's group (its runs' tag stage:<stage>), e.g. target: the from-scratch seeds")
    parser.add_argument("--baseline", help="the variant others are measured against (default: mha)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoothing", type=float, default=0.9, help="EMA factor of the training-loss curves")
    parser.add_argument("--log-x", action="store_true")
    args = parser.parse_args(argv)
    try:
        run_dirs = list(args.runs)
        if args.results and not run_dirs:
            run_dirs = best_runs(args.results)
        if args.wandb:
            if args.wandb.count("/") != 1:
                raise RunError(f"--wandb {args.wandb}: give ENTITY/PROJECT, for example --wandb my-team/mea")
            run_dirs += wandb_runs(args.wandb, args.group, args.stage, args.out / "wandb_runs")
        report = compare(run_dirs, args.out, args.baseline, args.results, args.smoothing, args.log_x)
        if args.wandb:
            from mea.tools.workspace import save_workspace

            print(f"saved the W&B workspace {save_workspace(args.wandb, args.group, args.smoothing)}")
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print((args.out / "report.md").read_text())
    print(f"wrote {args.out / 'report.md'}, {args.out / 'report.html'} and {len(report['plots'])} plots")


if __name__ == "__main__":
    main()
