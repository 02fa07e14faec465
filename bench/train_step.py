"""Training-step throughput of every attention variant as a ratio to `mha`, measured side by side in one run.

    python bench/train_step.py                      # CPU preset: 4 layers, width 256, 8 heads, T 256, batch 8, fp32
    python bench/train_step.py --device cuda        # GPU preset: 12 layers, width 1024, 16 heads, T 2048, bf16

Memory: the activations autograd saves for backward (every device) and, on a GPU, the allocator's peak.
On a CPU the process keeps the memory a step frees, as `train.py` does there (mea.cpu_heap; --default-heap
measures glibc's defaults, which return it to the kernel and fault it in again at every step).
Rounds interleave the variants (mha, mha_gn, mea, ...) so that drift in the machine hits all alike, each round
starting one variant later, and each variant's timed steps follow one untimed step of its own. A variant's ratio
to `mha` is taken round by round, so that it compares steps timed seconds apart, and the table gives the median
of those ratios and their middle half (quartiles). Tokens/s is the median over rounds. Imports torch and
mea.models only, so it runs on a bare GPU machine.

The training dynamics (mea.models.dynamics) cost nothing on a training step: they are one extra forward pass at
eval steps, with hooks that live only for that pass. The last column gives that pass's time in training steps,
and the step times are measured after a pass on every model, so a hook left behind would show in them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import describe, matmul_peak, sync  # noqa: E402
from mea.cpu_heap import keep_freed_memory  # noqa: E402
from mea.models import LM, REGISTRY, ModelConfig  # noqa: E402
from mea.models.dynamics import DYNAMICS_SEQUENCES, measure  # noqa: E402
from mea.models.attention.diff import DiffConfig  # noqa: E402
from mea.models.attention.mea import MEAConfig  # noqa: E402

PRESETS = {
    "cpu": dict(dim=256, n_layers=4, n_heads=8, vocab=4096, seq_len=256, batch=8, rounds=7, steps=3),
    "cuda": dict(dim=1024, n_layers=12, n_heads=16, vocab=32768, seq_len=2048, batch=8, rounds=5, steps=10),
    "smoke": dict(dim=64, n_layers=2, n_heads=4, vocab=512, seq_len=64, batch=4, rounds=2, steps=1),  # does it run
}


def arms() -> dict[str, object]:
    arms = {name: cls.Config() for name, cls in REGISTRY.items()}
    arms["mea (einsum HLC)"] = MEAConfig(fold_hlc=False)
    arms["diff (paired heads)"] = DiffConfig(pair_heads=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", choices=list(PRESETS), help="model and batch size (default: the device's; smoke: a seconds-long check that it runs)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    parser.add_argument("--default-heap", action="store_true", help="on a CPU, leave glibc's heap settings as they are")
    args = parser.parse_args()
    device = torch.device(args.device)
    heap_kept = device.type == "cpu" and not args.default_heap and keep_freed_memory()
    p = PRESETS[args.preset or args.device]
    rounds = args.rounds or p["rounds"]
    if rounds < 2:
        parser.error(f"--rounds {rounds}: the ratios' quartiles need at least 2 rounds; pass --rounds 2 or more")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)

    models = {}
    for name, attention in arms().items():
        model = LM(ModelConfig(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], vocab_size=p["vocab"], max_seq_len=p["seq_len"]), attention).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as mea.train.optim builds it
        forward = torch.compile(model) if args.compile else model
        models[name] = (model, opt, forward)
    x = torch.randint(0, p["vocab"], (p["batch"], p["seq_len"] + 1), device=device)

    def step(name: str) -> None:
        model, opt, forward = models[name]
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            logits = forward(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peak_memory, saved = {}, {}
    for name in models:  # warm-up (and compilation)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step(name)
        sync(device)
        if device.type == "cuda":
            peak_memory[name] = torch.cuda.max_memory_allocated() / 2**30
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):  # what the timed forward keeps
            saved[name] = saved_activation_bytes(models[name][2], x[:, :-1]) / 2**20
    dynamics_steps = {}
    for name in models:  # before the timed rounds: whatever the pass leaves behind is in the step times
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            measure(models[name][0], x[:DYNAMICS_SEQUENCES, :-1])
        sync(device)
        dynamics_steps[name] = time.perf_counter() - start
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in models[name][0].modules()), "the dynamics pass left a hook"
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            step(name)  # untimed: the allocator's heap is then this variant's, not the one before it's
            sync(device)
            start = time.perf_counter()
            for _ in range(p["steps"]):
                step(name)
            sync(device)
            times[name].append((time.perf_counter() - start) / p["steps"])

    peak = matmul_peak(device, dtype)
    tokens = p["batch"] * p["seq_len"]
    print(f"device: {describe(device)} · torch {torch.__version__} · {dtype} · compile={args.compile}" + (" · freed memory kept" if heap_kept else ""))
    print(f"model: {p['n_layers']} layers, width {p['dim']}, {p['n_heads']} heads, vocab {p['vocab']}, T {p['seq_len']}, batch {p['batch']}; median of {rounds} rounds × {p['steps']} steps")
    print(f"measured matmul peak: {peak / 1e12:.2f} TFLOP/s")
    print(f"{'variant':<19} {'tokens/s':>9} {'vs mha':>7} {'middle half':>12} {'MFU':>6} {'saved MiB':>10} {'vs mha':>7} {'dyn pass':>9}" + (f" {'peak GiB':>9}" if peak_memory else ""))
    for name, ts in times.items():
        t = statistics.median(ts)
        ratios = [t_mha / t_variant for t_mha, t_variant in zip(times["mha"], ts)]
        q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        flops = models[name][0].flops_per_token(p["seq_len"]) * tokens
        mem = f" {peak_memory[name]:9.2f}" if peak_memory else ""
        print(f"{name:<19} {tokens / t:9,.0f} {q2:7.3f} {q1:5.3f}–{q3:5.3f} {flops / t / peak:6.1%} {saved[name]:10,.0f} {saved[name] / saved['mha']:7.3f} {dynamics_steps[name] / t:9.2f}{mem}")
    print("dyn pass: one dynamics pass (eval steps only), in training steps of that variant; no hook stays on the model")


if __name__ == "__main__":
    main()
