"""Figures without a display: every plot is written as PNG (for reports) and SVG (for papers)."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "mea"  # with no date below: the same figure gives the same file, so a re-made report diffs only where it changed
import matplotlib.pyplot as plt  # noqa: E402,F401  (re-exported: import pyplot from here so the backend is set first)


def panels(n: int, columns: int = 4, width: float = 12.0, height: float = 3.2):
    """A grid of n panels that reads at a page's width (at most `columns` a row, the spare ones hidden): the figure
    and its axes, one per panel."""
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def mark_diverged(ax, lrs: list[float], color) -> None:
    """Diverged runs as crosses along the panel's top edge, at their LRs (they have no loss to draw)."""
    if lrs:
        ax.plot(lrs, [0.97] * len(lrs), "x", color=color, ms=6, transform=ax.get_xaxis_transform(), clip_on=False)


def save_figure(fig, stem: Path) -> Path:
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    fig.savefig(stem.with_suffix(".svg"), metadata={"Date": None})
    plt.close(fig)
    return stem.with_suffix(".png")
