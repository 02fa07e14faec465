"""Token shards: documents tokenised in parallel batches into memory-mapped files with a manifest.

A prepared corpus is a folder under the cache, named by a hash of everything that decides its tokens, holding
`tokenizer.json`, `{train,val}-NNNNN.bin` and `manifest.json`. It is built in a temporary folder and renamed
into place only when complete, so a prepare killed half-way leaves nothing that looks valid, and preparing
the same config again does no work. One process builds a corpus at a time (a lock beside it in the cache): the
others asking for it meanwhile wait, then read it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from tokenizers import Tokenizer

from mea.config import DataConfig

from .sources import DataError, Documents, load_documents
from .tokenizer import eod_id, load_tokenizer, train_bpe

FORMAT = 1
ENCODE_BATCH = 512
TOKENIZER_TRAIN_CHARS = 200_000_000  # a BPE learns its merges from at most this much text
# seq_len is a property of the loader, not of the tokens, so every sequence length shares one prepared corpus.
NOT_IN_KEY = ("name", "seq_len", "cache_dir")


@dataclass
class PreparedCorpus:
    path: Path
    manifest: dict

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.path / "tokenizer.json"))

    @property
    def content(self) -> str:
        """<name>-<hash> of the tokens themselves (the tokenizer's and every shard's checksum), where the cache key
        hashes what the tokens were made from: a source file copied, moved or re-stamped (a fresh mount, a copy to
        node-local disk) gets a new cache key, but its runs stay comparable while their tokens are the same."""
        parts = [self.manifest["tokenizer"]["sha256"], *(f"{s['split']}:{s['sha256']}" for s in self.manifest["shards"])]
        return f"{self.path.name.rsplit('-', 1)[0]}-{hashlib.sha256(' '.join(parts).encode()).hexdigest()[:16]}"

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def eod_id(self) -> int:
        return self.manifest["tokenizer"]["eod_id"]

    def shards(self, split: str) -> list[np.ndarray]:
        """Memory maps of one split's shards, each checked against the manifest's size and checksum."""
        dtype = np.dtype(self.manifest["dtype"])
        maps = []
        for shard in self.manifest["shards"]:
            if shard["split"] != split:
                continue
            file = self.path / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise DataError(f"shard {file} is missing or truncated; delete {self.path} and prepare again")
            if sha256(file) != shard["sha256"]:
                raise DataError(f"shard {file} does not match its checksum (altered or corrupt); delete {self.path} and prepare again")
            maps.append(np.memmap(file, dtype=dtype, mode="r"))
        return maps


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_key(cfg: DataConfig, docs: Documents) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_KEY}
    if cfg.tokenizer != "bpe":  # by content: every exported model carries its own copy of one tokenizer
        settings["tokenizer"] = sha256(Path(cfg.tokenizer).expanduser() / "tokenizer.json" if Path(cfg.tokenizer).is_dir() else Path(cfg.tokenizer))
    blob = json.dumps({"format": FORMAT, "settings": settings, "inputs": docs.fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ShardWriter:
    """Appends token ids of one split to files of at most shard_tokens tokens each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.documents = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            chunk, ids = ids[:room], ids[room:]
            chunk.astype(self.dtype, copy=False).tofile(self.file)
            self.shards[-1]["tokens"] += len(chunk)

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.file = open(self.folder / name, "wb")
        self.shards.append({"split": self.split, "file": name, "tokens": 0})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def finish(self) -> list[dict]:
        self.close()
        for shard in self.shards:
            shard["sha256"] = sha256(self.folder / shard["file"])
        return self.shards


def batched(texts, size: int):
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def limited_texts(docs: Documents, max_chars: int):
    seen = 0
    for text in docs.texts():
        if seen >= max_chars:
            return
        seen += len(text)
        yield text


