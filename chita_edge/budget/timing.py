"""Exporting and timing the cost model's units on this host, and the per-host cache of their timings.

* ``export``: a unit to ONNX (opset 17, constants folded); ``time_file``: an ONNX file's kernel time from
  ONNX Runtime's profiler, layout reorders excluded.
* ``time_overhead``: the fixed cost of a call into the runtime and the profiler's per-node excess.
* ``Cache``: one JSON file of unit timings per host, runtime and threads (``cache_dir``, named with
  ``fingerprint``).
* ``nchwc_block``: ONNX Runtime's NCHWc channel block on this CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chita_edge.core.errors import BadInput
from chita_edge.core.io import atomic_write_text

# module-qualified, so that patching these functions where they are defined reaches the calls below
from chita_edge.devices import bench_child, calibration, runtimes
from chita_edge.exporters import load_session

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]

TABLE_FORMAT = "chita-edge/layer-latency-v2"
RUNTIME = "onnxruntime"
_REORDER_OPS = ("ReorderInput", "ReorderOutput")


def cache_dir() -> Path:
    """$CHITA_EDGE_CACHE, else ~/.cache/chita-edge (shared with the host calibration)."""
    return calibration.cache_dir()


def export(module: nn.Module, inputs: list[torch.Tensor], path: Path) -> None:
    """``module`` on ``inputs`` to the ONNX file ``path`` (inputs in0, in1, ..., output out), warnings hidden."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs), str(path), dynamo=False, opset_version=17,
                          input_names=[f"in{i}" for i in range(len(inputs))], output_names=["out"],
                          do_constant_folding=True)


def time_file(path: Path, x: np.ndarray, threads: int, runs: int) -> tuple[float, int]:
    """(median kernel time in ms summed over the file's nodes, number of nodes), layout reorders excluded, from
    ONNX Runtime's profiler."""
    layers, _ = runtimes.profile_onnx(path, x, threads=threads, runs=runs)
    nodes = [lc for lc in layers if lc.op not in _REORDER_OPS]
    return float(sum(lc.ms or 0.0 for lc in nodes)), len(nodes)


class _Chain(nn.Module):
    """k cheap element-wise nodes on a tiny tensor: what a node costs beyond its arithmetic."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.k):
            x = torch.relu(x) + 0.001 if i % 2 else torch.relu(x) * 1.001
        return x


def _wall_p50(path: Path, threads: int, runs: int) -> float:
    sess = load_session(path, threads)
    x = np.random.default_rng(0).random((1, 8), dtype=np.float32)
    samples = bench_child.timed_runs(sess, x, warmup=50, runs=runs)
    del sess
    return float(np.median(samples))


def time_overhead(threads: int, runs: int = 400) -> tuple[float, float, str]:
    """(call_ms, node_ms, runtime version). ``call_ms``: wall time (p50) of one inference of a trivial model
    through the benchmark's session class, the fixed cost of a call into the runtime. ``node_ms``: how much the
    profiler's per-node time exceeds a node's real share of the wall time (its timestamps have microsecond
    resolution and their own cost): the slope of profiled time minus the slope of wall time over chains of 2
    and 60 trivial nodes. Unit timings are corrected by it, per node."""
    with tempfile.TemporaryDirectory(prefix="chita-edge-cost-") as td:
        p = Path(td) / "trivial.onnx"
        export(nn.ReLU(), [torch.rand(1, 8)], p)
        call = _wall_p50(p, threads, runs)
        prof, wall, nodes = [], [], []
        x = torch.rand(1, 8)
        for k in (2, 60):
            pk = Path(td) / f"chain{k}.onnx"
            export(_Chain(k), [x], pk)
            ms, n = time_file(pk, x.numpy(), threads, 100)
            prof.append(ms)
            nodes.append(n)
            wall.append(_wall_p50(pk, threads, runs))
        dn = max(nodes[1] - nodes[0], 1)
        node = max(0.0, (prof[1] - prof[0]) / dn - (wall[1] - wall[0]) / dn)
        return call, node, bench_child.runtime_version(RUNTIME)


def fingerprint(version: str, threads: int) -> str:
    """A short hash of this host's machine, CPU, cores and system with the runtime, its version and threads."""
    h = bench_child.host_info()
    key = json.dumps([h["machine"], h["cpu"], h["cores"], h["system"], RUNTIME, version, threads])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def nchwc_block() -> int:
    """ONNX Runtime's NCHWc channel block on this CPU: 16 with AVX-512, else 8."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return 16 if "avx512f" in line.split() else 8
    except OSError:
        pass
    return 8


class Cache:
    """One JSON file of timings per host, runtime and threads:
    ``{"entries": {key: [profiled ms, nodes]}, "overhead_ms": ..., "node_ms": ...}``."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path, self.meta, self.dirty = path, meta, False
        self.entries: dict[str, list[float]] = {}
        self.overhead_ms: float | None = None
        self.node_ms: float | None = None
        if path.is_file():
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
                if d.get("format") == TABLE_FORMAT:
                    self.entries = {str(k): [float(v[0]), float(v[1])] for k, v in d.get("entries", {}).items()}
                    self.overhead_ms = d.get("overhead_ms")
                    self.node_ms = d.get("node_ms")
            except (OSError, ValueError, TypeError, AttributeError, IndexError):
                log.warning("ignoring unreadable latency table cache %s", path)

    def ms(self, key: str) -> float:
        """A unit's time with the profiler's per-node excess removed."""
        raw, nodes = self.entries[key]
        return max(0.0, raw - (self.node_ms or 0.0) * nodes)

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"format": TABLE_FORMAT, **self.meta, "overhead_ms": self.overhead_ms,
                                                     "node_ms": self.node_ms, "entries": self.entries}, indent=0,
                                                    sort_keys=True))
            self.dirty = False
        except (OSError, BadInput) as e:
            log.warning("could not cache the latency tables at %s: %s", self.path, e)


__all__ = ["RUNTIME", "TABLE_FORMAT", "Cache", "Progress", "cache_dir", "export", "fingerprint", "nchwc_block",
           "time_file", "time_overhead"]
