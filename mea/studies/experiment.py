"""`mea-experiment`: the paper's protocol as one resumable command — LR sweeps, LR laws, from-scratch runs at
each arm's predicted LR with several seeds, KV-cache compression with recovery, a second corpus, the report.

    mea-experiment sweeps/paper_small.yaml      # run it (again: every finished step is skipped)
    mea-experiment sweeps/paper_small.yaml --from-archive docs/results/paper_small/runs.tar.xz   # the report again, training nothing
    mea-experiment sweeps/paper_small.yaml --pack sitting.tar.xz          # a sitting stopped part way, its finished runs in one file
    mea-experiment sweeps/paper_small.yaml --resume-from sitting.tar.xz   # ... carried on from them on another machine
    mea-experiment sweeps/paper_gpu_small.yaml --plan --mfu 0.35 --gpu H100   # what a sitting costs, training nothing
    mea-experiment sweeps/paper_gpu_small.yaml --slurm -- hydra.launcher.partition=gpu   # every run a SLURM job (mea.studies.cluster)

Every number of the report comes from the runs this command makes; the report is written to `report`, its runs'
configs, summaries and metrics to `runs.tar.xz` in the folder beside it (mea.studies.archive).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mea.config import batch_plan
from mea.eval.perplexity import EVAL_WINDOWS, evaluate
from mea.models import LM, parameter_counts
from mea.models.attention.mha import MHAConfig
from mea.pretrained import load_pretrained
from mea.run_directory import write_synced
from mea.scaling.effects import check_factors, lr_bracket
from mea.scaling.fit import FitSettings, json_ready, lr_law, write_fit
from mea.scaling.laws import FitError
from mea.scaling.sweep import (
    SweepError,
    SweepSpec,
    SweepStopped,
    at_largest_size,
    best_by_arm,
    compose_run,
    launcher_settings,
    load_spec,
    not_diverged,
    read_results,
    sweep_runs,
)
from mea.studies.archive import pack, sitting_of_archive, unpack
from mea.studies.claims import check_claims
from mea.studies.cluster import SlurmRuns
from mea.studies.init_audit import REFERENCE, finding
from mea.studies.plan import Rates, plan, render
from mea.studies.protocol import LocalRuns
from mea.studies.report import Findings, check_previous_report, write_report
from mea.studies.trust import verified_lrs
from mea.tools.compare import compare
from mea.tools.compress import CONVERTIBLE, compress, parse_layers, write_compressed
from mea.tools.export import export
from mea.tools.kv_report import kv_bytes_per_token


@dataclass
class Target:
    name: str
    tokens: int
    model: str = "tiny"
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


@dataclass
class Compression:
    arm: str = "mea"
    kv_heads: list[int] = field(default_factory=lambda: [2])  # stored heads G per layer after conversion, one setting each
    layer_sets: dict[str, str] = field(default_factory=lambda: {"all": "all", "middle": "middle"})
    recover_share: float = 0.1  # continued pretraining, as a share of the target's tokens
    lr_scale: float = 0.3  # recovery LR as a share of the arm's LR
    warmup_share: float = 0.2  # of the recovery steps: fresh AdamW moments make the first full-LR steps large


@dataclass
class SecondCorpus:
    data: list[str] = field(default_factory=list)  # overrides of the data config for the repeat; none: no repeat
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    # tokens a run; 0: the target's. A small corpus repeats: up to about 4 passes repeated tokens are worth nearly
    # as much as fresh ones (Muennighoff et al. 2023, arXiv 2305.16264); beyond that the runs measure memorisation.
    tokens: int = 0


@dataclass
class LRBracket:
    """Each arm also trained at the target at its law's LR × these factors (the first seed; ×1 is its comparison
    run), extended one factor beyond an edge where the best lies there: how far the law's LR is from the arm's
    own optimum (mea.scaling.effects.lr_bracket). No factors: no bracket."""

    factors: list[float] = field(default_factory=list)
    arms: list[str] = field(default_factory=list)  # which arms; none: every arm
    # what the comparison's seeds train at: "law", each arm's law's LR; "verified", its bracket's best (the ×1 run
    # is then a bracket run of its own)
    train_at: str = "law"


@dataclass
class InitChecks:
    """Each arm also trained at the target at the LR its seeds train at, under each of these inits (the first
    seed, one run each): whether the default init handicapped it. No settings: no checks."""

    settings: dict[str, list[str]] = field(default_factory=dict)  # name -> overrides, e.g. {llama: [model.init.scheme=llama]}
    arms: list[str] = field(default_factory=list)  # which arms; none: every arm


STAGES = ("sweep", "stability", "target", "second_corpus", "lr_bracket", "init_check", "compression")
CORPUS_STAGE = {"main": "target", "second": "second_corpus"}  # the from-scratch seeds' stage on each corpus


@dataclass
class Resources:
    """What each run of a stage is given on a cluster: nodes × GPUs each; several ranks train under DeepSpeed."""

    nodes: int = 1
    gpus_per_node: int = 1
    deepspeed: str = "none"  # a conf/deepspeed preset (zero1, zero2, zero3) for runs of several GPUs

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Protocol:
    name: str
    sweep: SweepSpec
    target: Target
    compression: Compression = field(default_factory=Compression)
    second_corpus: SecondCorpus = field(default_factory=SecondCorpus)
    baseline: str = "mha"
    margin: float = 0.01
    stability_lr_max: float = 0.0  # the grid continued at the largest size up to here, to find where each arm fails to train
    previous_report: str = ""  # an earlier report of this protocol: its deltas are set beside the new ones
    lr_bracket: LRBracket = field(default_factory=LRBracket)
    init_checks: InitChecks = field(default_factory=InitChecks)
    init_audit: str = ""  # the init audit's spec: its finding, read from its runs, opens "What changed"
    claims: str = ""  # the study whose claims the report reads against the runs (a module of mea/studies/claims); none: no claims
    out: str = "runs/experiments/${name}"
    report: str = "docs/results/${name}.md"
    resources: dict[str, Resources] = field(default_factory=dict)  # stage (STAGES) -> what each of its runs is given on a cluster; default one GPU
    spec: str = ""  # the file it was read from, for the report's command line

    def resources_of(self, stage: str) -> Resources:
        return self.resources.get(stage, Resources())


def load_protocol(path: Path) -> Protocol:
    if not path.is_file():
        raise SweepError(f"{path} does not exist; give an experiment spec such as sweeps/paper_small.yaml")
    try:
        raw = OmegaConf.load(path)
        raw.sweep.name = raw.get("name")
        raw.sweep.out = f"{raw.get('out', f'runs/experiments/{raw.name}')}/sweep"
        raw.sweep.tags = ["stage:sweep"]
        raw.spec = str(path)
        defaults = OmegaConf.structured(Protocol)
        if OmegaConf.select(raw, "compression.layer_sets") is not None:  # the spec's sets replace the default ones, not join them
            defaults.compression.layer_sets = {}
        return OmegaConf.to_object(OmegaConf.merge(defaults, raw))
    except OmegaConfBaseException as e:
        raise SweepError(f"{path}: {str(e).splitlines()[0]}; sweeps/paper_small.yaml shows every setting a spec takes") from None


def target_overrides(p: Protocol, arm: str, lr: float, seed: int, data: list[str], tokens: int, stage: str = "target") -> list[str]:
    """One run at the target: W&B groups every run of the sitting under the experiment's name, tagged with its stage
    (and by the trainer with its arm, `variant:<arm>`), so the protocol can be followed there while it runs."""
    base = [f"model={p.target.model}", *p.sweep.overrides, *p.target.overrides, f"model.name={p.target.name}", *p.sweep.arm_overrides()[arm], f"arm={arm}", *data]
    cfg = compose_run(base)
    steps = max(1, math.ceil(tokens / batch_plan(cfg).tokens_per_step))
    return [*base, f"optim.lr={lr:.6g}", f"trainer.seed={seed}", f"trainer.max_steps={steps}", f"trainer.eval_every={max(1, steps // 10)}",
            f"logger.group={p.name}", f"logger.tags=[stage:{stage}]"]


def seed_runs(p: Protocol, root: Path, arm: str, lr: float, seeds: list[int], data: list[str], tokens: int, stage: str) -> dict[Path, list[str]]:
    """One from-scratch run of the arm per seed, in root/s<seed>: each one's directory and overrides."""
    return {root / f"s{seed}": target_overrides(p, arm, lr, seed, data, tokens, stage) for seed in seeds}


