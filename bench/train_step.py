"""Training-step throughput of every attention variant as a ratio to `mha`, measured side by side in one run.

    python bench/train_step.py                      # CPU preset: 4 layers, width 256, 8 heads, T 256, batch 8, fp32
    python bench/train_step.py --device cuda        # GPU preset: 12 layers, width 1024, 16 heads, T 2048, bf16; eager and compiled
    python bench/train_step.py --compile both       # every variant eager and torch.compile'd, side by side in one run
    python bench/train_step.py --preset cpu-long    # the CPU preset's model at the GPU preset's T 2048, batch 1
    python bench/train_step.py --preset 125m --losses   # mha under each loss form at model=125m, vocabulary 32,768
    python bench/train_step.py --arms mha_gn,mea --rounds 30   # those against mha alone: more rounds in the same time

Every variant computes its loss as the trainer does by default (`chunked`, mea.models.loss); `mha (full CE)` keeps
the whole logits instead, and on a GPU `mha (liger CE)` and `mha (cce CE)` run those kernels where their extras are
installed, so the table prices the LM head's loss too. `--preset 125m --losses` runs those arms alone at model=125m's
width and vocabulary 32,768.

Memory: the activations autograd saves for backward (every device) and, on a GPU, the allocator's peak; on a CPU,
which has no allocator peak to read, the most bytes one eager step's tensors hold at once (bench.machine.PeakTensorBytes:
activations, gradients and temporaries; weights and optimizer state are not counted). One arm's
model and optimizer are on the GPU at a time (the others wait in host memory), and each arm's peak is read from an
allocator reset when its turn starts, so a row's peak is that arm's alone. An arm that does not fit the preset's
batch runs at the largest batch that does (halving it), and its row says so; its saved bytes are scaled to the
preset's batch (they grow with it linearly).
On a CPU the process keeps the memory a step frees, as `train.py` does there (mea.cpu_heap; --default-heap
measures glibc's defaults, which return it to the kernel and fault it in again at every step).
Rounds interleave the variants (mha, mha_gn, mea, ...) so that drift in the machine hits all alike, each round
starting one variant later, and each variant's timed steps follow one untimed step of its own. A variant's ratio
to `mha` is taken round by round, so that it compares steps timed seconds apart, and the table gives the median
of those ratios and their middle half (quartiles). With --compile both (a GPU's default), every variant runs
eager and compiled in the same rounds: a table for each, each against its own `mha`, and the speed-up compiling
gives each variant, again round by round. Tokens/s is the median over rounds. Imports torch and
mea.models only, so it runs on a bare GPU machine.

Stopped by SIGINT (^C, or `make gpu-check --budget` ending), it prints its tables over the rounds that had ended,
its header saying how many, and exits 130; stopped before the first round ended, it says how many arms had their
first turn. Each arm's first turn (on a GPU mostly its compilation) and each round go to stderr as they end.

The training dynamics (mea.models.dynamics) cost nothing on a training step: they are one extra forward pass at
eval steps, with hooks that live only for that pass. The last column gives that pass's time in training steps,
and the step times are measured after a pass on every model, so a hook left behind would show in them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import PeakTensorBytes, describe, matmul_peak, sync  # noqa: E402
from mea.cpu_heap import keep_freed_memory  # noqa: E402
from mea.models import LM, REGISTRY, ModelConfig, flops_per_token  # noqa: E402
from mea.models.dynamics import DYNAMICS_SEQUENCES, measure  # noqa: E402
from mea.models.attention.diff import DiffConfig  # noqa: E402
from mea.models.attention.mea import MEAConfig  # noqa: E402
from mea.models.loss import CROSS_ENTROPY, why_unavailable  # noqa: E402

PRESETS = {
    "cpu": dict(dim=256, n_layers=4, n_heads=8, vocab=4096, seq_len=256, batch=8, rounds=7, steps=3),
    "cuda": dict(dim=1024, n_layers=12, n_heads=16, vocab=32768, seq_len=2048, batch=8, rounds=5, steps=10),
    "smoke": dict(dim=64, n_layers=2, n_heads=4, vocab=512, seq_len=64, batch=4, rounds=2, steps=1),  # does it run
    "cpu-long": dict(dim=256, n_layers=4, n_heads=8, vocab=4096, seq_len=2048, batch=1, rounds=2, steps=1),  # the GPU preset's T: saved bytes
    "125m": dict(dim=768, n_layers=12, n_heads=12, vocab=32768, seq_len=1024, batch=8, rounds=3, steps=2),  # model=125m: the LM head's share at its size
}


def arms(device: torch.device, losses_only: bool = False) -> dict[str, tuple[object, str]]:
    """name: (attention config, loss form). Every variant with the trainer's default loss (chunked), and `mha` under
    each other form this machine runs (the Triton ones where their extra is installed on a GPU); or that alone."""
    mha = REGISTRY["mha"].Config()
    arms = {"mha": (mha, "chunked")} | {f"mha ({form} CE)": (mha, form) for form in CROSS_ENTROPY if form != "chunked" and not why_unavailable(form, device)}
    if not losses_only:
        arms |= {name: (cls.Config(), "chunked") for name, cls in REGISTRY.items() if name != "mha"}
        arms["mea (einsum HLC)"] = (MEAConfig(fold_hlc=False), "chunked")
        arms["diff (paired heads)"] = (DiffConfig(pair_heads=True), "chunked")
    return dict(sorted(arms.items(), key=lambda kv: (kv[0] != "mha", kv[0])))


def saved_activation_bytes(forward, *inputs: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward (each storage once): the activation memory of a step,
    measured the same way on every device."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(*inputs)
    return sum(storages.values())


class Arm:
    """One variant's model, optimizer and forward (compiled or not), kept in host memory between its turns."""

    def __init__(self, attention, cross_entropy: str, p: dict, device: torch.device, dtype: torch.dtype, compile: bool):
        torch.manual_seed(0)
        cfg = ModelConfig(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], vocab_size=p["vocab"], max_seq_len=p["seq_len"])
        self.model = LM(cfg, attention, cross_entropy)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)  # as mea.train.optim builds it
        self.forward = torch.compile(self.model, fullgraph=True) if compile else self.model  # as the trainer compiles it: a graph break is an error
        self.device, self.dtype, self.batch, self.compiled = device, dtype, p["batch"], compile
        self.peak_gib, self.step_peak_mib = 0.0, None  # the GPU allocator's peak; on a CPU, what one eager step's tensors hold at most

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda")

    def step(self, x: torch.Tensor) -> None:
        with self.autocast():
            loss = self.forward(x[: self.batch, :-1], x[: self.batch, 1:])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @contextmanager
    def turn(self):
        """The arm on the device for the block (its model and its optimizer state), its peak memory read at the end."""
        self.move(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        yield
        sync(self.device)
        if self.device.type == "cuda":
            self.peak_gib = max(self.peak_gib, torch.cuda.max_memory_allocated() / 2**30)
            self.move(torch.device("cpu"))
            torch.cuda.empty_cache()

    def move(self, device: torch.device) -> None:
        self.model.to(device)
        for state in self.opt.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(device)

    def fit_batch(self, x: torch.Tensor) -> None:
        """Two steps (compiling, if asked) at the largest batch up to the preset's that fits on the device."""
        while True:
            try:
                for _ in range(2):
                    self.step(x)
                return
            except torch.OutOfMemoryError:
                if self.batch == 1:
                    raise
            self.opt.zero_grad(set_to_none=True)  # out of the except block: the failed step's tensors are freed
            torch.cuda.empty_cache()
            self.batch //= 2


MODES = {"off": {"eager": False}, "on": {"compiled": True}, "both": {"eager": False, "compiled": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", choices=list(PRESETS), help="model and batch size (default: the device's; smoke: a seconds-long check that it runs)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--batch", type=int, help="sequences a step, in place of the preset's")
    parser.add_argument("--compile", choices=list(MODES), help="torch.compile each model, or each eager and compiled side by side (default: both on a GPU, off on a CPU, where it takes minutes)")
    parser.add_argument("--arms", help="comma-separated rows to run against mha, which always runs (default: every row); on a noisy machine a few "
                        "arms over many rounds pin a ratio down that the whole table leaves within ±10%%")
    parser.add_argument("--losses", action="store_true", help="mha alone, under each loss form this machine runs: the LM head's cost (--preset 125m)")
    parser.add_argument("--default-heap", action="store_true", help="on a CPU, leave glibc's heap settings as they are")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = arms(device, args.losses)
    if args.arms:
        chosen = {"mha", *args.arms.split(",")}
        if unknown := sorted(chosen - set(rows)):
            parser.error(f"--arms: no row named {', '.join(map(repr, unknown))} here; choose among: {', '.join(rows)}")
        rows = {name: row for name, row in rows.items() if name in chosen}
    heap_kept = device.type == "cpu" and not args.default_heap and keep_freed_memory()
    p = PRESETS[args.preset or args.device] | ({"batch": args.batch} if args.batch else {})
    rounds = args.rounds or p["rounds"]
    if rounds < 2:
        parser.error(f"--rounds {rounds}: the ratios' quartiles need at least 2 rounds; pass --rounds 2 or more")
    modes = MODES[args.compile or ("both" if device.type == "cuda" else "off")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    arms_ = {(name, mode): Arm(attention, loss, p, device, dtype, compiled) for mode, compiled in modes.items() for name, (attention, loss) in rows.items()}
    x = torch.randint(0, p["vocab"], (p["batch"], p["seq_len"] + 1), generator=torch.Generator().manual_seed(0)).to(device)
    saved, dynamics_s, times = {}, {}, {key: [] for key in arms_}
    try:
        first_turns(arms_, x, p, device, saved, dynamics_s)
        timed_rounds(arms_, x, p, device, rounds, times)
        stopped = None
    except KeyboardInterrupt:  # ^C, or gpu-check's budget ending: the rounds that ended are reported, not lost
        stopped = min(map(len, times.values()))
        if not stopped:
            print(f"stopped before the first round ended: {len(dynamics_s)} of {len(arms_)} arms had their first turn; nothing was timed")
            sys.exit(130)
        times = {key: ts[:stopped] for key, ts in times.items()}

    peak = matmul_peak(device, dtype)
    print(f"device: {describe(device)} · torch {torch.__version__} · {dtype} · compile={'+'.join(modes)}" + (" · freed memory kept" if heap_kept else ""))
    print(f"model: {p['n_layers']} layers, width {p['dim']}, {p['n_heads']} heads, vocab {p['vocab']}, T {p['seq_len']}, batch {p['batch']}; "
          + (f"median of {rounds} rounds" if stopped is None else f"stopped by SIGINT: median of the {stopped} of {rounds} rounds that ended") + f" × {p['steps']} steps")
    print(f"measured matmul peak: {peak / 1e12:.2f} TFLOP/s")
    tokens_per_s = {key: [arm.batch * p["seq_len"] / t for t in times[key]] for key, arm in arms_.items()}
    for mode in modes:
        if len(modes) > 1:
            print(f"\n{mode}:")
        table({name: arm for (name, m), arm in arms_.items() if m == mode}, {name: v for (name, m), v in tokens_per_s.items() if m == mode},
              {name: v for (name, m), v in saved.items() if m == mode}, {name: dynamics_s[name, mode] / statistics.median(times[name, mode]) for name, m in arms_ if m == mode},
              p, peak, device.type == "cuda")
    if len(modes) > 1:
        print("\ncompiled ÷ eager (tokens/s, round by round): " + ", ".join(
            f"{name} {statistics.median(c / e for e, c in zip(tokens_per_s[name, 'eager'], tokens_per_s[name, 'compiled'])):.2f}×" for name, m in arms_ if m == "eager"))
    lowered = sorted({name for (name, _), arm in arms_.items() if arm.batch < p["batch"]})
    if lowered:
        print(f"batch: {', '.join(lowered)} did not fit batch {p['batch']} and ran at the batch shown (saved MiB scaled to batch {p['batch']})")
    print("dyn pass: one dynamics pass (eval steps only), in training steps of that variant; no hook stays on the model")
    if stopped is not None:
        sys.exit(130)


def first_turns(arms_: dict, x: torch.Tensor, p: dict, device: torch.device, saved: dict, dynamics_s: dict) -> None:
    """Each arm's first turn: its batch, compilation, what it saves (into saved), and the time of one dynamics pass
    (into dynamics_s). Its time goes to stderr as it ends: on a GPU, mostly the compilation."""
    for key, arm in arms_.items():
        began = time.perf_counter()
        with arm.turn():
            arm.fit_batch(x)
            if device.type == "cpu" and not arm.compiled:  # a CPU has no allocator peak: count what the step's tensors hold
                with PeakTensorBytes() as held:
                    arm.step(x)
                arm.step_peak_mib = held.peak / 2**20
            with arm.autocast():  # what the timed forward keeps, scaled to the preset's batch
                saved[key] = saved_activation_bytes(arm.forward, x[: arm.batch, :-1], x[: arm.batch, 1:]) / 2**20 * p["batch"] / arm.batch
                sync(device)
                start = time.perf_counter()  # before the timed rounds: whatever the pass leaves behind is in the step times
                measure(arm.model, x[:DYNAMICS_SEQUENCES, :-1])
                sync(device)
            dynamics_s[key] = time.perf_counter() - start
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in arm.model.modules()), "the dynamics pass left a hook"
        print(f"first turn of {' · '.join(key)}: {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)


def timed_rounds(arms_: dict, x: torch.Tensor, p: dict, device: torch.device, rounds: int, times: dict[object, list[float]]) -> None:
    """Seconds a step, appended to times as each arm's turn ends; each round starts one arm later."""
    keys = list(arms_)
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            arm = arms_[key]
            with arm.turn():
                arm.step(x)  # untimed: the allocator's heap is then this variant's, not the one before it's
                sync(device)
                start = time.perf_counter()
                for _ in range(p["steps"]):
                    arm.step(x)
                sync(device)
                times[key].append((time.perf_counter() - start) / p["steps"])
        print(f"round {r + 1} of {rounds} done", file=sys.stderr, flush=True)


def table(arms_: dict, tokens_per_s: dict, saved: dict, dyn_steps: dict, p: dict, peak: float, gpu: bool) -> None:
    """One mode's rows: each variant against `mha` run the same way."""
    memory = "peak GiB" if gpu else "step MiB"
    print(f"{'variant':<19} {'batch':>5} {'tokens/s':>9} {'vs mha':>7} {'middle half':>12} {'MFU':>6} {'saved MiB':>10} {'vs mha':>7} {'dyn pass':>9} {memory:>9}")
    for name, arm in arms_.items():
        rate = statistics.median(tokens_per_s[name])
        ratios = [variant / mha for mha, variant in zip(tokens_per_s["mha"], tokens_per_s[name])]  # round by round
        q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3  # one round: a run stopped early
        mfu = rate * flops_per_token(arm.model.cfg, arm.model.attention_cfg, p["seq_len"]) / peak
        mem = f" {arm.peak_gib:9.2f}" if gpu else f" {arm.step_peak_mib:9,.0f}" if arm.step_peak_mib is not None else f" {'—':>9}"
        print(f"{name:<19} {arm.batch:5d} {rate:9,.0f} {q2:7.3f} {q1:5.3f}–{q3:5.3f} {mfu:6.1%} {saved[name]:10,.0f} {saved[name] / saved['mha']:7.3f} {dyn_steps[name]:9.2f}{mem}")


if __name__ == "__main__":
    main()
