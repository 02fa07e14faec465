"""The run directory's one owner: what run it holds, who writes it, which of its checkpoints can be trusted.

Identity: the settings that decide what a run computes, recorded in `identity.json` at its first start. A later
start under another identity stops before any compute, naming each key that differs, unless those keys are
amended (`trainer.amend=[optim.lr]`), which `identity.json` records with the step it took effect at.

Lease: rank 0 holds `lease.lock` (a `filelock`, released by the kernel when its process dies) for the run's life
and keeps `lease.json` (host, pid, SLURM job, heartbeat) fresh, so that a second writer stops naming the holder.
A holder on another host whose heartbeat has gone quiet for STALE_AFTER_S is taken over: a lock on a network
filesystem does not always reach across hosts, the heartbeat does.

Checkpoints: `checkpoints/step-N/` is trusted only when every file matches `manifest.json` (size and xxh3-128),
which `seal` writes after every file is synced; a folder that does not match is moved aside, never loaded.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import xxhash
from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from mea.config import ConfigError, TrainConfig, load_config

# What decides the numbers a run produces. Everything else (logging, eval and checkpoint cadence, W&B, threads,
# the engine, micro-batching, compilation) is how it is run, and changes nothing but speed or summation order.
DECIDES = ("arm", "model", "attention", "optim", "scheduler", "data", "trainer.max_steps", "trainer.global_batch", "trainer.seed",
           "trainer.precision", "trainer.init_from", "trainer.eval_batches")
LABELS = ("model.name", "data.name", "data.cache_dir")  # names and places: renaming them computes the same run
AFTER_DATA = ("model.vocab_size", "data.corpus")  # known once the corpus is prepared (its cache key fingerprints the inputs)

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
MANIFEST = "manifest.json"
CHECKPOINT_FORMAT = 2  # trainer_state.json of a sealed checkpoint carries it; older checkpoints have no manifest


class RunDirectoryError(ConfigError):
    """A start this run directory refuses (another identity, another writer); one line naming the fix."""


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def decides(key: str) -> bool:
    return key not in LABELS and any(key == d or key.startswith(d + ".") for d in DECIDES)


def identity_of(cfg: TrainConfig, corpus: str | None = None) -> dict[str, Any]:
    """The identity of a resolved config; without the corpus's key (before it is prepared) it lacks AFTER_DATA."""
    flat = flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))
    identity = {k: v for k, v in flat.items() if decides(k) and (corpus is not None or k not in AFTER_DATA)}
    identity["arm"] = cfg.label
    if corpus is not None:
        identity["data.corpus"] = corpus
    return json.loads(json.dumps(identity))  # JSON's own types, as identity.json reads back


def check_amendments(cfg: TrainConfig) -> None:
    keys = flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))
    for key in cfg.trainer.amend:
        if key not in keys and key not in AFTER_DATA:
            raise ConfigError(f"trainer.amend names {key}, which is not a config key; name the keys that changed, such as trainer.amend=[optim.lr]")
        if not decides(key):
            raise ConfigError(f"trainer.amend names {key}, which does not decide what the run computes; change it without amending")


def show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def describe(changes: dict[str, tuple]) -> str:
    """`key: old recorded, new now, …` for a one-line message."""
    return ", ".join(f"{k}: {show(old)} recorded, {show(new)} now" for k, (old, new) in changes.items())


