"""ONNX: export from PyTorch, static int8 (QDQ) and fp16, ``sparse_initializer``, metadata, sessions.

The one module of chita-edge that imports ``onnx`` and ``onnxruntime``. Export goes through the
``torch.export``-based exporter (``dynamo=True``) with a dynamic batch dimension, which keeps the PyTorch
parameter names as initializer names; the TorchScript exporter is the fallback for models ``torch.export``
cannot capture.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from chita_edge.exporters import layouts as L
from chita_edge.exporters import mixed
from onnx import helper, numpy_helper

from chita_edge.core.errors import BadInput, RuntimeFailure

log = logging.getLogger(__name__)

META_KEY = "chita_edge"
OPSET = 18
IR_VERSION = 10  # what onnxruntime 1.18+ loads
_WEIGHT_OPS = {"Conv": 1, "Gemm": 1, "MatMul": 1}


def _first_line(e: BaseException) -> str:
    s = str(e)
    for line in s.splitlines():  # torch.export errors put the cause under "## Exception summary"
        if line.startswith("<class "):
            return line.strip()[:240]
    s = s.strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:240]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Exporters print progress, warnings and root-logger advice; keep stdout clean for ``--json``."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _toposort(mp: onnx.ModelProto) -> None:
    """Order the graph's nodes so that every input is produced before use (the fp16 converter appends its
    input casts at the end)."""
    g = mp.graph
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {
        s.values.name for s in g.sparse_initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle or a dangling input: leave the rest as it was
            ordered += rest
            break
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


# ---------------------------------------------------------------------------------------------------------------
# Export and conversion


def export(model: torch.nn.Module, example: torch.Tensor, *, opset: int = OPSET) -> tuple[onnx.ModelProto, str]:
    """Export ``model`` (eval mode) for inputs shaped like ``example``; returns (model, exporter used)."""
    model.eval()
    errors = []
    x2 = torch.cat([example[:1], example[:1]])  # batch 2, so that torch.export does not specialise batch 1
    attempts = [
        ("torch.export, dynamic batch", dict(dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)), x2),
        ("torch.export, batch 1", dict(dynamo=True), example[:1]),
        ("torchscript, dynamic batch", dict(dynamo=False, dynamic_axes={"input": {0: "batch"},
                                                                        "output": {0: "batch"}}), example[:1]),
    ]
    for name, kw, x in attempts:
        try:
            with _quiet(), torch.no_grad():
                if kw["dynamo"]:
                    prog = torch.onnx.export(model, (x,), input_names=["input"], output_names=["output"],
                                             opset_version=opset, verbose=False, optimize=True, **kw)
                    mp = prog.model_proto
                else:
                    f = io.BytesIO()
                    torch.onnx.export(model, (x,), f, input_names=["input"], output_names=["output"],
                                      opset_version=opset, do_constant_folding=True, **kw)
                    mp = onnx.load_from_string(f.getvalue())
        except Exception as e:  # each exporter raises its own zoo of types
            errors.append(f"{name}: {_first_line(e)}")
            log.info("ONNX export via %s failed: %s", name, errors[-1])
            if "DispatchError" in errors[-1] or "No ONNX function" in errors[-1]:
                break  # an op without an ONNX translation: the other routes fail the same way
            continue
        mp.ir_version = min(mp.ir_version, IR_VERSION)
        return mp, name
    raise BadInput(f"{type(model).__name__}: the model uses an operation the ONNX exporter cannot convert "
                   f"({errors[0]})")


class _Reader:
    """onnxruntime calibration reader over an array of samples, one sample per call."""

    def __init__(self, name: str, x: np.ndarray):
        self.name, self.x, self.i = name, x, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.name: self.x[self.i - 1:self.i]}

    def rewind(self) -> None:
        self.i = 0


_FALLBACK_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Sub", "Concat")  # nodes that can be
# left in float (others just pass data)
_AVERAGING_OPS = ("AveragePool", "GlobalAveragePool", "ReduceMean")  # always float in int8 (``float_pooling``)


class Int8Quantizer:
    """Static int8 quantisation in QDQ form (per-channel int8 weights, int8 activations), calibrated once:
    ``quantize(keep_float)`` quantises again from the cached ranges with the named nodes left in float
    (``quantize_static``'s ``nodes_to_exclude``); the ``mixed.Int8Backend`` of ONNX.

    Averaging nodes (``float_pooling``) are always left in float: onnxruntime's QDQ AveragePool re-quantises its
    output on its *input's* int8 grid, far too coarse for averages (ResNet20's pooled features span 0-7.7 on a
    grid of step 0.1 made for 0-25); in float the next layer quantises them on a grid of their own range, which
    cut the int8 logit error of a pruned ResNet20 from 0.47 to 0.36 rms at no measurable cost (docs/exporters.md).

    Dynamic int8 is never used: on convolutions it runs as ConvInteger, 7-12x slower than fp32 (runtimes.md).
    """

    def __init__(self, mp: onnx.ModelProto, calibration: np.ndarray, *, method: str = "minmax"):
        from onnxruntime.quantization import CalibrationMethod

        self._tmp = tempfile.TemporaryDirectory(prefix="chita-edge-q-")
        self.float_model = onnx.ModelProto()
        self.float_model.CopyFrom(mp)
        for i, n in enumerate(self.float_model.graph.node):  # nodes_to_exclude needs names
            if not n.name:
                n.name = f"{n.op_type}_{i}"
        self._src = os.path.join(self._tmp.name, "f.onnx")
        self._cache = os.path.join(self._tmp.name, "ranges.json")
        onnx.save(self.float_model, self._src)
        self._calib = calibration.astype(np.float32)
        self._method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                        "entropy": CalibrationMethod.Entropy}[method]
        self.float_pooling = [n.name for n in self.float_model.graph.node if n.op_type in _AVERAGING_OPS]

    def candidates(self) -> list[mixed.Candidate]:
        ws = {w.name: w for w in weights(self.float_model)[0]}
        out = []
        for n in self.float_model.graph.node:
            if n.op_type not in _FALLBACK_OPS:
                continue
            w = ws.get(n.input[_WEIGHT_OPS[n.op_type]]) if n.op_type in _WEIGHT_OPS and len(n.input) > 1 else None
            out.append(mixed.Candidate(name=n.name, op=n.op_type, macs=w.macs if w else 0,
                                       param=w.param if w else None, tensor=w.name if w else None))
        return out

    def quantize(self, keep_float: Sequence[str] = ()) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        dst = os.path.join(self._tmp.name, "q.onnx")
        with _quiet():
            try:
                quantize_static(self._src, dst, _Reader(self.float_model.graph.input[0].name, self._calib),
                                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, calibrate_method=self._method,
                                nodes_to_exclude=list(dict.fromkeys([*self.float_pooling, *keep_float])),
                                calibration_cache_path=self._cache,
                                extra_options={"CalibTensorRangeSymmetric": False})
            except Exception as e:
                raise RuntimeFailure(f"onnxruntime static int8 quantisation failed ({_first_line(e)})") from None
            q = onnx.load(dst)
        q.ir_version = min(q.ir_version, IR_VERSION)
        return q

    def run(self, model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
        path = os.path.join(self._tmp.name, "run.onnx")
        onnx.save(model, path)
        return OnnxSession(path, 1).run(x)


def quantize_int8(mp: onnx.ModelProto, calibration: np.ndarray, *, method: str = "minmax") -> onnx.ModelProto:
    """Every node in static int8 (QDQ); see ``Int8Quantizer``."""
    return Int8Quantizer(mp, calibration, method=method).quantize(())


def to_fp16(mp: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations, fp32 inputs and outputs (onnxruntime.transformers' converter)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        try:
            out = convert_float_to_float16(mp, keep_io_types=True)
        except Exception as e:
            raise RuntimeFailure(f"fp16 conversion failed ({_first_line(e)})") from None
    _toposort(out)
    out.ir_version = min(out.ir_version, IR_VERSION)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Weights: find, describe, encode


def _sparse_to_dense(sp: onnx.SparseTensorProto) -> np.ndarray:
    vals = numpy_helper.to_array(sp.values)
    idx = numpy_helper.to_array(sp.indices).astype(np.int64)
    dims = tuple(sp.dims)
    dense = np.zeros(int(np.prod(dims)), dtype=vals.dtype)
    if idx.ndim == 2:  # [nnz, rank] coordinates
        idx = np.ravel_multi_index(tuple(idx.T), dims)
    dense[idx] = vals.reshape(-1)
    return dense.reshape(dims)


def _shapes(mp: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes of every value (symbolic dims -> 1), from ONNX shape inference on a densified copy."""
    m = onnx.ModelProto()
    m.CopyFrom(mp)
    for sp in m.graph.sparse_initializer:
        m.graph.initializer.append(numpy_helper.from_array(_sparse_to_dense(sp), sp.values.name))
    del m.graph.sparse_initializer[:]
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception as e:
        log.info("ONNX shape inference failed: %s", e)
    out = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                                 for d in t.shape.dim)
    return out


