"""One verb: ``export_model(model, ExportConfig(...), ...)`` writes an ONNX or TFLite file that passed parity.

Step 1: (``compact``/``auto``) physically remove all-zero channels with ``chita_edge.graph.compact.compact_model``.
Step 2: convert (torch.onnx / litert-torch), then quantise (static int8 with calibration data, or fp16).
Step 3: describe every weight of the converted file and choose its encoding (``layouts.plan_onnx`` /
        ``plan_tflite``: the measured rules), write the encodings and the metadata.
Step 4: run the file in its runtime on the parity inputs and compare with PyTorch: fp32 every output within
        ``atol + rtol * max|output|`` of its sample (1e-4 + 1e-3 * ..., numpy's ``allclose`` with the sample's
        largest output as the scale) and top-1 agreement >= ``min_agreement``; fp16 / int8 top-1 agreement >=
        ``min_agreement`` (99 %).
        A failure raises ``RuntimeFailure`` and nothing is left at ``out`` (temporary file, renamed on success).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from chita_edge.exporters import layouts as L
from chita_edge.exporters import mixed
from torch import nn

from chita_edge._version import __version__
from chita_edge.core.errors import BadInput, RuntimeFailure, check_finite
from chita_edge.core.io import atomic_path
from chita_edge.graph.compact import compact_model
from chita_edge.graph.macs import count_macs

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tflite")
LAYOUTS = ("dense", "compact", "sparse", "auto")
QUANTIZE = ("none", "fp16", "int8")
SUFFIX = {"onnx": ".onnx", "tflite": ".tflite"}
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """What to write. ``layout``: dense (as trained), compact (zero channels removed), sparse (smallest file the
    runtime can use; sparse kernels where they pay, XNNPACK off if need be), auto (per-layer choice for speed,
    with reasons; keeps XNNPACK, because the constants behind switching it off were measured on x86 only)."""

    format: str
    layout: str = "dense"
    quantize: str = "none"
    # fp32 parity: |file - PyTorch| <= atol + rtol * max|PyTorch output| of that sample, for every output
    atol: float = 1e-4
    rtol: float = 1e-3
    min_agreement: float = 0.99  # fp16 / int8 parity: top-1 agreement with PyTorch
    threads: int = 1
    onnx_calibration: str = "minmax"  # onnxruntime calibration method for int8: minmax / percentile / entropy
    # int8: leave the most quantisation-sensitive layers in float when all-int8 misses min_agreement on held-out
    # inputs (+ holdout_margin: held-out training images agree more easily than unseen test images), chosen by
    # measurement (exporters/mixed.py), at most max_float_macs of the model's MACs
    int8_fallback: bool = True
    max_float_macs: float = 0.2
    holdout_margin: float = 0.005

    def validate(self) -> None:
        for name, value, allowed in (("--format", self.format, FORMATS), ("--layout", self.layout, LAYOUTS),
                                     ("--quantize", self.quantize, QUANTIZE)):
            if value not in allowed:
                raise BadInput(f"{name} {value!r}: expected one of {', '.join(allowed)}")
        if self.onnx_calibration not in ("minmax", "percentile", "entropy"):
            raise BadInput(f"onnx_calibration {self.onnx_calibration!r}: expected minmax, percentile or entropy")
        check_finite(self, {"min_agreement": "--min-agreement", "max_float_macs": "--max-float-macs"})
        if not 0 < self.min_agreement <= 1:
            raise BadInput(f"--min-agreement {self.min_agreement}: expected a fraction in (0, 1]")
        if self.threads < 1:
            raise BadInput(f"--threads {self.threads}: expected >= 1")
        if not (self.atol > 0 and self.rtol >= 0):
            raise BadInput(f"atol {self.atol}, rtol {self.rtol}: expected atol > 0 and rtol >= 0")
        if not (0 <= self.max_float_macs <= 1 and 0 <= self.holdout_margin < 1):
            raise BadInput(f"--max-float-macs {self.max_float_macs}: expected a fraction in [0, 1]; holdout_margin "
                           f"in [0, 1)")


@dataclass(frozen=True)
class Parity:
    samples: int
    inputs: str  # "data" or "random"
    max_abs_error: float
    top1_agreement: float
    criterion: str
    passed: bool
    xnnpack: bool
    flips: int = 0  # inputs whose top-1 class differs from PyTorch's
    logit_rmse: float = 0.0  # root-mean-square error of the outputs
    flip_margin_max: float | None = None  # the largest PyTorch top-2 margin among the flipped inputs
    margin_median: float | None = None  # the median PyTorch top-2 margin over all inputs
    agreement_interval: tuple[float, float] = (0.0, 1.0)  # 95 % Wilson interval of the top-1 agreement
    accuracy_torch: float | None = None  # top-1 accuracy on the inputs' labels, when given: PyTorch
    accuracy_file: float | None = None  # ... and the exported file
    error_to_tolerance: float | None = None  # fp32: the largest |error| / (atol + rtol * scale); <= 1 passes
    summary: str = field(init=False, default="")  # how many decisions changed, how sure, how close to a tie

    def __post_init__(self) -> None:
        lo, hi = self.agreement_interval
        text = (f"{self.flips} of {self.samples} top-1 decisions changed (95 % interval of the agreement "
                f"{lo:.1%}-{hi:.1%})")
        if self.flips and self.flip_margin_max is not None:
            text += (f"; PyTorch's top-2 margin on them <= {self.flip_margin_max:.3g} (median over all inputs "
                     f"{self.margin_median:.3g}), output rms error {self.logit_rmse:.3g}")
        if self.accuracy_torch is not None and self.accuracy_file is not None:
            text += f"; top-1 accuracy on them: PyTorch {self.accuracy_torch:.2%}, file {self.accuracy_file:.2%}"
        object.__setattr__(self, "summary", text)


def _shortfall(p: Parity, target: float) -> str:
    """Whether a top-1 agreement below ``target`` is within the sampling noise of the parity inputs."""
    lo, hi = p.agreement_interval
    if hi >= target:
        return (f"the 95 % interval reaches {target:.0%}, so on {p.samples} inputs the shortfall is within sampling "
                f"noise: more inputs would tell (--parity-samples, up to the test split's size), or accept it with "
                f"--min-agreement")
    return f"the whole 95 % interval is below {target:.0%}: the file does worse than the gate, not by chance"


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p, zz = k / n, z * z / n
    mid, half = (p + zz / 2) / (1 + zz), z * math.sqrt(p * (1 - p) / n + zz / (4 * n)) / (1 + zz)
    return max(0.0, mid - half), min(1.0, mid + half)


@dataclass(frozen=True)
class ExportReport:
    out: str
    format: str
    layout: str
    quantize: str
    bytes: int
    exporter: str
    requires: dict[str, Any]
    layers: list[dict[str, Any]]
    compact: dict[str, Any] | None
    parity: Parity
    zeros: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    int8_fallback: dict[str, Any] | None = None  # int8: layers left in float and the measurements behind them
    int8_float_pooling: list[str] = field(default_factory=list)  # int8: averaging nodes / scopes run in float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batched(model: nn.Module, x: torch.Tensor, bs: int = 256) -> np.ndarray:
    with torch.no_grad():
        outs = [model(x[i:i + bs]) for i in range(0, len(x), bs)]
    y = torch.cat(outs) if outs else torch.zeros(0)
    if y.dim() != 2:
        y = y.reshape(len(x), -1)
    return y.float().numpy()


def _compact(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, dict[str, Any]]:

    new, plan = compact_model(model, example)
    removed = sum(g["size"] - len(plan["keep"][gid]) for gid, g in plan["groups"].items())
    info = {
        "removed_channels": removed,
        "groups": {gid: {"size": g["size"], "kept": len(plan["keep"][gid])} for gid, g in plan["groups"].items()},
        "params_before": sum(p.numel() for p in model.parameters()),
        "params_after": sum(p.numel() for p in new.parameters()),
        "macs_before": sum(count_macs(model, example).values()),
        "macs_after": sum(count_macs(new, example).values()),
    }
    return new, info


def _zeros_report(model: nn.Module, ws: list[L.Weight]) -> dict[str, Any]:
    """Zeros of each weight in PyTorch and in the file: conversion and quantisation must keep zeros zero."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    rows, kept = [], True
    for w in ws:
        p = params.get(w.param) if w.param else None
        if p is None or p.numel() != w.numel:
            continue
        zt, zf = int((p == 0).sum()), int((np.asarray(w.values) == 0).sum())
        kept = kept and zf >= zt
        rows.append({"tensor": w.name, "param": w.param, "zero_fraction_torch": zt / w.numel,
                     "zero_fraction_file": zf / w.numel})
    total = sum(w.numel for w in ws) or 1
    return {"zeros_kept": kept, "zero_fraction_file": sum(w.zero_fraction * w.numel for w in ws) / total,
            "layers": rows}


