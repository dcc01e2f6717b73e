"""Unstructured pruning of a checkpoint (``prune_checkpoint``, behind ``chita-edge prune --sparsity``) and
``evaluate_model`` (``chita-edge eval``): load, prune or evaluate, save; JSON-able dicts out."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chita_edge.core.checkpoint import save_checkpoint
from chita_edge.core.data import load_data
from chita_edge.core.errors import BadInput
from chita_edge.core.evaluate import accuracy
from chita_edge.core.io import sha256_file
from chita_edge.models.loading import LoadedModel, check_fits, load_model
from chita_edge.pruning.distributed import data_on, is_main, model_on, world
from chita_edge.pruning.layers import find_prunable, layer_sparsity
from chita_edge.pruning.prune import Progress, PruneConfig, PruneReport, prune_weights
from chita_edge.training.gradual import GradualConfig, gradual_prune


def sparsity_of(lm: LoadedModel) -> tuple[float, dict[str, float]]:
    params = find_prunable(lm.module, lm.prunable)
    ls = layer_sparsity(lm.module, params)
    total = sum(q.numel for q in params)
    return sum(ls[q.name] * q.numel for q in params) / total, ls


def evaluate_model(model: str | None, weights: str | os.PathLike | None, data: str) -> dict[str, Any]:
    if model == "ckpt" and weights is None:
        raise BadInput("MODEL 'ckpt' reads the model from a chita-edge checkpoint: give the checkpoint with --weights")
    lm = load_model(None if model == "ckpt" else model, weights)
    ds = load_data(data)
    check_fits(lm, ds.x_test, data, (ds.y_test,))
    s, ls = sparsity_of(lm)
    return {"model": lm.spec, "weights": lm.weights_path, "data": data, "test_examples": len(ds.x_test),
            "accuracy": accuracy(lm.module, ds.x_test, ds.y_test), "sparsity": s, "layer_sparsity": ls}


def prune_checkpoint(model: str, weights: str | os.PathLike | None, data: str, cfg: PruneConfig,
                     out: str | os.PathLike, progress: Progress | None = None, *,
                     gradual: GradualConfig | None = None, resume: bool = False,
                     settings: dict[str, Any] | None = None,
                     device: torch.device | None = None,
                     announce: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load, prune, evaluate and save: what ``chita-edge prune`` does.

    ``gradual`` (a ``chita_edge.training.gradual.GradualConfig``): prune in steps on the cubic schedule from 50 % with
    masked fine-tuning between them (state beside ``out`` for ``resume``). ``settings``: the resolved settings with
    their sources, recorded in the checkpoint and the result. ``device``: where the pruning (gradients, solves,
    re-fit) runs (default: the CPU); with several processes (``chita_edge.pruning.distributed``) every rank prunes
    and only rank 0 writes ``out``. Block mode (``cfg.block_size``): ``announce`` gets the memory plan; its state
    (finished groups of blocks) is kept in ``{out}.block-state`` while it runs, for ``resume``."""
    cfg.validate()
    lm = load_model(model, weights)
    ds = load_data(data)
    check_fits(lm, ds.x_train, data, (ds.y_train, ds.y_test))
    dense_acc = accuracy(lm.module, ds.x_test, ds.y_test)
    params = find_prunable(lm.module, lm.prunable)
    extra: dict[str, Any] = {}
    if gradual is not None:
        g = gradual_prune(lm.module, ds, cfg, gradual, filter_fn=lm.prunable, progress=progress,
                          state_path=f"{out}.gradual-state", resume=resume)
        report = PruneReport(method=f"gradual {cfg.method}", target_sparsity=cfg.sparsity, sparsity=g.sparsity,
                             layer_sparsity=g.layer_sparsity, timings=g.timings, config=g.config)
        extra = {"gradual_steps": g.steps}
    else:
        dev = device or torch.device("cpu")
        with model_on(lm.module, dev):
            report = prune_weights(lm.module, params, data_on(ds, dev), cfg, progress, resume=resume,
                                   state_path=block_state_path(out), announce=announce)
    acc = accuracy(lm.module, ds.x_test, ds.y_test)
    meta = {
        "model": lm.spec,
        "source_weights": str(weights) if weights else None,
        "source_sha256": sha256_file(weights) if weights else None,
        "data": data,
        "method": cfg.method,
        "sparsity": report.sparsity,
        "accuracy": acc,
        "dense_accuracy": dense_acc,
        "input_shape": list(lm.input_shape or ds.input_shape),
        "prunable": [q.name for q in params],
        "settings": settings,
    }
    if is_main():
        save_checkpoint(out, lm.module.state_dict(), meta)
        Path(block_state_path(out)).unlink(missing_ok=True)  # the run is complete: nothing to resume
    return {**report.to_dict(), **extra, "model": lm.spec, "dense_accuracy": dense_acc, "accuracy": acc,
            "out": str(out), "settings": settings, "device": str(device or "cpu"), "processes": world()[1]}


def block_state_path(out: str | os.PathLike) -> str:
    """Where block mode keeps its finished groups of blocks while it runs (removed when ``out`` is written)."""
    return f"{out}.block-state"


__all__ = ["PruneConfig", "block_state_path", "evaluate_model", "prune_checkpoint"]