def train_seeds(runs: LocalRuns, p: Protocol, root: Path, arm: str, lr: float, seeds: list[int], data: list[str], tokens: int, stage: str) -> list[Path]:
    """One from-scratch run of the arm per seed, in root/s<seed>; their directories."""
    seeds_of_arm = seed_runs(p, root, arm, lr, seeds, data, tokens, stage)
    for run_dir, overrides in seeds_of_arm.items():
        runs.train(run_dir, overrides)
    return list(seeds_of_arm)


def corpora(p: Protocol) -> dict[str, tuple[list[str], list[int], int]]:
    """Each corpus the seeds are trained on: its data overrides, seeds and token budget."""
    second = p.second_corpus
    return {"main": ([], p.target.seeds, p.target.tokens)} | ({"second": (second.data, second.seeds, second.tokens or p.target.tokens)} if second.data else {})


def target_runs(p: Protocol, out: Path, lrs: dict[str, dict]) -> dict[Path, list[str]]:
    """The runs at the target that the chosen LRs settle: every arm's seeds on every corpus and its init checks."""
    runs = {}
    for arm, chosen in lrs.items():
        for corpus, (data, seeds, tokens) in corpora(p).items():
            runs |= seed_runs(p, out / f"compare-{corpus}" / arm, arm, chosen["lr"], seeds, data, tokens, CORPUS_STAGE[corpus])
    return runs | dict(init_check_runs(p, out, lrs).values())


