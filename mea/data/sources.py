"""Where documents come from, all through `datasets`: the embedded stdlib corpus, local files, Hub datasets.

A corpus is named by a fingerprint of its inputs (versions, paths, sizes, dataset names) computed without reading
them into a dataset, which is built only when the shards are: a prepared corpus found in the cache costs neither
`datasets` nor the reading (1.5 s of every run's start, of every test's training subprocess).
"""
from __future__ import annotations

import glob
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from mea.config import DataConfig

if TYPE_CHECKING:
    import datasets

FILE_BUILDERS = {".txt": "text", ".py": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


class DataError(ValueError):
    """Input data that cannot be used; the message is one line that names the problem and the fix."""


@dataclass
class Documents:
    """A corpus as a `datasets` dataset (or iterable dataset) with a `text` column, built on first use, plus what
    was skipped and the fingerprint of its inputs."""

    build: Callable[[], datasets.Dataset | datasets.IterableDataset]
    fingerprint: list = field(default_factory=list)  # what the cache key needs to know about the inputs
    skipped_bad_utf8: list[str] = field(default_factory=list)

    @cached_property
    def dataset(self) -> datasets.Dataset | datasets.IterableDataset:
        return self.build()

    def texts(self) -> Iterator[str]:
        """Every non-empty document."""
        for row in self.dataset:
            if row["text"]:
                yield row["text"]


def stdlib_files() -> list[Path]:
    """The running interpreter's own standard library sources, tests and bundled applications left out."""
    files = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIP]  # never descend into site-packages: a large venv costs seconds
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(files)


def stdlib_documents() -> Documents:
    """Every stdlib module's source, then every pydoc topic's text (the interpreter's bundled documentation)."""
    files = stdlib_files()

    def build():
        import datasets
        from pydoc_data.topics import topics

        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        texts += [topics[name] for name in sorted(topics)]
        return datasets.Dataset.from_dict({"text": texts})

    return Documents(build, fingerprint=[sys.version, len(files)])


def expand_paths(source: str) -> list[Path]:
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        found = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in FILE_BUILDERS]
    elif any(ch in source for ch in "*?["):
        found = [Path(p) for p in sorted(glob.glob(os.path.expanduser(source), recursive=True)) if Path(p).is_file()]
    elif path.is_file():
        found = [path]
    else:
        raise DataError(f"data.source={source!r} does not exist; give an existing file, folder or glob")
    if not found:
        raise DataError(f"data.source={source!r} matches no files of a known type ({', '.join(FILE_BUILDERS)}); point it at text, jsonl or parquet files")
    unknown = sorted({p.suffix for p in found} - set(FILE_BUILDERS))
    if unknown:
        raise DataError(f"data.source={source!r} holds files of unknown type {unknown}; use {', '.join(FILE_BUILDERS)}")
    builders = {FILE_BUILDERS[p.suffix] for p in found}
    if len(builders) > 1:
        raise DataError(f"data.source={source!r} mixes {sorted(builders)} files; point it at one kind of file")
    return found


def split_valid_utf8(files: list[Path], on_bad_utf8: str) -> tuple[list[Path], list[str]]:
    good, bad = [], []
    for path in files:
        try:
            path.read_bytes().decode("utf-8")
            good.append(path)
        except UnicodeDecodeError as e:
            if on_bad_utf8 == "fail":
                raise DataError(f"{path} is not UTF-8 ({e.reason} at byte {e.start}); fix the file or set data.on_bad_utf8=skip") from None
            bad.append(str(path))
    return good, bad


def file_documents(cfg: DataConfig, hf_cache: str) -> Documents:
    files = expand_paths(cfg.source)
    builder = FILE_BUILDERS[files[0].suffix]
    bad: list[str] = []
    kwargs: dict = {}
    if builder == "text":
        files, bad = split_valid_utf8(files, cfg.on_bad_utf8)
        if not files:
            raise DataError(f"data.source={cfg.source!r}: every file is invalid UTF-8; fix the files or point at others")
        kwargs["sample_by"] = cfg.sample_by

    def build():
        import datasets

        ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", cache_dir=hf_cache, **kwargs)
        if cfg.text_field not in ds.column_names:
            raise DataError(f"data.text_field={cfg.text_field!r} is not a column of {cfg.source!r}; its columns are {ds.column_names}")
        if cfg.text_field != "text":
            ds = ds.rename_column(cfg.text_field, "text")
        return ds.select_columns(["text"])

    fingerprint = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return Documents(build, fingerprint=fingerprint, skipped_bad_utf8=bad)


def hub_documents(cfg: DataConfig) -> Documents:
    def build():
        import datasets

        try:
            ds = datasets.load_dataset(cfg.source, cfg.hub_config, split=cfg.split, streaming=True)
            first = next(iter(ds))
        except Exception as e:  # datasets raises many types for an unreachable Hub; all mean the same to the user
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise DataError(
                f"cannot load Hub dataset {cfg.source!r} ({reason}): this machine may be offline or the name wrong; "
                "without a network use local files: data=text data.source=PATH"
            ) from None
        if cfg.text_field not in first:
            raise DataError(f"data.text_field={cfg.text_field!r} is not a field of {cfg.source!r}; its fields are {sorted(first)}")
        ds = ds.select_columns([cfg.text_field])
        return ds.rename_column(cfg.text_field, "text") if cfg.text_field != "text" else ds

    return Documents(build, fingerprint=[cfg.source, cfg.hub_config, cfg.split])


def load_documents(cfg: DataConfig, hf_cache: str) -> Documents:
    if cfg.kind == "stdlib":
        docs = stdlib_documents()
    elif cfg.kind == "files":
        docs = file_documents(cfg, hf_cache)
    else:
        docs = hub_documents(cfg)
    if cfg.max_documents is not None:
        build = docs.build
        docs.build = lambda: build().take(cfg.max_documents)
    return docs
