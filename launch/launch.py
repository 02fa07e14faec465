"""Start a training run on a cluster: `python launch/launch.py slurm --nodes 8 --gpus-per-node 8 --run-dir DIR -- overrides`."""
from mea.tools.launch import main

if __name__ == "__main__":
    main()
