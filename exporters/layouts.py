"""Which encoding each weight tensor gets in a file, and why: the measured rules, in numpy only.

A format module (``onnx_format``, ``tflite_format``) describes the weights it found in a converted file as
``Weight`` records; ``plan_onnx`` / ``plan_tflite`` turn them into one ``Decision`` per weight plus the runtime
options the file will need. The rules come from measurements made on a 2-core AVX-512 x86 machine with
onnxruntime 1.31 and ai-edge-litert 2.3, batch 1, one thread (``../shared/docs/runtimes.md``):

* ONNX Runtime has no sparse CPU kernels and densifies a ``sparse_initializer`` when it loads the model: the
  file gets smaller (COO with int64 indices: only above ~2/3 zeros for fp32), peak memory grows, speed stays.
* LiteRT's built-in FULLY_CONNECTED kernel reads sparse weights directly: latency relative to dense is close to
  ``c * density`` -- ``c`` = 2.6 for 1x4 blocks (0.51 / 0.26 / 0.14 at 80 / 90 / 95 %) and 8.2 for unstructured
  CSR (1.6 / 0.82 / 0.43 at 80 / 90 / 95 %, 4x at 50 %); int8 weights need 1x16 blocks (``c`` ~ 1.5, measured
  at 90 %). XNNPACK mis-computes or crashes on such weights, so the whole file must run without it, and
  convolutions then run 4-5x slower on the built-in kernels.
* A DENSIFY op in front of any other weight shrinks the file and costs peak memory at load, at the same speed;
  XNNPACK accepts it for float weights but not for int8 ones.

None of this was measured on ARM. Each decision that rests on a constant names it in its ``why``
(``[rests on LITERT_SPARSE_FC_COST[bcsr1x4]=2.6, MIN_GAIN=0.9: measured on x86 only]``) and ``plan_notes`` says
so in the report. The whole-file XNNPACK-off switch is therefore opt-in: ``sparse`` takes it where the constants
predict a gain; ``auto`` never does and says when it would have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Latency of a direct sparse FULLY_CONNECTED relative to its dense kernel ~= C * (stored fraction of weights).
LITERT_SPARSE_FC_COST = {"bcsr1x4": 2.6, "csr": 8.2, "bcsr1x16": 1.5}
# Convolutions on LiteRT's built-in kernels (XNNPACK off) relative to XNNPACK.
LITERT_NO_XNNPACK_PENALTY = 4.5
# A layout change must promise at least this much (predicted latency ratio) to be taken.
MIN_GAIN = 0.9
# Where the three constants above were measured. None of them has been measured on ARM, where the devices run:
# every decision that rests on them names them (``[rests on ...]`` in its ``why``) and the report says so.
MEASURED_ON = "x86-64 (2-core AVX-512), ai-edge-litert 2.3, batch 1, 1 thread"
# How ``auto`` declines the whole-file XNNPACK-off switch; ``--layout sparse`` is the opt-in.
OPT_IN = "opt in with --layout sparse"

FC, CONV, DEPTHWISE, OTHER = "fc", "conv", "depthwise", "other"

DENSE = "dense"
COO = "sparse_initializer"  # ONNX COO, linearised int64 indices
CSR = "csr"  # TFLite direct sparse FULLY_CONNECTED weights, unstructured
BCSR4 = "bcsr1x4"
BCSR16 = "bcsr1x16"
DENSIFY_CSR = "densify-csr"
DENSIFY_BCSR4 = "densify-bcsr1x4"

K_DENSE, K_SPARSE, K_DENSIFIED = "dense kernel", "sparse kernel", "densified at load"


@dataclass(frozen=True)
class Weight:
    """One constant weight tensor of a converted file, as a format module found it."""

    name: str  # tensor name in the file
    op: str  # the op that consumes it (FULLY_CONNECTED, CONV_2D, Gemm, Conv, ...)
    kind: str  # fc / conv / depthwise / other
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name of the stored values (float32, float16, int8)
    values: np.ndarray = field(repr=False, compare=False)
    macs: int = 0  # per sample
    direct_ok: bool = False  # TFLite: may be fed sparse to the built-in FULLY_CONNECTED kernel
    param: str | None = None  # the PyTorch parameter it came from, when known

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def dense_bytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def zero_fraction(self) -> float:
        return zero_fraction(self.values)


@dataclass(frozen=True)
class Decision:
    name: str
    encoding: str
    kernel: str
    why: str
    bytes: int  # bytes the weight takes in the file with this encoding (values + indices)
    predicted_ratio: float | None = None  # predicted latency of this layer relative to dense, where known

    def to_dict(self) -> dict[str, Any]:
        return {"encoding": self.encoding, "kernel": self.kernel, "why": self.why, "bytes": self.bytes,
                "predicted_ratio": None if self.predicted_ratio is None else round(self.predicted_ratio, 3)}


# ---------------------------------------------------------------------------------------------------------------
# Zero patterns and encodings


def zero_fraction(a: np.ndarray) -> float:
    return float((np.asarray(a) == 0).mean()) if np.asarray(a).size else 0.0


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(-1, a.shape[-1]) if a.ndim >= 2 else a.reshape(1, -1)


def block_zero_fraction(a: np.ndarray, block: int) -> float | None:
    """Fraction of all-zero ``1 x block`` blocks along the last axis; None if the last axis does not divide."""
    w = _rows(a)
    if block < 1 or w.shape[1] % block:
        return None
    return float((~np.any(w.reshape(w.shape[0], -1, block) != 0, axis=2)).mean())


def index_itemsize(max_value: int) -> int:
    """Bytes per entry of the smallest TFLite index vector (uint8 / uint16 / int32) holding ``max_value``."""
    return 1 if max_value < 256 else 2 if max_value < 65536 else 4


def csr_arrays(a: np.ndarray, block: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TFLite CSR of ``a`` over its last axis (all leading axes dense), in ``1 x block`` blocks.

    Returns (segments, indices, values): ``segments`` has one entry per leading row plus one, ``indices`` the
    (block) column of every stored block, ``values`` the stored blocks flattened in row-major order -- the
    layout of ``SparsityParameters`` with ``traversal_order = [0..n-1(, n)]``, ``block_map = [n-1]``.
    """
    w = _rows(a)
    rows, cols = w.shape
    if block == 1:
        mask = w != 0
        counts = mask.sum(1)
        idx = np.nonzero(mask)[1]
        vals = w[mask]
    else:
        if cols % block:
            raise ValueError(f"last axis {cols} is not a multiple of the block size {block}")
        wb = w.reshape(rows, cols // block, block)
        mask = np.any(wb != 0, axis=2)
        counts = mask.sum(1)
        idx = np.nonzero(mask)[1]
        vals = wb[mask].reshape(-1)
    seg = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return seg, idx.astype(np.int64), np.ascontiguousarray(vals)


def csr_bytes(a: np.ndarray, block: int = 1) -> int | None:
    """Bytes of the TFLite sparse encoding (values + segments + indices); None if the block does not fit."""
    w = _rows(a)
    rows, cols = w.shape
    if block > 1:
        bz = block_zero_fraction(w, block)
        if bz is None:
            return None
        stored = int(round((1 - bz) * rows * (cols // block)))
        n_vals, max_idx = stored * block, cols // block
    else:
        stored = int(np.count_nonzero(w))
        n_vals, max_idx = stored, cols
    return (n_vals * w.itemsize + (rows + 1) * index_itemsize(stored) + stored * index_itemsize(max_idx))


def coo_bytes(a: np.ndarray) -> int:
    """Bytes of an ONNX ``sparse_initializer`` (values + linearised int64 indices)."""
    nnz = int(np.count_nonzero(a))
    return nnz * (np.asarray(a).itemsize + 8)


def _fc_cost(encoding: str) -> str:
    return f"LITERT_SPARSE_FC_COST[{encoding}]={LITERT_SPARSE_FC_COST[encoding]:g}"


_GAIN, _PENALTY = f"MIN_GAIN={MIN_GAIN:g}", f"LITERT_NO_XNNPACK_PENALTY={LITERT_NO_XNNPACK_PENALTY:g}"


def _rests_on(*constants: str) -> str:
    return f" [rests on {', '.join(constants)}: measured on x86 only]"


def predicted_fc_ratio(encoding: str, a: np.ndarray) -> float | None:
    """Predicted latency of a direct sparse FULLY_CONNECTED relative to dense (``c * stored fraction``)."""
    if encoding == CSR:
        density = 1.0 - zero_fraction(a)
    else:
        bz = block_zero_fraction(a, 4 if encoding == BCSR4 else 16)
        if bz is None:
            return None
        density = 1.0 - bz
    return LITERT_SPARSE_FC_COST[encoding] * density


# ---------------------------------------------------------------------------------------------------------------
# ONNX


def plan_onnx(weights: list[Weight], layout: str) -> tuple[list[Decision], dict[str, Any]]:
    """One decision per weight for an ONNX file, and the runtime options it needs (none: ``{}``)."""
    out = []
    for w in weights:
        dense, coo = w.dense_bytes, coo_bytes(w.values)
        zf = w.zero_fraction
        if layout == "sparse" and coo < dense:
            out.append(Decision(w.name, COO, K_DENSIFIED, f"{zf:.0%} zeros: COO is {coo / dense:.0%} of dense "
                                f"bytes; ONNX Runtime densifies it at load (same speed, more peak memory)", coo, 1.0))
        elif layout == "sparse":
            out.append(Decision(w.name, DENSE, K_DENSE, f"{zf:.0%} zeros: COO with int64 indices would be "
                                f"{coo / dense:.0%} of dense bytes, not smaller", dense, 1.0))
        elif layout == "auto" and zf > 0:
            out.append(Decision(w.name, DENSE, K_DENSE, f"{zf:.0%} zeros stored densely: ONNX Runtime has no sparse "
                                f"CPU kernels and densifies sparse initializers at load, so only the download "
                                f"would shrink (to {min(coo, dense) / dense:.0%}) at a peak-memory cost [no cost "
                                f"constant: densifying at load was measured with onnxruntime 1.31 on x86]",
                                dense, 1.0))
        else:
            out.append(Decision(w.name, DENSE, K_DENSE, f"layout {layout}", dense, 1.0))
    return out, {}


# ---------------------------------------------------------------------------------------------------------------
# TFLite / LiteRT


def _best_direct(w: Weight) -> tuple[str, float] | None:
    """The direct sparse FC encoding with the lowest predicted latency ratio, if the built-in kernel has one."""
    if not w.direct_ok or w.kind != FC or len(w.shape) != 2:
        return None
    encs = [BCSR16] if w.dtype == "int8" else [BCSR4, CSR] if w.dtype == "float32" else []
    best = None
    for e in encs:
        r = predicted_fc_ratio(e, w.values)
        if r is not None and (best is None or r < best[1]):
            best = (e, r)
    return best


def _densify_choice(w: Weight) -> tuple[str, int] | None:
    """The smaller DENSIFY encoding (CSR or 1x4 blocks) and its bytes, when it is smaller than dense."""
    cands = [(DENSIFY_CSR, csr_bytes(w.values, 1)), (DENSIFY_BCSR4, csr_bytes(w.values, 4))]
    cands = [(e, b) for e, b in cands if b is not None]
    e, b = min(cands, key=lambda eb: eb[1])
    return (e, b) if b < w.dense_bytes else None


def plan_tflite(weights: list[Weight], layout: str) -> tuple[list[Decision], dict[str, Any]]:
    """One decision per weight for a TFLite file, and whether the file may run under XNNPACK.

    ``sparse``: direct sparse FULLY_CONNECTED weights where the built-in kernel is predicted faster and turning
    XNNPACK off for the file does not cost more than it gains; DENSIFY for the other weights where that shrinks
    the file. ``auto``: every weight dense, so the file keeps XNNPACK: the whole-file XNNPACK-off switch rests on
    constants measured on x86 only, so ``auto`` does not take it; where those constants predict that it pays,
    each FC weight's ``why`` says so and how to opt in (``--layout sparse``). DENSIFY buys download size only, at
    a peak-memory cost. ``dense`` / ``compact``: everything dense.
    """
    by_name = {w.name: w for w in weights}
    total = sum(w.macs for w in weights) or 1
    direct: dict[str, tuple[str, float]] = {}
    why_not_direct = ""
    if layout in ("sparse", "auto"):
        cands = {w.name: b for w in weights if (b := _best_direct(w)) is not None and b[1] < MIN_GAIN}
        if cands:
            est = sum(w.macs * (cands[w.name][1] if w.name in cands else 1.0 if w.kind == FC
                                else LITERT_NO_XNNPACK_PENALTY) for w in weights) / total
            basis = _rests_on(*(_fc_cost(e) for e in sorted({e for e, _ in cands.values()})), _GAIN, _PENALTY)
            if est < MIN_GAIN and layout == "sparse":
                direct = cands
            elif est < MIN_GAIN:
                why_not_direct = (f"LiteRT's sparse FULLY_CONNECTED kernels are predicted to run the model at "
                                  f"{est:.2f}x dense latency, but only with XNNPACK off for the whole file, a switch "
                                  f"unverified on ARM: auto keeps XNNPACK; {OPT_IN} and time it on the device"
                                  f"{basis}")
            else:
                why_not_direct = (f"sparse FULLY_CONNECTED kernels would need XNNPACK off for the whole file, "
                                  f"estimated {est:.2f}x dense latency (convolutions run ~"
                                  f"{LITERT_NO_XNNPACK_PENALTY:g}x slower on built-in kernels){basis}")
    out: list[Decision] = []
    for w in weights:
        zf = w.zero_fraction
        if w.name in direct:
            enc, r = direct[w.name]
            block = {CSR: 1, BCSR4: 4, BCSR16: 16}[enc]
            b = csr_bytes(w.values, block) or w.dense_bytes
            out.append(Decision(w.name, enc, K_SPARSE, f"{zf:.0%} zeros: LiteRT's built-in sparse FULLY_CONNECTED "
                                f"kernel, predicted {r:.2f}x dense latency; needs XNNPACK off"
                                f"{_rests_on(_fc_cost(enc), _GAIN, _PENALTY)}", b, r))
            continue
        best = _best_direct(w)
        if layout == "sparse":
            d = _densify_choice(w) if zf > 0 else None
            if d is not None and w.dtype == "int8" and not direct:
                out.append(Decision(w.name, DENSE, K_DENSE, f"{zf:.0%} zeros: DENSIFY of int8 weights would need "
                                    f"XNNPACK off for the whole file", w.dense_bytes, 1.0))
            elif d is not None:
                reason = why_not_direct if best and why_not_direct else (
                    f"the direct sparse kernel is predicted {best[1]:.2f}x dense at this sparsity"
                    f"{_rests_on(_fc_cost(best[0]), _GAIN)}" if best else "no sparse kernel for this op")
                out.append(Decision(w.name, d[0], K_DENSIFIED, f"{zf:.0%} zeros: DENSIFY shrinks it to "
                                    f"{d[1] / w.dense_bytes:.0%} of dense bytes (same speed, more peak memory at "
                                    f"load); {reason}", d[1], 1.0))
            else:
                out.append(Decision(w.name, DENSE, K_DENSE, f"{zf:.0%} zeros: a sparse encoding would not be "
                                    f"smaller", w.dense_bytes, 1.0))
        elif layout == "auto" and zf > 0:
            if best and why_not_direct:
                reason = why_not_direct
            elif best:
                reason = (f"the direct sparse kernel is predicted {best[1]:.2f}x dense at this sparsity, not below "
                          f"{MIN_GAIN:g}{_rests_on(_fc_cost(best[0]), _GAIN)}")
            else:
                reason = ("no sparse kernel for this op; DENSIFY would only shrink the download, at a peak-memory "
                          "cost [no cost constant]")
            out.append(Decision(w.name, DENSE, K_DENSE, f"{zf:.0%} zeros kept dense: {reason}", w.dense_bytes, 1.0))
        else:
            out.append(Decision(w.name, DENSE, K_DENSE, f"layout {layout}", w.dense_bytes, 1.0))
    needs_off = any(d.encoding in (CSR, BCSR4, BCSR16) for d in out) or any(
        d.encoding.startswith("densify") and by_name[d.name].dtype == "int8" for d in out)
    req: dict[str, Any] = {"xnnpack": not needs_off}
    if needs_off:
        req["reason"] = ("sparse FULLY_CONNECTED weights: the XNNPACK delegate mis-computes or crashes on them; "
                         "run with the built-in kernels (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)")
    return out, req


def plan_notes(layout: str, decisions: list[Decision], req: dict[str, Any]) -> list[str]:
    """Report notes for a plan: which x86-measured constants its decisions rest on, and whether it took (or, in
    ``auto``, declined) the whole-file XNNPACK-off switch, which nobody has verified on ARM."""
    used = sorted({c for d in decisions for m in re.findall(r"\[rests on (.*?): measured on x86 only\]", d.why)
                   for c in m.split(", ")})
    notes = []
    if used:
        notes.append(f"layout {layout}: decisions rest on {', '.join(used)}, measured on {MEASURED_ON} "
                     f"(exporters/layouts.py), not on ARM; on the device they are predictions")
    if any(d.kernel == K_SPARSE for d in decisions) and req.get("xnnpack") is False:
        notes.append("XNNPACK is off for the whole file so that LiteRT's sparse FULLY_CONNECTED kernels can run: "
                     "the speed-up that justified it is unverified on ARM (measured on x86 only); time the file "
                     "on the device (bench --remote) against the --layout auto export")
    if any(OPT_IN in d.why for d in decisions):
        notes.append(f"auto kept XNNPACK on: turning it off for the whole file for sparse FULLY_CONNECTED kernels "
                     f"is predicted to pay on x86 but is unverified on ARM; {OPT_IN} (see each layer's why)")
    return notes


__all__ = [
    "BCSR4", "BCSR16", "COO", "CSR", "DENSE", "DENSIFY_BCSR4", "DENSIFY_CSR", "Decision", "Weight",
    "block_zero_fraction", "coo_bytes", "csr_arrays", "csr_bytes", "plan_notes", "plan_onnx", "plan_tflite",
    "zero_fraction",
]
