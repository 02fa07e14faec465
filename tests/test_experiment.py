"""The paper's protocol end to end at a micro scale: every artefact of the report is produced and consistent with the runs."""
import csv
import json
import math
import re
import threading
from pathlib import Path

import psutil
import pytest

from mea.scaling.effects import Bracket, difference
from mea.studies.init_audit import finding
from mea.scaling.sweep import Launcher, SweepError, load_spec
from mea.studies.archive import unpack
from mea.studies.experiment import check, load_protocol
from mea.studies.protocol import LocalRuns
from mea.studies.trust import bracket_claim, held_out_table, init_table, own_bests, two_readings, verified_lrs

from .conftest import QUICK, run_cli, run_tool

SPEC = """
name: micro
out: {out}/runs
report: {out}/results/micro.md
baseline: mha
claims: mea_paper
stability_lr_max: 1.0
previous_report: docs/results/paper_small_2026-11-25.md
sweep:
  arms:
    mha: [attention=mha]
    mea: [attention=mea]
    mha_gqa: [attention=mha, model.n_kv_heads=2]
  sizes:
    - {{model: tiny, name: w32, tokens: 4096, overrides: [model.dim=32, model.n_heads=4]}}
    - {{model: tiny, name: w64, tokens: 4096, overrides: [model.dim=64, model.n_heads=4]}}
  lr_min: 1.0e-3
  lr_max: 1.0e-1
  lr_points: 3
  overrides: [data.seq_len=32, trainer.global_batch=8, logger.mode=disabled, trainer.log_every=4, trainer.eval_batches=1, trainer.sample_tokens=4, scheduler.warmup_steps=2, model.n_layers=2]
target: {{model: tiny, name: w96, tokens: 4096, overrides: [model.dim=96, model.n_heads=4], seeds: [0, 1]}}
lr_bracket: {{factors: [0.5, 1, 2], arms: [mha, mea]}}
init_checks: {{settings: {{llama: [model.init.scheme=llama, model.init.head_norm_scale=1.0]}}, arms: [mha, mea]}}
compression: {{arm: mea, kv_heads: [2], layer_sets: {{all: all}}, recover_share: 0.25}}
second_corpus: {{data: [data=tinyshakespeare, data.source={shakespeare}, data.vocab_size=512], seeds: [0], tokens: 2048}}
"""


def test_bad_spec_settings_fail_before_any_run(tmp_path):
    """Each in one line, before anything is written: through the command (exit 2) for a spec and an archive, and the
    same checks called directly for the rest."""
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC.format(out=tmp_path, shakespeare="unused.txt").replace("tokens: 2048}", "tokens: -1}"))
    proc = run_cli("-m", "mea.studies.experiment", str(spec))
    assert proc.returncode == 2 and "second_corpus.tokens=-1; give a positive token budget, or 0 for the target's" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
    spec.write_text(SPEC.format(out=tmp_path, shakespeare="unused.txt"))
    (tmp_path / "damaged.tar.xz").write_bytes(b"not an archive")
    proc = run_tool("mea.studies.experiment", str(spec), "--from-archive", str(tmp_path / "damaged.tar.xz"))
    assert proc.returncode == 2 and "damaged.tar.xz is not a readable archive (" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "runs.unpacking").exists()
    proc = run_tool("mea.studies.experiment", str(spec), "--pack", str(tmp_path / "sitting.tar.xz"))
    assert proc.returncode == 2 and "runs holds no finished run to pack; run `mea-experiment <spec>` first" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "sitting.tar.xz").exists()
    with pytest.raises(SweepError, match="missing.tar.xz does not exist; give the runs.tar.xz beside a published report"):
        unpack(tmp_path / "missing.tar.xz", tmp_path / "runs")
    spec.write_text(SPEC.format(out=tmp_path, shakespeare="unused.txt") + "lr_checks: {mha_gqa: mha}\n")  # retired for the LR bracket
    with pytest.raises(SweepError, match=re.escape("Key 'lr_checks' not in 'Protocol'; sweeps/paper_small.yaml shows every setting a spec takes")):
        load_protocol(spec)
    for good, bad, error in [("w96, tokens: 4096", "w96, tokens: 0", "target.tokens=0; give the from-scratch runs a positive token budget"),
                             ("arms: [mha, mea]}\ninit", "arms: [mha, mea], train_at: best}\ninit", "lr_bracket.train_at=best; choose law (each arm's law's LR) or verified"),
                             ("factors: [0.5, 1, 2]", "factors: [0.5, 2]", "lr_bracket.factors [0.5, 2]: give positive factors of the law's LR that include 1"),
                             ("arms: [mha, mea]}", "arms: [mha, gpt]}", "lr_bracket.arms: gpt is not one of the arms (mha, mea, mha_gqa)"),
                             ("baseline: mha", "baseline: gpt", "baseline=gpt is not one of the arms (mha, mea, mha_gqa)"),
                             ("claims: mea_paper", "claims: other_paper", "claims=other_paper is not a study's claims; choose one of mea_paper (modules of mea/studies/claims)"),
                             ("init_checks: {settings: {llama: [model.init.scheme=llama", "init_checks: {settings: {llama: [model.init.scheme=xavier", "init_checks.settings.llama: "),
                             ("head_norm_scale=1.0]}, arms: [mha, mea]", "head_norm_scale=1.0]}, arms: [gpt]", "init_checks.arms: gpt is not one of the arms"),
                             ("kv_heads: [2]", "kv_heads: [2, 4]", "compression.kv_heads=[2, 4]: each must be from 1 to 3, below the target's 4 heads"),
                             ("paper_small_2026-11-25.md", "paper_small_1999.md",
                              "previous_report=docs/results/paper_small_1999.md does not exist; give an existing file or leave previous_report out")]:
        spec.write_text(SPEC.format(out=tmp_path, shakespeare="unused.txt").replace(good, bad))
        with pytest.raises(SweepError, match=re.escape(error)):
            check(load_protocol(spec))


