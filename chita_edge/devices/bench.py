"""``chita-edge bench``: measure an exported file in a child process, locally or on a device over SSH, and
estimate its latency on device profiles.

Every latency carries its provenance: ``measured-host`` (this machine), ``measured-device`` (``--remote``), or
``estimated-device (calibrated, anchors …, fit error …)`` (host latency × the profile's fitted factor).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chita_edge.core.data import load_data
from chita_edge.core.errors import BadInput, ChitaError, RuntimeFailure
from chita_edge.core.io import require_file, sha256_file
from chita_edge.devices.calibration import estimate, host_calibration
from chita_edge.devices.child import child_args, parse_child, run_child
from chita_edge.devices.profiles import Profile
from chita_edge.exporters import load_session
from chita_edge.exporters.runtime import RUNTIME_OF, detect_format, file_requirements

RUNTIMES = ("onnxruntime", "litert")

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """How to measure. ``threads`` None: 1 on this host (the calibration is per thread count), the profile's
    device threads with ``remote``. ``xnnpack`` None: the profile's LiteRT setting (on without a profile)."""

    runtime: str | None = None
    threads: int | None = None
    warmup: int = 10
    runs: int = 50
    xnnpack: bool | None = None
    profile_runs: int = 5
    remote: str | None = None
    remote_python: str = "python3"
    ssh_options: tuple[str, ...] = field(default_factory=tuple)
    timeout_s: float = 900.0

    def validate(self) -> None:
        if self.runs < 1 or self.runs > 100_000:
            raise BadInput(f"--runs {self.runs}: expected 1..100000")
        if self.warmup < 0 or self.warmup > 100_000:
            raise BadInput(f"--warmup {self.warmup}: expected 0..100000")
        if self.threads is not None and not 1 <= self.threads <= 256:
            raise BadInput(f"--threads {self.threads}: expected 1..256")


