"""Run an LR sweep spec: `python sweeps/lr_sweep.py sweeps/example.yaml` (also `mea-sweep`)."""
from mea.scaling.sweep import main

if __name__ == "__main__":
    main()