def _check_parity(cfg: ExportConfig, ref: np.ndarray, got: np.ndarray, inputs: str, xnnpack: bool,
                  labels: np.ndarray | None = None) -> Parity:
    n = len(ref)
    if got.shape != ref.shape:
        return Parity(n, inputs, float("inf"), 0.0, f"output shape {got.shape} vs PyTorch {ref.shape}", False, xnnpack)
    finite = bool(np.isfinite(got).all())
    err = float(np.abs(got.astype(np.float64) - ref).max()) if finite and n else (0.0 if n == 0 else float("inf"))
    top_ref, top_got = ref.argmax(1), got.argmax(1)
    flipped = (top_got != top_ref) if finite and n else np.ones(n, dtype=bool)
    agree = 1.0 - float(flipped.mean()) if finite and n else 0.0
    rmse = float(np.sqrt(np.mean((got.astype(np.float64) - ref) ** 2))) if finite and n else float("inf")
    margin = median = None
    if finite and n and ref.shape[1] > 1:
        top2 = np.sort(ref, axis=1)[:, -2:]
        margins = top2[:, 1] - top2[:, 0]
        median = float(np.median(margins))
        margin = float(margins[flipped].max()) if flipped.any() else None
    ratio = None
    if cfg.quantize == "none":
        crit = (f"|error| <= {cfg.atol:g} + {cfg.rtol:g} * max|output| per sample and top-1 agreement >= "
                f"{cfg.min_agreement:.0%}")
        if finite and n:
            scale = np.abs(ref).max(axis=1, keepdims=True)
            ratio = float((np.abs(got.astype(np.float64) - ref) / (cfg.atol + cfg.rtol * scale)).max())
        ok = finite and (n == 0 or (ratio is not None and ratio <= 1.0 and agree >= cfg.min_agreement))
    else:
        crit, ok = f"top-1 agreement >= {cfg.min_agreement:.0%}", finite and agree >= cfg.min_agreement
    acc_ref = acc_got = None
    if labels is not None and len(labels) == n and n:
        labels = np.asarray(labels).reshape(-1)
        acc_ref = float((top_ref == labels).mean())
        acc_got = float((top_got == labels).mean()) if finite else 0.0
    return Parity(n, inputs, err, agree, crit, ok, xnnpack, int(flipped.sum()), rmse, margin, median,
                  _wilson(n - int(flipped.sum()), n), acc_ref, acc_got, ratio)