def build(cfg: DataConfig, docs: Documents, folder: Path, log=print) -> dict:
    if next(docs.texts(), None) is None:
        raise DataError(f"the corpus is empty: data.source={cfg.source!r} holds no text; point it at files with text in them")
    if cfg.tokenizer == "bpe":
        log(f"training a byte-level BPE of {cfg.vocab_size} tokens on {cfg.source}")
        tok = train_bpe(limited_texts(docs, TOKENIZER_TRAIN_CHARS), cfg.vocab_size)
    else:
        tok = load_tokenizer(cfg.tokenizer)
    tok.save(str(folder / "tokenizer.json"))
    vocab_size, eod = tok.get_vocab_size(with_added_tokens=True), eod_id(tok)
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    writers = {split: ShardWriter(folder, split, dtype, cfg.shard_tokens) for split in ("train", "val")}
    in_val = np.random.default_rng(cfg.seed)  # one draw per document, in corpus order: a fixed split by document
    max_id = 0
    log(f"tokenising {cfg.source} into {folder}")
    for texts in batched(docs.texts(), ENCODE_BATCH):
        docs_ids = [np.array(e.ids + [eod], dtype=np.int64) for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
        to_val = in_val.random(len(docs_ids)) < cfg.val_share
        for split, chosen in (("train", ~to_val), ("val", to_val)):
            picked = [ids for ids, take in zip(docs_ids, chosen) if take]
            if picked:
                ids = np.concatenate(picked)
                writers[split].write(ids)
                writers[split].documents += len(picked)
                max_id = max(max_id, int(ids.max()))
    for split, writer in writers.items():
        if writer.documents == 0:
            raise DataError(f"no document fell in the {split} split ({writers['train'].documents + writers['val'].documents} documents); add documents or change data.val_share")
    shards = writers["train"].finish() + writers["val"].finish()
    return {
        "format": FORMAT,
        "source": {"kind": cfg.kind, "source": cfg.source, "hub_config": cfg.hub_config, "split": cfg.split},
        "config": asdict(cfg),
        "tokenizer": {"file": "tokenizer.json", "sha256": sha256(folder / "tokenizer.json"), "vocab_size": vocab_size, "eod_id": eod},
        "dtype": dtype.name,
        "max_token_id": max_id,
        "documents": {split: w.documents for split, w in writers.items()} | {"skipped_bad_utf8": len(docs.skipped_bad_utf8)},
        "skipped_files": docs.skipped_bad_utf8,
        "tokens": {split: sum(s["tokens"] for s in w.shards) for split, w in writers.items()},
        "shards": shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepared_path(cfg: DataConfig, key: str) -> Path:
    """Where the corpus named `key` (<name>-<hash>, as a run's summary records it) lies in the cache."""
    return Path(os.path.expanduser(cfg.cache_dir)) / key


def corpus_path(cfg: DataConfig, docs: Documents | None = None) -> Path:
    """Where the corpus of this data config lies in the cache, prepared or not yet (its key fingerprints the inputs
    without reading them): how a cluster driver knows a corpus is prepared before it submits any run."""
    docs = docs or load_documents(cfg, str(Path(os.path.expanduser(cfg.cache_dir)) / "hf"))
    return prepared_path(cfg, f"{cfg.name}-{cache_key(cfg, docs)}")


def prepare(cfg: DataConfig, log=print) -> PreparedCorpus:
    """The prepared corpus for this data config: from the cache if it is there, else built now."""
    docs = load_documents(cfg, str(Path(os.path.expanduser(cfg.cache_dir)) / "hf"))
    final = corpus_path(cfg, docs)
    manifest_file = final / "manifest.json"
    if not manifest_file.is_file():
        with sole_preparer(final, log):
            if not manifest_file.is_file():  # else built by the process this one waited for
                publish(cfg, docs, final, log)
    link_as_its_tokenizers(cfg, docs, final)
    return PreparedCorpus(final, json.loads(manifest_file.read_text()))


def preparing_lock(final: Path) -> FileLock:
    return FileLock(str(final.with_name(f".{final.name}.lock")))


@contextmanager
def sole_preparer(final: Path, log):
    """Held while this process builds the corpus `final`. Another asking for it meanwhile (a local sweep's runs start
    together, each preparing its data) waits instead of tokenising it beside this one, and then reads it. The lock
    goes with its process: a preparer killed half-way holds up no one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = preparing_lock(final)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"waiting for another process preparing {final.name} in {final.parent}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def publish(cfg: DataConfig, docs: Documents, final: Path, log) -> None:
    """Build the corpus in a temporary folder beside `final` and rename it into place once complete (under
    sole_preparer: what a killed preparer left in the temporary folder is cleared first)."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = build(cfg, docs, tmp, log)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if docs.skipped_bad_utf8:
        log(f"skipped {len(docs.skipped_bad_utf8)} files that are not UTF-8 (listed in {final / 'manifest.json'})")


def link_as_its_tokenizers(cfg: DataConfig, docs: Documents, corpus: Path) -> None:
    """A corpus whose tokenizer was trained here is also the corpus of the same settings read with that tokenizer's
    file (the same tokens, byte for byte): a link under that name, so that a model exported from a run on it (an
    evaluation, a recovery run) reads these shards instead of tokenising the corpus a second time."""
    if cfg.tokenizer != "bpe":
        return
    alias = corpus_path(replace(cfg, tokenizer=str(corpus / "tokenizer.json")), docs)
    if not alias.exists():
        try:
            alias.symlink_to(corpus.name)
        except FileExistsError:  # another process linked it first
            pass
