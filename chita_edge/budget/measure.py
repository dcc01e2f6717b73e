"""Measuring a candidate of the budget search: export it to ONNX and benchmark it for the profile.

The latency is measured until it is known well enough to decide with (``measure_model``): benchmark processes
are repeated until the 95 % interval of the latency (``latency_interval``: the median of the per-process values
times ``exp(+-h)``, ``h`` = Student's t over the spread of their logarithms, ``precision_of``) is within
``precision`` (3 %), or ``max_repeats`` processes ran; then ``precise`` is false and ``latency_precision`` is the
floor reached. Measurements are cached per file (its SHA-256), profile, percentile, runs, precision and host
(``reuse``): the same file is not re-timed, so that the same inputs and cache give the same decisions. A cached
entry whose repeats stopped early (it settled the decisions of the search that made it) is reused only where it
settles the new decisions too or is as precise as the new limits allow (``settles``); else more processes are run
on top of its samples and the entry is updated.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chita_edge.budget.config import Progress
from chita_edge.budget.timing import RUNTIME, cache_dir, fingerprint
from chita_edge.core.errors import BadInput
from chita_edge.core.io import atomic_write_text, sha256_file
from chita_edge.devices import bench_child
from chita_edge.devices.bench import BenchConfig, benchmark, best_latency
from chita_edge.devices.profiles import Profile
from chita_edge.exporters import ExportConfig, export_model

PRECISION = 0.03  # the relative half-width of the latency's 95 % interval that a measurement aims for
MEASUREMENTS_FORMAT = "chita-edge/measurements-v1"
# Student's t, 97.5 % quantile, by degrees of freedom (1..20); beyond 20: 2.09 down to 1.96
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086)


def precision_of(samples: list[float]) -> float:
    """The relative half-width (log space) of the 95 % interval of the typical value of ``samples`` (one per
    benchmark process): t(0.975, n - 1) * sd(ln x) / sqrt(n); infinite with fewer than two samples."""
    xs = [math.log(max(v, 1e-12)) for v in samples]
    if len(xs) < 2:
        return math.inf
    t = _T975[len(xs) - 2] if len(xs) - 1 <= len(_T975) else 1.96 + 2.6 / (len(xs) - 1)
    return t * statistics.stdev(xs) / math.sqrt(len(xs))


def _cache_path() -> Path:
    return cache_dir() / f"measurements-{fingerprint(bench_child.runtime_version(RUNTIME), 1)}.json"


def _cached(key: str) -> dict[str, Any] | None:
    p = _cache_path()
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        return d["entries"].get(key) if d.get("format") == MEASUREMENTS_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _store(key: str, value: dict[str, Any]) -> None:
    p = _cache_path()
    try:
        d = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
        entries = d.get("entries", {}) if d.get("format") == MEASUREMENTS_FORMAT else {}
    except (OSError, ValueError, AttributeError):
        entries = {}
    entries[key] = value
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, json.dumps({"format": MEASUREMENTS_FORMAT, "entries": entries}, sort_keys=True))
    except (OSError, BadInput):
        pass


def settles(hit: Mapping[str, Any], *, repeats: int, precision: float | None, most: int,
            decided: Callable[[dict[str, Any]], bool] | None) -> bool:
    """Whether the cached measurement ``hit`` answers a request for at least ``repeats`` processes (at most
    ``most``) to ``precision``, whose decisions ``decided`` judges: it has the repeats, and it is precise, or
    reached ``most``, or its interval settles the new decisions (it may have stopped early for other limits)."""
    n, iv = int(hit.get("repeats") or 0), hit.get("latency_interval")
    if n < repeats:
        return False
    if precision is None or hit.get("precise") or n >= most:
        return True
    return decided is not None and bool(iv) and decided(
        {"latency_ms": hit["latency_ms"], "latency_interval": list(iv), "repeats": n})


def _samples(hit: Mapping[str, Any] | None) -> tuple[list[float], list[float], list[float], list[float]]:
    """The per-process samples of a cached entry to continue from (latency, host latency, memory, dense
    fraction); empty lists where the entry has none of them all (an older entry: measured again from scratch)."""
    names = ("latency_samples", "host_samples", "memory_samples", "dense_samples")
    if not hit or any(not isinstance(hit.get(k), list) for k in names) or not hit["latency_samples"]:
        return [], [], [], []
    lats, hosts, mems, dens = ([float(v) for v in hit[k]] for k in names)
    return lats, hosts, mems, dens


# The variance of the median of K normal samples over that of one (K = 1..7; beyond, pi / (2K)): what a
# ``check --repeats K`` (the median of K benchmark processes) spreads by, in log space.
_MEDIAN_VAR = (1.0, 0.5, 0.4487, 0.3430, 0.2868, 0.2367, 0.2104)  # the even ones are not used (see median_var)


def median_var(k: int) -> float:
    """Var(median of ``k`` normal samples) / Var(one sample); ``check`` judges the upper middle of an even ``k``,
    counted here as the median of ``k - 1`` (wider)."""
    k = max(1, k if k % 2 else k - 1)
    return _MEDIAN_VAR[k - 1] if k <= len(_MEDIAN_VAR) else math.pi / (2 * k)


def check_interval(m: Mapping[str, Any], check_repeats: int = 1) -> list[float] | None:
    """Where the latency that ``check --repeats K`` (``check_repeats``: the median of K benchmark processes) will
    see for the same file is expected (95 %), so that a round passes only where such a check would pass too.
    From the median's interval over ``repeats`` processes (half-width h = t sd / sqrt(n) in log space), the
    prediction interval of a median of K more is h * sqrt(1 + n * v(K)) with v(K) = ``median_var``: for K = 1 (one
    run, ``check``'s default) h * sqrt(n + 1); without ``repeats``, the interval."""
    iv, n, v = m.get("latency_interval"), m.get("repeats"), m.get("latency_ms")
    if not iv or not n or n < 2 or not v or iv[1] <= v:
        return list(iv) if iv else None
    w = math.log(float(iv[1]) / float(v)) * math.sqrt(1 + n * median_var(check_repeats))
    return [float(v) * math.exp(-w), float(v) * math.exp(w)]


def measure_model(model: nn.Module, example_input: torch.Tensor, profile: Profile, path: Path, *, percentile: str,
                  runs: int, repeats: int, parity_inputs: torch.Tensor | None = None,
                  progress: Progress | None = None, precision: float | None = None, max_repeats: int | None = None,
                  reuse: bool = False, decided: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Export ``model`` to ONNX at ``path`` (compact layout, parity-checked) and benchmark it at least ``repeats``
    times for ``profile`` -- with ``precision``, until the latency's 95 % interval is within it (at most
    ``max_repeats`` times); medians of the latency at ``percentile`` (device estimate), peak memory and file size.
    ``reuse``: a cached measurement of the same file (bytes), profile, percentile, runs, precision and host is
    returned where it ``settles`` this request; otherwise it is continued with more processes and updated.
    ``decided(m)``: true when the measurement so far (``latency_ms``, ``latency_interval``, ``repeats``) already
    settles every decision made with it (its interval straddles no limit and no window edge); then the repeats stop
    before ``precision`` is reached, since more of them could not change a verdict (the result still says
    ``precise: false`` and the interval it reached)."""
    px = parity_inputs if parity_inputs is not None else example_input
    export_model(model, ExportConfig(format="onnx", layout="compact"), example_input=example_input[:1], out=path,
                 parity_inputs=px[:16], parity_source="data" if parity_inputs is not None else "random")
    key = f"{sha256_file(path)}|{profile.id}|{percentile}|{runs}|{precision}" if reuse else ""
    most = max(repeats, max_repeats or repeats) if precision is not None else repeats
    hit = _cached(key) if reuse else None
    if hit is not None and settles(hit, repeats=repeats, precision=precision, most=most, decided=decided):
        return {**hit, "file": str(path), "cached": True}
    lats, hosts, mems, dens = _samples(hit)  # a cached entry that does not settle this request: measure more
    prov = ""
    res: dict[str, Any] = {}
    est: dict[str, Any] = {}
    i = len(lats)
    while i < most:
        res = benchmark(path, [profile], BenchConfig(runs=runs, warmup=max(5, runs // 10), profile_runs=3))
        lat, prov = best_latency(res, profile.id)
        lats.append(float(lat[percentile]))
        hosts.append(float(res["latency_ms"][percentile]))
        mems.append(float(res["peak_memory_mb"]))
        est = (res.get("device_estimates") or {}).get(profile.id) or {}
        if est.get("dense_fraction") is not None:
            dens.append(float(est["dense_fraction"]))
        i += 1
        if progress:
            progress("benchmarking", i, most)
        if i >= repeats:
            h = precision_of(lats)
            if precision is None or h <= precision:
                break
            mid = statistics.median(lats)
            if decided is not None and math.isfinite(h) and decided(
                    {"latency_ms": mid, "latency_interval": [mid * math.exp(-h), mid * math.exp(h)], "repeats": i}):
                break
    value = statistics.median(lats)
    h = precision_of(lats)
    out = {"latency_ms": value, "host_latency_ms": statistics.median(hosts),
           "memory_mb": statistics.median(mems), "file_mb": float(res["file_mb"]), "percentile": percentile,
           "dense_fraction": statistics.median(dens) if dens else None,
           "latency_band": est.get("band"),  # the estimate's error band (factors), for check's rule in prune
           "latency_provenance": prov, "repeats": len(lats), "runs": runs, "latency_samples": lats,
           "latency_precision": h if math.isfinite(h) else None,
           "latency_interval": [value * math.exp(-h), value * math.exp(h)] if math.isfinite(h) else None,
           "precise": None if precision is None else h <= precision, "target_precision": precision,
           "memory_samples": mems, "host_samples": hosts, "dense_samples": dens, "file": str(path), "cached": False}
    if reuse:
        _store(key, {k: v for k, v in out.items() if k not in ("file", "cached")})
    return out
