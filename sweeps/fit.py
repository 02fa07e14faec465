"""Fit the LR law or the loss law: `python sweeps/fit.py lr-law results.csv --out DIR` (also `mea-fit`)."""
from mea.scaling.fit import main

if __name__ == "__main__":
    main()
