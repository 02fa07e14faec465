"""`mea-fit` / `sweeps/fit.py`: fit the LR law or the loss law to a CSV of runs, write fit.json, plots, configs.

    mea-fit lr-law results.csv --out fits/ --target 350m --target 1.3b
    mea-fit loss-law runs.csv --n-col params --d-col tokens --loss-col loss --out fits/

Any CSV fits once its columns are named with --n-col, --d-col, --lr-col, --loss-col, --group-col.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mea.run_directory import write_synced

from .laws import FitError, fit_loss_law, fit_power_law, lr_optimum, optimum_samples


@dataclass(frozen=True)
class FitSettings:
    """Which columns of the CSV a fit reads, and how it fits them (mea-fit's options, by the same names)."""
    n_col: str = "non_embedding_params"
    d_col: str = "tokens"
    lr_col: str = "lr"
    loss_col: str = "final_train_loss"
    group_col: str = "variant"
    bootstrap: int = 50
    seed: int = 0
    margin: float = 0.01  # lr-law: loss margin of the sensitivity width (relative)
    targets: tuple[str, ...] = ()  # lr-law: model presets or parameter counts to predict η* for
    target_tokens: float | None = None  # lr-law: the targets' token budget, where η* depends on D


def read_columns(path: Path, needed: dict[str, str], optional: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Named columns of a CSV; numeric ones as float arrays. Raises FitError naming a missing or bad column."""
    if not path.is_file():
        raise FitError(f"{path} does not exist; give the results.csv of a sweep or another CSV of runs")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0].keys()) if rows else []
    out = {}
    for role, column in {**needed, **(optional or {})}.items():
        if column not in header:
            if role in needed:
                raise FitError(f"{path} has no column {column!r} (--{role}-col); its columns are {header}")
            continue
        values = [r[column] for r in rows]
        if role in ("group", "diverged"):
            out[role] = np.array(values)
            continue
        try:
            out[role] = np.array([float(v) if v not in ("", "nan") else math.nan for v in values])
        except ValueError:
            raise FitError(f"column {column!r} of {path} is not numeric") from None
        if role in ("n", "d", "lr") and np.any(out[role][np.isfinite(out[role])] <= 0):
            raise FitError(f"column {column!r} (--{role}-col) of {path} has non-positive values; N, D and LR must be positive")
    return out


def preset_size(name: str) -> float:
    """Non-embedding parameters of a conf/model preset, counted on the meta device (nothing allocated)."""
    from omegaconf import OmegaConf

    from mea.models import ModelConfig, parameter_counts
    from mea.models.attention.mha import MHAConfig

    path = Path(__file__).resolve().parents[2] / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        raise FitError(f"--target {name}: no such model preset in conf/model; give a preset name or a number of parameters")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))
    cfg.vocab_size = 8
    return float(parameter_counts(cfg, MHAConfig())["non_embedding"])


def parse_target(text: str) -> tuple[str, float]:
    try:
        return text, float(text)
    except ValueError:
        return text, preset_size(text)


def cell_label(group: str, n: float, d: float | None) -> str:
    return f"{group}, N={n:.3g}" + (f", D={d:.3g}" if d is not None else "")


def fit_cells(cols: dict[str, np.ndarray], rows: np.ndarray, diverged: np.ndarray, group: str, settings: FitSettings, messages: list[str]) -> list[dict]:
    """One LR optimum per (N, D) cell of the group's rows: its runs, at one size and one token budget, are never
    pooled with another budget's. A cell that yields no optimum keeps its reason and the others go on."""
    budgets = cols["d"] if "d" in cols else np.full(len(cols["n"]), math.nan)
    keys = sorted({(float(n), float(d) if np.isfinite(d) else None) for n, d in zip(cols["n"][rows], budgets[rows])}, key=lambda k: (k[0], k[1] or 0.0))
    cells = []
    for n, d in keys:
        at = rows & (cols["n"] == n) & (budgets == d if d is not None else ~np.isfinite(budgets))
        ok = at & ~diverged
        points = sorted(zip(cols["lr"][ok].tolist(), cols["loss"][ok].tolist()))  # kept so that every plot of the fit shows what it was fitted to
        cell = {"n": n, **({"d": d} if d is not None else {}), "runs": int(at.sum()), "points": points, "diverged_lrs": sorted({float(x) for x in cols["lr"][at & diverged]})}
        try:
            opt = lr_optimum(cols["lr"][ok], cols["loss"][ok], cell_label(group, n, d), n_boot=settings.bootstrap, seed=settings.seed)
            cell |= {"lr": opt.lr, "lr_ci": opt.ci, "loss": opt.loss, "coeffs": list(map(float, opt.coeffs)), "fitted_lrs": list(opt.fitted),
                     "sensitivity_decades": opt.sensitivity_width(settings.margin), "_opt": opt}
        except FitError as e:
            cell["message"] = str(e)
            messages.append(str(e))
        cells.append(cell)
    return cells


def fit_law(cells: list[dict], group: str, targets: list[tuple[str, float]], target_tokens: float | None, n_boot: int, rng: np.random.Generator) -> dict:
    """η*(N, D) = c·N^α·D^β across cells when a size was trained at several budgets; else η*(N) = a·N^b, with
    η*(N, D) beside it where the budgets vary independently of N. Predictions at the targets."""
    fitted = [c for c in cells if "lr" in c]
    n = np.array([c["n"] for c in fitted])
    d = np.array([c.get("d", math.nan) for c in fitted])
    lr = np.array([c["lr"] for c in fitted])
    samples = np.column_stack([optimum_samples(c["_opt"], n_boot, rng) for c in fitted]) if fitted else np.empty((0, 0))
    sizes = {c["n"] for c in cells}
    several_budgets = len({(c["n"], c.get("d")) for c in cells}) > len(sizes)
    out: dict = {}

    def joint_law() -> dict:
        law = fit_power_law([n, d], lr, samples, f"{group}: η*(N, D)")
        form = f"η*(N, D) = {law.coef:.4g}·N^{law.exponents[0]:.4f}·D^{law.exponents[1]:.4f}"
        return {"c": law.coef, "alpha": law.exponents[0], "beta": law.exponents[1], "c_ci": law.coef_ci,
                "alpha_ci": law.exponents_ci[0], "beta_ci": law.exponents_ci[1], "form": form, "_law": law}

    if several_budgets:
        out["joint"] = joint = joint_law()
        law = joint["_law"]
        out["predictions"] = {name: {"n": size, "d": target_tokens, "lr": law(size, target_tokens), "lr_ci": law.interval(size, target_tokens), "law": joint["form"]}
                              for name, size in targets}
        return out
    law = fit_power_law([n], lr, samples, f"{group}: η*(N)")
    form = f"η*(N) = {law.coef:.4g}·N^{law.exponents[0]:.4f}"
    out |= {"a": law.coef, "b": law.exponents[0], "a_ci": law.coef_ci, "b_ci": law.exponents_ci[0], "form": form, "_law": law}
    out["predictions"] = {name: {"n": size, "lr": law(size), "lr_ci": law.interval(size), "law": form} for name, size in targets}
    if np.all(np.isfinite(d)) and len(set(d)) > 1 and len(fitted) >= 4:
        try:
            out["joint"] = joint_law()
        except FitError as e:  # one budget per size, tied to it: η*(N) is the law
            out["joint_message"] = str(e)
    return out


def lr_law(csv_path: Path, settings: FitSettings = FitSettings()) -> dict:
    """η* per cell and the LR law per group, with predictions at the targets; FitError where no law fits."""
    cols = read_columns(csv_path, {"n": settings.n_col, "lr": settings.lr_col, "loss": settings.loss_col},
                        {"group": settings.group_col, "d": settings.d_col, "diverged": "diverged"})
    groups = cols.get("group", np.array(["all"] * len(cols["n"])))
    diverged = np.isin(cols.get("diverged", np.array(["False"] * len(groups))), ["True", "true", "1"]) | ~np.isfinite(cols["loss"])
    targets = [parse_target(t) for t in settings.targets]
    if targets and settings.target_tokens is None and "d" in cols and len(set(zip(cols["n"], cols["d"]))) > len(set(cols["n"])):
        raise FitError(f"{csv_path}: some sizes were trained at several token budgets, so η* depends on D; give --target-tokens with --target")
    rng = np.random.default_rng(settings.seed)
    report: dict = {"kind": "lr-law", "loss": settings.loss_col, "margin": settings.margin, "groups": {}, "messages": []}
    for group in sorted(set(groups)):
        cells = fit_cells(cols, groups == group, diverged, group, settings, report["messages"])
        out = {"cells": cells}
        try:
            out |= fit_law(cells, group, targets, settings.target_tokens, settings.bootstrap, rng)
        except FitError as e:
            out["message"] = str(e)
            report["messages"].append(str(e))
        report["groups"][group] = out
    if not any("a" in g or "joint" in g for g in report["groups"].values()):
        raise FitError("no LR law could be fitted: " + "; ".join(report["messages"]))
    return report


def loss_law(csv_path: Path, settings: FitSettings = FitSettings()) -> dict:
    cols = read_columns(csv_path, {"n": settings.n_col, "d": settings.d_col, "loss": settings.loss_col})
    ok = np.isfinite(cols["loss"])
    law = fit_loss_law(cols["n"][ok], cols["d"][ok], cols["loss"][ok], n_boot=settings.bootstrap, seed=settings.seed)
    return {"kind": "loss-law", "E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta, "ci": law.ci, "_law": law, "_data": cols}


def json_ready(obj):
    """The report as fit.json holds it: without the objects kept for plotting, in JSON's own types."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return float(obj) if isinstance(obj, np.floating) else obj


def write_lr_configs(report: dict, folder: Path) -> list[Path]:
    """One Hydra fragment per group (variant) and target: `python train.py +lr=mea_350m` takes its LR."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for group, out in report["groups"].items():
        for name, pred in out.get("predictions", {}).items():
            path = folder / f"{group}_{name}.yaml"
            lo, hi = pred["lr_ci"]
            at = f"N = {pred['n']:.4g}" + (f", D = {pred['d']:.4g}" if "d" in pred else "")
            write_synced(path, f"# @package _global_\n# {pred['law']} for {group} at {at} (95% interval {lo:.3g} to {hi:.3g})\noptim:\n  lr: {pred['lr']:.6g}\n")
            written.append(path)
    return written


def render_markdown(report: dict) -> str:
    lines = [f"# LR law ({report['kind']})", ""]
    if report["kind"] == "loss-law":
        ci = report["ci"]
        lines += ["| constant | value | 95% interval |", "|---|---|---|"] + [f"| {k} | {report[k]:.4g} | {ci[k][0]:.4g} – {ci[k][1]:.4g} |" for k in ("E", "A", "B", "alpha", "beta")]
        return "\n".join(lines) + "\n"
    lines += [f"| group | N | D | runs | η* | 95% interval | loss at η* | LR range within {report['margin']:.0%} (decades) | note |", "|---|---|---|---|---|---|---|---|---|"]
    for group, out in report["groups"].items():
        for c in out["cells"]:
            budget = f"{c['d']:.3g}" if "d" in c else "–"
            if "lr" in c:
                lines.append(f"| {group} | {c['n']:.3g} | {budget} | {c['runs']} | {c['lr']:.3g} | {c['lr_ci'][0]:.3g} – {c['lr_ci'][1]:.3g} | "
                             f"{c['loss']:.4f} | {c['sensitivity_decades']:.2f} | {len(c['diverged_lrs'])} diverged |")
            else:
                lines.append(f"| {group} | {c['n']:.3g} | {budget} | {c['runs']} | – | – | – | – | not fitted: {c['message']} |")
    lines += ["", "| group | law | exponents (95% interval) | predictions |", "|---|---|---|---|"]
    for group, out in report["groups"].items():
        preds = "; ".join(f"{name}: {p['lr']:.3g} ({p['lr_ci'][0]:.3g} – {p['lr_ci'][1]:.3g})" for name, p in out.get("predictions", {}).items())
        if "a" in out:
            lines.append(f"| {group} | {out['form']} | b: {out['b_ci'][0]:.3f} – {out['b_ci'][1]:.3f} | {preds} |")
        if "joint" in out:
            j = out["joint"]
            lines.append(f"| {group} | {j['form']} | α: {j['alpha_ci'][0]:.3f} – {j['alpha_ci'][1]:.3f}, β: {j['beta_ci'][0]:.3f} – {j['beta_ci'][1]:.3f} | {preds if 'a' not in out else ''} |")
        if "message" in out:
            lines.append(f"| {group} | – | – | {out['message']} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mea-fit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("lr-law", "loss-law"):
        p = sub.add_parser(name)
        p.add_argument("csv", type=Path)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--n-col", default="non_embedding_params")
        p.add_argument("--d-col", default="tokens")
        p.add_argument("--lr-col", default="lr")
        p.add_argument("--loss-col", default="final_train_loss")
        p.add_argument("--group-col", default="variant")
        p.add_argument("--bootstrap", type=int, default=50)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--margin", type=float, default=0.01, help="lr-law: loss margin of the sensitivity width (relative)")
        p.add_argument("--target", action="append", default=[], help="lr-law: a model preset or a parameter count to predict η* for")
        p.add_argument("--target-tokens", type=float, help="lr-law: the targets' token budget, where η* depends on D (several budgets per size)")
        p.add_argument("--lr-conf-dir", type=Path, default=Path("conf/lr"), help="lr-law: where the Hydra fragments go")
    return parser.parse_args(argv)


def write_fit(report: dict, out: Path, lr_conf_dir: Path | None) -> list[Path]:
    """fit.json, fit.md and the plots in out, and an lr-law's Hydra fragments in lr_conf_dir: what was written."""
    from .plots import plot_report

    out.mkdir(parents=True, exist_ok=True)
    plots = plot_report(report, out)
    written = write_lr_configs(report, lr_conf_dir) if report["kind"] == "lr-law" and lr_conf_dir is not None else []
    write_synced(out / "fit.json", json.dumps(json_ready(report), indent=1))
    write_synced(out / "fit.md", render_markdown(json_ready(report)))
    return [out / "fit.json", out / "fit.md", *plots, *written]


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    settings = FitSettings(n_col=args.n_col, d_col=args.d_col, lr_col=args.lr_col, loss_col=args.loss_col, group_col=args.group_col, bootstrap=args.bootstrap,
                           seed=args.seed, margin=args.margin, targets=tuple(args.target), target_tokens=args.target_tokens)
    try:
        report = lr_law(args.csv, settings) if args.command == "lr-law" else loss_law(args.csv, settings)
    except FitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    written = write_fit(report, args.out, args.lr_conf_dir)
    for message in report.get("messages", []):
        print(f"warning: {message}", file=sys.stderr)
    print(render_markdown(json_ready(report)))
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
