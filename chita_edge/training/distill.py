"""Knowledge distillation from the dense model: ``distillation_loss`` (cross-entropy blended with the
temperature-scaled KL divergence to the teacher's outputs) and ``load_teacher`` (the dense teacher of a pruned
checkpoint, from its recorded source weights or given ones).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chita_edge.core.errors import BadInput
from chita_edge.core.io import sha256_file
from chita_edge.models.loading import load_model


def hard_loss(student: torch.Tensor, y: torch.Tensor, mix: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """CE(student, y); for a batch mixed by ``augment.mix_batch`` (``mix`` = (perm, lam)): lam CE(y) + (1 - lam)
    CE(y[perm])."""
    ce = F.cross_entropy(student, y)
    if mix is None or mix[1] == 1.0:
        return ce
    perm, lam = mix
    return lam * ce + (1 - lam) * F.cross_entropy(student, y[perm])


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float,
                      weight: float, mix: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """(1 - weight) CE(student, y) + weight T^2 KL(p_teacher^T || p_student^T) (Hinton et al. 2015); the teacher's
    outputs are those of the same (augmented, mixed) input, and the hard-label term is ``hard_loss`` (``mix``).

    Works on logits and on log-probabilities alike (log_softmax is shift-invariant).
    """
    if weight == 1:
        ce = student.new_zeros(())
    else:
        ce = hard_loss(student, y, mix)
    if weight == 0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                  reduction="batchmean")
    return (1 - weight) * ce + weight * t * t * kl


def load_teacher(spec: str, meta: dict[str, Any] | None, teacher_weights: str | os.PathLike | None,
                 where: str) -> nn.Module:
    """The dense model ``spec`` to distil from: ``teacher_weights`` or the checkpoint's recorded source weights."""
    src = teacher_weights or (meta or {}).get("source_weights")
    if not src:
        raise BadInput(f"{where}: records no dense source weights; give the dense weights with --teacher")
    if not Path(src).exists():
        raise BadInput(f"{src}: dense teacher weights (recorded in {where}) not found; give them with --teacher")
    if teacher_weights is None and meta and meta.get("source_sha256") and sha256_file(src) != meta["source_sha256"]:
        raise BadInput(f"{src}: changed since {where} was pruned from it (sha256 differs); give --teacher")
    return load_model(spec, src).module


__all__ = ["distillation_loss", "hard_loss", "load_teacher"]
