"""The data path on real text: stdlib and Tiny Shakespeare through datasets and tokenizers."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from mea.config import DataConfig
from mea.data import Batches, DataError, TokenWindows, prepare
from mea.data.shards import corpus_path, preparing_lock
from mea.data.sources import stdlib_files

from .conftest import ROOT, compose_config, run_cli, started


@pytest.fixture(scope="module")
def stdlib(data_cache):
    return prepare(DataConfig(cache_dir=str(data_cache / "data")), log=lambda _: None)


def shakespeare_cfg(path, tmp_path, **kw):
    return DataConfig(name="shakespeare", kind="files", source=str(path), sample_by="paragraph", vocab_size=512, cache_dir=str(tmp_path / "cache"), **kw)


def test_stdlib_corpus_is_the_running_interpreters_library(stdlib):
    files = stdlib_files()
    assert any(p.name == "os.py" for p in files) and not any("test" in p.parts for p in files)
    m = stdlib.manifest
    assert m["documents"]["train"] + m["documents"]["val"] > len(files)  # sources plus the pydoc topics
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 4096
    assert m["tokens"]["train"] > 1_000_000 and 0 < m["tokens"]["val"] < m["tokens"]["train"] / 5


def test_shards_round_trip_to_the_original_text(shakespeare, tmp_path):
    corpus = prepare(shakespeare_cfg(shakespeare, tmp_path, val_share=0.5))
    tok, eod = corpus.tokenizer, corpus.eod_id
    ids = np.concatenate([np.concatenate(corpus.shards(s)) for s in ("train", "val")]).tolist()
    docs = []
    while ids:
        end = ids.index(eod)
        docs.append(tok.decode(ids[:end]))
        ids = ids[end + 1 :]
    paragraphs = [p for p in shakespeare.read_text().split("\n\n")]
    assert sorted(docs) == sorted(d for d in paragraphs if d) or sorted(docs) == sorted(paragraphs)
    assert corpus.manifest["documents"]["train"] + corpus.manifest["documents"]["val"] == len(docs)


def test_a_given_tokenizer_is_known_by_its_content_not_its_path(shakespeare, tmp_path):
    trained = prepare(shakespeare_cfg(shakespeare, tmp_path))
    copies = [tmp_path / name / "tokenizer.json" for name in ("exported", "converted")]
    for copy in copies:
        copy.parent.mkdir()
        copy.write_bytes((trained.path / "tokenizer.json").read_bytes())
    first, second = (prepare(shakespeare_cfg(shakespeare, tmp_path, tokenizer=str(c))) for c in copies)
    assert first.path == second.path != trained.path  # every exported model's copy reuses one tokenised corpus
    edited = json.loads(copies[1].read_text())
    edited["added_tokens"] = edited["added_tokens"][:1]
    copies[1].write_text(json.dumps(edited))
    assert prepare(shakespeare_cfg(shakespeare, tmp_path, tokenizer=str(copies[1]))).path != first.path


def test_split_is_by_document_and_fixed_by_the_seed(shakespeare, tmp_path):
    a = prepare(shakespeare_cfg(shakespeare, tmp_path))
    b = prepare(shakespeare_cfg(shakespeare, tmp_path, seed=7))
    assert a.path != b.path
    assert a.manifest["documents"] != b.manifest["documents"] or a.manifest["tokens"] != b.manifest["tokens"]
    again = prepare(shakespeare_cfg(shakespeare, tmp_path / "other"))
    assert [s["sha256"] for s in again.manifest["shards"]] == [s["sha256"] for s in a.manifest["shards"]]


def test_second_prepare_is_a_cache_hit_that_does_no_work(shakespeare, tmp_path):
    cfg = shakespeare_cfg(shakespeare, tmp_path)
    first = prepare(cfg)
    stamps = {p: p.stat().st_mtime_ns for p in first.path.iterdir()}
    said = []
    second = prepare(replace(cfg, seq_len=32), log=said.append)  # another seq_len shares the shards
    assert second.path == first.path and said == []
    assert {p: p.stat().st_mtime_ns for p in second.path.iterdir()} == stamps


def test_the_same_text_copied_elsewhere_is_prepared_again_but_named_the_same_tokens(shakespeare, tmp_path):
    """A copy of the corpus (another path and mtime, as on a fresh mount or node-local disk) gets its own cache
    key, since the key hashes the inputs without reading them, but the tokens it yields are the same, and so is
    their content name, which is what decides whether two runs' losses compare; another vocabulary is other tokens."""
    from types import SimpleNamespace

    from mea.tools.compare import check_comparable

    copy = tmp_path / "copy" / "input.txt"
    copy.parent.mkdir()
    copy.write_bytes(Path(shakespeare).read_bytes())
    first, moved = prepare(shakespeare_cfg(shakespeare, tmp_path)), prepare(shakespeare_cfg(copy, tmp_path))
    other = prepare(replace(shakespeare_cfg(shakespeare, tmp_path), vocab_size=384))
    assert first.path != moved.path and first.content == moved.content and first.content.startswith("shakespeare-")
    assert other.content != first.content

    def run(corpus, recorded=True):
        return SimpleNamespace(data_content=corpus.content if recorded else corpus.path.name, summary={"data_content": corpus.content} if recorded else {}, amendments=[])
    assert check_comparable([run(first), run(moved)]) == []
    assert check_comparable([run(first), run(other)])[0].startswith("the runs were trained on different tokens")
    assert "predate the tokens' checksum" in check_comparable([run(first, recorded=False), run(moved, recorded=False)])[0]


