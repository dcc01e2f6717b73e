"""Host→device calibration: reference CNNs timed on this host, fitted to published device figures.

The reference architectures (MobileNetV1 from the zoo, MobileNetV2 and ResNet18 written here in plain PyTorch,
random weights, 1000 classes, 224×224) are the models that the device rows of ``devices.md`` measured. They
are exported and timed on this host with the same runtime and thread count as the benchmark (cached per host).

The model: a device runs dense operators (convolutions with groups=1, matrix products) and everything else
(depthwise convolutions, element-wise ops, pooling) at different speeds relative to this host, so

    device_ms = a_profile × host_ms × (dense + rho × (1 − dense))

where ``dense`` is the share of the model's host time spent in dense operators (measured per node by the
runtime's profiler), ``a_profile`` is each profile's scale and ``rho`` the relative weight of non-dense work,
shared by all bundled profiles (a least-squares fit in log space over every profile's anchors). A profile
therefore needs one anchor to be calibrated; with a depthwise-heavy and a dense anchor its own rows pin both
terms. The fit error printed in the provenance is the RMS relative error on the profile's own anchors (in-sample).

Every estimate also carries an out-of-sample error band (``chita_edge.devices.band``), its p90/p99 are its p50
times a stated widening, and it records the thread counts it maps between.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chita_edge.core.errors import BadInput, MissingExtra, RuntimeFailure
from chita_edge.core.io import atomic_write_text
from chita_edge.devices.band import (
    MIN_OWN_ERRORS,
    TAIL_WIDENING,
    Band,
    band_half_width,
    tail_estimates,
    thread_speedups,
)
from chita_edge.devices.bench_child import host_info, runtime_version
from chita_edge.devices.child import run_child
from chita_edge.devices.profiles import Profile, load_all
from chita_edge.models.zoo import BasicBlock, MobileNetV1

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


def _cbr(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: type[nn.Module] | None = nn.ReLU6) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_cbr(cin, hidden, 1, 1))
        layers += [_cbr(hidden, hidden, 3, stride, groups=hidden), _cbr(hidden, cout, 1, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 1.0 (Sandler et al. 2018), the torchvision layout: 3,504,872 parameters at 1000 classes."""

    CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        c = 32
        layers: list[nn.Module] = [_cbr(3, c, 3, 2)]
        for t, out, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        layers.append(_cbr(c, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


_Basic = BasicBlock  # the ResNet basic block of the zoo (same layers, same order)


class ResNet18(nn.Module):
    """ResNet18 (He et al. 2016), the torchvision layout: 11,689,512 parameters at 1000 classes."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = 64
        for i, w in enumerate((64, 128, 256, 512)):
            blocks = [_Basic(c, w, 1 if i == 0 else 2), _Basic(w, w, 1)]
            c = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


REFERENCE_MODELS: dict[str, Callable[[], nn.Module]] = {
    "mobilenet_v1": MobileNetV1,
    "mobilenet_v2": MobileNetV2,
    "resnet18": ResNet18,
}

# Which reference is which kind of anchor (devices.md §4: fit at least one of each where published).
ANCHOR_KIND = {"mobilenet_v1": "depthwise-heavy", "mobilenet_v2": "depthwise-heavy", "resnet18": "dense"}
RHO_GRID = np.exp(np.linspace(np.log(0.05), np.log(200.0), 481))


def cache_dir() -> Path:
    """Where host calibrations are cached: $CHITA_EDGE_CACHE, else ~/.cache/chita-edge."""
    env = os.environ.get("CHITA_EDGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "chita-edge"


def calibration_settings() -> dict[str, Any]:
    """Resolution, run counts and reference models of the host calibration. $CHITA_EDGE_CALIB_RESOLUTION,
    _RUNS, _REPEATS, _WARMUP and _MODELS (comma-separated) shrink it: the tests time two references with few
    runs; estimates are only meant to be used from the default (224 px, all three, 3 × 30 runs)."""
    out: dict[str, Any] = {"resolution": 224, "warmup": 5, "runs": 30, "repeats": 3}
    for key in list(out):
        v = os.environ.get(f"CHITA_EDGE_CALIB_{key.upper()}")
        if v:
            try:
                out[key] = int(v)
            except ValueError:
                raise BadInput(f"$CHITA_EDGE_CALIB_{key.upper()}={v!r}: expected an integer") from None
    if out["resolution"] < 32 or out["runs"] < 1 or out["repeats"] < 1 or out["warmup"] < 0:
        raise BadInput("$CHITA_EDGE_CALIB_*: expected resolution >= 32, runs >= 1, repeats >= 1, warmup >= 0")
    models = [m.strip() for m in os.environ.get("CHITA_EDGE_CALIB_MODELS", "").split(",") if m.strip()]
    bad = [m for m in models if m not in REFERENCE_MODELS]
    if bad or (models and len(models) < 2):
        raise BadInput(f"$CHITA_EDGE_CALIB_MODELS={','.join(models)}: expected two or more of "
                       f"{', '.join(REFERENCE_MODELS)}")
    out["models"] = [m for m in REFERENCE_MODELS if m in models] if models else list(REFERENCE_MODELS)
    return out


@dataclass(frozen=True)
class HostCalibration:
    """The reference models timed on this host: p50 ms and the dense share of their cost, per model."""

    runtime: str
    runtime_version: str
    threads: int
    resolution: int
    host: dict[str, Any]
    references: dict[str, dict[str, float]]  # model -> {"p50_ms", "dense", "p50_spread"}
    basis: str  # op-mix basis: "time" (per-node profile) or "macs"
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": "chita-edge/host-calibration-v1", "runtime": self.runtime,
                "runtime_version": self.runtime_version, "threads": self.threads, "resolution": self.resolution,
                "host": self.host, "references": self.references, "basis": self.basis}


def _host_fingerprint(runtime: str, version: str, threads: int, settings: dict[str, Any]) -> str:
    """Host, runtime and every calibration setting: a reduced calibration never serves as the full one."""

    h = host_info()
    key = json.dumps([h["machine"], h["cpu"], h["cores"], h["system"], runtime, version, threads,
                      sorted(settings.items())])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _runtime_version(runtime: str) -> str:

    v = runtime_version(runtime)
    if runtime == "litert" and v == "?":
        raise MissingExtra("tflite", "calibrating for LiteRT")
    return v


def _export_reference(name: str, runtime: str, resolution: int, out_dir: Path) -> Path:
    """The reference model with random weights, exported by chita-edge's own exporters (eval mode)."""
    torch.manual_seed(0)
    module = REFERENCE_MODELS[name]().eval()
    x = torch.rand(1, 3, resolution, resolution)
    if runtime == "onnxruntime":
        from chita_edge.exporters import onnx_format  # deferred: onnx/onnxruntime

        path = out_dir / f"{name}.onnx"
        mp, _ = onnx_format.export(module, x)
        onnx_format.save(mp, path)
        return path
    from chita_edge.exporters import tflite_format  # deferred: the LiteRT stack

    path = out_dir / f"{name}.tflite"
    path.write_bytes(tflite_format.convert(module, x))
    return path


def host_calibration(runtime: str = "onnxruntime", threads: int = 1, *, refresh: bool = False,
                     progress: Progress | None = None) -> HostCalibration:
    """Time the reference models on this host (cached per host, runtime, threads and resolution)."""

    st = calibration_settings()
    version = _runtime_version(runtime)
    fp = _host_fingerprint(runtime, version, threads, st)
    subset = "" if st["models"] == list(REFERENCE_MODELS) else "-" + "+".join(st["models"])
    path = cache_dir() / f"calibration-{runtime}-t{threads}-r{st['resolution']}{subset}-{fp}.json"
    if path.is_file() and not refresh:
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if d.get("format") == "chita-edge/host-calibration-v1" and set(d["references"]) == set(st["models"]):
                return HostCalibration(d["runtime"], d["runtime_version"], d["threads"], d["resolution"], d["host"],
                                       d["references"], d["basis"], str(path))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable calibration cache %s", path)
    log.info("calibrating %s with %d thread(s) at %d px on this host", runtime, threads, st["resolution"])
    refs: dict[str, dict[str, float]] = {}
    host: dict[str, Any] = {}
    basis = "time"
    total = len(st["models"]) * st["repeats"]
    done = 0
    with tempfile.TemporaryDirectory(prefix="chita-edge-calib-") as td:
        for name in st["models"]:
            f = _export_reference(name, runtime, st["resolution"], Path(td))
            p50s, dense = [], []
            for _ in range(st["repeats"]):
                r = run_child(f, runtime=runtime, threads=threads, warmup=st["warmup"], runs=st["runs"],
                              profile_runs=10)
                p50s.append(r["latency_ms"]["p50"])
                if r.get("op_mix"):
                    dense.append(r["op_mix"]["dense"])
                    basis = r["op_mix"]["basis"]
                host = r["host"]
                done += 1
                if progress:
                    progress("calibrating host", done, total)
            if not dense:
                raise RuntimeFailure(f"calibration: no per-layer costs for {name} on {runtime}")
            med = float(np.median(p50s))
            refs[name] = {"p50_ms": med, "dense": float(np.median(dense)),
                          "p50_spread": float((max(p50s) - min(p50s)) / med)}
            if refs[name]["p50_spread"] > 0.25:
                log.warning("calibration: %s p50 varied by %.0f %% across repeats (a busy host?); "
                            "consider 'chita-edge profiles calibrate --refresh' on a quiet machine",
                            name, 100 * refs[name]["p50_spread"])
    cal = HostCalibration(runtime, version, threads, st["resolution"], host, refs, basis, str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cal.to_dict(), indent=2))
    except (OSError, BadInput) as e:
        log.warning("could not cache the calibration at %s: %s", path, e)
        cal = HostCalibration(runtime, version, threads, st["resolution"], host, refs, basis, None)
    return cal


# ------------------------------------------------------------------------------------------------- fitting
@dataclass(frozen=True)
class Anchor:
    profile: str
    row: str
    model: str
    threads: int
    published_ms: float
    target_ms: float  # published, clock-scaled to the profile's clock for proxy rows

    @property
    def label(self) -> str:
        return f"{self.row}:{self.model}"


def anchors_for(profile: Profile, runtime: str, models: Collection[str] | None = None) -> list[Anchor]:
    """The profile's CPU fp32 rows of its calibration runtime, at its device thread count, for models we rebuild
    (``models``: those the host calibration timed; default all).

    Never NPU/GPU/NNAPI/Edge-TPU rows, never int8 rows (the host runs fp32), never another runtime's rows.
    """
    cal = profile.calibration
    if cal is None:
        return []
    t = profile.device_threads(runtime)
    out = []
    for r in cal.rows:
        if r.delegate != "cpu" or r.precision != "fp32" or r.runtime != cal.runtime or r.threads != t:
            continue
        if r.model not in (models if models is not None else REFERENCE_MODELS) or r.input != 224:
            continue
        scale = r.clock_ghz / cal.clock_ghz if (r.clock_ghz and cal.clock_ghz) else 1.0
        out.append(Anchor(profile.id, r.row, r.model, t, r.latency_ms, r.latency_ms * scale))
    return out


def _basis(host: HostCalibration, model: str, rho: np.ndarray) -> np.ndarray:
    ref = host.references[model]
    return ref["p50_ms"] * (ref["dense"] + rho * (1.0 - ref["dense"]))


def _fit_pool(anchors: list[Anchor], host: HostCalibration,
              fixed_rho: float | None = None) -> tuple[float, dict[str, float]]:
    """Least squares in log space: log(target) = log(a_profile) + log(host_ms * (dense + rho * (1 - dense))).

    ``a_profile`` is each profile's scale (closed form for a given rho), ``rho`` the weight of non-dense
    operators, shared by all profiles in the pool (grid search; ``fixed_rho`` pins it: 1.0 is the plain scalar
    host→device factor, the baseline the op-mix model is compared with).
    """
    grid = RHO_GRID if fixed_rho is None else np.array([fixed_rho])
    profiles = sorted({a.profile for a in anchors})
    idx = np.array([profiles.index(a.profile) for a in anchors])
    y = np.log([a.target_ms for a in anchors])
    B = np.log(np.stack([_basis(host, a.model, grid) for a in anchors], axis=1))  # grid x anchors
    R = y[None, :] - B
    sums = np.zeros((len(grid), len(profiles)))
    for j, p in enumerate(idx):
        sums[:, p] += R[:, j]
    counts = np.bincount(idx, minlength=len(profiles))
    means = sums / counts[None, :]
    sse = ((R - means[:, idx]) ** 2).sum(axis=1)
    g = int(np.argmin(sse))
    return float(grid[g]), {p: float(np.exp(means[g, j])) for j, p in enumerate(profiles)}


@dataclass(frozen=True)
class Fit:
    profile: str
    runtime: str
    device_threads: int
    scale: float
    rho: float
    anchors: list[Anchor]
    fit_error: float  # RMS relative error of the fit on this profile's anchors
    residuals: dict[str, float]
    pool: list[str]
    band: Band | None = None  # out-of-sample error band (leave-one-out)
    host_threads: int = 1  # the host calibration's threads (the anchors are at ``device_threads``)
    thread_speedups: tuple[tuple[str, float], ...] = ()  # published t(1 thread) / t(device threads), same device

    @property
    def threads(self) -> dict[str, Any]:
        """The thread correction, explicit: the factor maps a ``host_threads`` timing onto anchors at ``device_threads``,
        so it carries the anchors' speed-up (``published_speedup``, same device at both counts) to every model."""
        same = self.host_threads == self.device_threads
        return {"host": self.host_threads, "anchors": self.device_threads,
                "correction": "none needed (same thread count)" if same else
                f"implicit: the factor carries the anchors' {self.host_threads}->{self.device_threads}-thread "
                "speed-up (not validated for models smaller than the anchors)",
                "published_speedup": dict(self.thread_speedups)}

    def predict(self, host_ms: float, dense: float) -> float:
        return self.scale * host_ms * (dense + self.rho * (1.0 - dense))

    def factor(self, dense: float) -> float:
        return self.scale * (dense + self.rho * (1.0 - dense))

    @property
    def provenance(self) -> str:
        band = f", {self.band.describe()}" if self.band is not None else ""
        return (f"estimated-device (calibrated, anchors {', '.join(a.label for a in self.anchors)}, "
                f"fit error {100 * self.fit_error:.0f} % in-sample{band})")

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "runtime": self.runtime, "device_threads": self.device_threads,
                "scale": self.scale, "rho": self.rho, "fit_error": self.fit_error,
                "anchors": [{"row": a.row, "model": a.model, "kind": ANCHOR_KIND[a.model], "threads": a.threads,
                             "published_ms": a.published_ms, "target_ms": a.target_ms,
                             "residual": self.residuals[a.label]} for a in self.anchors],
                "pool": self.pool, "loo_error": self.band.own_rms if self.band else None,
                "band": self.band.to_dict() if self.band else None, "threads": self.threads}


