"""The cost model's peak-memory model: what ``bench`` measures (the peak resident-set growth of a process that
loads and runs the file), as

    peak_mb = base + alpha * fc_weight_bytes + alpha_conv * conv_weight_bytes + gamma * largest_conv_bytes
              + beta * activation_peak_bytes

ONNX Runtime keeps a re-laid-out copy of every conv weight and, while it optimises the graph at load, briefly
holds further copies of one layer at a time, hence the separate conv term and the largest-conv-layer term
(measured: a model whose weights sit in one conv peaks at ~4.5x its weight bytes, MobileNetV1 at ~2.7x).

* ``MemoryModel``: the fitted coefficients and the points they were fitted on.
* ``memory_model``: the fit (cached per host, runtime and threads) on synthetic models (Linear-weight,
  one-big-conv, many-conv and activation series), exported by the exporters and measured by ``bench``'s child
  process; the coefficients by non-negative least squares.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from chita_edge.budget.timing import RUNTIME, Progress, cache_dir, fingerprint, nchwc_block
from chita_edge.core.errors import BadInput
from chita_edge.core.io import atomic_write_text

# module-qualified, so that patching these functions where they are defined reaches the calls below
from chita_edge.devices import bench_child, child
from chita_edge.exporters import ExportConfig, export_model

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MEMORY_FORMAT = "chita-edge/memory-model-v4"


@dataclass(frozen=True)
class MemoryModel:
    """peak_mb = base + alpha * fc_mb + alpha_conv * conv_mb + gamma * largest_conv_mb + beta * activation_mb."""

    base_mb: float
    alpha: float
    alpha_conv: float
    gamma: float
    beta: float
    block: int  # NCHWc channel block used for activation sizes
    points: tuple[tuple[float, ...], ...] = ()  # (fc MB, conv MB, largest conv MB, activation MB, measured MB)

    def predict(self, fc_bytes: int, conv_bytes: int, largest_conv_bytes: int, activation_bytes: int) -> float:
        return (self.base_mb + self.alpha * fc_bytes / MiB + self.alpha_conv * conv_bytes / MiB
                + self.gamma * largest_conv_bytes / MiB + self.beta * activation_bytes / MiB)


def _export_like_bench(module: nn.Module, x: torch.Tensor, path: Path) -> None:
    """Export as the verified files are exported (``chita_edge.exporters``), so that memory matches them."""
    export_model(module, ExportConfig(format="onnx"), example_input=x, out=path, parity_inputs=x,
                 parity_source="random")


def _memory_series(td: Path) -> list[tuple[Path, float, float, float, float]]:
    """Synthetic models: (file, Linear weight MB, conv weight MB, largest conv MB, activation MB)."""
    out = []
    _export = _export_like_bench  # noqa: N806 - the same call shape as the timing export

    def mb(mods: list[nn.Module]) -> float:
        return sum(q.numel() for m in mods for q in m.parameters()) * 4 / MiB

    for n in (64, 1024, 3072):
        m = nn.Sequential(nn.Linear(1024, n), nn.ReLU(), nn.Linear(n, 10)).eval()
        p = td / f"w{n}.onnx"
        _export(m, torch.rand(1, 1024), p)
        out.append((p, mb([m]), 0.0, 0.0, (1024 + n + 10) * 4 / MiB))
    block = nchwc_block()
    for c in (256, 768, 1536):  # one big conv
        convs = [nn.Conv2d(64, c, 1), nn.Conv2d(c, c, 1)]
        m = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        p = td / f"c{c}.onnx"
        _export(m, torch.rand(1, 64, 8, 8), p)
        out.append((p, 0.0, mb(convs), max(mb([c_]) for c_ in convs), (64 + 2 * c) * 64 * 4 / MiB))
    for c in (192, 384):  # many equal convs
        convs = [nn.Conv2d(c, c, 3, padding=1) for _ in range(6)]
        layers: list[nn.Module] = []
        for cv in convs:
            layers += [cv, nn.ReLU()]
        m = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        p = td / f"k{c}.onnx"
        _export(m, torch.rand(1, c, 8, 8), p)
        out.append((p, 0.0, mb(convs), mb(convs[:1]), 3 * c * 64 * 4 / MiB))
    for c in (16, 48, 96):  # activations
        convs = [nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)]
        m = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        p = td / f"a{c}.onnx"
        _export(m, torch.rand(1, 3, 160, 160), p)
        cp = math.ceil(c / block) * block
        out.append((p, 0.0, mb(convs), max(mb([c_]) for c_ in convs), (2 * cp * 160 * 160 + 3 * 160 * 160) * 4 / MiB))
    return out


def _nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (active set on a handful of columns)."""
    free = list(range(A.shape[1]))
    while True:
        coef = np.zeros(A.shape[1])
        sol, *_ = np.linalg.lstsq(A[:, free], y, rcond=None)
        coef[free] = sol
        neg = [j for j in free if coef[j] < 0]
        if not neg:
            return coef
        free.remove(min(neg, key=lambda j: coef[j]))


def memory_model(threads: int = 1, *, refresh: bool = False, progress: Progress | None = None) -> MemoryModel:
    """Fit (cached per host/runtime/threads) the peak-memory model on synthetic models measured like ``bench``."""
    method = hashlib.sha256(Path(bench_child.__file__).read_bytes() + MEMORY_FORMAT.encode()).hexdigest()[:8]
    path = cache_dir() / f"memory-{RUNTIME}-t{threads}-{fingerprint(bench_child.runtime_version(RUNTIME), threads)}-{method}.json"
    if path.is_file() and not refresh:
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if d.get("format") == MEMORY_FORMAT:
                return MemoryModel(d["base_mb"], d["alpha"], d["alpha_conv"], d["gamma"], d["beta"], d["block"],
                                   tuple(map(tuple, d["points"])))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable memory model cache %s", path)
    rows = []
    with tempfile.TemporaryDirectory(prefix="chita-edge-mem-") as td:
        series = _memory_series(Path(td))
        for i, (p, fmb, cmb, lmb, amb) in enumerate(series):
            r = child.run_child(p, runtime=RUNTIME, threads=threads, warmup=2, runs=5, profile_runs=0)
            rows.append((fmb, cmb, lmb, amb, float(r["peak_memory_mb"])))
            if progress:
                progress("memory model", i + 1, len(series))
    A = np.array([[1.0, *r[:4]] for r in rows])
    y = np.array([r[4] for r in rows])
    coef = _nnls(A, y)
    base, alpha, alpha_conv, gamma, beta = (float(c) for c in coef)
    mm = MemoryModel(base, alpha, alpha_conv, gamma, beta, nchwc_block(), tuple(rows))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"format": MEMORY_FORMAT, "base_mb": base, "alpha": alpha,
                                            "alpha_conv": alpha_conv, "gamma": gamma, "beta": beta,
                                            "block": mm.block, "points": rows}, indent=1))
    except (OSError, BadInput) as e:
        log.warning("could not cache the memory model at %s: %s", path, e)
    return mm


__all__ = ["MEMORY_FORMAT", "MemoryModel", "MiB", "memory_model"]
