"""Data sets: ``npz:PATH`` (x_train, y_train, x_test, y_test) or ``digits`` (scikit-learn, 8x8).

uint8 images (N,H,W) or (N,H,W,C) are scaled to [0, 1] and laid out NCHW; float arrays are used as they are.
Float inputs far outside a normalised range (beyond +-10: 0-255 pixels stored as float, a sentinel like -1e6)
are logged as a warning naming the file, the array and the range; they are not refused, since a model may take
raw units.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from chita_edge.core.errors import BadInput
from chita_edge.core.io import require_file

KEYS = ("x_train", "y_train", "x_test", "y_test")
NORMALISED = 10.0  # float inputs beyond +-this are likely unscaled (0-255 pixels) or hold sentinel values
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _images(x: np.ndarray, where: str) -> torch.Tensor:
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[:, None, :, :]
        elif x.ndim == 4:
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        else:
            raise BadInput(f"{where}: uint8 images must be (N,H,W) or (N,H,W,C), got shape {x.shape}")
        return torch.from_numpy(x.astype(np.float32) / 255.0)
    if np.issubdtype(x.dtype, np.floating):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if not torch.isfinite(t).all():
            raise BadInput(f"{where}: contains NaN or Inf values")
        return t
    raise BadInput(f"{where}: expected uint8 images or a float array, got dtype {x.dtype}")


def _labels(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise BadInput(f"{where}: expected a 1-D integer label array, got shape {y.shape} dtype {y.dtype}")
    if len(y) != n:
        raise BadInput(f"{where}: {len(y)} labels for {n} inputs")
    if len(y) and y.min() < 0:
        raise BadInput(f"{where}: negative label {int(y.min())}; labels must be 0..C-1")
    return torch.from_numpy(y.astype(np.int64))


def from_arrays(name: str, arrays: dict[str, np.ndarray]) -> Dataset:
    """Validate and convert four arrays into a Dataset (one clear BadInput per problem)."""
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        raise BadInput(f"{name}: missing array(s) {', '.join(missing)}; expected {', '.join(KEYS)}")
    xtr = _images(np.asarray(arrays["x_train"]), f"{name}: x_train")
    xte = _images(np.asarray(arrays["x_test"]), f"{name}: x_test")
    if len(xtr) == 0 or len(xte) == 0:
        raise BadInput(f"{name}: x_train and x_test must each hold at least one example")
    if xtr.shape[1:] != xte.shape[1:]:
        raise BadInput(f"{name}: x_train samples {tuple(xtr.shape[1:])} and x_test samples {tuple(xte.shape[1:])} differ")
    ytr = _labels(np.asarray(arrays["y_train"]), len(xtr), f"{name}: y_train")
    yte = _labels(np.asarray(arrays["y_test"]), len(xte), f"{name}: y_test")
    for key, x in (("x_train", xtr), ("x_test", xte)):
        if np.asarray(arrays[key]).dtype != np.uint8 and _warn_if_unscaled(f"{name}: {key}", x):
            break
    return Dataset(name, xtr, ytr, xte, yte)


def _warn_if_unscaled(where: str, x: torch.Tensor) -> bool:
    """Log a warning (and return True) when float inputs lie far outside a normalised range."""
    lo, hi = float(x.min()), float(x.max())
    if -NORMALISED <= lo and hi <= NORMALISED:
        return False
    hint = ("0-255 pixels stored as float? store them as uint8 (scaled to [0, 1] on load) or divide by 255"
            if lo >= 0 and hi <= 255 else "check the data for sentinel or unscaled values")
    log.warning("%s: float inputs span [%.4g, %.4g], far outside a normalised range; they are used as they are "
                "(%s)", where, lo, hi, hint)
    return True


def load_digits_dataset() -> Dataset:
    """scikit-learn's 1797 8x8 digits, as (N,1,8,8) in [0,1]; a fixed 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    tr, te = perm[:cut], perm[cut:]
    return from_arrays("digits", {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]})


def data_file(spec: str | None) -> str | None:
    """The file a DATA spec reads (``npz:PATH`` -> PATH; ``digits`` and None -> None)."""
    return spec[4:] if spec and spec.startswith("npz:") else None


def _array(z: np.lib.npyio.NpzFile, key: str, where: str) -> np.ndarray:
    try:
        return z[key]
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise
        raise BadInput(f"{where}: refused: array '{key}' holds pickled Python objects (only numeric arrays are "
                       "loaded; the objects were not unpickled)") from None


def load_data(spec: str) -> Dataset:
    """Resolve a DATA spec: ``npz:PATH`` or ``digits``."""
    if spec == "digits":
        return load_digits_dataset()
    if spec.startswith("npz:"):
        if not spec[4:].strip():
            raise BadInput(f"data '{spec}': no path after 'npz:'; expected npz:PATH (an .npz file) or digits")
        path = require_file(spec[4:], "data file")
        if not zipfile.is_zipfile(path):  # numpy would read the bytes as a pickle and suggest allow_pickle=True
            raise BadInput(f"{path}: not a readable .npz file (not a zip archive; expected x_train, y_train, x_test, "
                           "y_test saved with numpy.savez)")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: _array(z, k, str(path)) for k in z.files}
        except BadInput:
            raise
        except Exception as e:  # zip/format errors of every kind
            raise BadInput(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
        return from_arrays(str(path), arrays)
    raise BadInput(f"data '{spec}': expected 'npz:PATH' or 'digits'")
