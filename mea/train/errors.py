"""Why a run cannot go on: one-line messages that say why and what to change."""


class TrainingError(RuntimeError):
    """The run cannot go on."""


class Diverged(TrainingError):
    """The loss stayed non-finite: a result an LR sweep records (its summary says so), not a crash to retry."""
