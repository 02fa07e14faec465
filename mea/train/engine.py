"""How a model is trained across processes: plain PyTorch on one device, or DeepSpeed ZeRO.

The loop sees one interface, `Engine`: `train_step(x, y)` runs the micro-batches of one optimizer step and
returns the loss and the gradient norm; `save(folder)` and `load(folder)` write and read the full training
state; leaving `with engine:` releases what the engine holds, so that the next run of a multirun in the same
process starts with the memory this one had. DeepSpeed's JSON config is generated here from the Hydra config, so there is one source of truth.
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from mea import distributed
from mea.config import ConfigError, TrainConfig
from mea.models.transformer import Block

from .errors import TrainingError
from .optim import build_optimizer, build_scheduler

DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size, in elements


def compiles(setting, device: torch.device) -> bool:
    """trainer.compile: auto is on for a GPU and off for a CPU, where at these sizes compiling costs more than a run
    saves (BENCHMARKS.md); true and false are themselves."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


class Engine:
    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, micro_batch: int):
        self.model, self.cfg, self.device, self.micro_batch = model, cfg, device, micro_batch
        self.compiled = compiles(cfg.trainer.compile, device)
        # bf16 matmuls under autocast on either device: on a CPU the same mixed-precision path a GPU runs
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.trainer.precision == "bf16" else nullcontext()

    def micro_batches(self, x: torch.Tensor, y: torch.Tensor):
        for xm, ym in zip(x.split(self.micro_batch), y.split(self.micro_batch)):
            yield xm.to(self.device, non_blocking=True), ym.to(self.device, non_blocking=True)

    def full_parameters(self):
        """A context in which self.model's parameters hold their full values (ZeRO-3 gathers its partitions)."""
        return nullcontext()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release what outlives the last reference to the engine; the plain engine holds nothing such."""


class PlainEngine(Engine):
    """One process, one device: AdamW, the lr schedule, clipping and gradient accumulation by hand."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, micro_batch: int):
        super().__init__(model, cfg, device, micro_batch)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, cfg.trainer.max_steps)
        self.forward = torch.compile(model, fullgraph=True) if self.compiled else model  # a graph break is an error, not a slow path

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Loss and gradient norm of the step; a non-finite loss leaves the weights and the optimizer untouched."""
        accumulation = math.ceil(len(x) / self.micro_batch)
        losses = []
        for xm, ym in self.micro_batches(x, y):
            with self.autocast:
                loss = self.forward(xm, ym)
            (loss / accumulation).backward()
            losses.append(loss.detach())
        if not distributed.all_finite(losses):
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan"), float("nan")
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip).item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean().item(), grad_norm

    def save(self, folder: Path) -> None:
        save_model(self.model, str(folder / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        load_model(self.model, str(folder / "model.safetensors"), device=str(self.device))
        state = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def deepspeed_config(cfg: TrainConfig, micro_batch: int, world_size: int, n_params: int) -> dict:
    """DeepSpeed's JSON, derived from the Hydra config. The optimizer stays torch's AdamW (built by mea with
    its weight-decay groups) and is handed to DeepSpeed as a client optimizer; with the optimizer offloaded it
    runs on the CPU copies as torch's fused CPU kernel, so that every path steps with the same AdamW.

    The gradient bucket is no larger than the model (n_params elements): ZeRO-3 allocates the whole bucket up front,
    and DeepSpeed's default of 5e8 elements is 1.9 GB in fp32, whatever the model. DeepSpeed reduces a bucket when
    the next gradient would overflow it, and all of a model's gradients fit one of its size, so the reductions are
    those of the default."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.stage, "reduce_bucket_size": min(DEEPSPEED_REDUCE_BUCKET, n_params)}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": cfg.trainer.global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.trainer.global_batch // (micro_batch * world_size),
        "gradient_clipping": cfg.optim.grad_clip if ds.stage else 0.0,  # without ZeRO the engine clips, as the plain engine does
        "zero_optimization": zero,
        # bf16 is torch autocast over fp32 weights, as the plain engine runs it. DeepSpeed's own `bf16` block would cast
        # the whole module to bf16 (HLC, THA's mixing, DIFF's λ, the head norms' scales), and its autocast reduces
        # Linear gradients in bf16 unless told otherwise: no module is, so the arithmetic is the plain engine's.
        "torch_autocast": {"enabled": cfg.trainer.precision == "bf16", "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # else an offloaded optimizer must be DeepSpeed's own CPU Adam
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stage 0-3 (with CPU offload options) over however many processes torchrun started."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, micro_batch: int, world_size: int):
        super().__init__(model, cfg, device, micro_batch)
        import deepspeed

        self.ds_config = deepspeed_config(cfg, micro_batch, world_size, model.parameter_counts()["total"])
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.trainer.max_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self.engine.checkpoint_engine = weights_only_checkpoint_engine(self.engine.checkpoint_engine)
        if self.compiled:
            self.engine.compile()

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Loss and gradient norm of the step. A non-finite loss on any rank skips the step as the plain engine does:
        its backward carries NaN into every gradient, so that DeepSpeed's own overflow check (ZeRO 1-3; at stage 0
        the optimizer's `overflow` flag, set here) steps neither the optimizer nor the schedule and clears the
        gradients, on every rank. The forward runs under DeepSpeed's torch autocast (deepspeed_config)."""
        losses, grad_norm, finite = [], None, True
        for xm, ym in self.micro_batches(x, y):
            loss = self.engine(xm, ym)
            losses.append(loss.detach().float())
            self.engine.backward(loss * torch.where(loss.detach().isfinite(), 1.0, math.nan))  # no wait on the device
            if self.engine.is_gradient_accumulation_boundary():
                finite = distributed.all_finite(losses)
                if self.cfg.deepspeed.stage == 0:  # without ZeRO, DeepSpeed neither reports the norm nor skips a step
                    grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip).item()
                    self.engine.optimizer.overflow = not finite
                    if not finite:
                        self.engine.optimizer.zero_grad(set_to_none=True)
            self.engine.step()
        if not self.engine.was_step_applied():  # skipped: a non-finite loss, or a gradient ZeRO found non-finite
            return math.nan, math.nan
        if not finite:
            raise TrainingError("DeepSpeed applied a step whose loss was not finite: its overflow check differs from the one mea is tested with; "
                                "install the deepspeed version that pyproject.toml names")
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        return distributed.mean(torch.stack(losses).mean().item()), float(grad_norm)

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)
        weights = self.consolidated_state()  # a collective under ZeRO-3: every rank takes part
        if distributed.rank() == 0:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, str(folder / "model.safetensors"))

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=True)
        if path is None:
            raise ConfigError(f"{folder} holds no DeepSpeed checkpoint; it was written without DeepSpeed — resume with the same deepspeed setting")

    def close(self) -> None:
        """DeepSpeed's own release. Its gradient hooks hold the optimizer, which holds the model, in a cycle through
        autograd's C++ nodes that Python's collector cannot see: without it every run of a multirun left its model,
        gradients and optimizer state in the process (tests/test_trainer.py), on a GPU its memory too."""
        self.engine.destroy()
        if self.cfg.deepspeed.stage == 3:
            release_zero3_references(self.engine.module)

    def full_parameters(self):
        if self.cfg.deepspeed.stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()))  # a collective: every rank enters

    def consolidated_state(self) -> dict[str, torch.Tensor]:
        """The full fp32 weights, gathered from every rank's partition (all ranks must call this)."""
        if self.cfg.deepspeed.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.engine.module.state_dict()