def weights(mp: onnx.ModelProto) -> tuple[list[L.Weight], dict[str, str]]:
    """The weights of Conv/Gemm/MatMul nodes (directly or through DequantizeLinear), and each one's encoding."""
    dense = {t.name: t for t in mp.graph.initializer}
    sparse = {sp.values.name: sp for sp in mp.graph.sparse_initializer}
    producers = {o: n for n in mp.graph.node for o in n.output}
    shapes = _shapes(mp)
    out: list[L.Weight] = []
    enc: dict[str, str] = {}
    seen = set()
    for node in mp.graph.node:
        slot = _WEIGHT_OPS.get(node.op_type)
        if slot is None or len(node.input) <= slot:
            continue
        name = node.input[slot]
        dq = producers.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear":
            name = dq.input[0]
        if name in seen or (name not in dense and name not in sparse):
            continue
        seen.add(name)
        try:
            arr = numpy_helper.to_array(dense[name]) if name in dense else _sparse_to_dense(sparse[name])
        except Exception:  # external data not loaded, or an odd encoding: not a weight we can describe
            continue
        if arr.ndim < 2:
            continue
        kind = L.FC
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            kind = L.DEPTHWISE if group > 1 and arr.shape[1] == 1 else L.CONV
            per_out = int(np.prod(arr.shape[1:]))
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            per_out = arr.shape[1] if trans_b else arr.shape[0]
        else:
            per_out = arr.shape[-2]
        oshape = shapes.get(node.output[0])
        if oshape:
            macs = int(np.prod(oshape[1:])) * per_out if len(oshape) > 1 else int(np.prod(oshape)) * per_out
        else:
            macs = int(arr.size)
        out.append(L.Weight(name=name, op=node.op_type, kind=kind, shape=tuple(arr.shape), dtype=arr.dtype.name,
                            values=arr, macs=macs, param=_param_name(name)))
        enc[name] = L.COO if name in sparse else L.DENSE
    return out, enc


