"""Figures without a display: every plot is written as PNG (for reports) and SVG (for papers)."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "mea"  # with no date below: the same figure gives the same file, so a re-made report diffs only where it changed
import matplotlib.pyplot as plt  # noqa: E402,F401  (re-exported: import pyplot from here so the backend is set first)


def save_figure(fig, stem: Path) -> Path:
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    fig.savefig(stem.with_suffix(".svg"), metadata={"Date": None})
    plt.close(fig)
    return stem.with_suffix(".png")
