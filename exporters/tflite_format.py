"""TFLite / LiteRT: litert-torch conversion, sparse encodings, metadata, interpreter sessions; quantisation is in
``tflite_quantize``.

The one module of chita-edge that imports the LiteRT stack (``litert_torch``, ``ai_edge_litert``,
``ai_edge_quantizer``, ``flatbuffers``), lazily, through ``stack()`` and ``_converter_stack()`` (which
``tflite_quantize`` uses too): without the ``tflite`` extra every entry point raises ``MissingExtra("tflite", ...)``.

Neither litert-torch nor the quantizer can store a weight sparse, so sparse encodings are written into the
flatbuffer after conversion with the schema bindings shipped in ``ai_edge_litert`` (``SparsityParameters``:
``traversal_order``, ``block_map``, ``dim_metadata`` DENSE / SPARSE_CSR):

* direct sparse FULLY_CONNECTED weights -- the weight tensor itself carries the sparsity and the built-in kernel
  reads it: fp32 unstructured (``[DENSE rows, CSR cols]``) or 1x4 blocks (``[DENSE, CSR, DENSE 4]``), int8 1x16
  blocks. XNNPACK mis-computes or crashes on these, so such a file records ``requires: no XNNPACK`` and
  ``TFLiteSession`` loads it with ``BUILTIN_WITHOUT_DEFAULT_DELEGATES``;
* DENSIFY: a new sparse constant feeds a DENSIFY op whose output replaces the dense weight for every consumer.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from chita_edge.exporters import layouts as L

from chita_edge.core.errors import BadInput, MissingExtra, RuntimeFailure

log = logging.getLogger(__name__)

META_NAME = b"chita_edge"
_WEIGHT_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")
_NP = {0: np.float32, 1: np.float16, 9: np.int8, 2: np.int32, 3: np.uint8}  # TensorType -> numpy
_stack_cache: SimpleNamespace | None = None


def stack(what: str = "TFLite export") -> SimpleNamespace:
    """The LiteRT modules, imported once; ``MissingExtra`` when the ``tflite`` extra is not installed."""
    global _stack_cache
    if _stack_cache is not None:
        return _stack_cache
    try:
        from ai_edge_litert import interpreter, schema_py_generated
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError:
        raise MissingExtra("tflite", what) from None
    ns = SimpleNamespace(interpreter=interpreter, schema=schema_py_generated, fb=flatbuffer_utils)
    ns.op_names = {v: k for k, v in vars(schema_py_generated.BuiltinOperator).items() if not k.startswith("_")}
    _stack_cache = ns
    return ns


def require_export_stack() -> None:
    """Raise ``MissingExtra`` now, before any work, if a TFLite export could not finish."""
    stack()
    _converter_stack()


def _converter_stack() -> SimpleNamespace:
    """litert-torch and ai-edge-quantizer: needed to export, not to run or inspect."""
    try:
        os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
        with _quiet():
            import litert_torch
            from ai_edge_quantizer import algorithm_manager, calibrator, qtyping, quantizer, recipe
            from ai_edge_quantizer.utils import qsv_utils, tfl_flatbuffer_utils
    except ImportError:
        raise MissingExtra("tflite", "TFLite export") from None
    return SimpleNamespace(litert_torch=litert_torch, quantizer=quantizer, recipe=recipe, calibrator=calibrator,
                           qsv_utils=qsv_utils, qtyping=qtyping, algorithm_manager=algorithm_manager,
                           tfl_flatbuffer_utils=tfl_flatbuffer_utils)


def _first_line(e: BaseException) -> str:
    for line in str(e).splitlines():
        if line.startswith("<class "):
            return line.strip()[:240]
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:240]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """litert-torch and the quantizer print progress bars and reports; keep stdout (``--json``) and stderr clean."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


# ---------------------------------------------------------------------------------------------------------------
# Conversion