def _param_name(name: str) -> str | None:
    base = name[: -len("_quantized")] if name.endswith("_quantized") else name
    return base if base.endswith(".weight") else None


def apply(mp: onnx.ModelProto, decisions: list[L.Decision]) -> onnx.ModelProto:
    """Move the initializers whose decision is COO into ``sparse_initializer`` (linearised int64 indices)."""
    to_sparse = {d.name for d in decisions if d.encoding == L.COO}
    keep = []
    for t in mp.graph.initializer:
        if t.name not in to_sparse:
            keep.append(t)
            continue
        arr = numpy_helper.to_array(t)
        flat = arr.reshape(-1)
        nz = np.flatnonzero(flat)
        vals = numpy_helper.from_array(flat[nz], name=t.name)
        idx = numpy_helper.from_array(nz.astype(np.int64), name=f"{t.name}.indices")
        mp.graph.sparse_initializer.append(helper.make_sparse_tensor(vals, idx, list(arr.shape)))
    del mp.graph.initializer[:]
    mp.graph.initializer.extend(keep)
    return mp


# ---------------------------------------------------------------------------------------------------------------
# Metadata and files


def set_metadata(mp: onnx.ModelProto, meta: dict[str, Any], version: str) -> None:
    mp.producer_name, mp.producer_version = "chita-edge", version
    for p in [p for p in mp.metadata_props if p.key in (META_KEY, "requires")]:
        mp.metadata_props.remove(p)
    mp.metadata_props.add(key=META_KEY, value=json.dumps(meta, separators=(",", ":")))
    mp.metadata_props.add(key="requires", value=json.dumps(meta.get("requires") or {}))


def save(mp: onnx.ModelProto, path: str | os.PathLike) -> None:
    try:
        onnx.checker.check_model(mp)
    except Exception as e:
        raise RuntimeFailure(f"the exported ONNX model does not pass onnx.checker ({_first_line(e)})") from None
    with open(path, "wb") as f:
        f.write(mp.SerializeToString())


