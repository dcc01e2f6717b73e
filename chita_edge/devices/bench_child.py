"""The measuring process of ``chita-edge bench``: one model, one runtime, one JSON object on stdout.

Run as ``python -m chita_edge.devices.bench_child FILE --threads 1 --warmup 10 --runs 50``. It is a fresh process so
that its memory figures belong to this model alone: the peak resident set (VmHWM, reset just before the model
is loaded through /proc/self/clear_refs) minus the resident set before loading. The same command runs on a
device over SSH (``bench --remote``). On failure it prints ``{"error": ..., "exit_code": 2|3}`` and exits
with that code.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from importlib import metadata
from typing import Any

import numpy as np

from chita_edge.core.errors import BadInput, ChitaError, RuntimeFailure
from chita_edge.devices.runtimes import LayerCost, op_mix, prime_runtime, profile_onnx, tflite_layers
from chita_edge.exporters.runtime import RUNTIME_OF, detect_format, load_session

MiB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(), "system": platform.system(),
            "python": platform.python_version()}


def _input_for(sess: Any, seed: int) -> np.ndarray:
    shape = tuple(sess.input_shape)
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def runtime_version(runtime: str) -> str:
    dist = {"onnxruntime": "onnxruntime", "litert": "ai-edge-litert"}[runtime]
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def timed_runs(sess: Any, x: np.ndarray, *, warmup: int, runs: int) -> list[float]:
    """``warmup`` untimed calls, then the wall time of each of ``runs`` calls of ``sess.run(x)``, in ms."""
    for _ in range(warmup):
        sess.run(x)
    samples = []
    for _ in range(runs):
        t = time.perf_counter_ns()
        sess.run(x)
        samples.append((time.perf_counter_ns() - t) / 1e6)
    return samples


def _stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "min": float(a.min()),
            "max": float(a.max()), "std": float(a.std())}


def _layers_json(layers: list[LayerCost] | None) -> list[dict[str, Any]] | None:
    if layers is None:
        return None
    return [{"name": lc.name, "op": lc.op, "kind": lc.kind, "ms": lc.ms, "param_bytes": lc.param_bytes,
             "macs": lc.macs} for lc in layers]


def measure(path: str, *, runtime: str | None = None, threads: int = 1, warmup: int = 10, runs: int = 50,
            xnnpack: bool | None = None, profile_runs: int = 5, seed: int = 0) -> dict[str, Any]:
    """Load ``path``, time ``runs`` inferences after ``warmup``, then cost its layers (profiled session)."""
    if runs < 1 or warmup < 0 or profile_runs < 0:
        raise BadInput(f"runs {runs}, warmup {warmup}: expected runs >= 1 and warmup >= 0")
    if not os.path.isfile(path):
        raise BadInput(f"{path}: model file not found")
    rt = RUNTIME_OF[detect_format(path)]
    if runtime is not None and runtime != rt:
        raise BadInput(f"{path}: this file runs on {rt}, not {runtime}")
    rss_pre = _status_kib("VmRSS")
    primed = prime_runtime(rt, threads)
    gc.collect()
    rss0 = _status_kib("VmRSS")
    reset = _reset_peak()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    sess = load_session(path, threads, xnnpack=xnnpack)
    load_ms = (time.perf_counter() - t0) * 1e3
    x = _input_for(sess, seed)
    try:
        first = sess.run(x)
    except ChitaError:
        raise
    except Exception as e:
        raise RuntimeFailure(f"{path}: inference failed ({type(e).__name__}: {str(e).strip()[:300]})") from None
    if not np.all(np.isfinite(first)):
        hint = " (sparse TFLite weights under XNNPACK do this: run with --no-xnnpack)" if rt == "litert" else ""
        raise RuntimeFailure(f"{path}: the model returns NaN or Inf on a random input{hint}")
    samples = timed_runs(sess, x, warmup=warmup, runs=runs)
    hwm = _status_kib("VmHWM")
    if reset and hwm is not None and rss0 is not None:
        peak_mb, method = max(0, hwm - rss0) / 1024, "VmHWM - VmRSS before load (runtime primed, peak reset)"
    else:  # no /proc: the process's max RSS growth during the run (a lower bound when imports peaked higher)
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024
        peak_mb, method = max(0, maxrss - maxrss0) * scale / MiB, "ru_maxrss growth during load and runs"
    rss_after = _status_kib("VmRSS")
    used_xnnpack = bool(getattr(sess, "xnnpack", False)) if rt == "litert" else None
    del sess
    layers: list[LayerCost] | None = None
    runtime_peak = None
    if profile_runs:
        if rt == "onnxruntime":
            layers, runtime_peak = profile_onnx(path, x, threads=threads, runs=profile_runs)
        else:
            layers = tflite_layers(path)
    size = os.path.getsize(path)
    return {
        "file": os.path.abspath(path),
        "file_bytes": size,
        "file_mb": size / MiB,
        "runtime": rt,
        "runtime_version": runtime_version(rt),
        "threads": threads,
        "xnnpack": used_xnnpack,
        "warmup": warmup,
        "runs": runs,
        "load_ms": load_ms,
        "latency_ms": _stats(samples),
        "samples_ms": [round(s, 4) for s in samples],
        "peak_memory_mb": peak_mb,
        "memory_method": method,
        "runtime_overhead_mb": (rss0 - rss_pre) / 1024 if primed and rss0 is not None and rss_pre is not None else None,
        "rss_after_mb": (rss_after or 0) / 1024,
        "runtime_peak_memory_mb": runtime_peak / MiB if runtime_peak else None,
        "input": {"shape": list(x.shape), "dtype": "float32"},
        "layers": _layers_json(layers),
        "op_mix": op_mix(layers),
        "host": host_info(),
        "provenance": "measured-host",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chita_edge.devices.bench_child", description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--runtime", choices=("onnxruntime", "litert"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--xnnpack", choices=("on", "off", "auto"), default="auto",
                    help="LiteRT XNNPACK delegate; auto follows the file's requirements")
    ap.add_argument("--profile-runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        result = measure(a.file, runtime=a.runtime, threads=a.threads, warmup=a.warmup, runs=a.runs,
                         xnnpack=None if a.xnnpack == "auto" else a.xnnpack == "on", profile_runs=a.profile_runs, seed=a.seed)
        code = 0
    except ChitaError as e:
        result, code = {"error": str(e), "exit_code": e.exit_code}, e.exit_code
    except MemoryError:
        result, code = {"error": f"{a.file}: out of memory while benchmarking", "exit_code": 3}, 3
    except Exception as e:  # one line, never a traceback: the parent reads stdout as JSON
        result, code = {"error": f"{a.file}: {type(e).__name__}: {str(e).strip()[:300]}", "exit_code": 3}, 3
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