def test_same_seed_same_batches_and_ranks_partition_the_epoch(stdlib):
    windows = TokenWindows(stdlib.shards("train"), 128)
    a, b = Batches(windows, 8, seed=3), Batches(windows, 8, seed=3)
    assert all(np.array_equal(a.indices(s), b.indices(s)) for s in (0, 5, 99))
    assert not np.array_equal(a.indices(0), Batches(windows, 8, seed=4).indices(0))
    x, y = a(2)
    assert x.shape == (8, 128) and np.array_equal(x[:, 1:], y[:, :-1])

    small = TokenWindows([stdlib.shards("val")[0][:64 * 96 + 1]], 64)  # 96 windows
    ranks = [Batches(small, 12, seed=0, rank=r, world_size=3) for r in range(3)]
    seen = [np.concatenate([rank.indices(step) for step in range(8)]) for rank in ranks]  # 8 steps = one epoch
    for i in range(3):
        for j in range(i + 1, 3):
            assert not set(seen[i]) & set(seen[j])
    assert sorted(np.concatenate(seen)) == list(range(96))


def test_a_resumed_loader_continues_exactly(stdlib):
    windows = TokenWindows(stdlib.shards("train"), 64)
    uninterrupted = Batches(windows, 4, seed=1)
    expected = [uninterrupted(step)[0] for step in range(10)]
    resumed = Batches(windows, 4, seed=1)  # a fresh process that starts at step 6
    assert all(np.array_equal(resumed(step)[0], expected[step]) for step in range(6, 10))


