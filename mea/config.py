"""Typed configs of a training run (Hydra structured configs) and their validation before any compute.

The model and attention configs live beside their modules in `mea.models` (torch alone); the rest is here.
`register_configs` puts the schemas in Hydra's ConfigStore: `train_schema` types the whole run, and each
attention variant's config class is `schema/attention/<name>`, which `conf/attention/<name>.yaml` extends.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mea.models import REGISTRY, AttentionConfig, ModelConfig, check_layers, variant_class


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line that names the key and the fix."""


@dataclass
class DataConfig:
    name: str = "stdlib"
    kind: str = "stdlib"  # stdlib | files | hub
    source: str = "stdlib"  # files: a path, folder or glob; hub: a dataset id such as roneneldan/TinyStories
    hub_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    sample_by: str = "document"  # .txt files: one document per document | paragraph | line
    max_documents: int | None = None
    tokenizer: str = "bpe"  # bpe: train a byte-level BPE here; else a tokenizer.json or a local HF tokenizer folder
    vocab_size: int = 4096
    seq_len: int = 256
    val_share: float = 0.05
    seed: int = 1234
    on_bad_utf8: str = "skip"  # skip (and count) | fail
    shard_tokens: int = 1 << 27
    cache_dir: str = "${oc.env:MEA_CACHE,'~/.cache/mea'}/data"


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    grad_clip: float = 1.0


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying at the end


@dataclass
class TrainerConfig:
    max_steps: int = 300
    global_batch: int = 16  # sequences per optimizer step, over all ranks
    global_batch_tokens: int | None = None  # instead of global_batch: tokens per step (a multiple of data.seq_len)
    micro_batch: int | None = None  # per rank; None = global_batch / world size (no accumulation)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    compile: Any = "auto"  # auto (on for CUDA, off for CPU) | true | false; Any: OmegaConf 2.3 has no bool-or-str type
    cross_entropy: str = "auto"  # how the LM head's loss is computed (mea.models.loss): auto (chunked) | full | chunked | liger | cce
    activation_checkpointing: bool = False
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the run directory's latest checkpoint
    resume_from: str | None = None  # or from this checkpoint folder
    amend: list[str] = field(default_factory=list)  # identity keys this start may change on an existing run directory (recorded)
    init_from: str | None = None  # start from an exported model (mea-export, mea-compress): its weights, model and attention config
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    peak_tflops: float | None = None  # for MFU on GPU; None = known devices' dense bf16 peak
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    dynamics: bool = True  # at eval steps: per-layer stream and branch RMS, head norms, head mixing, attention entropy
    sample_prompt: str = "def "
    sample_tokens: int = 64


@dataclass
class LoggerConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "mea"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class DeepSpeedConfig:
    enabled: bool = False
    stage: int = 0  # ZeRO stage 0-3
    offload_optimizer: bool = False
    offload_params: bool = False  # stage 3 only


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run_dir: str = MISSING
    arm: str | None = None  # the name this run is compared under (default: attention.name), e.g. diff_nonorm

    @property
    def label(self) -> str:
        return self.arm or self.attention.name


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, cls in REGISTRY.items():
        cs.store(group="schema/attention", name=name, node=cls.Config)


