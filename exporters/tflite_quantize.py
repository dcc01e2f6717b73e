"""TFLite quantisation: fp16 weight casting and static int8 with ai-edge-quantizer (``quantize``), the int8
backend of the measured float fallback (``Int8Quantizer``, see ``mixed``), and the repair of all-zero int8
output channels (``_fix_dead_channels``).

The LiteRT stack comes from ``tflite_format._converter_stack`` -- this module imports none of it -- so a missing
``tflite`` extra raises the same ``MissingExtra("tflite", ...)``; the flatbuffer helpers are ``tflite_format``'s.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from chita_edge.exporters import mixed
from chita_edge.exporters.tflite_format import (
    _WEIGHT_OPS,
    TFLiteSession,
    _bytes_u8,
    _converter_stack,
    _first_line,
    _name,
    _op_name,
    _quiet,
    _raw,
    read,
    weights,
    write,
)

from chita_edge.core.errors import MissingExtra, RuntimeFailure


def _signature(buf: bytes) -> tuple[str, str]:
    sig = read(buf).signatureDefs[0]
    key, name = sig.signatureKey, sig.inputs[0].name
    return (key.decode() if isinstance(key, bytes) else key), (name.decode() if isinstance(name, bytes) else name)


def quantize(buf: bytes, mode: str, calibration: np.ndarray | None = None) -> bytes:
    """``int8``: static int8 weights and activations (ai-edge-quantizer, min/max over all calibration samples);
    ``fp16``: fp16 weights dequantized at load (weight-only float casting)."""
    if mode == "int8":
        assert calibration is not None
        return Int8Quantizer(buf, calibration).quantize(())
    cs = _converter_stack()
    q = cs.quantizer.Quantizer(bytearray(buf))
    try:
        with _quiet():
            q.add_weight_only_config(regex=".*", operation_name=cs.qtyping.TFLOperationName.ALL_SUPPORTED,
                                     num_bits=16, algorithm_key=cs.algorithm_manager.AlgorithmName.FLOAT_CASTING)
            return bytes(q.quantize(enable_progress_report=False).quantized_model)
    except MissingExtra:
        raise
    except Exception as e:
        raise RuntimeFailure(f"LiteRT {mode} quantisation failed ({_first_line(e)})") from None


_FALLBACK_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "ADD", "MUL", "SUB",
                 "CONCATENATION")  # ops that can be left in float
_AVERAGING_OPS = ("AVERAGE_POOL_2D", "MEAN")  # always float in int8 (``Int8Quantizer.float_pooling``)


class Int8Quantizer:
    """ai-edge-quantizer ``static_wi8_ai8``, calibrated once with the true min/max over all calibration samples
    (the quantizer's default moving average of per-sample ranges clips the extremes): ``quantize(keep_float)``
    quantises again with the ops of the named scopes (their output tensor names) left in float32; the
    ``mixed.Int8Backend`` of TFLite.

    Averaging ops (``float_pooling``) are always left in float, so that the layer after them quantises the
    averages on their own calibrated range: int8 AVERAGE_POOL_2D must keep its input's scale, far too coarse for
    averages (see ``onnx_format.Int8Quantizer``)."""

    def __init__(self, buf: bytes, calibration: np.ndarray, params: dict[str, tuple[int, ...]] | None = None):
        cs = self._cs = _converter_stack()
        self._buf, self._params = bytes(buf), params
        q = cs.quantizer.Quantizer(bytearray(buf))
        try:
            with _quiet():
                q.load_quantization_recipe(cs.recipe.static_wi8_ai8())
                key, name = _signature(buf)
                cal = cs.calibrator.Calibrator(bytearray(buf), num_threads=1,
                                               qsv_update_func=cs.qsv_utils.min_max_update)
                cal.calibrate({key: [{name: calibration[i:i + 1].astype(np.float32)}
                                     for i in range(len(calibration))]}, q._recipe_manager)
                self._qsvs = cal.get_model_qsvs()
        except Exception as e:
            raise RuntimeFailure(f"LiteRT int8 calibration failed ({_first_line(e)})") from None
        self.float_pooling = list(dict.fromkeys(scope for name, scope, _ in self._scoped_ops(read(buf))
                                                if name in _AVERAGING_OPS))

    @staticmethod
    def _scoped_ops(fm: Any) -> list[tuple[str, str, Any]]:
        """(op name, scope -- what the quantizer's recipes match --, op) for each op of ``fm``'s main graph."""
        tu = _converter_stack().tfl_flatbuffer_utils
        g = fm.subgraphs[0]
        return [(_op_name(fm, op), tu.get_op_scope(op, g.tensors), op) for op in g.operators]

    def candidates(self) -> list[mixed.Candidate]:
        fm = read(self._buf)
        g = fm.subgraphs[0]
        ws = {w.name: w for w in weights(fm, self._params)[0]}
        by_scope: dict[str, mixed.Candidate] = {}
        for name, scope, op in self._scoped_ops(fm):
            if name not in _FALLBACK_OPS:
                continue
            w = None
            if name in _WEIGHT_OPS and op.inputs is not None and len(op.inputs) > 1:
                w = ws.get(_name(g.tensors[int(op.inputs[1])]))
            prev = by_scope.get(scope)  # ops sharing a scope are left in float together
            macs = (w.macs if w else 0) + (prev.macs if prev else 0)
            by_scope[scope] = mixed.Candidate(name=scope, op=name if prev is None else f"{prev.op}+{name}",
                                              macs=macs, param=(prev.param if prev else None) or (w.param if w else None),
                                              tensor=(prev.tensor if prev else None) or (w.name if w else None))
        return list(by_scope.values())

    def quantize(self, keep_float: Sequence[str] = ()) -> bytes:
        cs = self._cs
        q = cs.quantizer.Quantizer(bytearray(self._buf))
        try:
            with _quiet():
                q.load_quantization_recipe(cs.recipe.static_wi8_ai8())
                for scope in dict.fromkeys([*self.float_pooling, *keep_float]):  # later configs win
                    q.update_quantization_recipe(regex="^" + re.escape(scope) + "$",
                                                 operation_name=cs.qtyping.TFLOperationName.ALL_SUPPORTED,
                                                 algorithm_key=cs.algorithm_manager.AlgorithmName.NO_QUANTIZE)
                # a copy: the quantizer writes scale constraints (an int8 AVERAGE_POOL_2D's output range := its
                # input's) into the ranges it is given, which would leak into every later trial
                qbuf = bytes(q.quantize(copy.deepcopy(self._qsvs), enable_progress_report=False).quantized_model)
        except Exception as e:
            raise RuntimeFailure(f"LiteRT int8 quantisation failed ({_first_line(e)})") from None
        qm = read(qbuf)
        if _fix_dead_channels(qm, read(self._buf)):
            qbuf = write(qm)
        return qbuf

    def run(self, model: bytes, x: np.ndarray) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="chita-edge-q-") as d:
            path = os.path.join(d, "q.tflite")
            with open(path, "wb") as f:
                f.write(model)
            return TFLiteSession(path, 1, xnnpack=True).run(x)


def _fix_dead_channels(qm: Any, fm: Any) -> int:
    """Repair all-zero output channels of int8 layers; returns how many were repaired.

    ai-edge-quantizer gives a channel whose weights are all zero (common after pruning) a weight scale of ~1e-11,
    so its int32 bias, stored at ``input_scale * weight_scale``, overflows and is clipped to ~0: the channel
    loses its (BatchNorm-folded) bias. Such channels get the layer's largest weight scale -- their weights stay
    exactly zero -- and their bias is quantised again from the float model.
    """
    fg = fm.subgraphs[0]
    fbias = {_name(t): t for t in fg.tensors}
    g = qm.subgraphs[0]
    fixed = 0
    for op in g.operators:
        if _op_name(qm, op) not in _WEIGHT_OPS or op.inputs is None or len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        x, w, b = (g.tensors[int(i)] for i in op.inputs[:3])
        if w.type != 9 or b.type != 2 or w.quantization is None or b.quantization is None or x.quantization is None:
            continue
        ws = np.asarray(w.quantization.scale, dtype=np.float32).copy()
        raw, ft = _raw(qm, w), fbias.get(_name(b))
        if ws.size < 2 or raw is None or ft is None or _raw(fm, ft) is None:
            continue
        axis = int(w.quantization.quantizedDimension)
        per = np.moveaxis(raw.reshape(tuple(int(d) for d in w.shape)), axis, 0).reshape(ws.size, -1)
        dead = ~np.any(per != 0, axis=1) & (ws < 1e-6 * ws.max())
        if not dead.any() or dead.all():
            continue
        ws[dead] = ws[~dead].max()
        bs = ws * np.float32(np.asarray(x.quantization.scale, dtype=np.float32).reshape(-1)[0])
        bq = _raw(qm, b).astype(np.int64)
        fb = _raw(fm, ft).astype(np.float64)
        info = np.iinfo(np.int32)
        bq[dead] = np.clip(np.round(fb[dead] / bs[dead]), info.min, info.max)
        if bq.size != ws.size or fb.size != ws.size:
            continue
        w.quantization.scale, b.quantization.scale = ws, bs.astype(np.float32)
        qm.buffers[b.buffer].data = _bytes_u8(bq.astype(np.int32))
        fixed += int(dead.sum())
    return fixed


__all__ = ["Int8Quantizer", "quantize"]
