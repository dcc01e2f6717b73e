"""Run one benchmark of an exported file in a fresh ``python -m chita_edge.devices.bench_child`` process and
read its one-line JSON result (the parent side of ``bench_child``; ``bench`` and ``calibration`` both use it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from chita_edge.core.errors import BadInput, RuntimeFailure


def child_args(path: str, runtime: str | None, threads: int, warmup: int, runs: int, xnnpack: bool | None,
                profile_runs: int) -> list[str]:
    xnn = "auto" if xnnpack is None else "on" if xnnpack else "off"
    a = [path, "--threads", str(threads), "--warmup", str(warmup), "--runs", str(runs),
         "--xnnpack", xnn, "--profile-runs", str(profile_runs)]
    if runtime:
        a += ["--runtime", runtime]
    return a


def parse_child(stdout: str, stderr: str, rc: int, where: str) -> dict[str, Any]:
    line = next((ln for ln in reversed(stdout.strip().splitlines()) if ln.startswith("{")), None)
    if line is None:
        tail = " | ".join(stderr.strip().splitlines()[-3:])[:400]
        if "No module named chita_edge" in stderr:
            raise RuntimeFailure(f"{where}: chita-edge is not installed for that Python "
                                 "(pip install chita-edge there, or pass --remote-python)")
        raise RuntimeFailure(f"{where}: the benchmark process ended with exit {rc} and no result ({tail or 'no output'})")
    try:
        result = json.loads(line)
    except ValueError:
        raise RuntimeFailure(f"{where}: the benchmark process printed unreadable JSON") from None
    if "error" in result:
        cls = BadInput if result.get("exit_code") == 2 else RuntimeFailure
        raise cls(result["error"])
    return result


def run_child(path: str | os.PathLike, *, runtime: str | None = None, threads: int = 1, warmup: int = 10,
              runs: int = 50, xnnpack: bool | None = None, profile_runs: int = 5,
              timeout_s: float = 900.0) -> dict[str, Any]:
    """Benchmark ``path`` in a fresh ``python -m chita_edge.devices.bench_child`` process; its JSON result."""
    cmd = [sys.executable, "-m", "chita_edge.devices.bench_child",
           *child_args(str(path), runtime, threads, warmup, runs, xnnpack, profile_runs)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"{path}: the benchmark took longer than {timeout_s:.0f} s; use fewer --runs") from None
    return parse_child(p.stdout, p.stderr, p.returncode, str(path))
