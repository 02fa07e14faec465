"""The Hydra app end to end: real text, real tokenizer, every variant learns; bad settings stop before compute."""
import json

import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from mea.data.shards import prepared_path
from mea.models import REGISTRY
from mea.config import ConfigError
from mea.data import DataError
from mea.train import TrainingError, run

from .conftest import QUICK, compose_config, run_cli


def test_train_cli_writes_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train.py", "model=tiny", "attention=mea", "trainer.max_steps=30", f"hydra.run.dir={run_dir}", *QUICK, "trainer.eval_every=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 12, 15, 20, 24, 25, 30]  # every log step (5) and every eval step (12), off the log grid too
    assert all({"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [12, 24, 30]
    assert rows[-1]["tokens"] == 30 * 8 * 64
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_loss"] == rows[-1]["val_loss"] and summary["final_train_loss"] == rows[-1]["loss"]
    assert summary["variant"] == "mea" and summary["non_embedding_params"] < summary["params"]
    manifest = json.loads((prepared_path(OmegaConf.load(run_dir / "config.yaml").data, summary["data"]) / "manifest.json").read_text())
    windows = sum((shard["tokens"] - 1) // 64 for shard in manifest["shards"] if shard["split"] == "train")
    assert summary["passes"] == pytest.approx(30 * 8 / windows)  # how often the run repeats its training split
    assert "attention:\n  name: mea" in (run_dir / "config.yaml").read_text()
    for line in ("parameters (", "non-embedding", "final train loss", f"run directory: {run_dir}", "sample: "):
        assert line in proc.stdout


@pytest.mark.parametrize("variant", sorted(REGISTRY))
def test_every_variant_learns_real_text(variant, tmp_path, shakespeare):
    cfg = compose_config(tmp_path, f"attention={variant}", "data=tinyshakespeare", f"data.source={shakespeare}", "trainer.max_steps=40", "optim.lr=3e-3", "trainer.eval_every=40", *QUICK)
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]
    assert rows[-1]["val_loss"] < 6.5  # ln(2048) = 7.62 is a uniform guess


# Each refused in one line naming the fix, before any data is prepared or any step taken
BAD_SETTINGS = [
    ("attention=nope", "Could not find 'attention/nope'"),
    ("attention.name=nope", "attention.name='nope' is not a known variant; choose one of: diff, mea, mha, mha_gn, tha"),
    ("model=huge", "Could not find 'model/huge'"),
    ("model.n_heads=3", "model.n_heads=3 does not divide model.dim=128"),
    ("model.n_kv_heads=5", "model.n_kv_heads=5 exceeds model.n_heads=4; allowed: [1, 2, 3, 4] or null"),  # mea: HLC takes any G
    ("attention=diff attention.pair_heads=true model.n_kv_heads=1", "attention.pair_heads=true needs even model.n_heads and model.n_kv_heads"),
    ("attention.hlc_init=zeros", "attention.hlc_init='zeros' is not allowed; choose one of: identity, identity_noise, random"),
    ("scheduler.name=linear", "scheduler.name='linear' is not allowed; choose one of: cosine, wsd, constant"),
    ("trainer.global_batch=10", "trainer.global_batch=10 is not a multiple of trainer.micro_batch=4"),
    ("data.vocab_size=200", "data.vocab_size=200 cannot hold the 256 byte tokens"),
    pytest.param("deepspeed=zero2 trainer.device=cuda", "trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")),
    ("model.init.scheme=xavier", "model.init.scheme='xavier' is not a known scheme; choose one of: gpt2, llama, scaled_embed"),
    ("model.init.embed_std=-1", "model.init.embed_std=-1.0 must be positive (or null for the scheme's value)"),
]


@pytest.mark.parametrize("override, message", BAD_SETTINGS)
def test_bad_settings_fail_in_one_line_before_any_compute(override, message, tmp_path, monkeypatch):
    """Each checked in this process, as an error train.py prints in one line (exit 2: the command itself is
    tests/test_trainer.py's test_a_bad_setting_exits_in_one_line_before_compute) or Hydra's own for an unknown
    option (the test below)."""
    monkeypatch.setenv("MEA_CACHE", str(tmp_path / "cache"))  # an empty cache of its own: a corpus prepared would show in it
    run_dir = tmp_path / "run"
    extra = ["trainer.micro_batch=4"] if "global_batch" in override else []
    with pytest.raises((ConfigError, DataError, TrainingError, MissingConfigException)) as refused:
        run(compose_config(run_dir, *override.split(), *extra, "logger.mode=disabled"))
    assert message in str(refused.value)
    if not message.startswith("Could not find"):  # Hydra's own message for an unknown option lists the options
        assert "\n" not in str(refused.value)
    assert not (run_dir / "metrics.jsonl").exists() and not any(tmp_path.glob("**/manifest.json"))


def test_the_command_prints_hydras_message_for_an_unknown_option(tmp_path):
    override, message = BAD_SETTINGS[0]
    proc = run_cli("train.py", override, f"hydra.run.dir={tmp_path / 'run'}", "logger.mode=disabled")
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_compile_auto_is_off_on_a_cpu(tmp_path):
    """trainer.compile=auto (the default): off on a CPU, where compiling costs more than it saves at these sizes
    (BENCHMARKS.md); on for a GPU (tests/test_cuda.py)."""
    from mea.train.loop import resolve

    cfg = OmegaConf.to_object(compose_config(tmp_path, *QUICK))
    assert cfg.trainer.compile == "auto" and resolve(cfg, torch.device("cpu")).trainer.compile is False
    explicit = OmegaConf.to_object(compose_config(tmp_path, *QUICK, "trainer.compile=true"))
    assert resolve(explicit, torch.device("cpu")).trainer.compile is True


def test_a_composed_config_is_its_callers_own_and_a_bad_one_fails_each_time():
    """mea.config.compose_config composes each list of overrides once a process (a sitting plans a run at several
    stages): what one caller changes, the next caller never sees, and a failing setting is not kept. The layers are
    checked one of each shape: here the last layer alone has a KV-head count that paired heads cannot take."""
    from mea.config import ConfigError, compose_config as compose_run_config

    first = compose_run_config(["attention=mea", "optim.lr=0.01"])
    first.optim.lr = 1.0
    assert compose_run_config(["attention=mea", "optim.lr=0.01"]).optim.lr == 0.01
    for _ in range(2):
        with pytest.raises(ConfigError, match="attention.pair_heads=true needs even model.n_heads and model.n_kv_heads"):
            compose_run_config(["attention=diff", "attention.pair_heads=true", "model.kv_heads_per_layer=[4,4,2,1]"])