AUDIT = """
name: audit
arms:
  mha-gpt2: [attention=mha, model.init.scheme=gpt2]
  mha-llama: [attention=mha, model.init.scheme=llama]
  mea-llama: [attention=mea, model.init.scheme=llama, model.init.head_norm_scale=1.0]
sizes:
  - {{model: tiny, name: w32, tokens: 4096, overrides: [model.dim=32, model.n_heads=2]}}
lr_min: 1.0e-3
lr_max: 1.0e-1
lr_points: 3
overrides: [data.seq_len=32, trainer.global_batch=8, logger.mode=disabled, trainer.log_every=4, trainer.eval_batches=1, trainer.sample_tokens=4, scheduler.warmup_steps=2, model.n_layers=2]
out: {out}/runs
"""


def test_init_audit_reads_every_number_from_its_runs(tmp_path):
    spec = tmp_path / "audit.yaml"
    spec.write_text(AUDIT.format(out=tmp_path))
    report = tmp_path / "audit.md"
    proc = run_cli("-m", "mea.studies.init_audit", str(spec), "--seeds", "1", "--report", str(report), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    with open(tmp_path / "runs" / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["diverged"] != "True"]
    for arm, (variant, scheme) in {"mha-gpt2": ("mha", 0), "mha-llama": ("mha", 1), "mea-llama": ("mea", 1)}.items():
        best = min(rows, key=lambda r: float(r["final_val_loss"]) if r["variant"] == arm else float("inf"))
        cells = re.search(rf"^\| {variant} \| ([^|]+) \| ([^|]+) \|", text, re.M).groups()
        assert cells[scheme].strip().strip("*").startswith(f"{float(best['final_val_loss']):.4f} @ {float(best['lr']):g}"), (arm, cells)
    variances = []
    for arm in ("mha-gpt2", "mha-llama", "mea-llama"):  # the noise: each arm's best seed-0 run against its seed-1 run at that LR
        seed0 = min(float(r["final_val_loss"]) for r in rows if r["variant"] == arm)
        seed1 = json.loads((tmp_path / "runs" / "seeds" / "w32" / arm / "s1" / "summary.json").read_text())["final_val_loss"]
        variances.append((seed0 - seed1) ** 2 / 2)
    sigma = (sum(variances) / 3) ** 0.5
    assert abs(float(re.search(r"Seed noise: σ = ([\d.]+)", text).group(1)) - sigma) < 1e-4
    assert re.search(r"^- \*\*gpt2, head_norm_scale=0.05\*\*: (passes|fails)", text, re.M) and re.search(r"^- \*\*llama, head_norm_scale=1\*\*: (passes|fails)", text, re.M)
    # mha-llama's config carries the default head-norm scale, 0.05, which mha never uses: it names no setting of its own
    assert "llama, head_norm_scale=0.05" not in text and "| variant | gpt2, head_norm_scale=0.05 | llama, head_norm_scale=1 | best − " in text
    seed_rows = [json.loads(line) for line in (tmp_path / "runs" / "seeds" / "w32" / "mea-llama" / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in seed_rows if "dyn/hlc_k_offdiag/L1" in r]) >= 5 and "## Training dynamics at w32" in text
    assert "| w32 | mea-llama | " in text  # the branch ratios at initialisation
    mha = {arm: min(float(r["final_val_loss"]) for r in rows if r["variant"] == arm) for arm in ("mha-gpt2", "mha-llama")}
    said = finding(load_spec(spec), "llama, head_norm_scale=1")  # the two sentences the experiment report opens "What changed" with
    assert "costing the head-norm variants +0.000 to +0.000 nats" in said and f"against seed noise σ = {sigma:.3f}" in said
    assert f"the largest handicap left is mha at w32, {mha['mha-gpt2'] - min(mha.values()):+.3f}" in said
    for image in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert (tmp_path / image).is_file(), image


def test_a_scheme_passes_the_audit_only_when_it_handicaps_no_variant_beyond_noise():
    from mea.studies.init_audit import verdicts

    best = {("d64", "mha", "gpt2"): {"loss": 3.70}, ("d64", "mha", "llama"): {"loss": 3.72},
            ("d64", "mea", "gpt2"): {"loss": 4.30}, ("d64", "mea", "llama"): {"loss": 3.69}}
    assert verdicts(best, tolerance=0.05) == {"gpt2": ["mea at d64 is +0.610 above its best setting"], "llama": []}
    assert verdicts(best, tolerance=0.01)["llama"] == ["mha at d64 is +0.020 above its best setting"]


def test_each_claim_reads_its_arms_and_says_when_a_difference_is_within_noise():
    from types import SimpleNamespace

    from mea.studies.claims import Evidence
    from mea.studies.claims.mea_paper import claims

    def arm(name, loss, std=0.01, seeds=3):  # three seeds at loss - std, loss, loss + std: their mean and std
        return {"variant": name, "final_val_loss": loss, "final_val_loss_std": std, "seeds": seeds, "final_val_losses": [loss - std, loss, loss + std]}

    rows = [arm("mha", 3.70), arm("mha_gn", 3.68), arm("mea", 3.60), arm("diff", 3.75), arm("diff_nonorm", 3.72),
            arm("mha_gqa", 3.80), arm("mea_virtual", 3.62, std=0.2)]
    lrs = {"mha": {"lr": 2e-3}, "mha_gqa": {"lr": 1e-3}}
    said = claims(Evidence(SimpleNamespace(baseline="mha", margin=0.01), {"groups": {}}, lrs, rows, [], {}))
    welch = difference(rows[2]["final_val_losses"], rows[0]["final_val_losses"])
    assert (f"**MEA reaches a lower validation loss than the Transformer.** Δ = -0.1000 (3 vs 3 seeds): agrees, 95% interval {welch.interval[0]:+.4f} to "
            f"{welch.interval[1]:+.4f} (Welch); {welch.seeds_to_resolve} seeds an arm resolve it.") in said
    assert "Δ(mha_gn) = -0.0200 against Δ(mea) = -0.1000 (share 0.20): agrees" in said[1]
    assert "Distance to mha: diff +0.0500, diff without norm +0.0200: agrees" in said[2]
    rows[4] = arm("diff_nonorm", 3.72, std=0.05)  # seeds 0.05 apart: 0.03 closer is within noise
    assert "diff without norm +0.0200: within noise (|Δ| ≤ 2 standard errors) (the loss of diff without norm is closer to" in claims(
        Evidence(SimpleNamespace(baseline="mha", margin=0.01), {"groups": {}}, {}, rows, [], {}))[2]
    # 0.18 apart, but mea_virtual's seeds spread 0.2: the standard error is 0.116, so the claim is within noise
    assert ("Δ(mea_virtual − mha_gqa) = -0.1800: within noise (|Δ| ≤ 2 standard errors), 95% interval" in said[3] and "these seeds could see a Δ of" in said[3]
            and "What halving the cache costs each against its full-cache arm: "
            "mea_virtual +0.0200 against mea (within 2 standard errors); mha_gqa +0.1000 against mha (beyond 2 standard errors).") in said[3]


def test_a_comparison_without_a_standard_error_gives_no_verdict():
    from mea.studies.protocol import reading, verdict
    from mea.studies.trust import side_of_noise

    def one_seed(loss):
        return {"final_val_loss": loss, "final_val_loss_std": 0.0, "seeds": 1, "final_val_losses": [loss]}

    assert verdict(-0.1, 0.0) == verdict(0.1, 0.0) == verdict(-0.1, float("nan")) == side_of_noise(-0.1, 0.0) == "one seed: no noise estimate"
    assert reading(one_seed(3.6), one_seed(3.7)) == "one seed: no noise estimate"
    assert (verdict(-0.1, 0.01), verdict(0.1, 0.01), verdict(0.01, 0.01), side_of_noise(-0.1, 0.01)) == ("agrees", "disagrees", "within noise (|Δ| ≤ 2 standard errors)", "lower")


def test_the_early_phase_table_tells_a_run_stuck_early_from_one_that_fell_behind_later(tmp_path):
    """Given curves: mha's failed run is slow out of the early phase, mea's leaves it as soon as its good runs and
    falls behind later; the table reads each run's own metrics, and an arm with no failure adds no reading."""
    from mea.studies.report import early_phase_table

    def run(arm, lr, losses, final):
        run_dir = tmp_path / arm / str(lr)
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": 25 * (i + 1), "loss": x}) + "\n" for i, x in enumerate(losses)))
        return {"final_train_loss": str(final), "final_val_loss": str(final + 0.4), "diverged": "False", "run_dir": str(run_dir)}

    grid = {"mha": {1e-3: run("mha", 1e-3, [7.0, 5.5, 4.5, 3.2], 3.2), 1e-2: run("mha", 1e-2, [7.0, 6.5, 6.2, 5.0, 4.4], 4.4)},
            "mea": {1e-3: run("mea", 1e-3, [7.0, 5.4, 4.2, 3.0], 3.0), 1e-2: run("mea", 1e-2, [7.0, 5.0, 4.8, 4.7, 4.6], 4.6)},
            "tha": {1e-3: run("tha", 1e-3, [7.0, 6.0, 4.0, 3.1], 3.1), 1e-2: run("tha", 1e-2, [7.0, 7.5, 7.2, 7.1], 7.1)}}
    lines = early_phase_table(grid)  # the middle: (7.0 + 3.0) / 2 = 5.0
    assert lines[0].startswith("Step at which the training loss first falls under 5.00, half-way from the first logged loss (7.00") and "logged every 25 steps" in lines[0]
    assert "| mha | 75 | 100 ✗ |" in lines and "| mea | 75 | 50 ✗ |" in lines and "| tha | 75 | never ✗ |" in lines
    assert lines[-1].startswith("Where each arm fails and where it trains: mha: step 100 where it fails, step 75 where it trains; "
                                "mea: step 50 where it fails, step 75 where it trains; tha: never where it fails, step 75 where it trains. ")
    assert early_phase_table({"mha": {1e-3: grid["mha"][1e-3]}}) == []  # nothing failed: no table


def row(variant, loss, std=0.01, seeds=3, base=3.70):
    return {"variant": variant, "final_val_loss": loss, "final_val_loss_std": std, "seeds": seeds, "final_val_losses": [loss - std, loss, loss + std][:seeds],
            "delta_vs_baseline": loss - base}


def test_what_changed_says_which_arms_reading_moved_since_the_previous_report(tmp_path):
    """Read against a report's readings (the published one of 2026-11-30, converted from its table): tha was lower than mha beyond noise
    then (3.3037 ± 0.0084 against 3.3422 ± 0.0090, three seeds each); given rows that put it within noise now, and
    mea within noise as then, the table gives both readings and the line after it names tha alone."""
    from types import SimpleNamespace

    from mea.studies.report import what_changed

    previous = "docs/results/paper_small_2026-11-30.md"
    spec = SimpleNamespace(baseline="mha", previous_report=previous)
    rows = [row("mha", 3.3354, std=0.04, base=3.3354), row("mea", 3.3459, std=0.02, base=3.3354), row("tha", 3.3184, std=0.02, base=3.3354),
            row("new_arm", 3.30, seeds=1, base=3.3354)]
    lines = what_changed(spec, {"steps": {}, "corpora": {"main": rows}}, tmp_path / "report.md", None)
    assert any(line.startswith("The [previous report](") and "paper_small_2026-11-30.md) against this one" in line for line in lines)
    assert "| tha | -0.0385 | lower | -0.0170 | within noise |" in lines and "| mea | +0.0015 | within noise | +0.0105 | within noise |" in lines
    assert "| mha_gqa | +0.0871 | higher | – | – |" in lines and "| new_arm | – | – | -0.0354 | – |" in lines
    assert "The reading moved for tha (lower then, within noise now)." in lines
    steady = what_changed(spec, {"steps": {}, "corpora": {"main": [r for r in rows if r["variant"] != "tha"]}}, tmp_path / "report.md", None)
    assert "No arm's reading against the baseline moved." in steady
    (tmp_path / "old.md").write_text((Path(previous)).read_text())  # a report without its readings: one line, before any run
    spec = tmp_path / "micro.yaml"
    spec.write_text(SPEC.format(out=tmp_path, shakespeare="unused.txt").replace("docs/results/paper_small_2026-11-25.md", str(tmp_path / "old.md")))
    with pytest.raises(SweepError, match=re.escape(f"previous_report={tmp_path / 'old.md'} has no {tmp_path / 'old' / 'readings.json'}, which its comparison is read from")):
        check(load_protocol(spec))


def test_the_bracket_claim_says_whether_a_missed_lr_could_move_a_reading():
    rows = [row("mha", 3.70), row("mea", 3.68)]

    def brackets(regret, extend=None):
        return {"mea": {"bracket": Bracket(2e-3, 3e-3, 3.66, regret, False, extend, 4 if extend else None), "factors": [0.5, 1, 2], "losses": [3.7, 3.68, 3.66]}}
    said = bracket_claim(brackets(0.03), rows, "mha")
    assert said.startswith("**Were the laws' LRs near each arm's optimum at the target?** Bracketed (mea): the largest regret of a law's LR is mea's, +0.0300")
    assert "The smallest gap to mha read here is mea's, 0.0200: the regret of mea is as large, so a verified LR could change that reading." in said
    small = bracket_claim(brackets(0.005, extend="higher"), rows, "mha")
    assert "every regret is smaller, so no reading rests on a missed LR." in small and "Still at the bracket's edge after one extension: mea" in small


def test_a_verified_lr_moves_only_where_the_bracket_says_so():
    lrs = {"mha": {"lr": 2e-3, "ci": None, "source": "law"}, "mea": {"lr": 4e-3, "ci": None, "source": "law"}, "tha": {"lr": 1e-3, "ci": None, "source": "law"}}
    brackets = {"mha": {"bracket": Bracket(2e-3, 3e-3, 3.66, 0.02, False, None, None)}, "mea": {"bracket": Bracket(4e-3, 4e-3, 3.60, 0.0, False, None, None)}}
    moved = verified_lrs(lrs, brackets)
    assert moved["mha"]["lr"] == 3e-3 and moved["mha"]["source"] == "verified: the LR bracket's best (1.50× the law's 0.002)"
    assert moved["mea"] == lrs["mea"] and moved["tha"] == lrs["tha"]  # the law's LR was the best; not bracketed: the law's


def test_the_two_readings_disagree_where_an_arms_own_best_init_turns_its_gap_around():
    """Under the default mea is 0.03 behind mha (beyond noise); under llama, one run, it is 0.02 ahead of mha's own
    best: the readings disagree, and the init table names llama as the default's handicap for mea."""
    rows = [row("mha", 3.70), row("mea", 3.73)]
    checks = {"mha": {"llama": 3.72}, "mea": {"llama": 3.68}}
    lrs = {"mha": {"lr": 2e-3}, "mea": {"lr": 4e-3}}
    bests = own_bests(rows, {}, checks, lrs)
    assert bests["mea"] == (3.68, "llama, LR 0.004 (1 run)") and bests["mha"] == (3.70, "default init, LR 0.002 (3 seeds)")
    lines, said = two_readings(rows, bests, "mha")
    assert "| mea | +0.0300 | llama, LR 0.004 (1 run): 3.6800 | -0.0200 | **disagree** |" in lines
    assert said.startswith("**Do the claims hold with every arm at its own best (init, LR)?** Not everywhere: the readings disagree for mea (+0.0300 under the default, -0.0200")
    table = init_table(checks, rows)
    assert "| mea | 3.7300 ± 0.0100 | 3.6800 | +0.0500 against llama: beyond noise |" in table
    assert "| mha | 3.7000 ± 0.0100 | 3.7200 | -0.0200 against llama: within noise |" in table
    ahead = [row("mha", 3.70), row("mea", 3.60)]
    assert "The two readings agree for every arm" in two_readings(ahead, own_bests(ahead, {}, checks, lrs), "mha")[1]


def test_the_held_out_law_reads_a_fit_without_its_largest_size():
    """A law exact on the first two sizes whose largest size's optimum sits ×2 above it: 0.50× and the curve's
    regret; an arm with a size left unfitted is not tested, and says why."""
    def cell(n, lr_star, fitted=True):
        points = [[lr_star * f, 3.0 + 0.05 * math.log(f) ** 2] for f in (0.25, 0.5, 1, 2, 4)]
        return {"n": n, "points": points, **({"lr": lr_star, "fitted_lrs": [lr_star * 0.25, lr_star * 4]} if fitted else {})}

    def law(n):
        return 0.02 * n**-0.25
    fit = {"groups": {"mha": {"cells": [cell(1e6, law(1e6)), cell(4e6, law(4e6)), cell(1.6e7, 2 * law(1.6e7))]},
                      "mea": {"cells": [cell(1e6, 1e-3), cell(4e6, 1e-3, False), cell(1.6e7, 1e-3)]}}}
    table = held_out_table(fit)
    assert f"| mha | {law(1.6e7):.3g} | {2 * law(1.6e7):.3g} | 0.50× | {0.05 * math.log(2) ** 2:+.4f} |" in table
    assert "| mea | – | – | – | not tested: a smaller size or the largest has no fitted optimum |" in table


def test_target_runs_train_side_by_side_and_one_failure_stops_none_of_the_others(tmp_path):
    quick = [*QUICK, "trainer.max_steps=6", "trainer.eval_every=6"]
    runs = {tmp_path / "a": quick, tmp_path / "b": [*quick, "trainer.seed=1"], tmp_path / "bad": [*quick, "data=tinyshakespeare", f"data.source={tmp_path / 'absent.txt'}"]}
    # The training processes themselves, sampled while they run: two at once, never three. (Files' times could not
    # show it: on 2 loaded cores one run's start-up outlasted the other's whole run.)
    at_once, done = set(), threading.Event()

    def sample():
        while not done.wait(0.05):
            at_once.add(training_processes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with pytest.raises(SweepError, match=re.escape(f"the run {tmp_path / 'bad'} failed (exit")):
            LocalRuns(launcher=Launcher(jobs=2)).side_by_side(runs)
    finally:
        done.set()
        sampler.join()
    assert max(at_once) == 2
    assert all((tmp_path / name / "summary.json").is_file() for name in ("a", "b"))  # the failure waited for both


def training_processes() -> int:
    """train.py processes this one started that are running now (one that ends while it is read is not counted)."""
    count = 0
    for child in psutil.Process().children():
        try:
            count += "train.py" in " ".join(child.cmdline())
        except psutil.Error:
            pass
    return count


def test_a_batch_given_in_tokens_sets_the_step_counts_of_the_sweep_and_the_target(tmp_path):
    """trainer.global_batch_tokens=256 at data.seq_len=32 is 8 sequences a step, whatever trainer.global_batch says
    (its default is 16): 4,096 tokens are 16 steps for the sweep's runs and the target's alike."""
    from mea.scaling.sweep import shared_overrides
    from mea.studies.experiment import target_overrides

    spec = tmp_path / "tokens.yaml"
    spec.write_text(SPEC.format(out=tmp_path, shakespeare="unused.txt").replace("trainer.global_batch=8", "trainer.global_batch_tokens=256"))
    p = load_protocol(spec)
    assert "trainer.max_steps=16" in target_overrides(p, "mha", 1e-3, 0, [], tokens=4096)
    assert "trainer.max_steps=16" in shared_overrides(p.sweep, p.sweep.sizes[0], "mha", ["attention=mha"])


def test_compression_readings_are_read_not_remade_from_an_archive_and_under_a_refit_one_ulp_away(tmp_path):
    """The archive holds the readings, not the checkpoints they were read from: made again from it, or with a refit
    LR that differs in its last digits (another machine's BLAS), the readings are read, never remade (remaking
    them here would export a checkpoint that is not there)."""
    from dataclasses import asdict

    from mea.studies.experiment import run_compression

    spec = tmp_path / "micro.yaml"
    spec.write_text(SPEC.format(out=tmp_path, shakespeare=tmp_path / "unused.txt"))
    p = load_protocol(spec)
    lr, rows = 0.0024686199159128343, [{"setting": "recorded", "val_after_conversion": 3.0}]
    out, source = tmp_path / "compression", tmp_path / "compare-main" / "mea" / "s0"  # the source run holds no checkpoint
    out.mkdir()
    (out / "rows.json").write_text(json.dumps({"key": {"compression": asdict(p.compression), "lr": lr, "source": str(source)}, "rows": rows}))  # as the archive holds it
    assert run_compression(LocalRuns(), p, out, source, [], math.nextafter(lr, 1)) == rows
    assert run_compression(LocalRuns(archive=tmp_path / "runs.tar.xz"), p, out, source, [], 2 * lr) == rows  # from an archive: whatever its key
    (out / "rows.json").unlink()
    with pytest.raises(SweepError, match=re.escape(f"{tmp_path / 'runs.tar.xz'} has no compression readings (compression/rows.json)")):
        run_compression(LocalRuns(archive=tmp_path / "runs.tar.xz"), p, out, source, [], lr)


def test_the_plan_costs_each_stage_as_a_hand_computation_does_and_skips_finished_runs(tmp_path):
    """--plan on the micro spec with target runs of two GPUs each: the target stage's figures by hand (3 arms × 2
    seeds, 16 steps of 8 × 32 tokens, FLOPs 6N + 12·L·C·T with the arm's own N), one finished run costing nothing;
    its refusals in one line, before anything is composed or written."""
    from dataclasses import replace as with_

    from mea.models import parameter_counts
    from mea.scaling.sweep import compose_run
    from omegaconf import OmegaConf

    spec = tmp_path / "micro.yaml"
    resources = "resources: {target: {nodes: 1, gpus_per_node: 2, deepspeed: zero2}}\n"
    spec.write_text(SPEC.format(out=tmp_path, shakespeare=tmp_path / "unused.txt") + resources)
    finished = tmp_path / "runs" / "compare-main" / "mea" / "s1"
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    proc = run_tool("mea.studies.experiment", str(spec), "--plan", "--mfu", "0.4", "--gpu", "H100")
    assert proc.returncode == 0, proc.stderr[-2000:]
    flops, longest = 0.0, 0.0
    for arm, extra in (("mha", ["attention=mha"]), ("mea", ["attention=mea"]), ("mha_gqa", ["attention=mha", "model.n_kv_heads=2"])):
        cfg = OmegaConf.to_object(compose_run(["model=tiny", "data.seq_len=32", "trainer.global_batch=8", "model.n_layers=2", "model.dim=96", "model.n_heads=4", *extra]))
        model = with_(cfg.model, vocab_size=cfg.data.vocab_size)
        n = parameter_counts(model, cfg.attention)["non_embedding"] + model.vocab_size * model.dim
        flops += (1 if arm == "mea" else 2) * 4096 * (6 * n + 12 * 2 * 96 * 32)  # mea's seed 1 is done
        longest = max(longest, 4096 * (6 * n + 12 * 2 * 96 * 32))
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| target |"))
    assert row == f"| target | 6 | 1 | {5 * 4096:.3g} | {flops:.3g} | 2 | {flops / (0.4 * 989e12) / 3600:.3g} | {longest / (0.4 * 989e12) / 3600 / 2:.3g} h |"
    assert "Rate: MFU 0.4 stated, of 989 TFLOP/s a GPU (H100)." in proc.stdout and "| **total** |" in proc.stdout
    for extra_args, error in [((), "--plan needs a rate: --throughput runs/gpu-check/<card>-<date>.json (`make gpu-check` on your GPUs), or --mfu 0.35 --gpu H100"),
                              (("--mfu", "0.4"), "--mfu needs the card's peak: give --gpu (H200, H100, A100) or --peak-tflops"),
                              (("--throughput", str(tmp_path / "none.json")), f"--throughput {tmp_path / 'none.json'} does not exist")]:
        proc = run_tool("mea.studies.experiment", str(spec), "--plan", *extra_args)
        assert proc.returncode == 2 and error in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    spec.write_text(SPEC.format(out=tmp_path, shakespeare=tmp_path / "unused.txt") + "resources: {target: {nodes: 1, gpus_per_node: 3, deepspeed: zero2}}\n")
    proc = run_tool("mea.studies.experiment", str(spec), "--plan", "--mfu", "0.4", "--gpu", "H100")
    assert proc.returncode == 2 and "resources.target (1 × 3 GPUs): trainer.global_batch=8 is not a multiple of trainer.micro_batch=2 × world size 3" in proc.stderr, proc.stderr
    for bad, error in [("{targets: {}}", "resources.targets: not a stage; the stages are sweep, stability, target"),
                       ("{target: {gpus_per_node: 4}}", "resources.target: 4 GPUs a run train under DeepSpeed; give deepspeed: zero1, zero2 or zero3")]:
        spec.write_text(SPEC.format(out=tmp_path, shakespeare=tmp_path / "unused.txt") + f"resources: {bad}\n")
        with pytest.raises(SweepError, match=re.escape(error)):
            check(load_protocol(spec))


@pytest.mark.parametrize("name", ["paper_gpu_small", "paper_gpu"])
def test_a_gpu_specs_header_states_the_totals_of_its_own_plan(name):
    """The GPU-scale specs plan here, with no GPU and no scheduler, and their headers say what their plans total."""
    from mea.studies.experiment import cost_plan
    from mea.studies.plan import Rates

    path = Path(__file__).resolve().parents[1] / "sweeps" / f"{name}.yaml"
    total = next(line for line in cost_plan(load_protocol(path), Rates.from_mfu(0.35, "H100", None)).splitlines() if line.startswith("| **total** |"))
    runs, _, tokens, flops, _, gpu_hours, wall = [cell.strip(" *") for cell in total.strip("|").split("|")[1:]]
    assert f"#   {runs} runs, {tokens} tokens, {flops} FLOPs, {gpu_hours} GPU-hours, {wall} of wall time\n" in path.read_text(), total


def test_every_run_of_a_sitting_is_in_the_experiments_wandb_group_tagged_with_its_stage(tmp_path):
    from mea.scaling.sweep import compose_run
    from mea.studies.experiment import STAGES, stage_runs
    from mea.tools.compare import wandb_filters

    spec = tmp_path / "micro.yaml"
    spec.write_text(SPEC.format(out=tmp_path, shakespeare=tmp_path / "unused.txt"))
    p = load_protocol(spec)
    stages = stage_runs(p, tmp_path / "runs")
    assert set(stages) == set(STAGES) and all(stages.values())
    for stage, runs in stages.items():
        for overrides in runs.values():
            assert f"logger.group={p.name}" in overrides and f"logger.tags=[stage:{stage}]" in overrides, (stage, overrides)
    logger = compose_run(next(iter(stages["lr_bracket"].values()))).logger
    assert logger.group == "micro" and list(logger.tags) == ["stage:lr_bracket"]  # the trainer adds variant:<arm>, size, lr and seed
    assert wandb_filters("micro", "target") == {"group": "micro", "tags": {"$in": ["stage:target"]}} and wandb_filters(None, None) is None


def test_a_specs_compression_layer_sets_replace_the_default_ones(tmp_path):
    spec = tmp_path / "micro.yaml"
    spec.write_text(SPEC.format(out=tmp_path, shakespeare="unused.txt"))
    assert load_protocol(spec).compression.layer_sets == {"all": "all"}  # no "middle" joined to them: its recovery run is not asked for
    spec.write_text(SPEC.format(out=tmp_path, shakespeare="unused.txt").replace(", layer_sets: {all: all}", ""))
    assert load_protocol(spec).compression.layer_sets == {"all": "all", "middle": "middle"}
