"""Training-time data augmentation: ``augment_batch`` (random crop of the zero-padded image and a random horizontal
flip, per sample, from a given generator) and ``default_augment`` (whether a data set's images suit it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


__all__ = ["augment_batch", "default_augment"]