def runtime_of(path: str | os.PathLike, runtime: str | None = None) -> str:
    """The runtime that runs ``path`` (from its bytes); ``runtime`` when given must agree."""
    if runtime is not None and runtime not in RUNTIMES:
        raise BadInput(f"--runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    rt = RUNTIME_OF[detect_format(path)]
    if runtime is not None and runtime != rt:
        raise BadInput(f"{path}: this file runs on {rt}, not {runtime}")
    return rt


# ------------------------------------------------------------------------------------------------ remote
@dataclass(frozen=True)
class SshTarget:
    user: str | None
    host: str
    port: int

    @property
    def dest(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def scp_dest(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" if self.user else host

    def __str__(self) -> str:
        return f"ssh://{self.dest}:{self.port}"


_SSH_RE = re.compile(r"^(?:ssh://)?(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]*)@)?"
                     r"(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9a-fA-F:]+\])(?::(?P<port>\d+))?/?$")


def parse_remote(spec: str) -> SshTarget:
    """``ssh://user@host[:port]`` (or ``user@host``) → SshTarget, else BadInput."""
    m = _SSH_RE.match(spec.strip())
    if not m or spec.strip().startswith("-"):
        raise BadInput(f"--remote {spec!r}: expected ssh://user@host[:port]")
    port = int(m.group("port") or 22)
    if not 1 <= port <= 65535:
        raise BadInput(f"--remote {spec!r}: port {port} is out of range 1..65535")
    return SshTarget(m.group("user"), m.group("host").strip("[]"), port)


def _ssh_options(options: Sequence[str]) -> list[str]:
    opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-o", "StrictHostKeyChecking=accept-new",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    for o in options:
        opts += ["-o", o]
    return opts


def _run(cmd: list[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise RuntimeFailure(f"{what}: '{cmd[0]}' is not installed (the OpenSSH client is needed for --remote)") from None
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"{what}: no answer within {timeout:.0f} s") from None
    if p.returncode == 255:  # ssh's own failure: connection, authentication
        msg = " | ".join(ln for ln in p.stderr.strip().splitlines() if not ln.startswith("Warning: Permanently"))
        raise RuntimeFailure(f"{what}: ssh failed ({msg[:300] or 'exit 255'})")
    return p


def run_remote(path: str | os.PathLike, target: SshTarget, *, python: str = "python3",
               ssh_options: Sequence[str] = (), runtime: str | None = None, threads: int = 1, warmup: int = 10,
               runs: int = 50, xnnpack: bool | None = None, profile_runs: int = 5,
               timeout_s: float = 900.0) -> dict[str, Any]:
    """Copy ``path`` to the device, run ``python -m chita_edge.devices.bench_child`` there, bring the JSON back."""
    base = _ssh_options(ssh_options)
    ssh = ["ssh", *base, "-p", str(target.port), target.dest]
    scp = ["scp", "-q", *base, "-P", str(target.port)]
    where = f"{target}"
    p = _run([*ssh, "mktemp -d /tmp/chita-edge.XXXXXXXX"], 60, where)
    tmp = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else ""
    if not tmp.startswith("/tmp/chita-edge."):
        raise RuntimeFailure(f"{where}: could not make a temporary directory ({p.stderr.strip()[:200]})")
    try:
        name = Path(path).name
        dest_name = name if re.fullmatch(r"[A-Za-z0-9._-]+", name) else "model" + Path(path).suffix
        remote_file = f"{tmp}/{dest_name}"
        c = _run([*scp, str(path), f"{target.scp_dest}:{remote_file}"], timeout_s, where)
        if c.returncode != 0:
            raise RuntimeFailure(f"{where}: copying {path} failed ({c.stderr.strip()[:300]})")
        args = child_args(remote_file, runtime, threads, warmup, runs, xnnpack, profile_runs)
        remote_cmd = " ".join(shlex.quote(a) for a in [python, "-m", "chita_edge.devices.bench_child", *args])
        r = _run([*ssh, remote_cmd], timeout_s, where)
        result = parse_child(r.stdout, r.stderr, r.returncode, where)
    finally:
        try:
            _run([*ssh, f"rm -rf {shlex.quote(tmp)}"], 60, where)
        except ChitaError as e:
            log.warning("could not remove %s on %s: %s", tmp, where, e)
    result["provenance"] = "measured-device"
    result["remote"] = str(target)
    result["file"] = os.path.abspath(path)
    return result


# --------------------------------------------------------------------------------------------- benchmark
def accuracy_of_file(path: str | os.PathLike, data: str, *, threads: int = 1,
                     xnnpack: bool | None = None) -> dict[str, Any]:
    """Top-1 accuracy (percent) of an exported file on ``data``'s test set, run by its runtime."""
    import numpy as np


    ds = load_data(data)
    sess = load_session(path, threads, xnnpack=xnnpack)
    x = ds.x_test.numpy()
    if tuple(x.shape[1:]) != tuple(sess.input_shape[1:]):
        raise BadInput(f"{data}: samples of shape {tuple(x.shape[1:])} do not fit the input of {Path(path).name}, "
                       f"{tuple(sess.input_shape[1:])}")
    try:
        logits = sess.run(x)
    except ChitaError:
        raise
    except Exception as e:
        raise RuntimeFailure(f"{path}: inference on {data} failed ({type(e).__name__}: {str(e)[:200]})") from None
    pred = np.asarray(logits).reshape(len(x), -1).argmax(1)
    y = ds.y_test.numpy()
    return {"data": data, "accuracy": float(100.0 * (pred == y).mean()), "test_examples": int(len(y))}


def _estimates(result: dict[str, Any], profiles: Sequence[Profile], threads: int,
               progress: Progress | None) -> dict[str, dict[str, Any]]:

    out: dict[str, dict[str, Any]] = {}
    host = None
    for prof in profiles:
        if prof.calibration is None:
            out[prof.id] = {"profile": prof.id, "available": False, "confidence": prof.confidence,
                            "reason": f"profile {prof.id} is not calibrated: it has no calibration rows"}
            continue
        if host is None:
            host = host_calibration(result["runtime"], threads, progress=progress)
        out[prof.id] = estimate(prof, host, result["latency_ms"], result.get("op_mix"))
    return out


def benchmark(path: str | os.PathLike, profiles: Sequence[Profile] = (), cfg: BenchConfig | None = None, *,
              data: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Measure one exported file (child process or ``cfg.remote``) and estimate it on each profile."""
    cfg = cfg or BenchConfig()
    cfg.validate()
    p = require_file(path, "model file")
    runtime = runtime_of(p, cfg.runtime)
    first = profiles[0] if profiles else None
    xnnpack = cfg.xnnpack
    if xnnpack is None and runtime == "litert":  # the file's requirement first, then the profile's setting
        xnnpack = bool(file_requirements(p)["xnnpack"]) and (first.xnnpack() if first else True)
    if progress:
        progress(f"benchmarking {p.name}", 0, 1)
    if cfg.remote:
        target = parse_remote(cfg.remote)
        threads = cfg.threads or (first.device_threads(runtime) if first else 1)
        result = run_remote(p, target, python=cfg.remote_python, ssh_options=cfg.ssh_options, runtime=runtime,
                            threads=threads, warmup=cfg.warmup, runs=cfg.runs, xnnpack=xnnpack,
                            profile_runs=cfg.profile_runs, timeout_s=cfg.timeout_s)
    else:
        threads = cfg.threads or 1
        result = run_child(p, runtime=runtime, threads=threads, warmup=cfg.warmup, runs=cfg.runs, xnnpack=xnnpack,
                           profile_runs=cfg.profile_runs, timeout_s=cfg.timeout_s)
    if progress:
        progress(f"benchmarking {p.name}", 1, 1)
    result["sha256"] = sha256_file(p)
    result["profiles"] = [pr.id for pr in profiles]
    if profiles and not cfg.remote:
        est = _estimates(result, profiles, threads, progress)
        result["device_estimates"] = est
        if est[profiles[0].id].get("available"):
            result["device_estimate"] = est[profiles[0].id]
    if data:
        result["accuracy"] = accuracy_of_file(p, data, threads=threads, xnnpack=xnnpack)
    return result


def best_latency(result: dict[str, Any], profile_id: str | None) -> tuple[dict[str, float], str]:
    """The latency figures that speak for a profile, most direct first: measured on the device, estimated for
    it from the host, else measured on this host (said so)."""
    if result.get("provenance") == "measured-device":
        return result["latency_ms"], "measured-device"
    est = (result.get("device_estimates") or {}).get(profile_id or "", {})
    if est.get("available"):
        return est["latency_ms"], est["provenance"]
    return result["latency_ms"], "measured-host"


def latency_evidence(result: dict[str, Any], profile_id: str | None) -> dict[str, Any]:
    """What a latency verdict for ``profile_id`` can rest on: ``source`` ``measured-device`` (no band: the
    measurement), ``estimated-device`` (with ``band``: ``{pct: [low, high]}``, None when unknown) or
    ``measured-host`` (this machine: it cannot pass a device budget; ``reason`` says why there is no estimate)."""
    lat, prov = best_latency(result, profile_id)
    if prov == "measured-device":
        return {"source": "measured-device", "latency_ms": lat, "provenance": prov, "band": None}
    est = (result.get("device_estimates") or {}).get(profile_id or "", {})
    if est.get("available"):
        return {"source": "estimated-device", "latency_ms": lat, "provenance": prov,
                "band": (est.get("band") or {}).get("latency_ms"), "confidence": est.get("confidence")}
    reason = est.get("reason") or (f"no device estimate was made for {Path(result.get('file', '')).name} "
                                   f"on {profile_id}")
    return {"source": "measured-host", "latency_ms": lat, "provenance": prov, "band": None, "reason": reason,
            "confidence": est.get("confidence")}


def benchmark_many(paths: Sequence[str | os.PathLike], profiles: Sequence[Profile] = (),
                   cfg: BenchConfig | None = None, *, data: str | None = None,
                   progress: Progress | None = None) -> list[dict[str, Any]]:
    if not paths:
        raise BadInput("bench: give at least one model file")
    return [benchmark(p, profiles, cfg, data=data, progress=progress) for p in paths]