def target_size(p: Protocol) -> float:
    cfg = OmegaConf.to_object(compose_run([f"model={p.target.model}", *p.sweep.overrides, *p.target.overrides]).model)
    cfg.vocab_size = 8  # non-embedding parameters do not depend on it
    return float(parameter_counts(cfg, MHAConfig())["non_embedding"])


def laws_by_validation_loss(results: Path, n_target: float, margin: float) -> dict:
    """The sweep's LR laws fitted to the final validation loss instead of the training loss (to check that the
    loss picking the LR does not move the optimum); the reason where none fits."""
    try:
        return json_ready(lr_law(results, FitSettings(loss_col="final_val_loss", targets=(f"{n_target:g}",), margin=margin)))
    except FitError as e:
        return {"groups": {}, "messages": [str(e)]}


def chosen_lrs(p: Protocol, fit: dict, results: Path) -> dict[str, dict]:
    """Each arm's LR for the target: its law's prediction, else its best swept LR at the largest size (said so)."""
    rows = not_diverged(read_results(results))
    out = {}
    for arm in p.sweep.arm_overrides():
        law = fit["groups"].get(arm, {})
        if "predictions" in law:
            pred = next(iter(law["predictions"].values()))  # the one target: this protocol's target size
            out[arm] = {"lr": pred["lr"], "ci": pred["lr_ci"], "source": pred["law"]}
        else:
            mine = [r for r in rows if r["variant"] == arm]
            if not mine:
                raise SweepError(f"arm {arm}: every sweep run diverged and no law was fitted; lower the LR grid")
            best = best_by_arm(at_largest_size(mine))[arm]
            out[arm] = {"lr": float(best["lr"]), "ci": None, "source": f"no law ({law.get('message', 'no optimum')}); best swept LR at the largest size"}
    return out


def lr_brackets(runs: LocalRuns, p: Protocol, out: Path, lrs: dict[str, dict]) -> dict[str, dict]:
    """Each bracketed arm's runs at the target (the first seed): the law's LR, the factors run, their final
    validation losses and their reading, extended once past an edge where the best lay there (the arms'
    extensions side by side)."""
    seed = p.target.seeds[0]
    readings = {arm: bracket_reading(runs, p, out, arm, lrs[arm]["lr"], sorted(p.lr_bracket.factors), seed) for arm in bracketed(p, lrs)}
    extended = {arm: sorted([*r["factors"], r["bracket"].next_factor]) for arm, r in readings.items() if r["bracket"].extend is not None}
    runs.side_by_side(dict(bracket_run(p, out, arm, lrs[arm]["lr"], factor, seed) for arm, factors in extended.items() for factor in factors))
    return readings | {arm: bracket_reading(runs, p, out, arm, lrs[arm]["lr"], factors, seed) for arm, factors in extended.items()}


