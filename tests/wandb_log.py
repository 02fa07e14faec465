"""Reads an offline W&B run's `.wandb` file (a LevelDB-style record log of wandb's own protobuf Records)."""
import json
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER, FILE_HEADER = 32768, 7, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    pos, pending = FILE_HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # the rest of a block too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + payload)
            pending = b""
            yield record
        elif kind in (FIRST, MIDDLE):
            pending += payload


def read_run(run_dir: Path) -> dict:
    """{'config': {...}, 'history': [{key: value}], 'summary': {...}} of the run's offline log."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out: dict = {"config": {}, "history": [], "summary": {}, "tags": [], "group": None}
    for r in records(log):
        kind = r.WhichOneof("record_type")
        if kind in ("config", "run"):
            update = r.config.update if kind == "config" else r.run.config.update
            out["config"].update({i.key: json.loads(i.value_json) for i in update})
            if kind == "run":
                out["tags"], out["group"] = list(r.run.tags), r.run.run_group
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    return out
