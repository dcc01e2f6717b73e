"""chita-edge: CHITA pruning for edge devices.

    from chita_edge import load_model, load_data, prune, PruneConfig
    lm = load_model("zoo:mlpnet", "mlpnet.pt")
    report = prune(lm.module, PruneConfig(sparsity=0.95, method="chita++"), load_data("npz:mnist.npz"), lm.prunable)
"""

from chita_edge._version import __version__
from chita_edge.data import Dataset, load_data
from chita_edge.errors import BadInput, ChitaError, GateFailed, RuntimeFailure
from chita_edge.evaluate import accuracy
from chita_edge.models import LoadedModel, load_model
from chita_edge.pruning.prune import PruneConfig, PruneReport, prune

__all__ = [
    "BadInput",
    "ChitaError",
    "Dataset",
    "GateFailed",
    "LoadedModel",
    "PruneConfig",
    "PruneReport",
    "RuntimeFailure",
    "__version__",
    "accuracy",
    "load_data",
    "load_model",
    "prune",
]