CHOICES = {
    "data.kind": ("stdlib", "files", "hub"),
    "data.on_bad_utf8": ("skip", "fail"),
    "data.sample_by": ("document", "paragraph", "line"),
    "optim.name": ("adamw",),
    "scheduler.name": ("cosine", "wsd", "constant"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.precision": ("auto", "fp32", "bf16"),
    "trainer.compile": ("auto", True, False),
    "trainer.cross_entropy": ("auto", "full", "chunked", "liger", "cce"),
    "deepspeed.stage": (0, 1, 2, 3),
    "logger.mode": ("online", "offline", "disabled"),
}

POSITIVE = ("data.vocab_size", "data.seq_len", "data.shard_tokens", "trainer.max_steps", "trainer.global_batch", "trainer.keep_checkpoints", "optim.lr")


def validate(cfg: DictConfig | Any, only: str | None = None) -> None:
    """Raise ConfigError for the first setting that cannot work, before any data or model is touched.

    only="data" checks the data settings alone (for preparing shards, where no model is involved)."""
    select = lambda key: OmegaConf.select(cfg, key)  # noqa: E731
    wanted = lambda key: only is None or key.startswith(only + ".")  # noqa: E731
    for key, allowed in CHOICES.items():
        if wanted(key) and select(key) not in allowed:
            raise ConfigError(f"{key}={select(key)!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")
    for key in POSITIVE:
        if wanted(key) and not select(key) > 0:
            raise ConfigError(f"{key}={select(key)} must be positive")
    if not 0 < cfg.data.val_share < 1:
        raise ConfigError(f"data.val_share={cfg.data.val_share} must lie strictly between 0 and 1")
    if cfg.data.tokenizer == "bpe" and cfg.data.vocab_size < 257:
        raise ConfigError(f"data.vocab_size={cfg.data.vocab_size} cannot hold the 256 byte tokens and the end-of-document token; use at least 257")
    if only == "data":
        return
    try:
        check_layers(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.attention))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3, not deepspeed.stage=0; use deepspeed=zero2 or deepspeed=zero3_offload")
    if cfg.deepspeed.offload_params and cfg.deepspeed.stage != 3:
        raise ConfigError(f"deepspeed.offload_params needs ZeRO stage 3, not deepspeed.stage={cfg.deepspeed.stage}; use deepspeed=zero3_offload")
    tokens = cfg.trainer.global_batch_tokens
    if tokens is not None and (tokens <= 0 or tokens % cfg.data.seq_len):
        raise ConfigError(f"trainer.global_batch_tokens={tokens} is not a positive multiple of data.seq_len={cfg.data.seq_len}")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; lower one or raise the other")
    if cfg.model.vocab_size is not None and cfg.data.tokenizer == "bpe" and cfg.model.vocab_size < cfg.data.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than data.vocab_size={cfg.data.vocab_size}; token ids would fall outside the embedding — set model.vocab_size=null")


@dataclass(frozen=True)
class BatchPlan:
    """The trainer's batch settings worked out for a number of ranks."""

    global_batch: int  # sequences an optimizer step, over all ranks
    micro_batch: int  # sequences a rank runs forward and backward at once
    tokens_per_step: int


def batch_plan(cfg: TrainConfig | DictConfig, world_size: int = 1) -> BatchPlan:
    """The one place the batch arithmetic lives: trainer.global_batch (or global_batch_tokens, in sequences of
    data.seq_len) split into micro batches of trainer.micro_batch (default: the rank's whole share) on world_size
    ranks. The launcher, the sweep, the experiment and the trainer all ask it."""
    trainer, seq_len = cfg.trainer, cfg.data.seq_len
    global_batch = trainer.global_batch_tokens // seq_len if trainer.global_batch_tokens else trainer.global_batch
    micro = trainer.micro_batch or global_batch // world_size
    if micro < 1 or global_batch % (micro * world_size):
        raise ConfigError(f"trainer.global_batch={global_batch} is not a multiple of trainer.micro_batch={trainer.micro_batch or micro} × world size {world_size}; "
                          "change one of them")
    return BatchPlan(global_batch, micro, global_batch * seq_len)


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]) -> DictConfig:
    """The training config train.py would compose from these overrides, validated (outside a Hydra app). Each
    caller gets a copy of its own to change."""
    return copy.deepcopy(composed_once(tuple(overrides)))


@functools.cache
def composed_once(overrides: tuple[str, ...]) -> DictConfig:
    """Each list of overrides composed once a process: a sitting asks for a run's config at every stage that plans,
    checks or reports it, and a composition takes Hydra 0.1-0.3 s (the suite's smallest protocol composed 33 times
    a sitting, 16 of them new). A setting that fails is not kept: it raises each time it is asked for."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "run_dir=unused"])
    validate(cfg)
    return cfg


def load_config(path) -> TrainConfig:
    """A run directory's `config.yaml` back as a typed TrainConfig (the variant's own config class included)."""
    raw = OmegaConf.load(path)
    schema = OmegaConf.structured(TrainConfig)
    schema.attention = OmegaConf.structured(variant_class(raw.attention.name).Config)
    return OmegaConf.to_object(OmegaConf.merge(schema, raw))