def convert(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    """litert-torch conversion of ``model`` (eval mode) for one sample shaped like ``example[:1]``."""
    cs = _converter_stack()
    stack()
    model.eval()
    old = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        with _quiet(), torch.no_grad():
            return bytes(cs.litert_torch.convert(model, (example[:1],)).model_content())
    except Exception as e:
        raise BadInput(f"{type(model).__name__}: the model uses an operation litert-torch cannot convert to "
                       f"TFLite ({_first_line(e)})") from None
    finally:
        if old is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old


# ---------------------------------------------------------------------------------------------------------------
# The flatbuffer


def read(buf: bytes) -> Any:
    s = stack("reading a .tflite file")
    try:
        return s.fb.read_model_from_bytearray(bytearray(buf))
    except Exception as e:
        raise BadInput(f"not a readable TFLite flatbuffer ({_first_line(e)})") from None


def write(model: Any) -> bytes:
    return bytes(stack().fb.convert_object_to_bytearray(model))


def _op_name(model: Any, op: Any) -> str:
    oc = model.operatorCodes[op.opcodeIndex]
    return stack().op_names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "?")


def _name(t: Any) -> str:
    return t.name.decode() if isinstance(t.name, bytes) else str(t.name)


def _raw(model: Any, t: Any) -> np.ndarray | None:
    b = model.buffers[t.buffer]
    if b.data is None or len(b.data) == 0:
        return None
    return np.frombuffer(bytes(np.asarray(b.data, dtype=np.uint8)), dtype=_NP.get(t.type, np.uint8))


def _index_vector(v: Any) -> np.ndarray:
    return np.asarray(v.values if v is not None and v.values is not None else [], dtype=np.int64)


