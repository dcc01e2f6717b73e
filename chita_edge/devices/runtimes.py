"""What a benchmark needs from the runtimes beyond ``chita_edge.exporters.load_session``: per-layer costs and
a primed runtime.

Sessions for timing, accuracy and profiling come from ``chita_edge.exporters`` (the one runner, the one place
that imports onnxruntime / onnx): the per-node profile uses ONNX Runtime's built-in profiler (time, weight
bytes held, arena peak) through ``onnx_format.OnnxSession(..., profile_prefix=...)``, with the same options as
the timing session. For LiteRT the interpreter has no per-op timer: ops are costed by their
multiply-accumulates from the graph, through the exporters' LiteRT stack.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

# Op kinds of the op-mix model of the device estimate.
DENSE, DEPTHWISE, OTHER = "dense", "depthwise", "other"


@dataclass(frozen=True)
class LayerCost:
    """One node or op: host time when the runtime has a profiler, weight bytes, op kind, MACs when known."""

    name: str
    op: str
    kind: str  # dense / depthwise / other
    ms: float | None
    param_bytes: int
    macs: int | None = None


def _shape_of(d: dict[str, Any]) -> list[int]:
    return list(next(iter(d.values()))) if d else []


def _ort_kind(args: dict[str, Any]) -> str:
    op = args.get("op_name", "")
    shapes = args.get("input_type_shape", [])
    if op in ("Conv", "FusedConv", "NchwcConv", "ConvTranspose", "QLinearConv", "ConvInteger") and len(shapes) >= 2:
        x, w = _shape_of(shapes[0]), _shape_of(shapes[3 if op == "QLinearConv" and len(shapes) >= 4 else 1])
        if len(w) >= 2 and len(x) >= 2 and w[1] == 1 and x[1] > 1:
            return DEPTHWISE
        return DENSE
    if op in ("Gemm", "MatMul", "FusedMatMul", "FusedGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
              "DynamicQuantizeMatMul", "QGemm"):
        return DENSE
    return OTHER


def profile_onnx(path: str | os.PathLike, x: np.ndarray, *, threads: int = 1,
                 runs: int = 5) -> tuple[list[LayerCost], int | None]:
    """Run ``x`` ``runs`` times in a profiled ONNX Runtime session (same options as the timing session).

    Returns the nodes in execution order with their median time, and the arena's peak bytes."""
    from chita_edge.exporters.onnx_format import OnnxSession  # deferred: onnx/onnxruntime

    with tempfile.TemporaryDirectory(prefix="chita-edge-prof-") as td:
        s = OnnxSession(path, threads, profile_prefix=os.path.join(td, "ort"))
        once = s.prepare(x)
        for _ in range(runs):
            once()
        with open(s.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    per: dict[str, list[Any]] = {}
    peak = None
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        a = e.get("args", {})
        node = e["name"][: -len("_kernel_time")]
        if node not in per:
            per[node] = [a.get("op_name", "?"), _ort_kind(a), [], int(a.get("parameter_size", 0) or 0)]
        per[node][2].append(float(e.get("dur", 0)) / 1000.0)
        if "mem_in_use_peak" in a:
            peak = max(peak or 0, int(a["mem_in_use_peak"]))
    return [LayerCost(n, v[0], v[1], float(np.median(v[2])), v[3]) for n, v in per.items()], peak


def tflite_layers(path: str | os.PathLike) -> list[LayerCost]:
    """The ops of a .tflite file with their MACs and weight bytes (from the graph; no timing)."""
    from chita_edge.exporters.tflite_format import stack  # deferred: the LiteRT stack

    it = stack("profiling a .tflite file").interpreter.Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    out = []
    for op in it._get_ops_details():  # the interpreter's only op listing
        name = op["op_name"]
        ins = [tensors.get(int(i)) for i in op["inputs"] if int(i) >= 0]
        outs = [tensors.get(int(i)) for i in op["outputs"] if int(i) >= 0]
        o = outs[0]["shape"] if outs and outs[0] is not None else []
        w = ins[1]["shape"] if len(ins) > 1 and ins[1] is not None else []
        n_out = int(np.prod(o)) if len(o) else 0
        macs, kind = 0, OTHER
        if name == "DEPTHWISE_CONV_2D" and len(w) == 4:
            kind, macs = DEPTHWISE, n_out * int(w[1] * w[2])
        elif name in ("CONV_2D", "TRANSPOSE_CONV") and len(w) == 4:
            kind, macs = DENSE, n_out * int(np.prod(w[1:]))
        elif name in ("FULLY_CONNECTED", "BATCH_MATMUL") and len(w) >= 2:
            kind, macs = DENSE, n_out * int(w[-1])
        pbytes = 0 if kind == OTHER else sum(int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
                                             for t in ins[1:] if t is not None)
        out.append(LayerCost(f"{op['index']}:{name}", name, kind, None, pbytes, macs))
    return out


def prime_runtime(runtime: str, threads: int = 1) -> bool:
    """Load and run a one-node model so that the runtime's code and global state are resident before a
    measurement; what a model costs on top is then its own. False where the runtime cannot be primed."""
    if runtime != "onnxruntime":
        return False
    from chita_edge.exporters.onnx_format import prime  # deferred: onnx/onnxruntime

    prime(threads)
    return True


def op_mix(layers: list[LayerCost] | None) -> dict[str, Any] | None:
    """Share of the model's cost per op kind: by host time when measured, else by multiply-accumulates."""
    if not layers:
        return None
    if all(lc.ms is not None for lc in layers):
        w = {k: sum(lc.ms or 0.0 for lc in layers if lc.kind == k) for k in (DENSE, DEPTHWISE, OTHER)}
        basis = "time"
    else:
        w = {k: float(sum(lc.macs or 0 for lc in layers if lc.kind == k)) for k in (DENSE, DEPTHWISE, OTHER)}
        basis = "macs"
    tot = sum(w.values())
    if tot <= 0:
        return None
    return {**{k: v / tot for k, v in w.items()}, "basis": basis}