def _pool_for(profile: Profile, host: HostCalibration, pool: list[Profile] | None) -> list[Anchor]:
    others = pool if pool is not None else load_all()
    out = [a for p in others if p.id != profile.id for a in anchors_for(p, host.runtime, host.references)]
    return out + anchors_for(profile, host.runtime, host.references)


def fit_profile(profile: Profile, host: HostCalibration, pool: list[Profile] | None = None) -> Fit | None:
    """Fit ``profile``'s host→device model; None when it has no usable CPU anchor for this runtime."""
    mine = anchors_for(profile, host.runtime, host.references)
    if not mine:
        return None
    allv = _pool_for(profile, host, pool)
    rho, scales = _fit_pool(allv, host)
    fit = Fit(profile.id, host.runtime, profile.device_threads(host.runtime), scales[profile.id], rho, mine, 0.0, {},
              sorted({a.profile for a in allv}))
    res = {a.label: fit.predict(host.references[a.model]["p50_ms"], host.references[a.model]["dense"]) / a.target_ms - 1
           for a in mine}
    err = float(np.sqrt(np.mean(np.square(list(res.values())))))
    return Fit(fit.profile, fit.runtime, fit.device_threads, fit.scale, rho, mine, err, res, fit.pool,
               _band(profile.id, _loo(allv, host)), host.threads,
               tuple(thread_speedups(profile, fit.device_threads).items()))



