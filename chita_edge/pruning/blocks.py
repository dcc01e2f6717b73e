"""Block-sparse (1x4) pruning of Linear weights with structured CHITA: ``block_structure`` (blocks inside every
Linear weight as solver groups, the layout TFLite's sparse FULLY_CONNECTED kernel reads; one family per layer or
one for all), ``BlockConfig`` and ``prune_blocks`` (a cubic schedule of group solves to a block sparsity).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput, check_finite, check_seed
from chita_edge.pruning.channels import Progress, StructuredConfig, conv_linear, gradients, solve_groups
from chita_edge.pruning.defaults import DEFAULTS
from chita_edge.pruning.layers import PrunableParam, find_prunable, flatten_weights, num_weights
from chita_edge.pruning.schedule import cubic_schedule
from chita_edge.solvers.group_chita import Groups, coordinate_mask, group_sq_norms, select_groups


def block_structure(params: list[PrunableParam], model: nn.Module, *, block: tuple[int, int] = (1, 4),
                    per_layer: bool = True) -> tuple[Groups, list[str]]:
    """Blocks of ``block = (rows, cols)`` inside every Linear weight (out, in) as groups; (1, 4) is the layout of
    TFLite's sparse FULLY_CONNECTED kernel. Returns (groups, family names): one family per Linear layer, or one
    family ``"all"`` when ``per_layer`` is False. Partial blocks at the edges are groups too. Non-Linear
    weights are in no group (never pruned).
    """
    br, bc = block
    if br < 1 or bc < 1:
        raise BadInput(f"block {block}: expected positive sizes such as (1, 4) or (4, 1)")
    mods = dict(model.named_modules())
    families: list[list[torch.Tensor]] = []
    names: list[str] = []
    for q in params:
        if not isinstance(mods.get(q.module_name), nn.Linear):
            continue
        rows, cols = q.shape
        ids = torch.arange(rows * cols).view(rows, cols) + q.offset
        blocks = [ids[r:r + br, c:c + bc].reshape(-1) for r in range(0, rows, br) for c in range(0, cols, bc)]
        if per_layer or not families:
            families.append(blocks)
            names.append(q.module_name if per_layer else "all")
        else:
            families[0].extend(blocks)
    if not families:
        raise BadInput("block structure: the model has no Linear (fully connected) layer to prune in blocks")
    return Groups.from_lists(num_weights(params), families), names


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """Block-sparse pruning of Linear weights (TFLite's sparse FULLY_CONNECTED layout) to a sparsity."""

    sparsity: float  # fraction of the blocked (Linear) weights set to zero
    block: tuple[int, int] = (1, 4)
    stages: int = DEFAULTS["stages"]  # cubic schedule from 0.1, G recomputed at each stage
    n_grads: int = DEFAULTS["n_grads"]
    fisher_batch: int = DEFAULTS["fisher_batch"]
    l2: float = DEFAULTS["l2"]
    max_iter: int = 100
    seed: int = DEFAULTS["seed"]
    dtype: str = DEFAULTS["dtype"]  # G and the solve

    def validate(self) -> None:
        check_finite(self, {"sparsity": "--sparsity", "l2": "--l2"})
        check_seed(self.seed)
        if not 0.0 <= self.sparsity < 1.0:
            raise BadInput(f"--sparsity {self.sparsity}: expected a fraction in [0, 1)")
        if self.stages < 1 or self.n_grads < 1 or self.fisher_batch < 1 or not self.l2 > 0:
            raise BadInput("--stages, --grads and --fisher-batch must be >= 1 and --l2 > 0")


def prune_blocks(model: nn.Module, data: Dataset, cfg: BlockConfig, filter_fn: Callable[[nn.Module, str], bool] = conv_linear,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Prune every Linear weight in ``cfg.block`` blocks with structured CHITA (one global family of blocks),
    in place. Stage t keeps k_t blocks (cubic schedule), G recomputed at the current weights, blocks removed
    at an earlier stage stay removed. Returns the per-stage objectives and the block sparsity reached."""
    cfg.validate()
    params = find_prunable(model, filter_fn)
    groups, _ = block_structure(params, model, block=cfg.block, per_layer=False)
    nb = groups.num_groups
    scfg = StructuredConfig(n_grads=cfg.n_grads, fisher_batch=cfg.fisher_batch, l2=cfg.l2, max_iter=cfg.max_iter,
                            seed=cfg.seed, dtype=cfg.dtype, bn_batches=0)
    alive = torch.ones(nb, dtype=torch.bool)
    stages = []
    for t, s in enumerate(cubic_schedule(cfg.sparsity, cfg.stages, 0.1)):
        k = torch.tensor([int(math.floor((1.0 - s) * nb))])
        G = gradients(model, params, data, scfg, t, progress=progress)
        w = flatten_weights(model, params).to(G.dtype)
        keep0 = select_groups(group_sq_norms(w, groups), groups, k, alive)
        w0 = torch.where(coordinate_mask(keep0, groups), w, torch.zeros_like(w))
        info = solve_groups(model, params, groups, k, G, scfg, allowed=alive, w0=w0)
        alive = info.pop("keep")
        stages.append({"stage": t, "sparsity": s, "blocks_kept": int(alive.sum()), **info})
        if progress:
            progress("stages", t + 1, cfg.stages)
    w = flatten_weights(model, params)
    blocked = coordinate_mask(torch.zeros(nb, dtype=torch.bool), groups) == 0
    zero = float((w[blocked] == 0).double().mean())
    return {"blocks": nb, "blocks_kept": int(alive.sum()), "block": list(cfg.block), "sparsity": zero,
            "stages": stages}


__all__ = ["BlockConfig", "block_structure", "prune_blocks"]
