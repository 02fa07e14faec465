"""LR sweeps and scaling-law fits: synthetic data from known laws, an end-to-end mini sweep on CPU, bad input."""
import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mea.tools.compare import best_runs
from mea.studies.report import largest_size_runs
from mea.run_directory import RunDirectory
from mea.scaling.laws import FitError, fit_loss_law, lr_optimum
from mea.scaling.sweep import Launcher, at_largest_size, best_by_arm, load_spec, read_results, run_sweep, not_diverged

from .conftest import run_cli, run_tool, started


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def lr_law_runs(a=3.0, b=-0.3, sizes=(1e6, 3e6, 1e7, 3e7), noise=0.002, seed=0, span=30, points=9, depth=0.03):
    rng = np.random.default_rng(seed)
    rows = []
    for variant, scale in (("mha", 1.0), ("mea", 2.5)):
        for n in sizes:
            opt = scale * a * n**b
            for lr in np.geomspace(opt / span, opt * span, points):
                loss = 4 - 0.1 * math.log10(n) + depth * math.log(lr / opt) ** 2 + rng.normal(0, noise)
                rows.append({"arm": variant, "N": n, "D": 20 * n, "eta": lr, "L": loss, "diverged": False})
    return rows


def test_lr_law_recovers_known_constants(tmp_path):
    csv_path = write_csv(tmp_path / "runs.csv", lr_law_runs())
    proc = run_tool("mea.scaling.fit", "lr-law", str(csv_path), "--out", str(tmp_path / "fit"), "--n-col", "N", "--lr-col", "eta", "--loss-col", "L",
                   "--group-col", "arm", "--d-col", "D", "--target", "3e8", "--target", "25m", "--lr-conf-dir", str(tmp_path / "lr"))
    assert proc.returncode == 0, proc.stderr
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    for group, scale in (("mha", 1.0), ("mea", 2.5)):
        g = fit["groups"][group]
        assert g["b"] == pytest.approx(-0.3, abs=0.02) and g["a"] == pytest.approx(3.0 * scale, rel=0.25)
        assert g["b_ci"][0] < -0.3 < g["b_ci"][1] or abs(g["b"] + 0.3) < 0.01
        pred = g["predictions"]["3e8"]
        assert pred["lr"] == pytest.approx(scale * 3.0 * 3e8**-0.3, rel=0.1) and pred["lr_ci"][0] < pred["lr"] < pred["lr_ci"][1]
        for size in g["cells"]:  # width of the LR range within 1% of the optimum: 2·sqrt(0.01·L*/depth) in ln units
            expected = 2 * math.sqrt(0.01 * size["loss"] / 0.03) / math.log(10)
            assert size["sensitivity_decades"] == pytest.approx(expected, rel=0.1)
    fragment = (tmp_path / "lr" / "mea_25m.yaml").read_text()
    assert fragment.startswith("# @package _global_") and "optim:\n  lr: " in fragment
    for plot in ("lr_curves.png", "lr_curves.svg", "lr_law.png", "fit.md"):
        assert (tmp_path / "fit" / plot).stat().st_size > 1000


def test_loss_law_recovers_known_constants():
    rng = np.random.default_rng(0)
    n = np.repeat([1e6, 3e6, 1e7, 3e7, 1e8], 4)
    d = np.tile([1e8, 3e8, 1e9, 3e9], 5)
    loss = (1.7 + 400 / n**0.34 + 410 / d**0.28) * np.exp(rng.normal(0, 0.002, len(n)))
    law = fit_loss_law(n, d, loss, n_boot=10)
    assert law.alpha == pytest.approx(0.34, abs=0.02) and law.beta == pytest.approx(0.28, abs=0.03)
    assert law.E == pytest.approx(1.7, abs=0.15)
    assert law(1e9, 1e10) == pytest.approx(1.7 + 400 / 1e9**0.34 + 410 / 1e10**0.28, rel=0.01)