def _band(profile_id: str, rows: list[dict[str, Any]]) -> Band:
    own = tuple(r["error"] for r in rows if r["profile"] == profile_id and r["error"] is not None)
    if len(own) >= MIN_OWN_ERRORS:
        return Band("profile", band_half_width(own), len(own), own)
    pooled = [r["error"] for r in rows if r["error"] is not None]
    if pooled:
        w = float(band_half_width(pooled) or 0.0)
        w_own = max((abs(float(np.log1p(e))) for e in own), default=0.0)
        return Band("pooled", max(w, w_own), len(pooled), own, widened=w_own > w)
    return Band("unknown", None, 0, own)


def error_band(profile: Profile, host: HostCalibration, pool: list[Profile] | None = None, *,
               exclude: Anchor | None = None) -> Band:
    """The out-of-sample error band of ``profile``'s estimates (``exclude``: leave that anchor out of the pool
    entirely, as the coverage measurement does for the anchor it scores)."""
    allv = [a for a in _pool_for(profile, host, pool) if a != exclude]
    return _band(profile.id, _loo(allv, host))


def leave_one_out(profiles: list[Profile], host: HostCalibration,
                  fixed_rho: float | None = None) -> list[dict[str, Any]]:
    """For every anchor of every profile: refit without it, predict it, compare with the published figure.

    ``fixed_rho=1.0`` gives the scalar-factor baseline (one host→device ratio per profile)."""
    return _loo([a for p in profiles for a in anchors_for(p, host.runtime, host.references)], host, fixed_rho)


