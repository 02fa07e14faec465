"""`mea-prepare` / `data/prepare.py`: tokenise a data config into shards (the cache makes a second run free)."""
import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mea.config import ConfigError, register_configs, validate

from .shards import prepare
from .sources import DataError

# The configs live in the checkout beside the package (installed editable, as the Makefile does).
CONF = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def prepare_main(cfg: DictConfig) -> None:
    try:
        validate(cfg, only="data")
        corpus = prepare(OmegaConf.to_object(cfg.data))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    m = corpus.manifest
    print(json.dumps({"path": str(corpus.path), "documents": m["documents"], "tokens": m["tokens"], "vocab_size": corpus.vocab_size, "dtype": m["dtype"]}))


def main() -> None:
    register_configs()
    sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    prepare_main()
