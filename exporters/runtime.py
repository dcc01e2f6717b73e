"""Run an exported file in its runtime: the small, stable API the parity check and the benchmarks share.

    sess = load_session("model.tflite", threads=1)   # XNNPACK on or off as the file requires
    logits = sess.run(x)                             # x: (N, ...) float32 -> (N, classes) float32
    once = sess.prepare(x[:1]); once()               # one inference, input already set (timing loops)
    file_requirements("model.tflite")                # {"format": "tflite", "xnnpack": False, "reason": ...}

A TFLite file with sparse FULLY_CONNECTED weights must run without XNNPACK (the delegate returns NaN or crashes
the process on them); ``load_session`` refuses ``xnnpack=True`` for such a file instead of letting it run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from chita_edge.core.errors import BadInput
from chita_edge.core.io import require_file

FORMATS = ("onnx", "tflite")
RUNTIME_OF = {"onnx": "onnxruntime", "tflite": "litert"}


class Session(Protocol):
    format: str
    runtime: str
    xnnpack: bool
    input_shape: tuple[int, ...]
    dynamic_batch: bool

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def prepare(self, x: np.ndarray) -> Callable[[], Any]: ...


def detect_format(path: str | os.PathLike) -> str:
    """``onnx`` or ``tflite``, from the file's bytes (TFLite files carry the 'TFL3' identifier)."""
    p = require_file(path, "model file")
    with open(p, "rb") as f:
        head = f.read(8)
    if len(head) >= 8 and head[4:8] == b"TFL3":
        return "tflite"
    if p.suffix.lower() == ".tflite":
        raise BadInput(f"{p}: not a TFLite flatbuffer (no 'TFL3' identifier)")
    if p.suffix.lower() == ".onnx" or head[:1] == b"\x08":  # protobuf field 1 (ir_version), varint
        return "onnx"
    raise BadInput(f"{p}: unknown model format; expected an .onnx or .tflite file")


def file_requirements(path: str | os.PathLike) -> dict[str, Any]:
    """Runtime options ``path`` needs: ``{"format", "runtime", "xnnpack", "reason"?}``.

    ``xnnpack``: True / False for TFLite -- from the file's structure (sparse weights read directly by an op rule
    XNNPACK out), whatever its metadata says; None for ONNX (no delegate involved, no option needed).
    """
    fmt = detect_format(path)
    if fmt == "onnx":
        return {"format": "onnx", "runtime": "onnxruntime", "xnnpack": None}
    from chita_edge.exporters import tflite_format  # deferred: the LiteRT stack

    req = tflite_format.requirements(tflite_format.load(path))
    return {"format": "tflite", "runtime": "litert", **req}


def load_session(path: str | os.PathLike, threads: int = 1, *, xnnpack: bool | None = None) -> Session:
    """Open ``path`` in its runtime with ``threads`` threads. ``xnnpack=None`` follows the file's requirements
    (LiteRT's default XNNPACK delegate unless the file rules it out); ONNX ignores it."""
    if threads < 1:
        raise BadInput(f"threads {threads}: expected at least 1")
    fmt = detect_format(path)
    if fmt == "onnx":
        from chita_edge.exporters.onnx_format import OnnxSession  # deferred: onnx/onnxruntime

        return OnnxSession(path, threads)
    from chita_edge.exporters import tflite_format  # deferred: the LiteRT stack

    req = file_requirements(path)
    if xnnpack is None:
        xnnpack = bool(req["xnnpack"])
    elif xnnpack and not req["xnnpack"]:
        raise BadInput(f"{Path(path)}: this file must run without XNNPACK ({req.get('reason', '')})")
    return tflite_format.TFLiteSession(path, threads, xnnpack=xnnpack)


def run(path: str | os.PathLike, inputs: np.ndarray, *, threads: int = 1, xnnpack: bool | None = None) -> np.ndarray:
    """Load ``path`` and run ``inputs`` (N, ...) through it; the first output as float32."""
    return load_session(path, threads, xnnpack=xnnpack).run(inputs)


__all__ = ["FORMATS", "Session", "detect_format", "file_requirements", "load_session", "run"]
