"""Training-time data augmentation: ``augment_batch`` (random crop of the zero-padded image and a random horizontal
flip, per sample, from a given generator), ``default_augment`` (whether a data set's images suit it) and
``mix_batch`` (mixup or CutMix of a batch with a permutation of itself, from the same generator).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MIXES = ("none", "mixup", "cutmix")


def default_augment(input_shape: tuple[int, ...]) -> bool:
    """Crop + flip suits colour images of natural scenes (3 x H x W, H, W >= 16), not digits or non-images."""
    return len(input_shape) == 3 and input_shape[0] == 3 and min(input_shape[1:]) >= 16


def augment_batch(x: torch.Tensor, g: torch.Generator, padding: int, flip: bool) -> torch.Tensor:
    """Random crop of the zero-padded image (same size) and a random horizontal flip, per sample."""
    if x.dim() != 4:
        return x
    n, _, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=g)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * padding)
        xp = torch.gather(xp, 2, rows)
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
        x = torch.gather(xp, 3, cols)
    if flip:
        f = torch.rand(n, generator=g) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(3), x)
    return x


def mix_batch(x: torch.Tensor, g: torch.Generator, kind: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix the batch with a random permutation of itself: ``(mixed, perm, lam)`` with ``lam`` ~ Beta(alpha, alpha)
    the share of ``x`` (mixup: ``lam x + (1 - lam) x[perm]``, Zhang et al. 2018; CutMix: a random box of
    ``x[perm]`` pasted into ``x``, ``lam`` = the share of pixels left to ``x``, Yun et al. 2019). With a teacher
    the loss distils on the mixed image ("function matching", Beyer et al. 2022); the hard-label term is
    ``lam CE(y) + (1 - lam) CE(y[perm])``. ``kind`` "none" (or a non-image batch for CutMix) returns ``x``."""
    n = len(x)
    if kind == "none" or n < 2 or (kind == "cutmix" and x.dim() != 4):
        return x, torch.arange(n), 1.0
    perm = torch.randperm(n, generator=g)
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=g))).beta(alpha, alpha))
    if kind == "mixup":
        return lam * x + (1 - lam) * x[perm], perm, lam
    h, w = x.shape[-2:]
    cut = (1 - lam) ** 0.5
    bh, bw = round(h * cut), round(w * cut)
    cy, cx = (int(torch.randint(0, s, (1,), generator=g)) for s in (h, w))
    y0, y1 = max(cy - bh // 2, 0), min(cy - bh // 2 + bh, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx - bw // 2 + bw, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, perm, 1 - (y1 - y0) * (x1 - x0) / (h * w)


__all__ = ["MIXES", "augment_batch", "default_augment", "mix_batch"]
