"""compare on real runs, export -> load -> identical logits, generate from the command line."""
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_model

from mea.config import load_config
from mea.pretrained import load_pretrained
from mea.models import LM

from .conftest import QUICK, run_cli, run_tool

ARGS = (*QUICK, "trainer.max_steps=20", "trainer.eval_every=10")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, overrides in {"mha-0": ["attention=mha"], "mha-1": ["attention=mha", "trainer.seed=1"], "mea-0": ["attention=mea"]}.items():
        proc = run_cli("train.py", *ARGS, *overrides, f"hydra.run.dir={root / name}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        made[name] = root / name
    return made


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_compare_report_matches_the_runs(runs, tmp_path):
    out = tmp_path / "report"
    proc = run_cli("-m", "mea.tools.compare", *map(str, runs.values()), "--baseline", "mha", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("loss_vs_tokens.png", "loss_vs_tokens.svg", "delta_vs_baseline.png", "report.md", "report.html"):
        assert (out / name).stat().st_size > 500
    report = (out / "report.md").read_text()
    mha_finals = [metrics(runs[k])[-1]["val_loss"] for k in ("mha-0", "mha-1")]
    mea_final = metrics(runs["mea-0"])[-1]["val_loss"]
    mean = sum(mha_finals) / 2
    std = (sum((x - mean) ** 2 for x in mha_finals)) ** 0.5  # ddof=1 with two seeds
    row = re.search(r"\| mha \| 2 \| ([\d.]+) ± ([\d.]+) \| \+0\.0000 \|", report)
    assert row and float(row.group(1)) == pytest.approx(mean, abs=1e-4) and float(row.group(2)) == pytest.approx(std, abs=1e-4)
    mea_row = re.search(r"\| mea \| 1 \| ([\d.]+) ± 0\.0000 \| ([+-][\d.]+) \| ([+-][\d.]+) \|", report)
    assert float(mea_row.group(1)) == pytest.approx(mea_final, abs=1e-4) and float(mea_row.group(2)) == pytest.approx(mea_final - mean, abs=1e-4)
    tokens, val = zip(*[(r["tokens"], r["val_loss"]) for r in metrics(runs["mea-0"]) if "val_loss" in r])
    assert len(tokens) >= 2 and float(mea_row.group(3)) == pytest.approx(np.interp(0.8 * tokens[-1], tokens, val) - val[-1], abs=1e-4)
    assert "<table" in (out / "report.html").read_text()
    assert "## Training dynamics" in report  # every quantity logged, a figure each
    for quantity in ("resid_rms", "attn_ratio", "mlp_ratio", "entropy", "head_norm_scale", "hlc_k_offdiag", "hlc_v_dist"):
        assert (out / f"dynamics_{quantity}.png").stat().st_size > 1000 and f"(dynamics_{quantity}.png)" in report


def test_compare_warns_on_different_data_and_errors_on_missing_runs(runs, tmp_path, shakespeare):
    other = tmp_path / "other"
    assert run_cli("train.py", *ARGS, "data=tinyshakespeare", f"data.source={shakespeare}", f"hydra.run.dir={other}").returncode == 0
    proc = run_tool("mea.tools.compare", str(runs["mha-0"]), str(other), "--out", str(tmp_path / "r"))
    assert proc.returncode == 0 and "trained on different tokens" in proc.stderr
    assert "Warning" in (tmp_path / "r" / "report.md").read_text()
    missing = run_tool("mea.tools.compare", str(tmp_path / "nope"), "--out", str(tmp_path / "r2"))
    assert missing.returncode == 2 and "is not a run directory" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run_tool("mea.tools.compare", str(tmp_path / "empty"), "--out", str(tmp_path / "r3"))
    assert empty.returncode == 2 and "lacks config.yaml, metrics.jsonl, summary.json" in empty.stderr


def test_wandb_source_without_network_says_so(tmp_path):
    proc = run_cli("-m", "mea.tools.compare", "--wandb", "me/mea", "--group", "g", "--out", str(tmp_path), env={"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40})
    assert proc.returncode == 2 and "cannot reach W&B" in proc.stderr and "offline" in proc.stderr and "mea-compare RUN_DIR" in proc.stderr


@pytest.mark.parametrize("source", ["run", "checkpoint"])
def test_export_load_gives_identical_logits_and_generates(runs, tmp_path, source):
    run_dir = runs["mea-0"]
    path = run_dir if source == "run" else run_dir / "checkpoints" / "step-0000020"
    out = tmp_path / "exported"
    proc = run_cli("-m", "mea.tools.export", str(path), str(out))
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(run_dir / "config.yaml")
    original = LM(cfg.model, cfg.attention).eval()
    load_model(original, str(run_dir / "model.safetensors"))
    loaded, tokenizer = load_pretrained(out)
    x = torch.randint(0, cfg.model.vocab_size, (2, 32))
    assert torch.equal(loaded(x), original(x))
    assert tokenizer.get_vocab_size() == cfg.model.vocab_size
    gen = run_cli("-c", "from mea.tools.export import generate_main; generate_main()", str(out), "--prompt", "def ", "--tokens", "12")
    assert gen.returncode == 0 and gen.stdout.startswith("def ") and len(gen.stdout) > 6


def test_export_refuses_weights_of_another_shape(runs, tmp_path):
    import shutil

    fake = tmp_path / "fake"
    shutil.copytree(runs["mea-0"], fake)
    text = (fake / "config.yaml").read_text().replace("n_layers: 4", "n_layers: 3")
    (fake / "config.yaml").write_text(text)
    proc = run_cli("-m", "mea.tools.export", str(fake), str(tmp_path / "o"))
    assert proc.returncode == 2 and "do not fit its model config" in proc.stderr and "blocks.3" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_wandb_workspace_plots_what_the_runs_log(runs):
    """The saved workspace (built here; saving it needs W&B online) filters to the group, groups by arm, and every
    panel's axis and metric is a key the trainer logs, as the arm is a key of the run's config."""
    from mea.tools.workspace import comparison_workspace

    view = comparison_workspace("team/mea", "exp1")._to_model().model_dump(by_alias=True, exclude_none=True)
    runset = view["spec"]["section"]["runSets"][0]
    assert runset["filters"]["filters"] == [{"key": {"section": "run", "name": "group"}, "op": "=", "value": "exp1", "disabled": False}]
    assert runset["grouping"] == [{"section": "config", "name": "arm.value"}]
    logged = set().union(*(row.keys() for row in metrics(runs["mea-0"])))
    panels = [p["config"] for s in view["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]]
    assert {p["chartTitle"] for p in panels} >= {"training loss", "validation loss"}
    for panel in panels:  # a dynamics panel names its keys by a pattern, which some key logged for `mea` matches
        assert panel["xAxis"] in logged and set(panel["metrics"]) <= logged, panel
        if panel.get("useMetricRegex"):
            assert any(re.fullmatch(panel["metricRegex"], key) for key in logged) or panel["chartTitle"].startswith(("THA", "DIFF")), panel
    assert {p["metricRegex"] for p in panels if p.get("useMetricRegex")} >= {"dyn/attn_ratio/.*", "dyn/hlc_k_offdiag/.*", "dyn/entropy/.*"}
    assert load_config(runs["mea-0"] / "config.yaml").arm == "mea"
