"""Train one model: `python train.py model=tiny attention=mea trainer.max_steps=30 hydra.run.dir=DIR`."""
import sys

import hydra
from omegaconf import DictConfig

from mea.config import ConfigError, register_configs
from mea.data import DataError

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from mea.train import run

    try:
        run(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