def write_synced(path: Path, data: str | bytes) -> None:
    """Write path whole or not at all: a temporary file, synced, renamed over it. Every file mea publishes (a
    summary, a fit, a report, an archive) is written by this or by copy_synced."""
    with replaced_whole(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def copy_synced(source: Path, target: Path) -> None:
    """Copy a file into place whole or not at all (it may be large: never read into memory)."""
    with replaced_whole(target) as tmp:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


@contextmanager
def replaced_whole(path: Path):
    """A temporary name beside path, renamed over it once the block has written it; removed if the block fails."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_hash(path: Path, sync: bool = False) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def seal(folder: Path) -> None:
    """Sync every file of a written checkpoint, then write its manifest last: each file's size and hash."""
    files = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
    entries = {name: {"size": p.stat().st_size, "xxh3_128": file_hash(p, sync=True)} for name, p in files.items()}
    for sub in {p.parent for p in files.values()}:
        sync_folder(sub)
    write_synced(folder / MANIFEST, json.dumps({"files": entries}, indent=1))


def damage(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (naming the file), or None when every file matches its manifest."""
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        state = folder / "trainer_state.json"
        if state.is_file() and "format" not in json.loads(state.read_text()):
            return None  # written before checkpoints were sealed: nothing to check it against
        return f"{MANIFEST} is missing"
    try:
        entries = json.loads(manifest_file.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is empty or unreadable"
    if "trainer_state.json" not in entries:
        return f"{MANIFEST} lists no trainer_state.json"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {entry['size']} (truncated or overwritten)"
        if file_hash(path) != entry["xxh3_128"]:
            return f"{name} does not match its hash in {MANIFEST} (corrupt or altered)"
    return None


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDirectory) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def identity_file(self) -> Path:
        return self.path / "identity.json"

    def _record(self) -> dict | None:
        if self.identity_file.is_file():
            return json.loads(self.identity_file.read_text())
        if (self.path / "config.yaml").is_file():  # a run made before identities were recorded: its saved config
            summary = self.path / "summary.json"
            corpus = json.loads(summary.read_text()).get("data") if summary.is_file() else None
            return {"identity": identity_of(load_config(self.path / "config.yaml"), corpus), "amendments": []}
        return None

    def identity(self) -> dict | None:
        record = self._record()
        return record["identity"] if record else None

    def amendments(self) -> list[dict]:
        record = self._record()
        return record["amendments"] if record else []

    def differences(self, identity: dict) -> dict[str, tuple]:
        """Keys known on both sides whose values differ: (recorded, now)."""
        recorded = self.identity() or {}
        return {k: (recorded[k], v) for k, v in identity.items() if k in recorded and recorded[k] != v}

    def holds(self, identity: dict) -> bool:
        """A finished run (or a diverged one) of this identity: a result to reuse."""
        return (self.path / "summary.json").is_file() and not self.differences(identity)

    def check(self, identity: dict, amend: list[str]) -> dict[str, tuple]:
        """The differences this start may train under (amended, or a longer run on a constant schedule); refuses others."""
        changes = self.differences(identity)
        extended = "trainer.max_steps" in changes and identity.get("scheduler.name") == "constant" and changes["trainer.max_steps"][1] > changes["trainer.max_steps"][0]
        refused = [k for k in changes if k not in amend and not (k == "trainer.max_steps" and extended)]
        if refused:
            raise RunDirectoryError(f"{self.path} holds another run ({describe({k: changes[k] for k in refused})}); "
                                    f"give a new hydra.run.dir, or amend this one with trainer.amend=[{','.join(refused)}]")
        return changes

    def record(self, identity: dict, changes: dict[str, tuple], step: int) -> None:
        """Write the identity this start trains under, with its amendment if it made one."""
        record = self._record() or {"identity": identity, "amendments": []}
        if changes:
            record["amendments"].append({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": {k: list(v) for k, v in changes.items()}})
        record["identity"] = identity
        self.path.mkdir(parents=True, exist_ok=True)
        write_synced(self.identity_file, json.dumps(record, indent=1))

    def checkpoints(self) -> list[Path]:
        return sorted((self.path / "checkpoints").glob("step-*"))

    def latest_verified(self, log: Callable[[str], None] = print) -> Path | None:
        """The newest checkpoint whose files match its manifest; newer damaged ones are moved aside, with one line each."""
        for folder in reversed(self.checkpoints()):
            why = damage(folder)
            if why is None:
                return folder
            aside = folder.with_name(f"damaged-{folder.name}")
            if aside.exists():  # damaged at this step before: keep both for a look
                aside = aside.with_name(f"{aside.name}-{time.strftime('%Y%m%dT%H%M%S')}")
            folder.rename(aside)
            log(f"warning: checkpoint {folder.name} is damaged ({why}); moved to {aside.name}, resuming from the previous verified one")
        return None

    def lease(self, log: Callable[[str], None] = print) -> Lease:
        return Lease(self.path, log)


class Lease:
    """One writer per run directory: `with RunDirectory(p).lease():` for the run's life (rank 0 only)."""

    def __init__(self, folder: Path, log: Callable[[str], None]):
        self.folder, self.log = folder, log
        self.file = folder / "lease.json"
        self.lock = FileLock(str(folder / "lease.lock"), timeout=0)
        self.stop = threading.Event()

    def holder(self) -> dict | None:
        try:
            return json.loads(self.file.read_text())
        except (OSError, ValueError):
            return None

    def refuse(self, holder: dict) -> RunDirectoryError:
        who = "another process" if not holder else (
            f"pid {holder['pid']} on {holder['host']}" + (f" (SLURM job {holder['slurm_job']})" if holder.get("slurm_job") else "")
            + f", heartbeat {time.time() - holder['heartbeat']:.0f} s ago")
        return RunDirectoryError(f"{self.folder} is being trained by {who}; wait for it to end or stop it (a holder that is gone, or silent for {STALE_AFTER_S:.0f} s, is taken over)")

    def __enter__(self) -> Lease:
        self.folder.mkdir(parents=True, exist_ok=True)
        host, waiting = socket.gethostname(), False
        while (holder := self.try_acquire(host)) is not None:
            if not self.earlier_allocation(holder) or time.time() - holder["heartbeat"] > STALE_AFTER_S:
                raise self.refuse(holder)
            if not waiting:  # SLURM keeps the job id across a requeue; its earlier allocation may still be saving
                self.log(f"waiting for the earlier allocation of SLURM job {holder['slurm_job']} (pid {holder['pid']} on {holder['host']}) to release {self.folder}")
                waiting = True
            time.sleep(1)
        self.me = {"host": host, "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"), "started": time.time()}
        self.beat()
        self.thread = threading.Thread(target=self.keep_beating, daemon=True, name="lease-heartbeat")
        self.thread.start()
        return self

    def try_acquire(self, host: str) -> dict | None:
        """Take the lease, or return the live holder's record (an empty one where the lock is held without it)."""
        try:
            self.lock.acquire()
        except Timeout:
            return self.holder() or {}
        holder = self.holder()
        if holder is not None:
            silent = time.time() - holder["heartbeat"]
            if holder["host"] != host and silent < STALE_AFTER_S:  # the lock may not reach across hosts; the heartbeat does
                self.lock.release()
                return holder
            gone = "its process is gone" if holder["host"] == host else f"no heartbeat for {silent:.0f} s"
            self.log(f"taking over the lease of pid {holder['pid']} on {holder['host']} ({gone})")
        return None

    @staticmethod
    def earlier_allocation(holder: dict) -> bool:
        """The holder is this SLURM job before it was requeued."""
        return bool(holder.get("slurm_job")) and holder["slurm_job"] == os.environ.get("SLURM_JOB_ID")

    def beat(self) -> None:
        write_synced(self.file, json.dumps({**self.me, "heartbeat": time.time()}))

    def keep_beating(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            self.beat()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.file.unlink(missing_ok=True)
        self.lock.release()