def test_loss_law_cli_with_mapped_columns(tmp_path):
    rows = [{"params": n, "toks": d, "loss": 2 + 300 / n**0.3 + 300 / d**0.3} for n in (1e6, 1e7, 1e8) for d in (1e8, 1e9, 1e10)]
    proc = run_tool("mea.scaling.fit", "loss-law", str(write_csv(tmp_path / "r.csv", rows)), "--n-col", "params", "--d-col", "toks", "--loss-col", "loss",
                   "--out", str(tmp_path / "o"), "--bootstrap", "5")
    assert proc.returncode == 0, proc.stderr
    fit = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert set(fit) >= {"E", "A", "B", "alpha", "beta", "ci"} and fit["alpha"] == pytest.approx(0.3, abs=0.02)
    assert (tmp_path / "o" / "loss_law.png").is_file()


def test_edge_optimum_and_all_diverged_give_messages_not_fits():
    lrs = np.geomspace(1e-4, 1e-2, 5)
    with pytest.raises(FitError, match="edge of the grid; extend the grid to higher LRs"):
        lr_optimum(lrs, 3 - np.log(lrs) * 0.1, "mea, N=1e6")
    with pytest.raises(FitError, match="mea, N=1e6: every run diverged; lower the LR grid"):
        lr_optimum(np.array([]), np.array([]), "mea, N=1e6")


def test_fit_report_names_sizes_without_an_optimum(tmp_path):
    rows = [r for r in lr_law_runs() if not (r["N"] == 1e6 and r["eta"] < 0.5 * 3.0 * 1e6**-0.3)]  # 1e6: the optimum falls on the low edge
    for r in rows:
        if r["N"] == 3e7 and r["arm"] == "mha":
            r["diverged"] = True
    proc = run_tool("mea.scaling.fit", "lr-law", str(write_csv(tmp_path / "r.csv", rows)), "--out", str(tmp_path / "o"), "--n-col", "N", "--lr-col", "eta",
                   "--loss-col", "L", "--group-col", "arm", "--lr-conf-dir", str(tmp_path / "lr"))
    assert proc.returncode == 0, proc.stderr
    assert "mha, N=1e+06: the best LR" in proc.stderr and "extend the grid to lower LRs" in proc.stderr
    assert "mha, N=3e+07: every run diverged" in proc.stderr
    fit = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert len([s for s in fit["groups"]["mha"]["cells"] if "lr" in s]) == 2 and "b" in fit["groups"]["mha"]


@pytest.mark.parametrize(
    "rows, args, message",
    [
        ([{"N": 1, "eta": 0.1}], [], "has no column 'L' (--loss-col)"),
        ([{"N": -5, "eta": 0.1, "L": 3}], [], "column 'N' (--n-col) of"),
        ([{"N": 1e6, "eta": 0.0, "L": 3}], [], "non-positive values"),
        ([{"N": n, "eta": lr, "L": 3 + (math.log(lr) + 4) ** 2} for n in (1e6,) for lr in (0.001, 0.01, 0.1)], [], "1 points for 2 parameters; add sizes"),
    ],
)
def test_bad_csv_input(rows, args, message, tmp_path):
    proc = run_tool("mea.scaling.fit", "lr-law", str(write_csv(tmp_path / "r.csv", rows)), "--out", str(tmp_path / "o"), "--n-col", "N", "--lr-col", "eta",
                   "--loss-col", "L", "--group-col", "none", "--lr-conf-dir", str(tmp_path / "lr"), *args)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o" / "fit.json").exists()


MINI = """
name: mini
variants: [mea]
sizes:
  - {model: tiny, name: w32, tokens: 6144, overrides: [model.dim=32, model.n_heads=2]}
  - {model: tiny, name: w64, tokens: 6144, overrides: [model.dim=64, model.n_heads=4]}
lr_min: 1.0e-3
lr_max: 1.0e-1
lr_points: 3
overrides: [data.seq_len=32, trainer.global_batch=8, logger.mode=disabled, trainer.log_every=4, trainer.eval_batches=1, trainer.sample_tokens=4, scheduler.warmup_steps=2]
out: OUT
"""


