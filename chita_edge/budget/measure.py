"""Measuring a candidate of the budget search: export it to ONNX and benchmark it for the profile."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chita_edge.budget.config import Progress
from chita_edge.devices.bench import BenchConfig, benchmark, best_latency
from chita_edge.devices.profiles import Profile
from chita_edge.exporters import ExportConfig, export_model


def measure_model(model: nn.Module, example_input: torch.Tensor, profile: Profile, path: Path, *, percentile: str,
                  runs: int, repeats: int, parity_inputs: torch.Tensor | None = None,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Export ``model`` to ONNX at ``path`` (compact layout, parity-checked) and benchmark it ``repeats`` times
    for ``profile``; medians of the latency at ``percentile`` (device estimate), peak memory and file size."""
    px = parity_inputs if parity_inputs is not None else example_input
    export_model(model, ExportConfig(format="onnx", layout="compact"), example_input=example_input[:1], out=path,
                 parity_inputs=px[:16], parity_source="data" if parity_inputs is not None else "random")
    lats, hosts, mems, dens, prov = [], [], [], [], ""
    res: dict[str, Any] = {}
    for i in range(repeats):
        res = benchmark(path, [profile], BenchConfig(runs=runs, warmup=max(5, runs // 10), profile_runs=3))
        lat, prov = best_latency(res, profile.id)
        lats.append(float(lat[percentile]))
        hosts.append(float(res["latency_ms"][percentile]))
        mems.append(float(res["peak_memory_mb"]))
        est = (res.get("device_estimates") or {}).get(profile.id) or {}
        if est.get("dense_fraction") is not None:
            dens.append(float(est["dense_fraction"]))
        if progress:
            progress("benchmarking", i + 1, repeats)
    return {"latency_ms": statistics.median(lats), "host_latency_ms": statistics.median(hosts),
            "memory_mb": statistics.median(mems), "file_mb": float(res["file_mb"]), "percentile": percentile,
            "dense_fraction": statistics.median(dens) if dens else None,
            "latency_band": est.get("band"),  # the estimate's error band (factors), for check's rule in prune
            "latency_provenance": prov, "repeats": repeats, "runs": runs, "latency_samples": lats,
            "memory_samples": mems, "file": str(path)}
