"""Scaling: LR sweeps, the LR law and the loss law that choose each comparison's learning rate."""
