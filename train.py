"""Train one model: `python train.py model=tiny attention=mea trainer.max_steps=30 hydra.run.dir=DIR`.

Several processes: `torchrun --nproc_per_node 8 train.py deepspeed=zero2 ...`.
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mea.config import ConfigError, register_configs
from mea.data import DataError

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from mea.train import TrainingError, run

    try:
        run(cfg)
    except (ConfigError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, TrainingError) and HydraConfig.get().mode == RunMode.MULTIRUN:
            return  # a diverged run of a sweep is recorded in its summary; the sweep goes on
        sys.exit(2)


if __name__ == "__main__":
    main()
