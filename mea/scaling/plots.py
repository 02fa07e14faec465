"""Plots of a fit report (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mea.plotting import plt, save_figure


def plot_report(report: dict, out: Path) -> list[Path]:
    return plot_lr_law(report, out) if report["kind"] == "lr-law" else plot_loss_law(report, out)


LINESTYLES = ("-", "--", ":", "-.")


def plot_lr_law(report: dict, out: Path) -> list[Path]:
    """lr_curves: each cell's fitted loss against LR, a colour per size and a line style per budget;
    lr_law: η* against N for each group, coloured by the budget D, with the fitted law at each budget."""
    groups = report["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (group, g) in zip(axes[0], groups.items()):
        sizes = sorted({c["n"] for c in g["cells"]})
        budgets = sorted({c.get("d", 0.0) for c in g["cells"]})
        colors = dict(zip(sizes, plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))))
        for c in g["cells"]:
            color, style = colors[c["n"]], LINESTYLES[budgets.index(c.get("d", 0.0)) % len(LINESTYLES)]
            budget = f", D={c['d']:.2g}" if "d" in c else ""
            if "coeffs" in c:
                c0, c1, c2 = c["coeffs"]
                x = np.linspace(np.log(c["lr"]) - 1.5, np.log(c["lr"]) + 1.5, 50)
                ax.plot(np.exp(x), c0 + c1 * x + c2 * x**2, color=color, ls=style, lw=1)
                ax.plot([c["lr"]], [c["loss"]], "*", color=color, ms=10, label=f"N={c['n']:.2g}{budget}: η*={c['lr']:.2g}")
            for lr in c["diverged_lrs"]:
                ax.axvline(lr, color=color, lw=0.6, alpha=0.5)
        ax.set_xscale("log")
        ax.set(title=f"{group}: loss against LR per cell (thin vertical lines: diverged)", xlabel="learning rate", ylabel="loss")
        ax.legend(fontsize=6)
    path1 = save_figure(fig, out / "lr_curves")

    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.5), squeeze=False)
    for ax, (group, g) in zip(axes[0], groups.items()):
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
        ax.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel="optimal LR η*", title=f"{group}: η* and its law")
        ax.legend(fontsize=6)
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
