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
from pathlib import Path

import numpy as np

from .laws import FitError, fit_loss_law, fit_power_law, lr_optimum, optimum_samples


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
    import torch
    from omegaconf import OmegaConf

    from mea.models import LM, ModelConfig
    from mea.models.attention.mha import MHAConfig

    path = Path(__file__).resolve().parents[2] / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        raise FitError(f"--target {name}: no such model preset in conf/model; give a preset name or a number of parameters")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))
    cfg.vocab_size = 8
    with torch.device("meta"):
        return float(LM(cfg, MHAConfig()).parameter_counts()["non_embedding"])


def parse_target(text: str) -> tuple[str, float]:
    try:
        return text, float(text)
    except ValueError:
        return text, preset_size(text)


def lr_law(args: argparse.Namespace) -> dict:
    cols = read_columns(args.csv, {"n": args.n_col, "lr": args.lr_col, "loss": args.loss_col}, {"group": args.group_col, "d": args.d_col, "diverged": "diverged"})
    groups = cols.get("group", np.array(["all"] * len(cols["n"])))
    diverged = np.isin(cols.get("diverged", np.array(["False"] * len(groups))), ["True", "true", "1"]) | ~np.isfinite(cols["loss"])
    targets = [parse_target(t) for t in args.target]
    rng = np.random.default_rng(args.seed)
    report: dict = {"kind": "lr-law", "margin": args.margin, "groups": {}, "messages": []}
    for group in sorted(set(groups)):
        in_group = groups == group
        sizes = {}
        for n in sorted(set(cols["n"][in_group])):
            at = in_group & (cols["n"] == n)
            ok = at & ~diverged
            entry = {"n": n, "runs": int(at.sum()), "diverged_lrs": sorted(float(x) for x in cols["lr"][at & diverged])}
            if "d" in cols:
                entry["d"] = float(np.median(cols["d"][at]))
            try:
                opt = lr_optimum(cols["lr"][ok], cols["loss"][ok], f"{group}, N={n:.3g}", n_boot=args.bootstrap, seed=args.seed)
                entry |= {"lr": opt.lr, "lr_ci": opt.ci, "loss": opt.loss, "coeffs": list(map(float, opt.coeffs)), "sensitivity_decades": opt.sensitivity_width(args.margin), "_opt": opt}
            except FitError as e:
                entry["message"] = str(e)
                report["messages"].append(str(e))
            sizes[n] = entry
        fitted = [e for e in sizes.values() if "lr" in e]
        out = {"sizes": [{k: v for k, v in e.items() if not k.startswith("_")} for e in sizes.values()]}
        try:
            n_arr = np.array([e["n"] for e in fitted])
            y = np.array([e["lr"] for e in fitted])
            samples = np.column_stack([optimum_samples(e["_opt"], args.bootstrap, rng) for e in fitted]) if fitted else np.empty((0, 0))
            law = fit_power_law([n_arr], y, samples, f"{group}: η*(N)")
            out |= {"a": law.coef, "b": law.exponents[0], "a_ci": law.coef_ci, "b_ci": law.exponents_ci[0]}
            out["predictions"] = {name: {"n": n, "lr": law(n), "lr_ci": law.interval(n)} for name, n in targets}
            out["_law"] = law
            d_arr = np.array([e.get("d", math.nan) for e in fitted])
            if np.all(np.isfinite(d_arr)) and len(set(d_arr)) > 1 and len(fitted) >= 4:
                joint = fit_power_law([n_arr, d_arr], y, samples, f"{group}: η*(N, D)")
                out["joint"] = {"c": joint.coef, "alpha": joint.exponents[0], "beta": joint.exponents[1], "c_ci": joint.coef_ci, "alpha_ci": joint.exponents_ci[0], "beta_ci": joint.exponents_ci[1]}
        except FitError as e:
            out["message"] = str(e)
            report["messages"].append(str(e))
        report["groups"][group] = out
    if not any("a" in g for g in report["groups"].values()):
        raise FitError("no LR law could be fitted: " + "; ".join(report["messages"]))
    return report