def decode_sparse(t: Any, raw: np.ndarray) -> np.ndarray | None:
    """Dense values of a sparse tensor in the encodings chita-edge writes (dense leading dims, CSR on the last
    dim, optional 1xB blocks on it); None for other encodings."""
    sp = t.sparsity
    s = stack().schema
    n = len(t.shape)
    dims = list(sp.dimMetadata or [])
    order = list(sp.traversalOrder) if sp.traversalOrder is not None else []
    blocked = sp.blockMap is not None and len(sp.blockMap) == 1 and int(sp.blockMap[0]) == n - 1
    if order != list(range(n + (1 if blocked else 0))) or len(dims) != len(order):
        return None
    if any(d.format != s.DimensionType.DENSE for d in dims[: n - 1]) or dims[n - 1].format != s.DimensionType.SPARSE_CSR:
        return None
    block = int(dims[n].denseSize) if blocked else 1
    rows = int(np.prod(t.shape[:-1])) if n > 1 else 1
    cols = int(t.shape[-1])
    seg, idx = _index_vector(dims[n - 1].arraySegments), _index_vector(dims[n - 1].arrayIndices)
    if len(seg) != rows + 1 or len(raw) != len(idx) * block:
        return None
    out = np.zeros((rows, cols // block, block), dtype=raw.dtype)
    r = np.repeat(np.arange(rows), np.diff(seg))
    out[r, idx] = raw.reshape(-1, block)
    return out.reshape(tuple(int(d) for d in t.shape))


def _encoding_of(model: Any, t: Any) -> str:
    """Name the sparse encoding of tensor ``t`` as chita-edge writes it."""
    if t.sparsity is None:
        return L.DENSE
    n = len(t.shape)
    dims = t.sparsity.dimMetadata or []
    if len(dims) == n + 1:
        return {4: L.BCSR4, 16: L.BCSR16}.get(int(dims[n].denseSize), f"bcsr1x{int(dims[n].denseSize)}")
    return L.CSR


def weights(model: Any, params: dict[str, tuple[int, ...]] | None = None) -> tuple[list[L.Weight], dict[str, Any]]:
    """The weights of FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D ops (through DEQUANTIZE and DENSIFY).

    Returns the weights (dense values, MACs per sample) and, per weight name, {"tensor": index, "encoding":
    dense / csr / bcsr1x4 / bcsr1x16 / densify-...}. ``params`` maps PyTorch weight names to shapes, used to
    name the parameter each tensor came from.
    """
    g = model.subgraphs[0]
    producer = {o: op for op in g.operators for o in (op.outputs if op.outputs is not None else [])}
    consumers: dict[int, list[tuple[str, int]]] = {}
    for op in g.operators:
        for slot, i in enumerate(op.inputs if op.inputs is not None else []):
            if i >= 0:
                consumers.setdefault(int(i), []).append((_op_name(model, op), slot))
    out: list[L.Weight] = []
    info: dict[str, Any] = {}
    seen: set[int] = set()
    for op in g.operators:
        name = _op_name(model, op)
        if name not in _WEIGHT_OPS or op.inputs is None or len(op.inputs) < 2:
            continue
        ti = label = int(op.inputs[1])  # label: the dense weight tensor, named as at conversion
        via = None
        p = producer.get(ti)
        if p is not None and _op_name(model, p) in ("DEQUANTIZE", "DENSIFY"):
            via = _op_name(model, p)
            src = int(p.inputs[0])
            if via == "DEQUANTIZE":
                label = src
            p2 = producer.get(src)
            if via == "DEQUANTIZE" and p2 is not None and _op_name(model, p2) == "DENSIFY":  # fp16 behind DENSIFY
                via, src = "DENSIFY", int(p2.inputs[0])
            ti = src
        if ti in seen:
            continue
        seen.add(ti)
        t = g.tensors[ti]
        raw = _raw(model, t)
        if raw is None:
            continue
        values = decode_sparse(t, raw) if t.sparsity is not None else raw.reshape(tuple(int(d) for d in t.shape))
        if values is None:
            continue
        enc = _encoding_of(model, t)
        if via == "DENSIFY":
            enc = "densify-" + enc  # densify-csr / densify-bcsr1x4
        shape = tuple(int(d) for d in t.shape)
        o = g.tensors[int(op.outputs[0])]
        n_out = int(np.prod(o.shape)) if o.shape is not None and len(o.shape) else 0
        if name == "FULLY_CONNECTED":
            kind, macs = L.FC, n_out * shape[-1]
        elif name == "CONV_2D":
            kind, macs = L.CONV, n_out * int(np.prod(shape[1:]))
        else:
            kind, macs = L.DEPTHWISE, n_out * int(np.prod(shape[1:3]))
        direct_ok = (name == "FULLY_CONNECTED" and via is None and len(shape) == 2
                     and values.dtype in (np.float32, np.int8)
                     and all(c == ("FULLY_CONNECTED", 1) for c in consumers.get(ti, [])))
        tname = _name(g.tensors[label])
        wname = tname if tname not in info else f"{tname}#{ti}"
        out.append(L.Weight(name=wname, op=name, kind=kind, shape=shape, dtype=values.dtype.name, values=values,
                            macs=macs, direct_ok=direct_ok, param=_param_for(tname, shape, kind, params)))
        info[wname] = {"tensor": ti, "encoding": enc}
    return out, info


def _param_for(tname: str, shape: tuple[int, ...], kind: str, params: dict[str, tuple[int, ...]] | None) -> str | None:
    """The PyTorch weight a litert-torch tensor name refers to: names look like
    ``pkg.Model/torch.nn.modules.container.Sequential_layer1/pkg.Block_0/torch.nn.modules.conv.Conv2d_conv1;``
    (several such paths joined by ';' when ops were fused)."""
    if not params:
        return None
    numel = int(np.prod(shape))
    for part in tname.split(";"):
        segs = part.split("/")[1:]
        path = []
        for seg in segs:
            leaf = seg.rsplit(".", 1)[-1]
            if "_" not in leaf:
                break
            path.append(leaf.split("_", 1)[1])
        cand = ".".join(path) + ".weight"
        if cand in params and int(np.prod(params[cand])) == numel:
            return cand
    return None


def _index_vector_t(a: np.ndarray) -> tuple[int, Any]:
    s = stack().schema
    a = np.asarray(a)
    top = int(a.max()) if a.size else 0
    if top < 256:
        v, kind, dt = s.Uint8VectorT(), s.SparseIndexVector.Uint8Vector, np.uint8
    elif top < 65536:
        v, kind, dt = s.Uint16VectorT(), s.SparseIndexVector.Uint16Vector, np.uint16
    else:
        v, kind, dt = s.Int32VectorT(), s.SparseIndexVector.Int32Vector, np.int32
    v.values = a.astype(dt)
    return kind, v


def _sparsity(values: np.ndarray, block: int) -> tuple[Any, np.ndarray]:
    s = stack().schema
    seg, idx, vals = L.csr_arrays(values, block)
    n = values.ndim

    def dense(size: int) -> Any:
        d = s.DimensionMetadataT()
        d.format, d.denseSize = s.DimensionType.DENSE, int(size)
        return d

    csr = s.DimensionMetadataT()
    csr.format = s.DimensionType.SPARSE_CSR
    csr.arraySegmentsType, csr.arraySegments = _index_vector_t(seg)
    csr.arrayIndicesType, csr.arrayIndices = _index_vector_t(idx)
    sp = s.SparsityParametersT()
    dims = [dense(d) for d in values.shape[:-1]] + [csr]
    if block > 1:
        sp.traversalOrder, sp.blockMap = list(range(n + 1)), [n - 1]
        dims.append(dense(block))
    else:
        sp.traversalOrder = list(range(n))
    sp.dimMetadata = dims
    return sp, vals


def _bytes_u8(a: np.ndarray) -> np.ndarray:
    return np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=np.uint8).copy()


def apply(model: Any, ws: list[L.Weight], info: dict[str, Any], decisions: list[L.Decision]) -> Any:
    """Write the sparse encodings the decisions ask for into ``model`` (in place) and return it."""
    s = stack().schema
    g = model.subgraphs[0]
    by_name = {w.name: w for w in ws}
    refs: dict[int, int] = {}
    for sg in model.subgraphs:
        for t in sg.tensors:
            refs[t.buffer] = refs.get(t.buffer, 0) + 1
    densify_ops = []
    densify_code = None
    for d in decisions:
        if d.encoding == L.DENSE:
            continue
        w, ti = by_name[d.name], info[d.name]["tensor"]
        t = g.tensors[ti]
        block = {L.CSR: 1, L.BCSR4: 4, L.BCSR16: 16, L.DENSIFY_CSR: 1, L.DENSIFY_BCSR4: 4}[d.encoding]
        sp, vals = _sparsity(w.values, block)
        if d.encoding in (L.CSR, L.BCSR4, L.BCSR16):
            if refs.get(t.buffer, 0) > 1:  # a buffer shared with another tensor: give this one its own
                model.buffers.append(s.BufferT())
                t.buffer = len(model.buffers) - 1
            model.buffers[t.buffer].data = _bytes_u8(vals)
            t.sparsity = sp
            continue
        if densify_code is None:
            oc = s.OperatorCodeT()
            oc.builtinCode = oc.deprecatedBuiltinCode = s.BuiltinOperator.DENSIFY
            oc.version = 1
            model.operatorCodes.append(oc)
            densify_code = len(model.operatorCodes) - 1
        b = s.BufferT()
        b.data = _bytes_u8(vals)
        model.buffers.append(b)
        st = s.TensorT()
        st.shape, st.type, st.buffer = list(t.shape), t.type, len(model.buffers) - 1
        st.name, st.sparsity, st.quantization = (_name(t) + "/sparse").encode(), sp, t.quantization
        g.tensors.append(st)
        if refs.get(t.buffer, 0) > 1:
            model.buffers.append(s.BufferT())
            t.buffer = len(model.buffers) - 1
        else:
            model.buffers[t.buffer].data = None  # the dense tensor is now DENSIFY's output
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = densify_code, [len(g.tensors) - 1], [ti]
        op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.DensifyOptions, s.DensifyOptionsT()
        densify_ops.append(op)
    g.operators = densify_ops + list(g.operators)
    return model


def requirements(model: Any) -> dict[str, Any]:
    """Runtime options the file needs, from its structure: sparse weights fed straight to an op (not through
    DENSIFY), or int8 DENSIFY, rule XNNPACK out."""
    g = model.subgraphs[0]
    producer = {o: op for op in g.operators for o in (op.outputs if op.outputs is not None else [])}
    for op in g.operators:
        name = _op_name(model, op)
        for i in op.inputs if op.inputs is not None else []:
            if i < 0:
                continue
            t = g.tensors[int(i)]
            if t.sparsity is not None and name != "DENSIFY":
                return {"xnnpack": False, "reason": f"{name} reads sparse weights directly; the XNNPACK delegate "
                                                    f"mis-computes or crashes on them"}
            p = producer.get(int(i))
            if name != "DEQUANTIZE" and p is not None and _op_name(model, p) == "DENSIFY" and t.type == 9:
                return {"xnnpack": False, "reason": "int8 weights behind DENSIFY, which XNNPACK cannot delegate"}
    return {"xnnpack": True}


def set_metadata(model: Any, meta: dict[str, Any]) -> None:
    s = stack().schema
    model.metadata = [m for m in (model.metadata or []) if m.name != META_NAME]
    b = s.BufferT()
    b.data = _bytes_u8(np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), dtype=np.uint8))
    model.buffers.append(b)
    md = s.MetadataT()
    md.name, md.buffer = META_NAME, len(model.buffers) - 1
    model.metadata.append(md)