def bracket_reading(runs: LocalRuns, p: Protocol, out: Path, arm: str, law_lr: float, factors: list[float], seed: int) -> dict:
    losses = [bracket_loss(runs, p, out, arm, law_lr, factor, seed) for factor in factors]
    return {"law_lr": law_lr, "factors": factors, "losses": losses, "bracket": lr_bracket(law_lr, factors, losses)}


def bracket_run(p: Protocol, out: Path, arm: str, law_lr: float, factor: float, seed: int) -> tuple[Path, list[str]]:
    """The run at law_lr × factor: its directory and overrides; ×1 is the comparison's own run when the comparison
    trains at the law's LR."""
    at_law = factor == 1 and p.lr_bracket.train_at == "law"
    run_dir = out / "compare-main" / arm / f"s{seed}" if at_law else out / "lr-bracket" / arm / f"x{factor:g}"
    return run_dir, target_overrides(p, arm, law_lr * factor, seed, [], p.target.tokens, stage="target" if at_law else "lr_bracket")


def checked_arms(listed: list[str], lrs: dict[str, dict], on: bool) -> list[str]:
    """The arms a check at the target covers: those its spec lists, else every arm; none where it is off."""
    return (listed or list(lrs)) if on else []


def bracketed(p: Protocol, lrs: dict[str, dict]) -> list[str]:
    return checked_arms(p.lr_bracket.arms, lrs, bool(p.lr_bracket.factors))


def first_bracket_runs(p: Protocol, out: Path, lrs: dict[str, dict]) -> dict[Path, list[str]]:
    """Every bracketed arm's runs at the spec's factors, before any extension."""
    return dict(bracket_run(p, out, arm, lrs[arm]["lr"], factor, p.target.seeds[0]) for arm in bracketed(p, lrs) for factor in p.lr_bracket.factors)


def bracket_loss(runs: LocalRuns, p: Protocol, out: Path, arm: str, law_lr: float, factor: float, seed: int) -> float:
    """The final validation loss at law_lr × factor (NaN if it diverged)."""
    summary = runs.train(*bracket_run(p, out, arm, law_lr, factor, seed))
    return math.nan if summary.get("diverged") else summary["final_val_loss"]


def init_check_runs(p: Protocol, out: Path, lrs: dict[str, dict]) -> dict[tuple[str, str], tuple[Path, list[str]]]:
    """(arm, init setting) -> the directory and overrides of its one run at the target, at the arm's chosen LR."""
    seed = p.target.seeds[0]
    return {(arm, name): (out / "init-check" / name / arm, [*target_overrides(p, arm, lrs[arm]["lr"], seed, [], p.target.tokens, stage="init_check"), *overrides])
            for arm in checked_arms(p.init_checks.arms, lrs, bool(p.init_checks.settings)) for name, overrides in p.init_checks.settings.items()}


def init_checks(runs: LocalRuns, p: Protocol, out: Path, lrs: dict[str, dict]) -> dict[str, dict[str, float]]:
    """arm -> init setting -> the final validation loss of one run at the target (NaN if it diverged)."""
    checks = {}
    for (arm, name), run in init_check_runs(p, out, lrs).items():
        summary = runs.train(*run)
        checks.setdefault(arm, {})[name] = math.nan if summary.get("diverged") else summary["final_val_loss"]
    return checks


