"""One default per pruning setting, shared by every entry point.

The Python API (``PruneConfig``, ``BlockConfig``, ``StructuredConfig``, ``BudgetConfig``), the CLI
(``chita-edge prune``) and ``pipeline.yaml`` all read their defaults from ``DEFAULTS``; the CLI and the pipeline
file leave a setting "not given" (None) and ``chita_edge.workflows.settings.resolve`` fills it in the order
flag > pipeline file > device profile > default, remembering where each value came from.

How the values were chosen (docs/benchmarks.md, "Defaults"):

- ``l2 = 0.03`` (lambda = l2 * n / 2): MLPNet chita++ at 98 % gives 65.1 % with the reference's 1e-3, 81.9 % with
  0.03, 81.2 % with 0.1 and 75.9 % with 0.3 (15 stages, same seeds).
- ``stages = 25`` (T of CHITA++'s cubic schedule, also block pruning's): MLPNet chita++ at 98 % gives 89.4 % with
  25 stages against 84.8-85.1 % with 8.
- ``n_grads = 1000``, ``fisher_batch = 1``: the paper's n and m; n = 1000 per-sample gradients fit every zoo model's
  G in memory.
- ``dtype = "float64"``: the solver's precision (G is collected in float32 and cast).
- ``search_stages = 4``: stages of the budget search (``prune --profile``), each one measured; a separate setting
  from CHITA++'s T because one search stage costs an export and a benchmark.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

DEFAULTS: MappingProxyType[str, Any] = MappingProxyType({
    "method": "chita++",
    "sparsity": None,  # no default: the target fraction is always the user's (not used with a device budget)
    "structure": "unstructured",
    "n_grads": 1000,  # n: rows of G
    "fisher_batch": 1,  # m: samples per row of G
    "l2": 0.03,  # ridge, lambda = l2 * n / 2
    "stages": 25,  # T: CHITA++ (and block pruning) stages, cubic schedule
    "search_stages": 4,  # stages of the budget search
    "dtype": "float64",  # solver precision
    "seed": 0,
    "block_size": 0,  # > 0: block-diagonal Fisher of this many weights per block
    "block_support": "saliency",  # block mode: global OBS-saliency threshold; "magnitude": the reference's rule
    "first_order": None,  # None: on for chita++, off otherwise
    "layer_floor": 0.1,  # unstructured: each layer keeps >= ceil(0.1 (1 - s) size) weights (0: off)
    "refit": None,  # None: on for the data-driven methods (chita, chita++, bso), off for the magnitude baselines
    "width_multiple": None,  # None: the device profile's
    "depth": True,  # budget search: may remove whole residual blocks
    "objective": "auto",  # budget search: what a step costs (output, weights; auto: weights when fine-tuning follows)
})

__all__ = ["DEFAULTS"]
