"""Plots of a fit report (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mea.plotting import plt, save_figure


def plot_report(report: dict, out: Path) -> list[Path]:
    return plot_lr_law(report, out) if report["kind"] == "lr-law" else plot_loss_law(report, out)


def plot_lr_law(report: dict, out: Path) -> list[Path]:
    groups = report["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (group, g) in zip(axes[0], groups.items()):
        colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(g["sizes"]))))
        for color, e in zip(colors, g["sizes"]):
            if "coeffs" in e:
                c0, c1, c2 = e["coeffs"]
                x = np.linspace(np.log(e["lr"]) - 1.5, np.log(e["lr"]) + 1.5, 50)
                ax.plot(np.exp(x), c0 + c1 * x + c2 * x**2, color=color, lw=1)
                ax.plot([e["lr"]], [e["loss"]], "*", color=color, ms=10, label=f"N={e['n']:.2g}: η*={e['lr']:.2g}")
            for lr in e["diverged_lrs"]:
                ax.axvline(lr, color=color, ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set(title=f"{group}: loss against LR (dotted: diverged)", xlabel="learning rate", ylabel="loss")
        ax.legend(fontsize=7)
    path1 = save_figure(fig, out / "lr_curves")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for group, g in groups.items():
        pts = [e for e in g["sizes"] if "lr" in e]
        if not pts:
            continue
        n = np.array([e["n"] for e in pts])
        lines = ax.errorbar(n, [e["lr"] for e in pts], yerr=np.abs(np.array([e["lr_ci"] for e in pts]).T - [e["lr"] for e in pts]), fmt="o", label=group)
        if "a" in g:
            targets = [p["n"] for p in g["predictions"].values()]
            span = [*n, *targets]
            grid = np.geomspace(min(span) / 1.5, max(span) * 1.5, 50)
            ax.plot(grid, g["a"] * grid ** g["b"], color=lines[0].get_color(), lw=1, label=f"{group}: {g['a']:.3g}·N^{g['b']:.3f}")
            for name, p in g["predictions"].items():
                ax.errorbar([p["n"]], [p["lr"]], yerr=[[p["lr"] - p["lr_ci"][0]], [p["lr_ci"][1] - p["lr"]]], fmt="s", mfc="none", color=lines[0].get_color())
                ax.annotate(name, (p["n"], p["lr"]), fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel="optimal LR η*", title="η*(N) and its extrapolation")
    ax.legend(fontsize=7)
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