def export_model(
    model: nn.Module,
    cfg: ExportConfig,
    *,
    example_input: torch.Tensor,
    out: str | os.PathLike,
    parity_inputs: torch.Tensor,
    parity_source: str = "data",
    parity_labels: torch.Tensor | np.ndarray | None = None,
    calibration: torch.Tensor | np.ndarray | None = None,
    holdout: torch.Tensor | np.ndarray | None = None,
    source: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """Export ``model`` as ``cfg`` says to ``out`` and prove it with a parity check (see the module docstring).

    ``example_input``: one batch (N >= 1) of the model's input; ``parity_inputs``: the inputs to compare on
    (``parity_labels``: their classes, if known: the parity report then gives both top-1 accuracies);
    ``calibration``: inputs for static int8 (required for ``quantize="int8"``); ``holdout``: inputs, disjoint
    from ``parity_inputs``, on which int8's float fallback is chosen (default: the calibration inputs);
    ``source``: provenance recorded in the file's metadata (e.g. ``{"sha256": ..., "name": ...}``).
    """
    cfg.validate()
    cb = progress or (lambda stage, done, total: None)
    out = Path(out)
    if out.suffix.lower() != SUFFIX[cfg.format]:
        raise BadInput(f"--out {out}: a {cfg.format} file should end in {SUFFIX[cfg.format]}")
    if cfg.quantize == "int8" and (calibration is None or len(calibration) == 0):
        raise BadInput("--quantize int8 needs calibration data: the checkpoint names no data set; "
                       "give --calibration-data")
    if len(parity_inputs) == 0:
        raise BadInput("parity check needs at least one input")
    if cfg.format == "tflite":
        from chita_edge.exporters.tflite_format import require_export_stack  # deferred: the LiteRT stack

        require_export_stack()
    model = copy.deepcopy(model).float().eval()
    example = example_input[:1].float()
    ref = _batched(model, parity_inputs.float())
    notes: list[str] = []

    compact = None
    if cfg.layout in ("compact", "auto"):
        cb("compact", 0, 1)
        model, compact = _compact(model, example)
        if compact["removed_channels"] == 0:
            notes.append("no all-zero channels or neurons to remove: the zeros are unstructured, so the compact "
                         "layout equals the dense one")
        cb("compact", 1, 1)

    calib, hold = (None if a is None else np.asarray(a.float().numpy() if isinstance(a, torch.Tensor) else a,
                                                     dtype=np.float32) for a in (calibration, holdout))
    fallback: dict[str, Any] | None = None
    float_pooling: list[str] = []

    def int8(q: Any) -> Any:
        """All-int8, or int8 with the measured float fallback (exporters/mixed.py)."""
        nonlocal fallback
        float_pooling.extend(q.float_pooling)
        if q.float_pooling:
            notes.append(f"int8: {len(q.float_pooling)} average pooling op(s) run in float32, so that the next "
                         f"layer quantises their output on its own int8 range (int8 average pooling keeps its "
                         f"input's, much coarser, scale)")
        if not cfg.int8_fallback:
            return q.quantize(())

        hx, src = (hold, "held-out") if hold is not None and len(hold) else (calib, "calibration")
        fb = mixed.select_float_fallback(q, hx, _batched(model, torch.from_numpy(hx)),
                                         target=min(1.0, cfg.min_agreement + cfg.holdout_margin),
                                         max_float_macs=cfg.max_float_macs, progress=cb)
        fallback = {**fb.to_dict(), "inputs": src}
        if fb.kept:
            notes.append(f"int8: {len(fb.kept)} layer(s) ({fb.float_mac_fraction:.1%} of MACs) kept in float32, "
                         f"the most quantisation-sensitive by measurement on {fb.samples} {src} inputs: top-1 "
                         f"agreement there {fb.agreement_int8:.2%} all-int8 -> {fb.agreement:.2%} (see "
                         f"int8_fallback)")
        return fb.model

    plan_layout = "dense" if cfg.layout == "compact" else cfg.layout
    cb("convert", 0, 3)
    if cfg.format == "onnx":
        from chita_edge.exporters import onnx_format as F  # deferred: onnx/onnxruntime

        mp, exporter = F.export(model, example)
        cb("convert", 1, 3)
        if cfg.quantize == "int8":
            assert calib is not None
            mp = int8(F.Int8Quantizer(mp, calib, method=cfg.onnx_calibration))
        elif cfg.quantize == "fp16":
            mp = F.to_fp16(mp)
        cb("convert", 2, 3)
        ws, _ = F.weights(mp)
        decisions, req = L.plan_onnx(ws, plan_layout)
        mp = F.apply(mp, decisions)
    else:
        from chita_edge.exporters import tflite_format as F  # deferred: the LiteRT stack
        from chita_edge.exporters import tflite_quantize  # deferred: the LiteRT stack

        buf = F.convert(model, example)
        exporter = "litert-torch"
        cb("convert", 1, 3)
        params = {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() >= 2}
        if cfg.quantize == "int8":
            assert calib is not None
            buf = int8(tflite_quantize.Int8Quantizer(buf, calib, params))
        elif cfg.quantize != "none":
            buf = tflite_quantize.quantize(buf, cfg.quantize, calib)
        cb("convert", 2, 3)
        mobj = F.read(buf)
        ws, info = F.weights(mobj, params)
        decisions, req = L.plan_tflite(ws, plan_layout)
        F.apply(mobj, ws, info, decisions)
    cb("convert", 3, 3)
    notes.extend(L.plan_notes(cfg.layout, decisions, req))

    zeros = _zeros_report(model, ws)
    if not zeros["zeros_kept"]:
        notes.append("conversion or quantisation turned some zero weights into non-zeros (see zeros.layers)")
    dec = {d.name: d for d in decisions}
    kept = {k["tensor"]: k for k in (fallback or {}).get("kept", []) if k.get("tensor")}
    layers = [{"tensor": w.name, "param": w.param, "op": w.op, "shape": list(w.shape), "dtype": w.dtype,
               "zero_fraction": round(w.zero_fraction, 6), "macs": w.macs, **dec[w.name].to_dict()} for w in ws]
    for row in layers:
        if row["tensor"] in kept:
            row["precision_why"] = "kept in float32 (int8 sensitivity): " + kept[row["tensor"]]["why"]
    meta = {
        "producer": "chita-edge", "version": __version__, "format": cfg.format, "layout": cfg.layout,
        "quantize": cfg.quantize, "exporter": exporter, "source": source or {}, "requires": req,
        "compact": None if compact is None else {k: v for k, v in compact.items() if k != "groups"},
        "layers": [{k: v for k, v in row.items() if k in ("tensor", "param", "encoding", "kernel", "why", "macs",
                                                         "zero_fraction", "dtype", "precision_why")}
                   for row in layers],
    }
    if fallback is not None:
        meta["int8_fallback"] = fallback
    if float_pooling:
        meta["int8_float_pooling"] = float_pooling

    with atomic_path(out) as tmp:
        if cfg.format == "onnx":
            F.set_metadata(mp, meta, __version__)
            F.save(mp, tmp)
            sess: Any = F.OnnxSession(tmp, cfg.threads)
        else:
            F.set_metadata(mobj, meta)
            tmp.write_bytes(F.write(mobj))
            sess = F.TFLiteSession(tmp, cfg.threads, xnnpack=bool(req["xnnpack"]))
        cb("parity", 0, 1)
        got = sess.run(parity_inputs.float().numpy())
        del sess
        parity = _check_parity(cfg, ref, got.reshape(len(got), -1) if len(got) else got, parity_source,
                               bool(req.get("xnnpack", False)) and cfg.format == "tflite",
                               None if parity_labels is None else np.asarray(parity_labels))
        cb("parity", 1, 1)
        if not parity.passed:
            fb = ""
            if fallback and fallback["kept"]:
                fb = (f"; int8 fallback: {len(fallback['kept'])} layer(s), {fallback['float_mac_fraction']:.1%} of "
                      f"MACs in float32, {fallback['agreement']:.2%} on {fallback['samples']} {fallback['inputs']} "
                      f"inputs")
            raise RuntimeFailure(
                f"parity check failed for the {cfg.format} {cfg.layout}/{cfg.quantize} export on "
                f"{parity.samples} {parity_source} inputs: max abs error {parity.max_abs_error:.3g}, top-1 "
                f"agreement {parity.top1_agreement:.2%} (needs {parity.criterion}): {parity.summary}{fb}"
                f"{'' if cfg.quantize == 'none' else '; ' + _shortfall(parity, cfg.min_agreement)}; "
                f"nothing written to {out}")
        size = tmp.stat().st_size
    return ExportReport(out=str(out), format=cfg.format, layout=cfg.layout, quantize=cfg.quantize, bytes=size,
                        exporter=exporter, requires=req, layers=layers, compact=compact, parity=parity,
                        zeros=zeros, notes=notes, int8_fallback=fallback, int8_float_pooling=float_pooling)


__all__ = ["FORMATS", "LAYOUTS", "QUANTIZE", "ExportConfig", "ExportReport", "Parity", "export_model"]
