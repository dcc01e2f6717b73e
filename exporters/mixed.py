"""int8 with a measured float fallback: keep the few most quantisation-sensitive layers in float32.

Per-tensor int8 activations flip some low-margin predictions of a pruned model (a 90 %-pruned ResNet20: 97.7 %
top-1 agreement with PyTorch on both runtimes; better calibration did not help). ``select_float_fallback``
measures, on held-out inputs (never the parity-check inputs), which layers cause it and leaves just those in
float:

1. quantise everything (calibrated once); if the held-out top-1 agreement already reaches the target, stop;
2. sensitivity: for each candidate layer, quantise everything *but* that layer and measure the held-out
   agreement and the mean squared logit error against PyTorch;
3. greedy: leave layers in float in order of sensitivity (lowest logit error when left in float first) until the
   held-out agreement reaches the target, never above ``max_float_macs`` of the model's MACs; past the cap the
   export fails with ``RuntimeFailure`` as a plain int8 export did.

Float, not int16 activations: ONNX Runtime's CPU provider fuses int8 QDQ into QLinearConv / QGemm but runs a
16-bit-activation QDQ Conv / Gemm as DequantizeLinear -> fp32 Conv -> QuantizeLinear (checked on the optimised
graph with onnxruntime 1.31), i.e. float compute plus conversions; XNNPACK's integer kernels are 8-bit only
(LiteRT runs 16x8 ops on its built-in kernels; not measured here). A float layer is the cheaper of the two on
both, and exact for pruned zeros. The format modules provide the backends
(``onnx_format.Int8Quantizer``, ``tflite_quantize.Int8Quantizer``); this module is numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from chita_edge.core.errors import RuntimeFailure

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Candidate:
    """A layer that can be left in float: ``name`` is the ONNX node name or the TFLite op scope."""

    name: str
    op: str
    macs: int
    param: str | None = None
    tensor: str | None = None  # its weight's name in the float model (as ``weights()`` names it)


class Int8Backend(Protocol):
    float_pooling: list[str]  # averaging nodes / scopes that every quantisation leaves in float

    def candidates(self) -> list[Candidate]: ...

    def quantize(self, keep_float: Sequence[str] = ()) -> Any: ...

    def run(self, model: Any, x: np.ndarray) -> np.ndarray: ...


def agreement(ref: np.ndarray, got: np.ndarray) -> float:
    return float((ref.argmax(1) == got.reshape(len(got), -1).argmax(1)).mean()) if len(ref) else 0.0


def logit_mse(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean((got.reshape(ref.shape).astype(np.float64) - ref) ** 2)) if len(ref) else 0.0


@dataclass(frozen=True)
class Fallback:
    """What ``select_float_fallback`` chose, and the measurements behind it (JSON-able via ``to_dict``)."""

    model: Any
    target: float
    samples: int
    agreement_int8: float
    logit_mse_int8: float
    agreement: float
    logit_mse: float
    kept: list[dict[str, Any]] = field(default_factory=list)
    float_mac_fraction: float = 0.0
    max_float_macs: float = 0.2
    evaluated: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        d["precision"] = "float32"
        d["criterion"] = f"held-out top-1 agreement >= {self.target:.2%}"
        return d


def select_float_fallback(backend: Int8Backend, x: np.ndarray, ref: np.ndarray, *, target: float,
                          max_float_macs: float = 0.2, progress: Progress | None = None) -> Fallback:
    """Quantise with ``backend``, leaving in float the fewest most sensitive layers that bring the top-1
    agreement with ``ref`` (PyTorch logits for ``x``, held-out inputs) to ``target``; see the module docstring."""
    cb = progress or (lambda stage, done, total: None)
    x = np.asarray(x, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float64).reshape(len(x), -1)
    q0 = backend.quantize(())
    y0 = backend.run(q0, x)
    a0, e0 = agreement(ref, y0), logit_mse(ref, y0)
    base = dict(target=target, samples=len(x), agreement_int8=a0, logit_mse_int8=e0, max_float_macs=max_float_macs)
    if a0 >= target:
        return Fallback(model=q0, agreement=a0, logit_mse=e0, evaluated=1, **base)
    cands = backend.candidates()
    total_macs = sum(c.macs for c in cands) or 1
    alone: dict[str, tuple[float, float]] = {}
    for i, c in enumerate(cands):
        cb("int8 sensitivity", i, len(cands))
        y = backend.run(backend.quantize([c.name]), x)
        alone[c.name] = (agreement(ref, y), logit_mse(ref, y))
    cb("int8 sensitivity", len(cands), len(cands))
    # most sensitive first: the lowest logit error when only this layer stays in float, then the best agreement
    # (layers that do not help alone come last: two may still help together)
    order = sorted(cands, key=lambda c: (alone[c.name][1] >= e0, alone[c.name][1], -alone[c.name][0]))
    kept: list[Candidate] = []
    best = (a0, e0, q0)
    peak = (a0, 0)  # the best held-out agreement seen on the way, and with how many float layers
    evaluated = 1 + len(cands)
    for c in order:
        if (sum(k.macs for k in kept) + c.macs) / total_macs > max_float_macs:
            continue
        kept.append(c)
        cb("int8 fallback", len(kept), len(order))
        q = backend.quantize([k.name for k in kept])
        y = backend.run(q, x)
        evaluated += 1
        best = (agreement(ref, y), logit_mse(ref, y), q)
        peak = max(peak, (best[0], -len(kept)))
        if best[0] >= target:
            break
    frac = sum(k.macs for k in kept) / total_macs
    if best[0] < target:
        raise RuntimeFailure(
            f"int8: top-1 agreement {a0:.2%} on {len(x)} held-out inputs with every layer in int8; leaving the "
            f"{len(kept)} most sensitive layers in float ({frac:.1%} of MACs, at most {max_float_macs:.0%}) "
            f"reaches only {best[0]:.2%} (needs {target:.2%}; the best on the way: {peak[0]:.2%} with {-peak[1]} "
            f"float layer(s)); use --quantize fp16, or allow more float layers (--max-float-macs) or a lower "
            f"--min-agreement")
    rows = [{"name": k.name, "op": k.op, "param": k.param, "tensor": k.tensor, "macs": k.macs,
             "mac_fraction": round(k.macs / total_macs, 6), "agreement_alone": alone[k.name][0],
             "logit_mse_alone": alone[k.name][1],
             "why": (f"left alone in float, held-out top-1 agreement {a0:.2%} -> {alone[k.name][0]:.2%}, "
                     f"logit MSE {e0:.3g} -> {alone[k.name][1]:.3g}")} for k in kept]
    return Fallback(model=best[2], agreement=best[0], logit_mse=best[1], kept=rows, float_mac_fraction=frac,
                    evaluated=evaluated, **base)


__all__ = ["Candidate", "Fallback", "Int8Backend", "agreement", "logit_mse", "select_float_fallback"]
