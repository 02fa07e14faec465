"""Plots of a fit report (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mea.plotting import mark_diverged, panels, plt, save_figure


def plot_report(report: dict, out: Path) -> list[Path]:
    return plot_lr_law(report, out) if report["kind"] == "lr-law" else plot_loss_law(report, out)


LINESTYLES = ("-", "--", ":", "-.")


def plot_lr_law(report: dict, out: Path) -> list[Path]:
    """lr_curves: per group, each cell's measured losses against LR (dots; crosses on the top edge: diverged), the
    quadratic fitted through the runs near its best (solid, across the LRs it was fitted to) and its vertex (star),
    a colour per size and a line style per budget; lr_law: η* against N per group, with the fitted law."""
    groups = report["groups"]
    fig, axes = panels(len(groups))
    for ax, (group, g) in zip(axes, groups.items()):
        sizes = sorted({c["n"] for c in g["cells"]})
        budgets = sorted({c.get("d", 0.0) for c in g["cells"]})
        colors = dict(zip(sizes, plt.cm.viridis(np.linspace(0, 0.85, len(sizes)))))
        for c in g["cells"]:
            color, style = colors[c["n"]], LINESTYLES[budgets.index(c.get("d", 0.0)) % len(LINESTYLES)]
            budget = f", D={c['d']:.2g}" if "d" in c else ""
            if c["points"]:
                ax.plot(*zip(*c["points"]), "o", color=color, ms=3.5, alpha=0.8, label=None if "coeffs" in c else f"N={c['n']:.2g}{budget}: no fit")
            if "coeffs" in c:
                c0, c1, c2 = c["coeffs"]
                x = np.linspace(*np.log(c["fitted_lrs"]), 50)
                ax.plot(np.exp(x), c0 + c1 * x + c2 * x**2, color=color, ls=style, lw=1.2)
                ax.plot([c["lr"]], [c["loss"]], "*", color=color, ms=9, label=f"N={c['n']:.2g}{budget}: η*={c['lr']:.2g}")
            mark_diverged(ax, c["diverged_lrs"], color)
        ax.set_xscale("log")
        ax.set(title=group, xlabel="learning rate", ylabel=f"{report.get('loss', 'loss')}")
        ax.legend(fontsize=6)
    fig.suptitle("Loss against LR per size: runs (dots; × diverged), the fitted quadratic and its vertex (★)", fontsize=9)
    path1 = save_figure(fig, out / "lr_curves")

    fig, axes = panels(len(groups))
    for ax, (group, g) in zip(axes, groups.items()):
        ax.set(title=group, xlabel="non-embedding parameters N", ylabel="optimal LR η*")
        cells = [c for c in g["cells"] if "lr" in c]
        if not cells:
            continue
        budgets = sorted({c.get("d", 0.0) for c in cells})
        colors = dict(zip(budgets, plt.cm.plasma(np.linspace(0, 0.8, len(budgets)))))
        targets = [p["n"] for p in g.get("predictions", {}).values()]
        span = [c["n"] for c in cells] + targets
        grid = np.geomspace(min(span) / 1.5, max(span) * 1.5, 50)
        for d in budgets:
            at = [c for c in cells if c.get("d", 0.0) == d]
            lr = np.array([c["lr"] for c in at])
            ax.errorbar([c["n"] for c in at], lr, yerr=np.abs(np.array([c["lr_ci"] for c in at]).T - lr), fmt="o", color=colors[d], label=f"D={d:.2g}" if d else "η* per size")
            if "joint" in g and "a" not in g:
                j = g["joint"]
                ax.plot(grid, j["c"] * grid ** j["alpha"] * d ** j["beta"], color=colors[d], lw=1)
        if "a" in g:
            ax.plot(grid, g["a"] * grid ** g["b"], color="k", lw=1, label=g["form"])
        elif "joint" in g:
            ax.plot([], [], color="k", lw=1, label=g["joint"]["form"])
        for name, p in g.get("predictions", {}).items():
            ax.errorbar([p["n"]], [p["lr"]], yerr=[[p["lr"] - p["lr_ci"][0]], [p["lr_ci"][1] - p["lr"]]], fmt="s", mfc="none", color="k")
            ax.annotate(name, (p["n"], p["lr"]), fontsize=7)
        ax.set(xscale="log", yscale="log")
        ax.legend(fontsize=6)
    fig.suptitle("η* per size (the vertices, with bootstrap intervals) and the law fitted to them; squares: predictions", fontsize=9)
    return [path1, save_figure(fig, out / "lr_law")]


def plot_loss_law(report: dict, out: Path) -> list[Path]:
    law, data = report["_law"], report["_data"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for d in sorted(set(data["d"])):
        at = data["d"] == d
        line = ax.plot(data["n"][at], data["loss"][at], "o", label=f"D={d:.2g}")[0]
        grid = np.geomspace(data["n"].min() / 1.5, data["n"].max() * 1.5, 50)
        ax.plot(grid, [law(n, d) for n in grid], color=line.get_color(), lw=1)
    ax.set(xscale="log", xlabel="N", ylabel="loss", title=f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}")
    ax.legend(fontsize=7)
    return [save_figure(fig, out / "loss_law")]