def loss_law(args: argparse.Namespace) -> dict:
    cols = read_columns(args.csv, {"n": args.n_col, "d": args.d_col, "loss": args.loss_col})
    ok = np.isfinite(cols["loss"])
    law = fit_loss_law(cols["n"][ok], cols["d"][ok], cols["loss"][ok], n_boot=args.bootstrap, seed=args.seed)
    return {"kind": "loss-law", "E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta, "ci": law.ci, "_law": law, "_data": cols}


def public(obj):
    """The report without the objects kept for plotting."""
    if isinstance(obj, dict):
        return {str(k): public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [public(v) for v in obj]
    return float(obj) if isinstance(obj, np.floating) else obj


def write_lr_configs(report: dict, folder: Path) -> list[Path]:
    """One Hydra fragment per group (variant) and target: `python train.py +lr=mea_350m` takes its LR."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for group, out in report["groups"].items():
        for name, pred in out.get("predictions", {}).items():
            path = folder / f"{group}_{name}.yaml"
            lo, hi = pred["lr_ci"]
            path.write_text(f"# @package _global_\n# η*(N) = {out['a']:.4g}·N^{out['b']:.4f} for {group} at N = {pred['n']:.4g} (95% interval {lo:.3g} to {hi:.3g})\noptim:\n  lr: {pred['lr']:.6g}\n")
            written.append(path)
    return written


def render_markdown(report: dict) -> str:
    lines = [f"# LR law ({report['kind']})", ""]
    if report["kind"] == "loss-law":
        ci = report["ci"]
        lines += ["| constant | value | 95% interval |", "|---|---|---|"] + [f"| {k} | {report[k]:.4g} | {ci[k][0]:.4g} – {ci[k][1]:.4g} |" for k in ("E", "A", "B", "alpha", "beta")]
        return "\n".join(lines) + "\n"
    lines += [f"| group | N | runs | η* | 95% interval | loss at η* | LR range within {report['margin']:.0%} (decades) | note |", "|---|---|---|---|---|---|---|---|"]
    for group, out in report["groups"].items():
        for e in out["sizes"]:
            if "lr" in e:
                lines.append(f"| {group} | {e['n']:.3g} | {e['runs']} | {e['lr']:.3g} | {e['lr_ci'][0]:.3g} – {e['lr_ci'][1]:.3g} | {e['loss']:.4f} | {e['sensitivity_decades']:.2f} | {len(e['diverged_lrs'])} diverged |")
            else:
                lines.append(f"| {group} | {e['n']:.3g} | {e['runs']} | – | – | – | – | {e['message']} |")
    lines += ["", "| group | a | b (95% interval) | predictions |", "|---|---|---|---|"]
    for group, out in report["groups"].items():
        if "a" in out:
            preds = "; ".join(f"{name}: {p['lr']:.3g} ({p['lr_ci'][0]:.3g} – {p['lr_ci'][1]:.3g})" for name, p in out["predictions"].items())
            lines.append(f"| {group} | {out['a']:.4g} | {out['b']:.4f} ({out['b_ci'][0]:.3f} – {out['b_ci'][1]:.3f}) | {preds} |")
        else:
            lines.append(f"| {group} | – | – | {out.get('message', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
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
        p.add_argument("--lr-conf-dir", type=Path, default=Path("conf/lr"), help="lr-law: where the Hydra fragments go")
    args = parser.parse_args(argv)
    try:
        report = lr_law(args) if args.command == "lr-law" else loss_law(args)
    except FitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    from .plots import plot_report

    plots = plot_report(report, args.out)
    written = write_lr_configs(report, args.lr_conf_dir) if args.command == "lr-law" else []
    tmp = args.out / "fit.json.tmp"
    tmp.write_text(json.dumps(public(report), indent=1))
    tmp.replace(args.out / "fit.json")
    (args.out / "fit.md").write_text(render_markdown(public(report)))
    for message in report.get("messages", []):
        print(f"warning: {message}", file=sys.stderr)
    print(render_markdown(public(report)))
    print(f"wrote {args.out / 'fit.json'}, {args.out / 'fit.md'}, " + ", ".join(str(p) for p in plots + written))


if __name__ == "__main__":
    main()
