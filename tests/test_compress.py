"""KV-cache compression: exact where the maths says so, a compressed checkpoint that loads, generates and
recovers by continued pretraining, the KV report, and bad input."""
import json

import pytest
import torch

from mea.tools.compress import compress, parse_layers
from mea.pretrained import load_pretrained
from mea.tools.kv_report import kv_bytes_per_token
from mea.models import LM, ModelConfig
from mea.models.attention.diff import DiffConfig
from mea.models.attention.mea import MEAConfig
from mea.models.attention.mha import MHAConfig
from mea.runs import RunError

from .conftest import QUICK, run_cli, run_tool
from .test_attention import DEVICES


def model(attention, **kw):
    torch.manual_seed(0)
    return LM(ModelConfig(vocab_size=64, dim=64, n_heads=8, n_layers=4, **kw), attention).eval()


X = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("source", [MHAConfig(), MEAConfig(hlc_init="random")])
def test_compressing_to_all_heads_changes_nothing(source):
    m = model(source)
    c, report = compress(m, 8)
    torch.testing.assert_close(c(X), m(X), rtol=1e-4, atol=1e-5)
    assert all(r["key_error"] < 1e-6 and r["value_error"] < 1e-6 for r in report)


@pytest.mark.parametrize("device", DEVICES)
def test_hlc_of_rank_at_most_g_converts_exactly_and_halves_the_cache(device):
    m = model(MEAConfig(hlc_init="random"))
    with torch.no_grad():
        for block in m.blocks:
            block.attention.hlc_k.copy_(torch.randn(8, 4) @ torch.randn(4, 8))
            block.attention.hlc_v.copy_(torch.randn(8, 4) @ torch.randn(4, 8))
    c, report = compress(m, 4)  # mea-compress works on the CPU; the compressed model runs wherever it is loaded
    assert max(r["key_error"] for r in report) < 1e-6
    m, c, x = m.to(device), c.to(device), X.to(device)
    torch.testing.assert_close(c(x), m(x), rtol=1e-4, atol=1e-5)
    sizes = []
    for net in (m, c):
        caches = net.new_caches()
        net(x, caches=caches)
        sizes.append(sum(cache.nbytes for cache in caches))
    assert sizes[1] * 2 == sizes[0]
    cached = c.new_caches()  # the compressed cache, decoded token by token (the absorbed attention), equals the full forward
    steps = [c(x[:, :5], caches=cached)] + [c(x[:, t : t + 1], caches=cached) for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), c(x), rtol=1e-4, atol=2e-5)


def test_a_rank_g_fit_is_the_best_one_and_the_error_is_reported():
    m = model(MHAConfig())
    c, report = compress(m, 2, layers=[1, 2])
    assert [r["layer"] for r in report] == [1, 2] and all(0 < r["key_error"] < 1 for r in report)
    assert [b.attention.shape.n_kv_heads for b in c.blocks] == [8, 2, 2, 8]
    assert parse_layers("middle", 12) == list(range(3, 9)) and parse_layers("0-2,5", 8) == [0, 1, 2, 5]


def test_bad_input():
    with pytest.raises(RunError, match="--kv-heads 9 is not between 1 and the model's 8 heads"):
        compress(model(MHAConfig()), 9)
    with pytest.raises(RunError, match="not attention=diff"):
        compress(model(DiffConfig()), 4)
    with pytest.raises(RunError, match="names layers the model does not have"):
        compress(model(MHAConfig()), 4, layers=[7])


def test_kv_report_counts_what_the_cache_holds():
    cfg = ModelConfig(vocab_size=64, dim=64, n_heads=8, n_layers=4, kv_heads_per_layer=[8, 4, 4, 8])
    m = LM(cfg, MEAConfig()).eval()
    caches = m.new_caches()
    m(X[:1, :10], caches=caches)
    assert sum(c.nbytes for c in caches) == 10 * kv_bytes_per_token(cfg, 4)
    proc = run_tool("mea.tools.kv_report", "--model", "25m", "--memory-gib", "16")
    assert proc.returncode == 0 and "| mea virtual heads (G = 4) | 8,192 | 0.50 |" in proc.stdout


def test_compressed_checkpoint_loads_generates_and_recovers(tmp_path):
    run = tmp_path / "run"
    assert run_cli("train.py", *QUICK, "attention=mea", "trainer.max_steps=40", "trainer.eval_every=40", f"hydra.run.dir={run}").returncode == 0
    assert run_cli("-m", "mea.tools.export", str(run), str(tmp_path / "exported")).returncode == 0
    proc = run_cli("-m", "mea.tools.compress", str(tmp_path / "exported"), str(tmp_path / "small"), "--kv-heads", "2", "--layers", "middle")
    assert proc.returncode == 0, proc.stderr
    assert "layer   1: 2 KV heads" in proc.stdout and "layer   0" not in proc.stdout
    small, tok = load_pretrained(tmp_path / "small")
    assert [b.attention.shape.n_kv_heads for b in small.blocks] == [4, 2, 2, 4]
    prompt = tok.encode("def ").ids
    out = small.generate(torch.tensor([prompt]), 8, temperature=0)
    assert out.shape == (1, len(prompt) + 8) and tok.decode(out[0].tolist()).startswith("def ")
    recover = tmp_path / "recover"
    proc = run_cli("train.py", "+experiment=recover", f"trainer.init_from={tmp_path / 'small'}", *QUICK, "trainer.max_steps=20", "trainer.eval_every=20",
                    "trainer.checkpoint_every=0", f"hydra.run.dir={recover}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((tmp_path / "small" / "config.json").read_text())
    assert "kv_heads_per_layer:\n  - 4\n  - 2\n  - 2\n  - 4" in (recover / "config.yaml").read_text() and cfg["model"]["kv_heads_per_layer"] == [4, 2, 2, 4]
    rows = [json.loads(line) for line in (recover / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] < 7.0  # it starts from the trained weights, far below a fresh model's ln(4096) = 8.3
