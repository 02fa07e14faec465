"""Reading run directories: the one contract between training, sweeps, compare, export and evaluation
(see docs/run_directory.md)."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mea.config import TrainConfig, load_config
from mea.run_directory import RunDirectory


class RunError(ValueError):
    """A run directory that cannot be read; one line naming it and the fix."""


def made_with(run_dir: Path) -> list[str] | None:
    """The command-line overrides the run was started with (Hydra's record), None when it has none."""
    import yaml

    record = run_dir / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(record.read_text())) if record.is_file() else None


def code_version() -> str:
    """The git commit of this mea checkout, `-dirty` when tracked files differ from it, so that a run or a report
    names the code that made it."""
    git = ["git", "-C", str(Path(__file__).resolve().parent)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("-dirty" if dirty else "")


@dataclass
class Run:
    path: Path
    config: TrainConfig
    summary: dict
    rows: list[dict]  # metrics.jsonl

    @property
    def variant(self) -> str:
        """The arm the run is compared under (attention.name unless `arm` was set)."""
        return self.config.label

    @property
    def amendments(self) -> list[dict]:
        """Changes of identity the run trained through (trainer.amend), in the order they were made."""
        return RunDirectory(self.path).amendments()

    @property
    def data_key(self) -> str:
        """The prepared corpus (name and hash of everything that decides its tokens): runs to compare share it."""
        return self.summary.get("data", "")

    @property
    def data_content(self) -> str:
        """The tokens it trained on (mea.data.shards.PreparedCorpus.content); the cache key for runs made before
        summaries recorded it."""
        return self.summary.get("data_content") or self.data_key


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per logged step."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_run(path: Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path} is not a run directory (it does not exist); give the hydra.run.dir of a finished run")
    missing = [name for name in ("config.yaml", "metrics.jsonl", "summary.json") if not (path / name).is_file()]
    if missing:
        raise RunError(f"{path} lacks {', '.join(missing)}: not a finished run; finish it (the same train.py command resumes it) or leave it out")
    rows = metrics_rows(path)
    if not rows:
        raise RunError(f"{path}/metrics.jsonl is empty; the run logged no step")
    return Run(path, load_config(path / "config.yaml"), json.loads((path / "summary.json").read_text()), rows)
