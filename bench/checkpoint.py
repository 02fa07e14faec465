"""What verified checkpoints cost: a save with and without sealing, a resume's verification, the hash's throughput.

    python bench/checkpoint.py                 # the 125m preset (about 1.9 GB a checkpoint with its AdamW state)
    python bench/checkpoint.py --model tiny    # a quick look

"unsealed" is the engine's files and the RNG file alone (the save before checkpoints were verified); "sealed" is
`mea.train.checkpoint.save`: the same files, each synced, the manifest (size and xxh3-128 of every file) written
last, the folder renamed and its parent synced. Rounds alternate the two, each into a fresh folder, so the page
cache and the disk see both alike; the table gives medians. "verify" is `mea.run_directory.damage` on the sealed
folder, what a resume reads before it loads. The hash line compares xxh3-128 with SHA-256 on one buffer in memory.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import xxhash
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import describe  # noqa: E402
from mea.config import compose_config  # noqa: E402
from mea.models import LM  # noqa: E402
from mea.run_directory import RunDirectory, damage  # noqa: E402
from mea.train import checkpoint  # noqa: E402
from mea.train.engine import PlainEngine  # noqa: E402


def engine_for(model: str) -> PlainEngine:
    cfg = OmegaConf.to_object(compose_config([f"model={model}", "model.vocab_size=32768", "data.seq_len=32"]))
    torch.manual_seed(0)
    engine = PlainEngine(LM(cfg.model, cfg.attention), cfg, torch.device("cpu"), micro_batch=1)
    x = torch.randint(0, 32768, (1, 32))
    engine.train_step(x, x)  # the optimizer's state exists, as in every checkpoint after step 0
    return engine


def unsealed_save(engine: PlainEngine, folder: Path) -> None:
    folder.mkdir(parents=True)
    engine.save(folder)
    torch.save(checkpoint.rng_state(), folder / "rng-rank0.pt")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hash_throughput(megabytes: int = 512) -> dict[str, float]:
    buffer = torch.randint(0, 256, (megabytes << 20,), dtype=torch.uint8).numpy().tobytes()
    rates = {}
    for name, digest in (("xxh3_128", lambda: xxhash.xxh3_128(buffer).hexdigest()), ("sha256", lambda: hashlib.sha256(buffer).hexdigest())):
        rates[name] = megabytes / 1024 / min(timed(digest) for _ in range(3))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="125m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder on the same disk as /tmp)")
    args = parser.parse_args()
    engine = engine_for(args.model)
    root = Path(tempfile.mkdtemp(dir=args.dir))
    times = {"unsealed": [], "sealed": [], "verify": []}
    try:
        for r in range(args.rounds):
            times["unsealed"].append(timed(lambda: unsealed_save(engine, root / f"plain-{r}")))
            shutil.rmtree(root / f"plain-{r}")
            run_dir = RunDirectory(root / f"run-{r}")
            times["sealed"].append(timed(lambda: checkpoint.save(engine, run_dir, {"step": r + 1}, keep=1)))
            folder = run_dir.checkpoints()[-1]
            times["verify"].append(timed(lambda: damage(folder)))
            size = sum(p.stat().st_size for p in folder.iterdir())
            shutil.rmtree(run_dir.path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    unsealed, sealed, verify = (statistics.median(times[k]) for k in ("unsealed", "sealed", "verify"))
    print(f"device: {describe(torch.device('cpu'))} · model {args.model}: {size / 2**30:.2f} GiB a checkpoint · median of {args.rounds} rounds")
    print(f"save, unsealed   {unsealed:7.2f} s   {size / 2**30 / unsealed:5.2f} GiB/s")
    print(f"save, sealed     {sealed:7.2f} s   {size / 2**30 / sealed:5.2f} GiB/s   {sealed / unsealed:.2f}× the unsealed save")
    print(f"verify on resume {verify:7.2f} s   {size / 2**30 / verify:5.2f} GiB/s   {verify / unsealed:.2f}× the unsealed save")
    print("hash, in memory  " + " · ".join(f"{name} {rate:.2f} GiB/s" for name, rate in hash_throughput().items()))


if __name__ == "__main__":
    main()