def test_mini_sweep_end_to_end_and_resume(tmp_path):
    spec = tmp_path / "mini.yaml"
    spec.write_text(MINI.replace("OUT", str(tmp_path / "out")))
    proc = run_cli("sweeps/lr_sweep.py", str(spec), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["size"] for r in rows} == {"w32", "w64"} and {float(r["lr"]) for r in rows} == {0.001, 0.01, 0.1}
    assert all(int(r["tokens"]) == 24 * 256 for r in rows) and all(r["variant"] == "mea" for r in rows)
    assert set(rows[0]) == {"variant", "size", "params", "non_embedding_params", "layers", "width", "tokens", "batch_tokens", "lr", "seed",
                            "final_train_loss", "final_val_loss", "diverged", "wall_time_s", "run_dir"}
    largest = [r for r in rows if r["size"] == "w64" and r["diverged"] != "True"]
    best = best_by_arm(at_largest_size(not_diverged(read_results(tmp_path / "out" / "results.csv"))))
    assert best["mea"] == min(largest, key=lambda r: float(r["final_train_loss"]))
    assert best_runs(tmp_path / "out" / "results.csv") == [Path(best["mea"]["run_dir"])]
    spec.write_text(spec.read_text().replace("trainer.log_every=4", "trainer.log_every=2"))
    relogged = run_cli("sweeps/lr_sweep.py", str(spec), timeout=900)  # resumed, and logging decides nothing: the same runs, no multirun started
    assert relogged.returncode == 0 and relogged.stdout.count("every run is already done") == 2, relogged.stderr[-3000:]
    assert "Launching" not in relogged.stdout + relogged.stderr
    results_before = (tmp_path / "out" / "results.csv").read_text()
    spec.write_text(spec.read_text().replace("scheduler.warmup_steps=2", "scheduler.warmup_steps=3"))
    for extra in ([], ["--collect-only"]):  # another schedule: the runs are not the spec's any more, and never collected
        changed = run_cli("sweeps/lr_sweep.py", str(spec), *extra, timeout=900)
        assert changed.returncode == 2 and "6 run(s) under" in changed.stderr and "scheduler.warmup_steps: 2 recorded, 3 now" in changed.stderr, changed.stderr
        assert len(changed.stderr.strip().splitlines()) == 1 and "Launching" not in changed.stdout
    assert (tmp_path / "out" / "results.csv").read_text() == results_before
    spec.write_text(spec.read_text().replace("scheduler.warmup_steps=3", "scheduler.warmup_steps=2"))
    fit = run_cli("sweeps/fit.py", "lr-law", str(tmp_path / "out" / "results.csv"), "--out", str(tmp_path / "fit"), "--target", "25m", "--lr-conf-dir", str(tmp_path / "lr"))
    assert fit.returncode == 0, fit.stderr
    assert (tmp_path / "fit" / "fit.json").is_file() and (tmp_path / "fit" / "lr_curves.png").is_file()
    report = json.loads((tmp_path / "fit" / "fit.json").read_text())
    sizes = report["groups"]["mea"]["cells"]
    assert len(sizes) == 2 and all(("lr" in s) or ("message" in s) for s in sizes)


def test_results_readers_take_each_arms_best_trained_run_at_the_largest_size(tmp_path):
    """Arms of one size differ by a few parameters; a diverged run never wins; the report's grid keeps it."""
    def row(variant, size, params, lr, loss, diverged=False):
        return {"variant": variant, "size": size, "non_embedding_params": params, "lr": lr, "final_train_loss": loss,
                "diverged": diverged, "run_dir": f"/runs/{size}/{variant}/{lr}"}

    path = write_csv(tmp_path / "results.csv", [
        row("mha", "small", 1000, 0.01, 2.0), row("mea", "small", 1010, 0.01, 1.9),  # lower losses, smaller size
        row("mha", "big", 5000, 0.001, 3.0), row("mha", "big", 5000, 0.003, 2.8), row("mha", "big", 5000, 0.01, 1.0, diverged=True),
        row("mea", "big", 5032, 0.003, 2.9), row("mea", "big", 5032, 0.01, 2.7),
    ])
    best = best_by_arm(at_largest_size(not_diverged(read_results(path))))
    assert {arm: (r["size"], r["lr"]) for arm, r in best.items()} == {"mha": ("big", "0.003"), "mea": ("big", "0.01")}
    assert best_runs(path) == [Path("/runs/big/mha/0.003"), Path("/runs/big/mea/0.01")]
    assert sorted(largest_size_runs(path, None)["mha"]) == [0.001, 0.003, 0.01]


