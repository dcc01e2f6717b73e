"""chita-edge: CHITA pruning for edge devices.

    from chita_edge import load_model, load_data, prune, PruneConfig
    lm = load_model("zoo:mlpnet", "mlpnet.pt")
    report = prune(lm.module, PruneConfig(sparsity=0.95, method="chita++"), load_data("npz:mnist.npz"), lm.prunable)

or, as ``chita-edge prune`` does it (settings resolved from the one table of defaults, recorded with their source):

    from chita_edge import PruneJob, prune_settings, run_prune
    result = run_prune(PruneJob(model="zoo:mlpnet", weights="mlpnet.pt", data="npz:mnist.npz", out="p.pt",
                                settings=prune_settings(flags={"sparsity": 0.95})))

Names are imported lazily, so that light entry points (the benchmark child process) do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from chita_edge._version import __version__

_EXPORTS = {
    "BadInput": "chita_edge.core.errors",
    "ChitaError": "chita_edge.core.errors",
    "GateFailed": "chita_edge.core.errors",
    "RuntimeFailure": "chita_edge.core.errors",
    "Dataset": "chita_edge.core.data",
    "load_data": "chita_edge.core.data",
    "accuracy": "chita_edge.core.evaluate",
    "LoadedModel": "chita_edge.models.loading",
    "load_model": "chita_edge.models.loading",
    "PruneConfig": "chita_edge.pruning.prune",
    "PruneReport": "chita_edge.pruning.prune",
    "prune": "chita_edge.pruning.prune",
    "DEFAULTS": "chita_edge.pruning.defaults",
    "FinetuneConfig": "chita_edge.training.finetune",
    "finetune": "chita_edge.training.finetune",
    "BudgetConfig": "chita_edge.budget.config",
    "prune_to_budget": "chita_edge.budget.search",
    "PruneJob": "chita_edge.workflows.jobs",
    "FinetuneJob": "chita_edge.workflows.jobs",
    "ExportJob": "chita_edge.workflows.jobs",
    "CheckJob": "chita_edge.workflows.jobs",
    "prune_settings": "chita_edge.workflows.jobs",
    "run_prune": "chita_edge.workflows.jobs",
    "run_finetune": "chita_edge.workflows.jobs",
    "run_export": "chita_edge.workflows.jobs",
    "run_check": "chita_edge.workflows.jobs",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'chita_edge' has no attribute {name!r}")
