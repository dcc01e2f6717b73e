"""chita-edge: CHITA pruning for edge devices.

    from chita_edge import load_model, load_data, prune, PruneConfig
    lm = load_model("zoo:mlpnet", "mlpnet.pt")
    report = prune(lm.module, PruneConfig(sparsity=0.95, method="chita++"), load_data("npz:mnist.npz"), lm.prunable)

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
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'chita_edge' has no attribute {name!r}")