def _loo(allv: list[Anchor], host: HostCalibration, fixed_rho: float | None = None) -> list[dict[str, Any]]:
    rows = []
    for i, a in enumerate(allv):
        rest = allv[:i] + allv[i + 1:]
        if not any(b.profile == a.profile for b in rest):
            rows.append({"profile": a.profile, "row": a.row, "model": a.model, "threads": a.threads,
                         "published_ms": a.published_ms, "estimate_ms": None, "error": None})
            continue
        rho, scales = _fit_pool(rest, host, fixed_rho)
        ref = host.references[a.model]
        pred_target = scales[a.profile] * ref["p50_ms"] * (ref["dense"] + rho * (1 - ref["dense"]))
        pred = pred_target * a.published_ms / a.target_ms
        rows.append({"profile": a.profile, "row": a.row, "model": a.model, "threads": a.threads,
                     "published_ms": a.published_ms, "estimate_ms": pred, "error": pred / a.published_ms - 1})
    return rows


def estimate(profile: Profile, host: HostCalibration, latency_ms: dict[str, float], op_mix: dict[str, Any] | None,
             pool: list[Profile] | None = None) -> dict[str, Any]:
    """Device latency for a model measured on this host: host latency × the profile's factor for its op mix."""
    fit = fit_profile(profile, host, pool)
    if fit is None:
        cal = profile.calibration
        why = ("it has no calibration rows" if cal is None else
               f"it has no fp32 CPU row of its calibration runtime '{cal.runtime}' at "
               f"{profile.device_threads(host.runtime)} thread(s) for a reference model "
               f"({', '.join(host.references)})")
        return {"profile": profile.id, "available": False, "confidence": profile.confidence,
                "reason": f"profile {profile.id} is not calibrated: {why}"}
    if op_mix and op_mix.get("basis") == host.basis:
        dense, mix_from = float(op_mix["dense"]), "measured"
    else:
        dense = float(np.mean([r["dense"] for r in host.references.values()]))
        mix_from = "assumed (mean of the reference models)"
    factor = fit.factor(dense)
    # p50 and mean from the calibration; p90/p99 from the p50 with a stated widening (band.TAIL_WIDENING)
    est = {k: v * factor for k, v in latency_ms.items() if k in ("p50", "mean")}
    tails, tail_note = tail_estimates(est["p50"], latency_ms) if "p50" in est else ({}, None)
    est.update(tails)
    th = fit.threads
    speed = ", ".join(f"{k} x{v:.2f}" for k, v in th["published_speedup"].items()) or "not published for this profile"
    how = (f"; p50 calibrated, p90/p99 = p50 x {TAIL_WIDENING['p90']:g} / {TAIL_WIDENING['p99']:g}; host {th['host']} "
           f"thread(s), anchors at {th['anchors']}" + ("" if th["host"] == th["anchors"] else
                                                     f": carries the anchors' thread speed-up ({speed})") + ")")
    band = fit.band or Band("unknown", None, 0)
    lo, hi = band.low, band.high
    return {
        "profile": profile.id,
        "available": True,
        "latency_ms": est,
        "band": {**band.to_dict(), "latency_ms": ({k: [v * lo, v * hi] for k, v in est.items()}
                                                  if lo is not None and hi is not None else None)},
        "confidence": profile.confidence,
        "factor": factor,
        "dense_fraction": dense,
        "op_mix": mix_from,
        "provenance": fit.provenance[:-1] + how,
        "tails": tail_note,
        "threads": th,
        "fit": fit.to_dict(),
        "host_calibration": {"runtime": host.runtime, "threads": host.threads, "resolution": host.resolution,
                             "cache": host.path, "references": host.references},
    }
