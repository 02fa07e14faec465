"""The W&B side of `mea-compare --wandb`: a saved workspace with the comparison's panels.

One experiment's runs share a W&B group and carry their arm (variant, or a named arm) in config; the workspace
filters to that group, groups the runs by arm — so seeds collapse into a mean with a min–max band — and plots the
curves against tokens, the axis on which variants of different speed are comparable.
"""
from __future__ import annotations

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from wandb_workspaces.expr import Config, Metric

LOSS_PANELS = {"loss": "training loss", "val_loss": "validation loss"}
RUN_PANELS = {"tokens_per_s": "throughput (tokens/s)", "grad_norm": "gradient norm", "lr": "learning rate"}
DYNAMICS_PANELS = {  # mea.models.dynamics, every layer of a quantity in one panel
    "attn_ratio": "attention branch / residual stream", "mlp_ratio": "MLP branch / residual stream", "resid_rms": "residual stream RMS",
    "head_norm_scale": "head norm mean |γ|", "hlc_k_offdiag": "MEA C_K off-diagonal mass", "hlc_v_offdiag": "MEA C_V off-diagonal mass",
    "mix_logits_offdiag": "THA P_l off-diagonal mass", "mix_weights_offdiag": "THA P_w off-diagonal mass", "lambda": "DIFF λ", "entropy": "attention entropy",
}


def line(metric: str, title: str, smoothing: float = 0.0, regex: str | None = None) -> wr.LinePlot:
    return wr.LinePlot(title=title, x="tokens", y=[] if regex else [metric], metric_regex=regex, smoothing_factor=smoothing,
                       smoothing_type="exponential" if smoothing else "none", groupby_aggfunc="mean", groupby_rangefunc="minmax")


def comparison_workspace(path: str, group: str | None, smoothing: float = 0.9) -> ws.Workspace:
    """A workspace for ENTITY/PROJECT: runs of `group` (all runs when None) grouped by arm, curves against tokens."""
    entity, project = path.split("/", 1)
    sections = [
        ws.Section(name="Loss against tokens, by arm", panels=[line(m, t, smoothing if m == "loss" else 0.0) for m, t in LOSS_PANELS.items()], is_open=True),
        ws.Section(name="Run health", panels=[line(m, t) for m, t in RUN_PANELS.items()], is_open=False),
        ws.Section(name="Training dynamics, every layer", panels=[line(q, t, regex=f"dyn/{q}/.*") for q, t in DYNAMICS_PANELS.items()], is_open=False),
    ]
    return ws.Workspace(
        entity=entity, project=project, name=f"mea: {group or project}", sections=sections,
        settings=ws.WorkspaceSettings(x_axis="tokens", max_runs=100),
        runset_settings=ws.RunsetSettings(filters=[Metric("Group") == group] if group else [], groupby=[Config("arm")]),
    )


def save_workspace(path: str, group: str | None, smoothing: float = 0.9) -> str:
    """Save the comparison workspace to W&B (online) and return its URL."""
    return comparison_workspace(path, group, smoothing).save().url