def read_metadata(model: Any) -> dict[str, Any] | None:
    for m in model.metadata or []:
        if m.name == META_NAME:
            data = model.buffers[m.buffer].data
            try:
                return json.loads(bytes(np.asarray(data, dtype=np.uint8)).decode())
            except (ValueError, UnicodeDecodeError):
                return None
    return None


def load(path: str | os.PathLike) -> Any:
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise BadInput(f"{path}: not a TFLite flatbuffer (no 'TFL3' identifier)")
    return read(buf)


def describe(path: str | os.PathLike) -> dict[str, Any]:
    model = load(path)
    ws, info = weights(model)
    g = model.subgraphs[0]
    t = g.tensors[int(g.inputs[0])] if g.inputs is not None and len(g.inputs) else None
    return {"weights": ws, "encodings": {k: v["encoding"] for k, v in info.items()}, "metadata": read_metadata(model),
            "requires": requirements(model), "input_shape": None if t is None else [int(d) for d in t.shape]}


# ---------------------------------------------------------------------------------------------------------------
# Running


class TFLiteSession:
    """A LiteRT interpreter: ``run(x)`` returns the first output as float32 for a batch ``x``, one sample per
    invoke (exported files have batch 1); int8 inputs and outputs are (de)quantised here."""

    format = "tflite"
    runtime = "litert"

    def __init__(self, path: str | os.PathLike, threads: int = 1, xnnpack: bool = True):
        it_mod = stack("running a .tflite file").interpreter
        kw: dict[str, Any] = {"model_path": str(path), "num_threads": threads}
        if not xnnpack:
            kw["experimental_op_resolver_type"] = it_mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self._it = it_mod.Interpreter(**kw)
            self._it.allocate_tensors()
        except ValueError as e:
            raise BadInput(f"{path}: not a loadable TFLite model ({_first_line(e)})") from None
        except Exception as e:
            raise RuntimeFailure(f"{path}: LiteRT could not load the model ({_first_line(e)})") from None
        self.xnnpack = xnnpack
        self._in = self._it.get_input_details()[0]
        self._out = self._it.get_output_details()[0]
        self.input_shape = tuple(int(d) for d in self._in["shape"])
        self.input_dtype = np.dtype(self._in["dtype"])
        self.dynamic_batch = False

    def _set(self, x: np.ndarray) -> None:
        if self.input_dtype != np.float32:
            scale, zp = self._in["quantization"]
            info = np.iinfo(self.input_dtype)
            x = np.clip(np.round(x / scale) + zp, info.min, info.max)
        self._it.set_tensor(self._in["index"], np.ascontiguousarray(x, dtype=self.input_dtype))

    def _get(self) -> np.ndarray:
        y = self._it.get_tensor(self._out["index"])
        if y.dtype != np.float32:
            scale, zp = self._out["quantization"]
            y = (y.astype(np.float32) - zp) * scale if scale else y.astype(np.float32)
        return np.array(y, dtype=np.float32)

    def prepare(self, x: np.ndarray) -> Callable[[], Any]:
        """A no-argument callable running exactly one inference on the sample ``x`` (for timing loops)."""
        self._set(np.asarray(x, dtype=np.float32).reshape(self.input_shape))
        return self._it.invoke

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        step = self.input_shape[0] if self.input_shape else 1
        outs = []
        for i in range(0, len(x), step):
            xb = x[i:i + step]
            if xb.shape != self.input_shape:
                raise BadInput(f"input of shape {tuple(xb.shape)} does not fit the model input {self.input_shape}")
            self._set(xb)
            try:
                self._it.invoke()
            except Exception as e:
                raise RuntimeFailure(f"LiteRT failed to run the model ({_first_line(e)})") from None
            outs.append(self._get())
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


__all__ = ["TFLiteSession", "apply", "convert", "decode_sparse", "describe", "load", "read", "read_metadata",
           "require_export_stack", "requirements", "set_metadata", "stack", "weights", "write"]