@torch.no_grad()
def decode_ms(model: LM, batch: int = 4, prompt: int = 256, tokens: int = 32) -> float:
    """Milliseconds per generated token after a prompt, KV-cached."""
    ids = torch.randint(0, model.cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    model.generate(ids[:, :8], 2, temperature=0)
    start = time.perf_counter()
    model.generate(ids, tokens, temperature=0)
    return (time.perf_counter() - start) / tokens * 1e3


def run_compression(runs: LocalRuns, p: Protocol, out: Path, source_run: Path, common: list[str], lr: float) -> list[dict]:
    """Convert the target-size run to G stored heads per layer set, recover by continued pretraining, measure.

    The uncompressed model gets the same continued pretraining as a control: rewarming the LR after the end of a
    schedule costs loss by itself, and further tokens gain some, so recovery is read against that control.
    """
    readings = out / "rows.json"  # kept (and archived): they are read from checkpoints, which a report's archive does not hold
    key = {"compression": asdict(p.compression), "lr": f"{lr:.6g}", "source": str(source_run)}  # the LR as the runs are given it, not its last digits
    if readings.is_file():
        kept = json.loads(readings.read_text())
        if runs.archive is not None or kept["key"] | {"lr": f"{float(kept['key']['lr']):.6g}"} == key:  # from an archive: what it recorded is read, not remade
            return kept["rows"]
    if runs.archive is not None:
        raise SweepError(f"{runs.archive} has no compression readings (compression/rows.json): it was not written by mea-experiment; give the runs.tar.xz beside a published report")
    data = [o for o in common if o.startswith("data")]
    exported = out / "exported"
    if not (exported / "config.json").is_file():
        export(source_run, exported)
    full, _ = load_pretrained(exported)
    full_val = evaluate(exported, data)["val_loss"]
    recover_steps = max(1, round(p.compression.recover_share * json.loads((source_run / "summary.json").read_text())["steps"]))
    global_batch = OmegaConf.load(source_run / "config.yaml").trainer.global_batch
    same_windows = f"trainer.eval_batches={max(1, EVAL_WINDOWS // global_batch)}"  # the recovery curve on mea-eval's windows

    def recover(name: str, folder: Path) -> float:
        runs.train(out / f"{name}-recover", [*common, "+experiment=recover", f"trainer.init_from={folder}", f"trainer.max_steps={recover_steps}",
                                        f"trainer.eval_every={max(1, recover_steps // 5)}", same_windows, f"optim.lr={lr * p.compression.lr_scale:.6g}", "trainer.checkpoint_every=0",
                                        f"arm={p.compression.arm}-{name}", f"scheduler.warmup_steps={max(1, round(p.compression.warmup_share * recover_steps))}",
                                             f"logger.group={p.name}", "logger.tags=[stage:compression]"])
        recovered = out / f"{name}-recovered"
        if not (recovered / "config.json").is_file():
            export(out / f"{name}-recover", recovered)
        return evaluate(recovered, data)["val_loss"]

    rows = [{"setting": "uncompressed (control: the same continued pretraining)", "val_after_conversion": full_val, "val_after_recovery": recover("uncompressed", exported),
             "kv_bytes_per_token": kv_bytes_per_token(full.cfg, 2), "decode_ms": decode_ms(full), "recover_steps": recover_steps, "run": "uncompressed-recover"}]
    for G in p.compression.kv_heads:
        for name, layers in p.compression.layer_sets.items():
            folder = out / f"kv{G}-{name}"
            if not (folder / "config.json").is_file():
                model, report = compress(full, G, None if layers == "all" else parse_layers(layers, full.cfg.n_layers))
                write_compressed(model, report, exported, folder)
            compressed, _ = load_pretrained(folder)
            rows.append({"setting": f"G = {G} of {full.cfg.n_heads}, {name} layers", "val_after_conversion": evaluate(folder, data)["val_loss"],
                         "val_after_recovery": recover(f"kv{G}-{name}", folder), "kv_bytes_per_token": kv_bytes_per_token(compressed.cfg, 2),
                         "decode_ms": decode_ms(compressed), "recover_steps": recover_steps, "run": f"kv{G}-{name}-recover"})
    write_synced(readings, json.dumps({"key": key, "rows": rows}, indent=1))
    return rows


def stability_spec(p: Protocol, out: Path) -> SweepSpec | None:
    """The LR grid continued past lr_max, at the same spacing, at the largest size only: where each arm fails to train.
    Kept apart from the sweep so that the LR laws are fitted on the same grid for every arm. None: no probe."""
    s = p.sweep
    step = (math.log10(s.lr_max) - math.log10(s.lr_min)) / (s.lr_points - 1)
    n = round((math.log10(p.stability_lr_max) - math.log10(s.lr_max)) / step) if p.stability_lr_max > s.lr_max else 0
    if n < 1:
        return None
    return replace(s, sizes=[s.sizes[-1]], lr_min=s.lr_max * 10**step, lr_max=s.lr_max * 10 ** (n * step), lr_points=n, out=str(out / "stability"),
                   tags=["stage:stability"])


def stage_runs(p: Protocol, out: Path, lrs: dict[str, dict] | None = None) -> dict[str, dict[Path, list[str]]]:
    """Every run of a sitting by stage (STAGES): its folder and overrides. Before the sweep is fitted (lrs=None) each
    arm stands at the grid's top LR: an LR changes a run's identity, not its folder or its cost."""
    lrs = lrs or {arm: {"lr": p.sweep.lr_max} for arm in p.sweep.arm_overrides()}
    stages = {"sweep": sweep_runs(p.sweep), "stability": sweep_runs(probe) if (probe := stability_spec(p, out)) else {}}
    for corpus, (data, seeds, tokens) in corpora(p).items():
        stage = CORPUS_STAGE[corpus]
        stages[stage] = {run: o for arm, chosen in lrs.items() for run, o in seed_runs(p, out / f"compare-{corpus}" / arm, arm, chosen["lr"], seeds, data, tokens, stage).items()}
    stages["lr_bracket"] = {run: o for run, o in first_bracket_runs(p, out, lrs).items() if run not in stages["target"]}
    stages["init_check"] = dict(init_check_runs(p, out, lrs).values())
    # the recovery runs as they cost: the target's model at the recovery's share of its tokens (their weights come from the conversion)
    arm, recover = p.compression.arm, round(p.compression.recover_share * p.target.tokens)
    settings = ["uncompressed", *(f"kv{g}-{name}" for g in p.compression.kv_heads for name in p.compression.layer_sets)]
    stages["compression"] = {out / "compression" / f"{name}-recover": target_overrides(p, arm, lrs[arm]["lr"] * p.compression.lr_scale, p.target.seeds[0], [], recover,
                                                                                             "compression") for name in settings}
    return stages


def check(p: Protocol) -> None:
    """The spec's files, token budgets and compression settings against the target model, before any compute."""
    if p.target.tokens <= 0:
        raise SweepError(f"target.tokens={p.target.tokens}; give the from-scratch runs a positive token budget")
    if p.second_corpus.tokens < 0:
        raise SweepError(f"second_corpus.tokens={p.second_corpus.tokens}; give a positive token budget, or 0 for the target's")
    for key in ("previous_report", "init_audit"):
        if getattr(p, key) and not Path(getattr(p, key)).is_file():
            raise SweepError(f"{key}={getattr(p, key)} does not exist; give an existing file or leave {key} out")
    if p.previous_report:
        check_previous_report(Path(p.previous_report))
    if why := check_claims(p.claims):
        raise SweepError(why)
    arms = p.sweep.arm_overrides()
    if p.baseline not in arms:
        raise SweepError(f"baseline={p.baseline} is not one of the arms ({', '.join(arms)}); name the arm the others are compared with")
    if p.lr_bracket.factors:
        try:
            check_factors(p.lr_bracket.factors)
        except FitError as e:
            raise SweepError(f"lr_bracket.{e}") from None
    for key, named in (("lr_bracket.arms", p.lr_bracket.arms), ("init_checks.arms", p.init_checks.arms)):
        if unknown := [arm for arm in named if arm not in arms]:
            raise SweepError(f"{key}: {', '.join(unknown)} is not one of the arms ({', '.join(arms)})")
    if p.lr_bracket.train_at not in ("law", "verified"):
        raise SweepError(f"lr_bracket.train_at={p.lr_bracket.train_at}; choose law (each arm's law's LR) or verified (its bracket's best)")
    if p.lr_bracket.train_at == "verified" and not p.lr_bracket.factors:
        raise SweepError("lr_bracket.train_at=verified needs lr_bracket.factors (e.g. [0.5, 1, 2]): the verified LR is the bracket's best")
    for name, overrides in p.init_checks.settings.items():
        try:
            compose_run([f"model={p.target.model}", *p.sweep.overrides, *p.target.overrides, *overrides])
        except SweepError as e:
            raise SweepError(f"init_checks.settings.{name}: {e}") from None
    for stage, given in p.resources.items():
        if stage not in STAGES:
            raise SweepError(f"resources.{stage}: not a stage; the stages are {', '.join(STAGES)}")
        if given.nodes < 1 or given.gpus_per_node < 1:
            raise SweepError(f"resources.{stage}: nodes={given.nodes}, gpus_per_node={given.gpus_per_node}; give each run at least one node and one GPU")
        if given.gpus > 1 and given.deepspeed == "none":
            raise SweepError(f"resources.{stage}: {given.gpus} GPUs a run train under DeepSpeed; give deepspeed: zero1, zero2 or zero3")
    c = p.compression
    if c.arm not in arms:
        raise SweepError(f"compression.arm={c.arm} is not one of the arms ({', '.join(arms)})")
    cfg = compose_run([f"model={p.target.model}", *p.sweep.overrides, *p.target.overrides, *arms[c.arm]])
    if cfg.attention.name not in CONVERTIBLE:
        raise SweepError(f"compression.arm={c.arm} is attention={cfg.attention.name}; conversion to stored heads takes an mha or mea arm")
    if not all(1 <= g < cfg.model.n_heads for g in c.kv_heads):
        raise SweepError(f"compression.kv_heads={list(c.kv_heads)}: each must be from 1 to {cfg.model.n_heads - 1}, below the target's {cfg.model.n_heads} heads")


def run(p: Protocol, archive: Path | None = None, resume_from: Path | None = None, cluster: list[str] | None = None, poll_s: float = 30.0) -> Path:
    """The protocol, resumed where it stopped (from an archive's finished runs, if given one), its runs on this
    machine or, given the launcher settings of a cluster, as SLURM jobs (every stage's shape checked before the
    first); from an archive, the report made again from its runs alone."""
    started = time.perf_counter()
    out = Path(p.out)
    check(p)
    for given in (archive, resume_from):
        if given is not None:
            unpack(given, out)
    if cluster is None:
        runs = LocalRuns(archive)
    else:
        runs = SlurmRuns(p.name, out, p.resources_of, cluster, poll_s)
        runs.check_shapes(stage_runs(p, out))
    results = runs.sweep(p.sweep)
    stability = runs.sweep(probe) if (probe := stability_spec(p, out)) else None

    n_target = target_size(p)
    fitted = lr_law(results, FitSettings(targets=(f"{n_target:g}",), margin=p.margin))
    write_fit(fitted, out / "fit", out / "lr")
    fit = json_ready(fitted)
    fit_val = laws_by_validation_loss(results, n_target, p.margin)
    lrs = chosen_lrs(p, fit, results)
    # the runs the laws' LRs settle are trained side by side first; the readings below then find them finished
    runs.side_by_side(first_bracket_runs(p, out, lrs) | (target_runs(p, out, lrs) if p.lr_bracket.train_at == "law" else {}))
    brackets = lr_brackets(runs, p, out, lrs)
    if p.lr_bracket.train_at == "verified":
        lrs = verified_lrs(lrs, brackets)
    runs.side_by_side(target_runs(p, out, lrs))
    comparisons = {}
    for corpus, (data, seeds, tokens) in corpora(p).items():
        dirs = [d for arm, chosen in lrs.items() for d in train_seeds(runs, p, out / f"compare-{corpus}" / arm, arm, chosen["lr"], seeds, data, tokens,
                                                                          CORPUS_STAGE[corpus])]
        comparisons[corpus] = compare(dirs, out / f"report-{corpus}", p.baseline if p.baseline in lrs else None, results if corpus == "main" else None)
    inits = init_checks(runs, p, out, lrs)
    source = out / "compare-main" / p.compression.arm / f"s{p.target.seeds[0]}"
    compression = run_compression(runs, p, out / "compression", source, [*p.sweep.overrides, *p.target.overrides], lrs[p.compression.arm]["lr"])
    findings = Findings(fit, fit_val, lrs, comparisons, brackets, inits, compression, results, stability, n_target)
    report = Path(p.report)
    if archive is not None:
        return write_report(p, findings, sitting_of_archive(out, archive), report)
    sitting = made_now(p, time.perf_counter() - started)
    write_synced(out / "made.json", json.dumps(sitting, indent=1))
    write_report(p, findings, sitting, report)
    pack(out, report.with_suffix("") / "runs.tar.xz")
    return report


def pack_sitting(p: Protocol, archive: Path) -> Path:
    """The finished runs of a sitting stopped part way, for --resume-from on another machine (a run stopped mid-way
    is left out: its checkpoint does not travel, so it starts again there)."""
    check(p)
    if not any(Path(p.out).rglob("summary.json")):
        raise SweepError(f"{p.out} holds no finished run to pack; run `mea-experiment <spec>` first")
    return pack(Path(p.out), archive)


def made_now(p: Protocol, wall_s: float) -> dict:
    """Where and when this sitting made the report, and what it read from outside its runs."""
    return {"date": time.strftime("%Y-%m-%d"), "device": f"{platform.machine()}, {os.cpu_count()} cores", "machine": platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "wall_s": wall_s, "init_audit": finding(load_spec(Path(p.init_audit)), REFERENCE) if p.init_audit else None}


def cost_plan(p: Protocol, rates: Rates) -> str:
    """The sitting's cost by stage on the GPUs its resources ask for (mea.studies.plan); each stage's batch is checked
    against its runs' ranks on the way, so a shape the spec cannot train is refused before anything is submitted."""
    check(p)
    costs = plan(stage_runs(p, Path(p.out)), p.resources_of, rates)
    return f"# {p.name}: the cost of a sitting ({p.spec})\n\n" + render(costs, p.resources_of, rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mea-experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="With --slurm, after --: hydra.launcher.KEY=VALUE settings (partition, account, qos, constraint, timeout_min, ...).")
    parser.add_argument("spec", type=Path)
    parser.add_argument("--slurm", action="store_true", help="every run a SLURM job, submitted stage by stage and followed from here (mea.studies.cluster)")
    parser.add_argument("--poll-seconds", type=float, default=30.0, help="--slurm: how often the queue is read")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from-archive", type=Path, metavar="RUNS_TAR_XZ", help="make the report again from a published report's runs.tar.xz alone, training nothing")
    source.add_argument("--pack", type=Path, metavar="RUNS_TAR_XZ", help="write the sitting's finished runs so far to one file, training nothing (to carry on elsewhere with --resume-from)")
    source.add_argument("--resume-from", type=Path, metavar="RUNS_TAR_XZ",
                        help="start from an archive's finished runs (--pack's, or a report's) in an empty run folder, and train what the spec still lacks")
    source.add_argument("--plan", action="store_true", help="print what the sitting costs by stage (runs, tokens, FLOPs, GPU-hours, wall time), training nothing")
    rate = parser.add_argument_group("the rate --plan costs at: a measured throughput table, or a stated MFU with the card")
    rate.add_argument("--throughput", type=Path, metavar="JSON", help="`make gpu-check`'s table (runs/gpu-check/<card>-<date>.json)")
    rate.add_argument("--mfu", type=float, help="the share of the card's peak a run reaches")
    rate.add_argument("--gpu", help="the card, for its peak (H100, H200, A100)")
    rate.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, where --gpu does not know it")
    try:
        argv, settings = launcher_settings(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        if args.slurm and (args.from_archive or args.pack or args.plan):
            raise SweepError("--slurm trains the sitting's runs on a cluster; --from-archive, --pack and --plan train nothing: give one or the other")
        if settings and not args.slurm:
            raise SweepError(f"{settings[0]}: launcher settings after -- go with --slurm")
        protocol_spec = load_protocol(args.spec)
        if args.plan:
            print(cost_plan(protocol_spec, rates_of(args)), end="")
            return
        cluster = settings if args.slurm else None
        path = pack_sitting(protocol_spec, args.pack) if args.pack else run(protocol_spec, args.from_archive, args.resume_from, cluster, args.poll_seconds)
    except SweepStopped as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
    except (SweepError, FitError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path} ({platform.node()})")


def rates_of(args: argparse.Namespace) -> Rates:
    if args.throughput is not None:
        return Rates.from_table(args.throughput)
    if args.mfu is not None:
        return Rates.from_mfu(args.mfu, args.gpu, args.peak_tflops)
    raise SweepError("--plan needs a rate: --throughput runs/gpu-check/<card>-<date>.json (`make gpu-check` on your GPUs), or --mfu 0.35 --gpu H100")


if __name__ == "__main__":
    main()
