"""Knowledge distillation from the dense model: ``distillation_loss`` (cross-entropy blended with the
temperature-scaled KL divergence to the teacher's outputs), ``FeatureHints`` (the teacher's intermediate feature maps
as extra targets, FitNets-style) and ``load_teacher`` (the dense teacher of a pruned checkpoint, from its recorded
source weights or given ones).
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


def hint_points(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> list[str]:
    """Where ``FeatureHints`` matches by default: the root's children that hold parameterised sub-modules (a
    ResNet's stages, a torchvision ``features``), present under the same name in both models, whose outputs on
    ``x`` are feature maps (N, C, H, W) with H, W >= 2 of the same spatial size in both."""
    t_kids = dict(teacher.named_children())
    names = [n for n, c in student.named_children() if n in t_kids and any(
        next(m.parameters(recurse=False), None) is not None for m in list(c.modules())[1:])]
    shapes = _output_shapes(student, names, x), _output_shapes(teacher, names, x)
    return [n for n in names if len(shapes[0].get(n, ())) == 4 and len(shapes[1].get(n, ())) == 4
            and shapes[0][n][2:] == shapes[1][n][2:] and min(shapes[0][n][2:]) >= 2]


@torch.no_grad()
def _output_shapes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    mods = dict(model.named_modules())

    def keep(name: str, o: Any) -> None:  # a forward hook that returns something replaces the output
        if torch.is_tensor(o):
            out.setdefault(name, tuple(o.shape))

    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: keep(n, o)) for n in names]
    was = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return out


class FeatureHints(nn.Module):
    """Intermediate-feature distillation (FitNets, Romero et al. 2015): at each point (a module name present in
    both models), a 1x1 projection P of the student's feature map s regresses the teacher's t, both scaled to unit
    root mean square on the batch, and the loss is the mean over points of mean((P s' - t')^2) -- the relative
    squared error ||P s - t||^2 / ||t||^2 of the map P scaled back. The student's maps keep a subset of the teacher's
    channels (or, with residual blocks removed, all of them at fewer layers); the hint asks them to carry what the
    teacher's do, many more numbers per image than the 10 logits of ``distillation_loss``.

    P starts as the ridge least-squares map from the student's maps (in training mode, as the steps will see them)
    to the teacher's (eval mode) on ``x``, so that the first steps do not pull the student towards a random
    projection, and is trained with the student. Forward hooks on both models capture the maps of the latest
    forward passes; ``loss()`` reads them, ``close()`` removes the hooks.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, points: list[str] | None = None,
                 damp: float = 1e-3) -> None:
        super().__init__()
        self.points = list(points) if points is not None else hint_points(student, teacher, x)
        if not self.points:
            raise BadInput("feature hints: no module of the student matches the teacher's by name and feature-map "
                           "size; give the points or turn the hints off")
        self._seen: dict[str, dict[str, torch.Tensor]] = {"s": {}, "t": {}}
        self._hooks = []
        for side, model in (("s", student), ("t", teacher)):
            mods = dict(model.named_modules())
            missing = [p for p in self.points if p not in mods]
            if missing:
                raise BadInput(f"feature hints: no module {missing[0]!r} in the {'student' if side == 's' else 'teacher'}")
            for p in self.points:
                self._hooks.append(mods[p].register_forward_hook(
                    lambda m, i, o, side=side, p=p: self._seen[side].__setitem__(p, o)))
        _probe(student, x)
        with torch.no_grad():
            teacher(x)
        self.proj = nn.ModuleDict()
        for p in self.points:
            s, t = _unit_rms(self._seen["s"][p]), _unit_rms(self._seen["t"][p])
            proj = nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
            with torch.no_grad():
                proj.weight.copy_(_ridge_map(s, t, damp)[:, :, None, None])
            self.proj[_key(p)] = proj
        self._clear()

    def _clear(self) -> None:
        self._seen = {"s": {}, "t": {}}

    def loss(self) -> torch.Tensor:
        """Mean over points of the relative squared error of the projected student maps of the latest forward."""
        terms = []
        for p in self.points:
            s, t = _unit_rms(self._seen["s"][p]), _unit_rms(self._seen["t"][p].detach())
            terms.append((self.proj[_key(p)](s) - t).pow(2).mean())
        self._clear()
        return torch.stack(terms).mean()

    def close(self) -> None:
        """Remove the forward hooks from both models."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._clear()


@torch.no_grad()
def _probe(student: nn.Module, x: torch.Tensor) -> None:
    """One forward pass of the student in training mode (the maps the hints will see: BatchNorm on batch
    statistics), leaving its buffers (BatchNorm's running statistics) and the global RNG as they were."""
    buffers = {k: v.clone() for k, v in student.named_buffers()}
    was = student.training
    try:
        with torch.random.fork_rng(devices=[]):
            student.train()
            student(x)
    finally:
        student.train(was)
        for k, v in student.named_buffers():
            v.copy_(buffers[k])


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    """``x`` over its root mean square (a constant of the gradient): the projection then maps maps of unit scale to
    maps of unit scale, and its steps do not depend on how large either model's activations are."""
    return x / x.detach().pow(2).mean().sqrt().clamp_min(1e-12)


def _key(point: str) -> str:
    return point.replace(".", "/")  # ModuleDict keys cannot hold dots


def _ridge_map(s: torch.Tensor, t: torch.Tensor, damp: float) -> torch.Tensor:
    """argmin_P ||P S - T||^2 + damp * mean(diag(S S^T)) ||P||^2 over the pixels of maps s (N, Cs, H, W) and t
    (N, Ct, H, W): the (Ct, Cs) least-squares map from the student's channels to the teacher's."""
    S = s.transpose(0, 1).reshape(s.shape[1], -1).double()
    T = t.transpose(0, 1).reshape(t.shape[1], -1).double()
    A = S @ S.T
    A.diagonal().add_(damp * float(A.diagonal().mean().clamp_min(1e-12)))
    return torch.linalg.solve(A, S @ T.T).T.float()


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


__all__ = ["FeatureHints", "distillation_loss", "hard_loss", "hint_points", "load_teacher"]