def test_missing_path_empty_corpus_and_small_vocab(tmp_path):
    with pytest.raises(DataError, match="does not exist; give an existing file"):
        prepare(DataConfig(kind="files", source=str(tmp_path / "nope.txt"), cache_dir=str(tmp_path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(DataError, match="the corpus is empty"):
        prepare(DataConfig(kind="files", source=str(empty), cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match="cannot hold the 256 byte tokens"):
        prepare(DataConfig(vocab_size=100, cache_dir=str(tmp_path)))
    assert not list(tmp_path.glob("**/manifest.json"))


def test_bad_utf8_is_skipped_and_counted_or_fails(shakespeare, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    text = shakespeare.read_text()
    for i in range(4):
        (folder / f"good{i}.txt").write_text(text[i * 20000 : (i + 1) * 20000])
    (folder / "bad.txt").write_bytes(b"caf\xe9 latin-1 bytes\n")
    corpus = prepare(DataConfig(name="mixed", kind="files", source=str(folder), vocab_size=300, val_share=0.3, seed=2, cache_dir=str(tmp_path / "c")))
    assert corpus.manifest["documents"]["skipped_bad_utf8"] == 1 and corpus.manifest["skipped_files"][0].endswith("bad.txt")
    with pytest.raises(DataError, match=r"bad.txt is not UTF-8 .* set data.on_bad_utf8=skip"):
        prepare(DataConfig(name="mixed", kind="files", source=str(folder), on_bad_utf8="fail", cache_dir=str(tmp_path / "c")))


def test_jsonl_field_and_glob_sources(tmp_path, shakespeare):
    paras = [p for p in shakespeare.read_text().split("\n\n") if p][:400]
    for part in range(2):
        with open(tmp_path / f"part{part}.jsonl", "w") as f:
            for p in paras[part::2]:
                f.write(json.dumps({"body": p, "id": 1}) + "\n")
    cfg = DataConfig(name="j", kind="files", source=str(tmp_path / "part*.jsonl"), text_field="body", vocab_size=300, cache_dir=str(tmp_path / "c"))
    corpus = prepare(cfg)
    assert corpus.manifest["documents"]["train"] + corpus.manifest["documents"]["val"] == 400
    with pytest.raises(DataError, match=r"data.text_field='text' is not a column .* columns are \['body', 'id'\]"):
        prepare(replace(cfg, text_field="text"))


def test_parquet_source(tmp_path, shakespeare):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paras = [p for p in shakespeare.read_text().split("\n\n") if p][:300]
    pq.write_table(pa.table({"text": paras, "n": list(range(len(paras)))}), tmp_path / "docs.parquet")
    corpus = prepare(DataConfig(name="pq", kind="files", source=str(tmp_path / "docs.parquet"), vocab_size=300, cache_dir=str(tmp_path / "c")))
    assert corpus.manifest["documents"]["train"] + corpus.manifest["documents"]["val"] == 300


@pytest.mark.parametrize("config", ["tinystories", "fineweb_edu", "wikitext103"])
def test_hub_dataset_without_network_says_so(config):
    proc = run_cli("data/prepare.py", f"data={config}", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "offline" in proc.stderr and "data.source=PATH" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_hub_dataset_runs_offline_from_a_local_folder_with_the_hubs_layout(shakespeare, tmp_path):
    """FineWeb-Edu's layout (a README whose YAML names the config sample-10BT and its parquet files), its rows
    Tiny Shakespeare's speeches: `data=fineweb_edu` reads it through the Hub's loader, offline, and prepares it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    speeches = [s for s in shakespeare.read_text().split("\n\n") if s.strip()][:400]
    repo = tmp_path / "fineweb-edu"
    (repo / "sample" / "10BT").mkdir(parents=True)
    for i, part in enumerate((speeches[:200], speeches[200:])):
        pq.write_table(pa.table({"text": part, "id": [f"doc{i}-{j}" for j in range(len(part))], "score": [3.0] * len(part)}),
                       repo / "sample" / "10BT" / f"00{i}_00000.parquet")
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n  - split: train\n    path: sample/10BT/*.parquet\n---\n")
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MEA_CACHE": str(tmp_path / "cache")}
    proc = run_cli("data/prepare.py", "data=fineweb_edu", f"data.source={repo}", "data.vocab_size=512", "data.seq_len=64", "data.val_share=0.1", env=offline)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (manifest,) = {m.resolve() for m in (tmp_path / "cache" / "data").glob("fineweb_edu-*/manifest.json")}  # the corpus and its tokenizer's link
    made = json.loads(manifest.read_text())
    assert made["source"] == {"kind": "hub", "source": str(repo), "hub_config": "sample-10BT", "split": "train"}
    assert made["documents"]["train"] + made["documents"]["val"] == 400 and made["tokens"]["train"] > 10_000


def test_a_corpus_read_with_the_file_of_the_tokenizer_trained_on_it_is_the_same_corpus_not_made_again(shakespeare, tmp_path):
    """An exported model's tokenizer (a copy of the trained one) reads the shards prepared when it was trained."""
    trained = prepare(shakespeare_cfg(shakespeare, tmp_path))
    exported = tmp_path / "exported-tokenizer.json"
    shutil.copy(trained.path / "tokenizer.json", exported)
    read = prepare(shakespeare_cfg(shakespeare, tmp_path, tokenizer=str(exported)), log=lambda line: pytest.fail(f"tokenised again: {line}"))
    assert read.path != trained.path and read.path.resolve() == trained.path
    fresh = prepare(shakespeare_cfg(shakespeare, tmp_path / "elsewhere", tokenizer=str(exported)))  # made from scratch: the same tokens
    assert fresh.path.name == read.path.name and not fresh.path.is_symlink()
    for shard in trained.manifest["shards"]:
        assert (fresh.path / shard["file"]).read_bytes() == (trained.path / shard["file"]).read_bytes()


def test_altered_or_truncated_shard_is_refused(shakespeare, tmp_path):
    corpus = prepare(shakespeare_cfg(shakespeare, tmp_path))
    shard = corpus.path / corpus.manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match its checksum"):
        corpus.shards("train")
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="missing or truncated"):
        corpus.shards("train")


def test_token_ids_past_the_model_vocabulary_are_refused(tmp_path):
    proc = run_cli("train.py", "model.vocab_size=300", "data.tokenizer=" + str(write_big_vocab_tokenizer(tmp_path)), f"hydra.run.dir={tmp_path}", "logger.mode=disabled", "data.max_documents=50")
    assert proc.returncode == 2 and "but model.vocab_size=300; set model.vocab_size=null" in proc.stderr, proc.stderr


def write_big_vocab_tokenizer(tmp_path: Path) -> Path:
    from mea.data.sources import stdlib_documents
    from mea.data.tokenizer import train_bpe

    tok = train_bpe(list(stdlib_documents().texts())[:100], 1000)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_killed_prepare_leaves_nothing_that_looks_complete(shakespeare, tmp_path):
    """Killed half-way, a prepare leaves its temporary folder and no corpus; the next prepare is not held up by it
    (its lock went with its process), clears that folder and publishes the corpus."""
    env = {**os.environ, "MEA_CACHE": str(tmp_path)}
    args = [sys.executable, "data/prepare.py", "data=tinyshakespeare", f"data.source={shakespeare}", "data.vocab_size=8000"]
    with started(args, env=env, stdout=subprocess.PIPE, text=True) as proc:
        assert "training a byte-level BPE" in proc.stdout.readline()
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not list(tmp_path.glob("data/*/manifest.json")) and not list(tmp_path.glob("data/tinyshakespeare-*"))
    assert list(tmp_path.glob("data/.tinyshakespeare-*.tmp*"))  # what the killed prepare had built so far
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and len({m.resolve() for m in tmp_path.glob("data/tinyshakespeare-*/manifest.json")}) == 1
    assert not list(tmp_path.glob("data/.*.tmp*")), list(tmp_path.glob("data/.*"))


def test_a_corpus_asked_for_while_it_is_prepared_is_tokenised_once(shakespeare, tmp_path, monkeypatch):
    """Two processes asking for a corpus while another prepares it (a local sweep's runs, started together) wait for
    it, each saying so; once it is free, one of them builds the corpus and the other reads what that one built."""
    monkeypatch.setenv("MEA_CACHE", str(tmp_path))
    overrides = ["data=tinyshakespeare", f"data.source={shakespeare}"]
    final = corpus_path(OmegaConf.to_object(compose_config(tmp_path / "run", *overrides).data))
    final.parent.mkdir(parents=True)
    args = [sys.executable, "data/prepare.py", *overrides]
    lock = preparing_lock(final)
    with lock, started(args, stdout=subprocess.PIPE, text=True) as first, started(args, stdout=subprocess.PIPE, text=True) as second:
        for proc in (first, second):
            assert proc.stdout.readline() == f"waiting for another process preparing {final.name} in {final.parent}\n"
        lock.release()
        outputs = [proc.communicate(timeout=120)[0] for proc in (first, second)]
    assert [proc.returncode for proc in (first, second)] == [0, 0]
    assert sum("training a byte-level BPE" in out for out in outputs) == 1, outputs
    assert {json.loads(out.splitlines()[-1])["path"] for out in outputs} == {str(final)}