def test_bad_sweep_spec(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(MINI.replace("lr_points: 3", "lr_points: 2").replace("OUT", str(tmp_path)))
    proc = run_tool("mea.scaling.sweep", str(spec))
    assert proc.returncode == 2 and "lr_points >= 3" in proc.stderr
    spec.write_text(MINI.replace("lr_min", "lr_mn").replace("OUT", str(tmp_path)))
    proc = run_tool("mea.scaling.sweep", str(spec))
    assert proc.returncode == 2 and "lr_mn" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    spec.write_text(MINI.replace("name: w64, tokens: 6144", "name: w64, tokens: 0").replace("OUT", str(tmp_path)))
    proc = run_tool("mea.scaling.sweep", str(spec))
    assert proc.returncode == 2 and "size w64 has tokens=0; give each size a positive token budget" in proc.stderr
    assert not any(tmp_path.glob("**/summary.json"))


def budget_grid_runs(c=0.5, alpha=-0.35, beta=0.12, sizes=(1e6, 3e6, 1e7, 3e7), budgets=(3e7, 1e8, 3e8, 1e9), noise=0.001, seed=0):
    """A published-style dense grid: every size at several token budgets, LRs spaced by √2 around each cell's optimum."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        for d in budgets:
            opt = c * n**alpha * d**beta
            for k in range(-4, 5):
                lr = opt * 2 ** (k / 2 + rng.uniform(-0.25, 0.25))  # the grid is not centred on the optimum
                loss = 2 + 30 / n**0.2 + 40 / d**0.2 + 0.03 * math.log(lr / opt) ** 2 + rng.normal(0, noise)
                rows.append({"N": n, "D": d, "eta": lr, "L": loss})
    return rows


def test_lr_law_with_several_budgets_per_size_fits_each_cell_and_recovers_both_exponents(tmp_path):
    rows = budget_grid_runs()
    proc = run_tool("mea.scaling.fit", "lr-law", str(write_csv(tmp_path / "r.csv", rows)), "--out", str(tmp_path / "o"), "--n-col", "N", "--d-col", "D", "--lr-col", "eta",
                   "--loss-col", "L", "--group-col", "none", "--target", "1e8", "--target-tokens", "2e9", "--lr-conf-dir", str(tmp_path / "lr"))
    assert proc.returncode == 0, proc.stderr
    g = json.loads((tmp_path / "o" / "fit.json").read_text())["groups"]["all"]
    assert len(g["cells"]) == 16 and all("lr" in cell for cell in g["cells"])  # one optimum per (N, D), never pooled
    for cell in g["cells"]:
        assert cell["lr"] == pytest.approx(0.5 * cell["n"] ** -0.35 * cell["d"] ** 0.12, rel=0.2)  # a cell: noise of 0.001 on a 0.004 rise per LR step
    assert "a" not in g  # η*(N) alone would mix the budgets
    assert g["joint"]["alpha"] == pytest.approx(-0.35, abs=0.03) and g["joint"]["beta"] == pytest.approx(0.12, abs=0.03)
    pred = g["predictions"]["1e8"]
    assert pred["d"] == 2e9 and pred["lr"] == pytest.approx(0.5 * 1e8**-0.35 * 2e9**0.12, rel=0.15)
    assert "η*(N, D)" in (tmp_path / "lr" / "all_1e8.yaml").read_text()
    table = (tmp_path / "o" / "fit.md").read_text()
    assert table.count("| all | ") == 16 + 1 and "η*(N, D) = " in table


def test_several_budgets_without_target_tokens_say_what_is_missing(tmp_path):
    proc = run_tool("mea.scaling.fit", "lr-law", str(write_csv(tmp_path / "r.csv", budget_grid_runs())), "--out", str(tmp_path / "o"), "--n-col", "N", "--d-col", "D",
                   "--lr-col", "eta", "--loss-col", "L", "--group-col", "none", "--target", "1e8", "--lr-conf-dir", str(tmp_path / "lr"))
    assert proc.returncode == 2 and "some sizes were trained at several token budgets, so η* depends on D; give --target-tokens with --target" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_awkward_cells_get_their_reason_and_the_rest_of_the_fit_goes_on(tmp_path):
    rows = [r for r in budget_grid_runs(sizes=(1e6, 3e6, 1e7, 3e7, 1e8), budgets=(1e8, 1e9)) if r["N"] != 1e8]
    def grid(n, d):  # √2-spaced around the law's optimum
        return 0.5 * n**-0.35 * d**0.12 * 2 ** (np.arange(-3, 4) / 2)

    def cell(n, losses, d=1e8):
        return [{"N": n, "D": d, "eta": x, "L": y} for x, y in zip(grid(n, d), losses)]

    rows += cell(1e8, [3.2] * 7)  # flat: the runs did not train
    rows += cell(1e8, [3.30, 3.10, 3.00, 2.99, 2.98, 2.975, 3.9], d=1e9)  # lopsided: a slow slope, then a wall
    rows += cell(2e8, [3.1, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan])  # a single finite run
    seeds = [{**r, "L": r["L"] + 0.004 * s} for s in (0, 1) for r in cell(3e8, [3.3, 3.1, 3.02, 3.0, 3.02, 3.15, 3.4])]
    rows += seeds  # duplicate LRs, two seeds each
    rows += cell(4e8, [12.0, 12.0, 2.2, 2.1, 2.2, 12.0, 12.0])  # near-divergent walls beside a sharp optimum
    proc = run_tool("mea.scaling.fit", "lr-law", str(write_csv(tmp_path / "r.csv", rows)), "--out", str(tmp_path / "o"), "--n-col", "N", "--d-col", "D", "--lr-col", "eta",
                   "--loss-col", "L", "--group-col", "none", "--target-tokens", "1e9", "--target", "1e9", "--lr-conf-dir", str(tmp_path / "lr"))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    g = json.loads((tmp_path / "o" / "fit.json").read_text())["groups"]["all"]
    by_cell = {(c["n"], c.get("d")): c for c in g["cells"]}
    assert "the loss is the same (3.2) at every LR" in by_cell[(1e8, 1e8)]["message"]
    assert "lies more than a grid step from the best LR" in by_cell[(1e8, 1e9)]["message"]
    assert "1 finite run(s) at 1 LR(s)" in by_cell[(2e8, 1e8)]["message"]
    assert by_cell[(3e8, 1e8)]["runs"] == 14 and by_cell[(3e8, 1e8)]["lr"] == pytest.approx(grid(3e8, 1e8)[3], rel=0.1)
    assert by_cell[(4e8, 1e8)]["lr"] == pytest.approx(grid(4e8, 1e8)[3], rel=0.05) and by_cell[(4e8, 1e8)]["loss"] == pytest.approx(2.1)  # the walls left out
    fitted = [c for c in g["cells"] if "lr" in c]
    assert len(fitted) == 10 and g["joint"]["alpha"] == pytest.approx(-0.35, abs=0.05)
    table = (tmp_path / "o" / "fit.md").read_text()
    for reason in ("the loss is the same", "more than a grid step", "fewer than the 3 LRs"):
        assert "not fitted: all, N=" in table and reason in table


def test_a_vertex_far_below_every_loss_seen_is_refused_not_square_rooted():
    """A flat bottom between steep sides: the parabola dips below the runs by more than a parabola can."""
    with pytest.raises(FitError, match=r"the fitted loss at the optimum, 2.247, is far below every loss seen near it \(2.308–2.367\)"):
        lr_optimum(np.exp(np.arange(5.0)), np.array([2.78, 2.311, 2.308, 2.367, 2.865]), "x")


def test_three_runs_give_the_bracketing_lrs_as_the_interval_not_a_zero_width_one():
    """mha at d64 in paper_small: the walls left out, three single-seed runs remain, and a parabola through three
    points does not move when they are resampled; the interval is then the best LR's neighbours."""
    lrs = np.array([1e-3, 2.15e-3, 4.64e-3, 1e-2, 2.15e-2])
    opt = lr_optimum(lrs, np.array([3.708, 3.358, 3.337, 3.356, 3.704]), "mha, N=2.14e+05")
    assert 2.15e-3 < opt.lr < 1e-2 and opt.ci == pytest.approx((2.15e-3, 1e-2))
    seeds = lr_optimum(np.repeat(lrs, 2), np.array([3.708, 3.71, 3.358, 3.37, 3.337, 3.33, 3.356, 3.35, 3.704, 3.70]), "two seeds")
    assert 2.15e-3 < seeds.ci[0] < seeds.lr < seeds.ci[1] < 1e-2  # replicate seeds: the bootstrap has noise to resample


AUTOGROUPS = Path("/proc/sys/kernel/sched_autogroup_enabled")


@pytest.mark.skipif(not AUTOGROUPS.is_file() or AUTOGROUPS.read_text().strip() != "1", reason="this kernel schedules no autogroups (sched_autogroup_enabled absent or 0)")
def test_a_niced_sweep_runs_its_multiruns_at_its_own_niceness():
    """Each multirun has a session, so an autogroup, of its own: it must not go back to nice 0."""
    probe = "import time; time.sleep(0.5); print(open('/proc/self/autogroup').read())"  # after the sweep has set it
    proc = run_cli("-c", f"import os, sys; os.nice(7); from mea.scaling.sweep import run_side_by_side; run_side_by_side([[sys.executable, '-c', {probe!r}]], {{}})")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("nice 7"), proc.stdout + proc.stderr


def test_a_local_sweep_shares_its_jobs_between_multiruns_side_by_side(tmp_path, capsys):
    """--jobs 2 over two multiruns of 3 runs: both at once, a run at a time each (3 runs 2 at a time, in turn, leave
    a core idle a third of the time); one size alone takes both jobs. Under SLURM up to 8 job arrays queue at once."""
    spec = tmp_path / "mini.yaml"
    spec.write_text(MINI.replace("OUT", str(tmp_path / "out")))
    run_sweep(load_spec(spec), Launcher(jobs=2), dry_run=True)
    run_sweep(load_spec(spec), Launcher(jobs=2), dry_run=True, only_sizes=["w32"])
    commands = capsys.readouterr().out.splitlines()
    assert [command.split("hydra.launcher.n_jobs=")[1].split()[0] for command in commands] == ["1", "1", "2"]
    assert Launcher(slurm=True).side_by_side(24, 5) == 8 and Launcher(slurm=True, jobs=30).side_by_side(24, 5) == 24


def test_a_stop_signal_ends_a_local_sweep_after_its_runs_saved_and_the_same_command_resumes(tmp_path):
    """SIGTERM, or Ctrl-C (SIGINT), to mea-sweep running two runs at once (its two multiruns side by side, a run
    at a time each): every run in progress saves a checkpoint, no further run starts, and running the spec again
    finishes it."""
    spec = tmp_path / "mini.yaml"
    spec.write_text(MINI.replace("OUT", str(tmp_path / "out")).replace("tokens: 6144", "tokens: 20480"))  # 80 steps a run
    runs = [tmp_path / "out" / size / "mea" / f"lr{lr}-s0" for size in ("w32", "w64") for lr in (0.001, 0.01, 0.1)]

    def logged() -> dict:  # the runs that have trained a step: a run stopped before its first has nothing to save
        counts = {run: len((run / "metrics.jsonl").read_text().splitlines()) for run in runs if (run / "metrics.jsonl").is_file()}
        return {run: count for run, count in counts.items() if count}

    for sig in (signal.SIGTERM, signal.SIGINT):
        before = logged()
        with started([sys.executable, "sweeps/lr_sweep.py", str(spec), "--jobs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            deadline = time.time() + 300
            while not all(logged().get(run, 0) > before.get(run, 0) for run in (runs[0], runs[3])):  # w32's first run and w64's at once
                assert proc.poll() is None and time.time() < deadline, proc.communicate()
                time.sleep(0.05)
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=300)
        assert proc.returncode == 128 + sig, err[-3000:]
        assert f"stopped by {sig.name} after the run in progress saved" in err
        in_progress = [run for run in logged() if not (run / "summary.json").exists()]
        assert set(in_progress) == {runs[0], runs[3]} and all(RunDirectory(run).checkpoints() for run in in_progress), in_progress  # each saved
        assert not any(run in logged() for run in (*runs[1:3], *runs[4:]))  # neither multirun went on to its next run
    again = run_cli("sweeps/lr_sweep.py", str(spec), timeout=900)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-3000:]
    assert sum(1 for _ in open(tmp_path / "out" / "results.csv")) == 7