def release_zero3_references(module: nn.Module) -> None:
    """What DeepSpeed's (0.19) destroy() leaves behind at stage 3, each holding the model from a module's globals:
    the top module it pushes on its forward stack when the engine is built and never pops, and a method's
    lru_cache whose keys are the engine's parameter coordinator and the model's submodules."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not module]
    method = PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release  # private, inside an NVTX wrapper
    for cell in method.__closure__ or ():
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def weights_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True: nothing in a checkpoint runs as code.

    The plain-data classes DeepSpeed pickles into its checkpoints are allow-listed by name."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnly(type(engine)):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    if not isinstance(engine, TorchCheckpointEngine):
        return engine
    engine.__class__ = WeightsOnly
    return engine


def deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def setup_distributed(cfg: TrainConfig, device: torch.device) -> tuple[int, int]:
    """(rank, world size): torchrun's environment under DeepSpeed, else one process."""
    world_size = distributed.launched_world_size()
    if world_size > 1 and not cfg.deepspeed.enabled:
        raise ConfigError(f"{world_size} processes were started but deepspeed=none; choose deepspeed=zero1 (or zero0/zero2/zero3) for multi-process training")
    if not cfg.deepspeed.enabled:
        return 0, 1
    return distributed.start(device, through_deepspeed=True)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (state-dict keys unchanged)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing as wrap

    wrap(model, check_fn=lambda module: isinstance(module, Block))


def build_engine(model: nn.Module, cfg: TrainConfig, device: torch.device, micro_batch: int, world_size: int) -> Engine:
    if cfg.trainer.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.deepspeed.enabled:
        return DeepSpeedEngine(model, cfg, device, micro_batch, world_size)
    return PlainEngine(model, cfg, device, micro_batch)


def describe(engine: Engine) -> str:
    if isinstance(engine, DeepSpeedEngine):
        return "DeepSpeed " + json.dumps(engine.ds_config["zero_optimization"])
    return "plain PyTorch"
