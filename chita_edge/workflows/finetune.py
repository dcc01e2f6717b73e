"""Fine-tuning a checkpoint (``chita-edge finetune``): load a pruned checkpoint, fine-tune it with its zeros kept
(``chita_edge.training.finetune``), write a checkpoint that records what was done; the training state lives beside
the output while the run is in progress, so an interrupted run resumes."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chita_edge.budget.config import FINETUNE, FINETUNE_HINTS
from chita_edge.core.checkpoint import save_checkpoint
from chita_edge.core.data import data_file, load_data
from chita_edge.core.errors import BadInput
from chita_edge.core.io import refuse_overwrite, sha256_file
from chita_edge.models.loading import check_fits, load_model, model_file
from chita_edge.pruning.layers import find_prunable
from chita_edge.training.distill import hint_points, load_teacher
from chita_edge.training.finetune import FinetuneConfig, Progress, finetune
from chita_edge.training.masks import masks_from_zeros


def state_path_for(out: str | os.PathLike) -> Path:
    """Where ``finetune_checkpoint`` keeps its resumable training state: beside the output."""
    out = Path(out)
    return out.with_name(out.name + ".state")


def resolve_recipe(cfg: FinetuneConfig, model: nn.Module, teacher: nn.Module | None, x: torch.Tensor, *,
                   budget_pruned: bool) -> FinetuneConfig:
    """The settings left to the recipe (None) resolved: for a model pruned to a budget (re-fitted weights), the
    budget path's head re-fit (``FINETUNE["head_ridge"]``) and, when ``teacher`` distils and shares stages with
    it (``hint_points`` on ``x``), its feature hints (``FINETUNE_HINTS``); otherwise both off."""
    if cfg.head_ridge is None:
        cfg = replace(cfg, head_ridge=FINETUNE["head_ridge"] if budget_pruned else 0.0)
    if cfg.hints is None:
        shared = budget_pruned and teacher is not None and bool(hint_points(model, teacher, x))
        cfg = replace(cfg, hints=FINETUNE_HINTS if shared else 0.0)
    return cfg


def finetune_checkpoint(
    pruned: str | os.PathLike,
    data: str,
    cfg: FinetuneConfig,
    out: str | os.PathLike,
    *,
    distill: bool = False,
    teacher_weights: str | os.PathLike | None = None,
    resume: bool = False,
    model: str | None = None,
    progress: Progress | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """What ``chita-edge finetune`` does: load a pruned checkpoint, fine-tune with its masks, write ``out``.

    ``model``: the model spec, needed only when ``pruned`` is a plain state dict rather than a chita-edge checkpoint.

    The training state lives in ``OUT.state`` while the run is in progress (removed on success); a state file
    left by an interrupted run must be resumed (``resume=True``) or removed.
    """
    cfg.validate()
    src = Path(pruned)
    out = Path(out)
    refuse_overwrite([("--out", out), ("--out state", state_path_for(out))],
                     [("checkpoint", src), ("--data", data_file(data)), ("--model file", model_file(model)),
                      ("--teacher", teacher_weights)])
    if not out.parent.exists():
        raise BadInput(f"{out}: directory {out.parent} does not exist; choose another --out")
    lm = load_model(model, src)
    ds = load_data(data)
    check_fits(lm, ds.x_train, data, (ds.y_train, ds.y_test))
    state = state_path_for(out)
    if state.exists() and not resume:
        raise BadInput(f"{state}: an interrupted fine-tuning run left its state here; pass --resume to continue "
                       f"it or remove the file to start over")
    teacher = load_teacher(lm.spec, lm.meta, teacher_weights, str(src)) if distill else None
    if teacher is not None and cfg.distill_weight == 0:
        raise BadInput("--distill with distill weight 0 would not distil; give a weight in (0, 1]")
    cfg = resolve_recipe(cfg, lm.module, teacher, ds.x_train[:8], budget_pruned=bool((lm.meta or {}).get("profile")))
    params = find_prunable(lm.module, lm.prunable)
    report = finetune(lm.module, ds, cfg, masks=masks_from_zeros(lm.module, params), teacher=teacher,
                      progress=progress, on_epoch=on_epoch, state_path=state, resume=resume)
    meta = dict(lm.meta or {})
    meta.pop("format", None)
    meta.setdefault("model", lm.spec)
    meta.setdefault("input_shape", list(lm.input_shape or ds.input_shape))
    record = {"source": str(src), "source_sha256": sha256_file(src), "data": data, "distill": distill,
              "teacher": str(teacher_weights or (lm.meta or {}).get("source_weights")) if distill else None,
              "initial_accuracy": report.initial_accuracy, "accuracy": report.accuracy,
              # the epochs' wall-clock seconds stay in the report, out of the file: equal weights and settings
              # give equal bytes, so an export that records this file's sha256 is reproducible
              "history": [{k: v for k, v in h.items() if k != "seconds"} for h in report.history],
              "config": report.config, "qat": report.qat, "head": report.head, "previous": meta.get("finetune")}
    meta["finetune"] = record
    if cfg.qat:  # the weights were trained for the exporters' int8; a later float fine-tune drops the flag
        meta["qat"] = True
    else:
        meta.pop("qat", None)
    meta["accuracy"] = report.accuracy
    meta["pruned_accuracy"] = report.initial_accuracy
    save_checkpoint(out, lm.module.state_dict(), meta)
    state.unlink(missing_ok=True)
    return {**report.to_dict(), "model": lm.spec, "input": str(src), "out": str(out), "data": data,
            "distill": distill}


__all__ = ["finetune_checkpoint", "resolve_recipe", "state_path_for"]