def load(path: str | os.PathLike) -> onnx.ModelProto:
    try:
        mp = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise BadInput(f"{path}: not a readable ONNX file ({_first_line(e)})") from None
    if not mp.HasField("graph") or not mp.graph.node or not mp.graph.output:
        # protobuf parses an empty (or nearly empty) byte string as an empty ModelProto
        raise BadInput(f"{path}: not an ONNX model (no graph, nodes or outputs)")
    return mp


def read_metadata(mp: onnx.ModelProto) -> dict[str, Any] | None:
    for p in mp.metadata_props:
        if p.key == META_KEY:
            try:
                return json.loads(p.value)
            except json.JSONDecodeError:
                return None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Running


def session_options(threads: int = 1, profile_prefix: str | None = None) -> Any:
    """The one set of ONNX Runtime session options chita-edge runs with: ``threads`` intra-op threads,
    sequential, thread spinning off (it matters on small machines: runtimes.md); optionally profiled."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


class OnnxSession:
    """An ONNX Runtime CPU session: ``run(x)`` returns the first output as float32 for a batch ``x``.

    ``path`` may also be a serialised model (bytes); ``profile_prefix`` turns ONNX Runtime's profiler on
    (``end_profiling()`` returns the JSON trace's path)."""

    format = "onnx"
    runtime = "onnxruntime"
    xnnpack = False

    def __init__(self, path: str | os.PathLike | bytes, threads: int = 1, *, profile_prefix: str | None = None):
        import onnxruntime as ort

        so = session_options(threads, profile_prefix)
        src: str | bytes = path if isinstance(path, bytes) else str(path)
        if isinstance(path, bytes):
            path = "<in-memory ONNX model>"
        elif os.path.isfile(path) and os.path.getsize(path) == 0:
            raise BadInput(f"{path}: an empty file (0 bytes), not an ONNX model")
        self.path = str(path)
        try:
            self._s = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            msg = _first_line(e)
            if "INVALID_PROTOBUF" in msg or "Protobuf parsing failed" in msg or "No graph was found" in msg:
                raise BadInput(f"{path}: not a valid ONNX model ({msg})") from None
            raise RuntimeFailure(f"{path}: ONNX Runtime could not load the model ({msg})") from None
        i = self._s.get_inputs()[0]
        if i.type not in ("tensor(float)", "tensor(float16)"):
            raise BadInput(f"{path}: input '{i.name}' is {i.type}; chita-edge runs models that take one float32 "
                           "(or float16) tensor")
        self.input_name = i.name
        self.dynamic_batch = bool(i.shape) and not (isinstance(i.shape[0], int) and i.shape[0] > 0)
        self.input_shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in i.shape)
        self.input_dtype = np.float16 if "float16" in i.type else np.float32

    def prepare(self, x: np.ndarray) -> Callable[[], Any]:
        """A no-argument callable running exactly one inference on ``x`` (for timing loops)."""
        feeds = {self.input_name: np.ascontiguousarray(x, dtype=self.input_dtype)}
        return lambda: self._s.run(None, feeds)

    def run(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        x = np.asarray(x, dtype=self.input_dtype)
        step = batch_size if self.dynamic_batch else self.input_shape[0]
        outs = []
        for i in range(0, len(x), step):
            xb = np.ascontiguousarray(x[i:i + step])
            try:
                y = self._s.run(None, {self.input_name: xb})[0]
            except Exception as e:
                raise RuntimeFailure(f"{self.path}: ONNX Runtime failed to run the model ({_first_line(e)})") from None
            outs.append(np.asarray(y, dtype=np.float32))
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    def end_profiling(self) -> str:
        """Stop the profiler (``profile_prefix``) and return the path of its JSON trace."""
        return self._s.end_profiling()


def prime(threads: int = 1) -> None:
    """Load and run a one-node model so that ONNX Runtime's code and global state are resident."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "prime",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 9)
    OnnxSession(model.SerializeToString(), threads).run(np.zeros((1, 4), dtype=np.float32))


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What the file holds: weights with their encodings, metadata, input shape."""
    mp = load(path)
    ws, enc = weights(mp)
    inp = mp.graph.input[0].type.tensor_type.shape.dim if mp.graph.input else []
    return {"weights": ws, "encodings": enc, "metadata": read_metadata(mp), "model": mp,
            "input_shape": [d.dim_value if d.HasField("dim_value") else None for d in inp]}


__all__ = ["Int8Quantizer", "OnnxSession", "apply", "describe", "export", "load", "prime", "quantize_int8",
           "read_metadata", "save", "session_options", "set_metadata", "to_fp16", "weights"]
