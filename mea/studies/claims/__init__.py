"""A study's claims, read against its runs. Each study that makes claims keeps them in one module of this
package, named by its spec (`claims: mea_paper`, as sweeps/paper_small.yaml does), so that a study of other
variants or of another paper adds a module here and a line to its spec, and the report renders whatever claims
its spec names. A module gives `claims(evidence) -> list[str]`: one Markdown sentence per claim."""
from __future__ import annotations

import pkgutil
from dataclasses import dataclass
from importlib import import_module


@dataclass
class Evidence:
    """What a sitting measured, as its claims read it."""

    protocol: object  # mea.studies.experiment.Protocol: its baseline and margin
    fit: dict  # the sweep's LR laws (mea.scaling.fit.lr_law, as fit.json holds them)
    lrs: dict[str, dict]  # arm -> the LR its seeds trained at
    rows: list[dict]  # the main corpus's comparison rows (mea.tools.compare)
    compression: list[dict]  # the KV-cache compression readings, the uncompressed control first
    grid: dict[str, dict[float, dict]]  # arm -> LR -> its run at the largest swept size


def studies() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def check_claims(name: str) -> str | None:
    """Why a spec's `claims` cannot be read (one line), or None."""
    if name and name not in studies():
        return f"claims={name} is not a study's claims; choose one of {', '.join(studies())} (modules of mea/studies/claims), or leave claims out"
    return None


def read_claims(name: str, evidence: Evidence) -> list[str]:
    """The claims of the study named (none where the spec names none). Only this package's modules can be named:
    a spec chooses a study, it cannot point at code elsewhere."""
    return import_module(f"{__name__}.{name}").claims(evidence) if name else []
