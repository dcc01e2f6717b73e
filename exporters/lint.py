"""Sparsity lint: what an exported file's zeros will buy in its runtime, weight by weight, with a verdict.

``inspect_file(path)`` reads any .onnx / .tflite file (chita-edge's metadata is used when present, never
required): for every Conv / Gemm / MatMul / FULLY_CONNECTED weight, its zero fraction, how the file stores it,
and what the runtime does with it -- a dense kernel (zeros are multiplied like any weight), a sparse kernel
(LiteRT's FULLY_CONNECTED on sparse weights, XNNPACK off) or densified at load (ONNX ``sparse_initializer``,
TFLite DENSIFY: smaller file, same speed, more peak memory) -- then the share of MACs that run sparse and a
one-line verdict.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

from chita_edge.exporters import layouts as L
from chita_edge.exporters.runtime import RUNTIME_OF, detect_format

from chita_edge.core.errors import BadInput

RUNTIMES = ("onnxruntime", "litert")


def _action(fmt: str, enc: str) -> str:
    if enc == L.DENSE:
        return L.K_DENSE
    if fmt == "tflite" and enc in (L.CSR, L.BCSR4, L.BCSR16):
        return L.K_SPARSE
    return L.K_DENSIFIED


def _gzip_size(path: Path) -> int:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip container
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n += len(c.compress(chunk))
    return n + len(c.flush())


def _predicted_ratio(rows: list[dict[str, Any]], requires_off: bool) -> float | None:
    """Predicted latency vs the dense file on LiteRT, from the measured rules (None without MACs)."""
    total = sum(r["macs"] for r in rows)
    if not total:
        return None
    t = 0.0
    for r in rows:
        if r["runtime_action"] == L.K_SPARSE:
            block = {L.CSR: None, L.BCSR4: 4, L.BCSR16: 16}[r["encoding"]]
            density = 1 - (r["zero_fraction"] if block is None else (r["block_zero_fraction"] or 0.0))
            t += r["macs"] * L.LITERT_SPARSE_FC_COST[r["encoding"]] * density
        elif requires_off and r["kind"] != L.FC:
            t += r["macs"] * L.LITERT_NO_XNNPACK_PENALTY
        else:
            t += r["macs"]
    return t / total


def verdict(fmt: str, rows: list[dict[str, Any]], *, zero_fraction: float, sparse_share: float,
            file_bytes: int, gzip_bytes: int, compact: dict[str, Any] | None, predicted: float | None) -> str:
    densified = [r for r in rows if r["runtime_action"] == L.K_DENSIFIED]
    lead = ""
    if compact and compact.get("removed_channels"):
        ratio = compact["macs_after"] / max(1, compact["macs_before"])
        lead = (f"structurally compact: {ratio:.0%} of the dense model's MACs and "
                f"{compact['params_after'] / max(1, compact['params_before']):.0%} of its parameters, expected to "
                f"run at about that fraction of dense latency on every runtime")
    if sparse_share > 0:
        pred = f", predicted ~{predicted:.2f}x the dense file's latency" if predicted is not None else ""
        msg = (f"{sparse_share:.0%} of MACs run on LiteRT's sparse FULLY_CONNECTED kernels with XNNPACK off (as "
               f"the file requires){pred}; the rest runs dense")
    elif densified and fmt == "onnx":
        msg = ("smaller file (sparse_initializer), but runs at dense speed: ONNX Runtime densifies sparse "
               "initializers at load (more peak memory) and has no sparse CPU kernels; for speed use --layout "
               "compact (structured) or --quantize int8")
    elif densified:
        msg = ("smaller file (sparse weights behind DENSIFY), but runs at dense speed: LiteRT densifies them at "
               "load (more peak memory); for speed use sparse FULLY_CONNECTED weights (--layout sparse on FC "
               "layers) or --layout compact (structured)")
    elif zero_fraction >= 0.05:
        rt = "ONNX Runtime has no sparse CPU kernels" if fmt == "onnx" else \
            "LiteRT's dense kernels multiply stored zeros like any weight"
        msg = (f"runs at dense speed: {rt}; {zero_fraction:.0%} zeros stored densely only shrink the gzip size "
               f"({gzip_bytes / file_bytes:.0%} of the file); use --layout compact (structured) or TFLite sparse "
               f"FC (--format tflite --layout sparse)")
        if lead:
            msg = f"the remaining {zero_fraction:.0%} zeros are stored densely and run at dense speed ({rt})"
    elif lead:
        return lead
    else:
        return (f"dense model ({zero_fraction:.0%} zeros): size and speed follow its parameter count; "
                f"nothing sparse to exploit")
    return f"{lead}; {msg}" if lead else msg


def _mixed_precision(rows: list[dict[str, Any]], fallback: dict[str, Any] | None) -> dict[str, Any] | None:
    """int8 files with some weight layers in float (read from the file's structure; the metadata adds why)."""
    if not any(r["dtype"] in ("int8", "uint8") for r in rows):
        return None
    flt = [r for r in rows if r["dtype"] in ("float32", "float16")]
    if not flt:
        return None
    total = sum(r["macs"] for r in rows) or 1
    share = sum(r["macs"] for r in flt) / total
    names = ", ".join(r["param"] or r["tensor"][-40:] for r in flt)
    why = ""
    if fallback and fallback.get("kept"):
        why = (f", kept by measured int8 sensitivity: held-out top-1 agreement {fallback['agreement_int8']:.2%} "
               f"all-int8 -> {fallback['agreement']:.2%}")
    return {"float_layers": [r["param"] or r["tensor"] for r in flt], "float_mac_share": share,
            "summary": f"int8 except {len(flt)} float layer(s) ({share:.1%} of MACs: {names}){why}",
            "int8_fallback": fallback}


def inspect_file(path: str | os.PathLike, runtime: str | None = None) -> dict[str, Any]:
    """The sparsity lint of one exported file (see the module docstring); a JSON-able dict."""
    fmt = detect_format(path)
    p = Path(path)
    if runtime is not None and runtime not in RUNTIMES:
        raise BadInput(f"--runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if runtime is not None and runtime != RUNTIME_OF[fmt]:
        raise BadInput(f"{p}: a {fmt} file runs on {RUNTIME_OF[fmt]}, not {runtime}")
    if fmt == "onnx":
        from chita_edge.exporters import onnx_format  # deferred: onnx/onnxruntime

        d = onnx_format.describe(p)
        requires: dict[str, Any] = {}
    else:
        from chita_edge.exporters import tflite_format  # deferred: the LiteRT stack

        d = tflite_format.describe(p)
        requires = d["requires"]
    meta = d["metadata"] or {}
    by_tensor = {r.get("tensor"): r for r in meta.get("layers", [])}
    rows = []
    for w in d["weights"]:
        enc = d["encodings"][w.name]
        m = by_tensor.get(w.name, {})
        rows.append({
            "tensor": w.name, "param": w.param or m.get("param"), "op": w.op, "kind": w.kind,
            "shape": list(w.shape), "dtype": w.dtype, "zero_fraction": round(w.zero_fraction, 6),
            "block_zero_fraction": L.block_zero_fraction(w.values, 16 if enc == L.BCSR16 else 4),
            "encoding": enc, "runtime_action": _action(fmt, enc), "macs": w.macs,
            "why": m.get("why"), "precision_why": m.get("precision_why"),
        })
    total = sum(r["macs"] for r in rows)
    sparse_macs = sum(r["macs"] for r in rows if r["runtime_action"] == L.K_SPARSE)
    numel = sum(w.numel for w in d["weights"]) or 1
    zf = sum(w.zero_fraction * w.numel for w in d["weights"]) / numel
    size, gz = p.stat().st_size, _gzip_size(p)
    share = sparse_macs / total if total else 0.0
    predicted = _predicted_ratio(rows, not requires.get("xnnpack", True)) if fmt == "tflite" and share else None
    mixed = _mixed_precision(rows, meta.get("int8_fallback"))
    v = verdict(fmt, rows, zero_fraction=zf, sparse_share=share, file_bytes=size, gzip_bytes=gz,
                compact=meta.get("compact"), predicted=predicted)
    if mixed:
        v += f"; {mixed['summary']}"
    return {
        "file": str(p), "format": fmt, "runtime": RUNTIME_OF[fmt], "bytes": size, "gzip_bytes": gz,
        "producer": meta.get("producer"), "version": meta.get("version"), "layout": meta.get("layout"),
        "quantize": meta.get("quantize"), "source": meta.get("source"), "requires": requires,
        "compact": meta.get("compact"), "zero_fraction": zf, "macs": total, "sparse_macs": sparse_macs,
        "sparse_mac_share": share, "predicted_latency_ratio": predicted, "weights": rows,
        "mixed_precision": mixed, "int8_float_pooling": meta.get("int8_float_pooling", []), "verdict": v,
    }


__all__ = ["RUNTIMES", "inspect_file", "verdict"]
