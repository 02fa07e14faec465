"""A report's raw data in one file beside it (`<report>/runs.tar.xz`): every run's resolved config, identity,
summary, metrics and command line (no checkpoints, no W&B files), the compression readings made from the
checkpoints, and what the report read from outside its runs (the machine it was made on, the init audit's
finding). `mea-experiment SPEC --from-archive` writes the report again from that file alone, byte for byte;
`--pack` writes the same file of a sitting stopped part way, and `--resume-from` carries the sitting on from it.

The archive is made the same way each time (sorted members, no dates or owners), so a report made again from
the same runs commits as no change."""
from __future__ import annotations

import io
import json
import lzma
import shutil
import tarfile
from pathlib import Path

from mea.run_directory import write_synced
from mea.scaling.sweep import SweepError

RUN_FILES = ("config.yaml", "identity.json", "summary.json", "metrics.jsonl", ".hydra/overrides.yaml")
READINGS = ("compression/rows.json", "made.json")  # what the report read besides the runs


def members(out: Path) -> list[Path]:
    """The files under out that the report reads, relative to out."""
    runs = sorted(summary.parent for summary in out.rglob("summary.json"))
    files = [run / name for run in runs for name in RUN_FILES if (run / name).is_file()]
    files += [out / name for name in READINGS if (out / name).is_file()]
    return [f.relative_to(out) for f in files]


def pack(out: Path, archive: Path) -> Path:
    """Write the archive of out's runs, whole or not at all (a temporary file renamed into place)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name in members(out):
            data = (out / name).read_bytes()
            info = tarfile.TarInfo(name.as_posix())
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    write_synced(archive, buffer.getvalue())
    return archive


def unpack(archive: Path, out: Path) -> None:
    """The archive's runs into out, which must not hold runs already (they would be mixed with the archive's)."""
    if not archive.is_file():
        raise SweepError(f"{archive} does not exist; give the runs.tar.xz beside a published report (docs/results/<name>/runs.tar.xz)")
    if out.exists() and any(out.iterdir()):
        raise SweepError(f"{out} already holds runs; carry on from them with `mea-experiment <spec>`, or move {out} away to start from the archive")
    partial = out.with_name(out.name + ".unpacking")  # renamed to out once whole: a failure leaves no half of the runs behind
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(partial, filter="data")  # plain files inside it only: nothing in the archive is executed or placed elsewhere
    except (tarfile.TarError, EOFError, lzma.LZMAError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise SweepError(f"{archive} is not a readable archive ({str(e).splitlines()[0].rstrip(':')}); fetch it again from the repository") from None
    if out.exists():
        out.rmdir()
    partial.rename(out)


def sitting_of_archive(out: Path, archive: Path) -> dict:
    """The archive's record of where and when the report was made (out unpacked from it)."""
    path = out / "made.json"
    if not path.is_file():
        raise SweepError(f"{archive} has no made.json: it was not written by mea-experiment; give the runs.tar.xz beside a published report")
    return json.loads(path.read_text())
