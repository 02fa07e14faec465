"""Train one model: `python train.py model=tiny attention=mea trainer.max_steps=30 hydra.run.dir=DIR`.

Several processes: `torchrun --nproc_per_node 8 train.py deepspeed=zero2 ...`.
"""
import os
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mea import distributed
from mea.config import ConfigError, register_configs
from mea.data import DataError

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from mea.train import Diverged, StopFlag, TrainingError, run

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        if StopFlag.received is None:
            run(cfg)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        if not multirun:
            sys.exit(2)  # a diverged run of a sweep is recorded in its summary; the sweep goes on
    except (ConfigError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    StopFlag.call_earlier_handler()  # under submitit: it requeues the job now that the run has saved
    if multirun and StopFlag.received is not None:
        print(f"stopped by {signal.Signals(StopFlag.received).name} after this run saved; the same command resumes the sweep", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not SystemExit, which a launcher's worker process catches (joblib's): this process starts no further run.
        os._exit(128 + StopFlag.received)

if __name__ == "__main__":
    main()  # an error exits here; past it every run of the process finished or saved (a multirun's runs share the group)
    distributed.stop()
