"""The Python API behind ``chita-edge export`` and ``chita-edge inspect``: plain arguments in, JSON-able dicts out.

``export_checkpoint`` resolves a checkpoint into what ``chita_edge.exporters.export_model`` needs -- the model,
its input shape, real inputs for the parity check (the test split of the checkpoint's data set), calibration
inputs for int8 (``--calibration-data`` or the checkpoint's training split) and the provenance recorded in the
file -- and returns the export report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chita_edge.core.checkpoint import read_weights
from chita_edge.core.data import Dataset, data_file, load_data
from chita_edge.core.errors import BadInput
from chita_edge.core.io import check_out, refuse_overwrite, require_file, sha256_file
from chita_edge.exporters import ExportConfig, export_model, inspect_file
from chita_edge.exporters.export import SUFFIX, Progress
from chita_edge.models.loading import load_model, model_file

RANDOM_PARITY_SAMPLES = 100
HOLDOUT_SAMPLES = 1000  # int8 float fallback: training inputs after the calibration ones, never the test split


def _format_for(out: Path, fmt: str | None) -> str:
    if fmt is not None:
        return fmt
    for f, suffix in SUFFIX.items():
        if out.suffix.lower() == suffix:
            return f
    raise BadInput(f"--out {out}: cannot tell the format from the suffix; give --format onnx or --format tflite")


def _calibration_inputs(spec: str, n: int, shape: tuple[int, ...],
                        holdout: int = 0) -> tuple[np.ndarray, np.ndarray, Dataset | None]:
    """``npz:PATH`` / ``digits`` (its training split) or a ``.npy`` array of inputs (N, *shape): the first ``n``
    to calibrate, the next ``holdout`` held out for int8's float fallback."""
    if spec.endswith(".npy"):
        p = require_file(spec, "calibration data")
        with open(p, "rb") as f:
            if f.read(6) != b"\x93NUMPY":  # numpy would read the bytes as a pickle and suggest allow_pickle=True
                raise BadInput(f"{p}: not a .npy array (expected inputs saved with numpy.save)")
        try:
            x = np.load(p, allow_pickle=False)
        except Exception as e:
            if "allow_pickle" in str(e):
                raise BadInput(f"{p}: refused: the array holds pickled Python objects (only numeric arrays are "
                               "loaded; the objects were not unpickled)") from None
            raise BadInput(f"{p}: not a readable .npy array ({type(e).__name__}: {e})") from None
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape) or not np.issubdtype(x.dtype, np.number):
            raise BadInput(f"{p}: expected a numeric array of shape (N, {', '.join(map(str, shape))}), "
                           f"got {x.shape} {x.dtype}")
        return x[:n].astype(np.float32), x[n:n + holdout].astype(np.float32), None
    ds = load_data(spec)
    if tuple(ds.input_shape) != tuple(shape):
        raise BadInput(f"--calibration-data {spec}: samples of shape {ds.input_shape} do not fit the model input "
                       f"{tuple(shape)}")
    return ds.x_train[:n].numpy(), ds.x_train[n:n + holdout].numpy(), ds


def export_checkpoint(
    pruned: str | os.PathLike,
    *,
    out: str | os.PathLike,
    fmt: str | None = None,
    layout: str = "dense",
    quantize: str = "none",
    model: str | None = None,
    calibration_data: str | None = None,
    parity_samples: int = 1000,
    calibration_samples: int = 200,
    min_agreement: float = 0.99,
    int8_fallback: bool = True,
    max_float_macs: float = 0.2,
    threads: int = 1,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export a pruned checkpoint (``chita-edge export``); raises BadInput / MissingExtra / RuntimeFailure."""
    src = require_file(pruned, "checkpoint")
    out = Path(out)
    cfg = ExportConfig(format=_format_for(out, fmt), layout=layout, quantize=quantize, threads=threads,
                       min_agreement=min_agreement, int8_fallback=int8_fallback, max_float_macs=max_float_macs)
    cfg.validate()
    if parity_samples < 1 or calibration_samples < 1:
        raise BadInput("--parity-samples and calibration samples must be at least 1")
    calib_file = calibration_data if calibration_data and calibration_data.endswith(".npy") else \
        data_file(calibration_data)
    refuse_overwrite([("--out", out)], [("checkpoint", src), ("--model file", model_file(model)),
                                        ("--calibration-data", calib_file)])
    check_out(out)  # before the export and its parity check, not after them
    _, meta = read_weights(src)
    if meta is None and model is None:
        raise BadInput(f"{src}: not a pruned checkpoint (a plain state dict without chita-edge metadata); "
                       f"give --model SPEC (zoo:NAME or path/to/file.py:factory) to export it")
    lm = load_model(model, src)
    meta = lm.meta or {}
    shape = tuple(meta.get("input_shape") or lm.input_shape or ())

    ds: Dataset | None = None
    notes = []
    if meta.get("data"):
        try:
            ds = load_data(meta["data"])
        except BadInput as e:
            notes.append(f"the checkpoint's data set is not available here ({e})")
    if ds is not None and not shape:
        shape = tuple(ds.input_shape)
    calib = hold = None
    calib_ds = None
    n_hold = HOLDOUT_SAMPLES if quantize == "int8" else 0
    if calibration_data is not None:
        if not shape:
            raise BadInput(f"{src}: the checkpoint records no input shape; cannot check --calibration-data")
        calib, hold, calib_ds = _calibration_inputs(calibration_data, calibration_samples, shape, n_hold)
    elif quantize == "int8" and ds is not None:
        calib = ds.x_train[:calibration_samples].numpy()
        hold = ds.x_train[calibration_samples:calibration_samples + n_hold].numpy()
    if not shape:
        raise BadInput(f"{src}: the input shape is unknown (not in the checkpoint, no data set); "
                       f"export it from a checkpoint written by chita-edge prune")
    if ds is not None and tuple(ds.input_shape) != shape:
        ds = None
        notes.append("the checkpoint's data set does not match its input shape; parity on random inputs")
    test = ds if ds is not None else calib_ds
    labels = None
    if test is not None:
        parity_inputs, parity_source = test.x_test[:parity_samples], "data"
        labels = test.y_test[:parity_samples]
    else:
        g = torch.Generator().manual_seed(0)
        parity_inputs = torch.rand((min(parity_samples, RANDOM_PARITY_SAMPLES), *shape), generator=g)
        parity_source = "random"
        notes.append("no data set: parity checked on random inputs in [0, 1)")
    example = parity_inputs[:1]
    try:
        with torch.no_grad():
            y = lm.module(example)
    except (Exception, SystemExit) as e:  # a user's forward that calls sys.exit() is a bad model, not success
        raise BadInput(f"{src}: inputs of shape {shape} do not fit the model "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise BadInput(f"{src}: the model must return one (batch, classes) tensor to be exported and checked")
    source = {"checkpoint": src.name, "sha256": sha256_file(src), "model": lm.spec,
              "method": meta.get("method"), "sparsity": meta.get("sparsity"),
              "dense_sha256": meta.get("source_sha256")}
    report = export_model(lm.module, cfg, example_input=example, out=out, parity_inputs=parity_inputs,
                          parity_source=parity_source, parity_labels=labels, calibration=calib, holdout=hold,
                          source=source, progress=progress)
    result = report.to_dict()
    result["notes"] = notes + result["notes"]
    result["source"] = source
    return result


def inspect_export(path: str | os.PathLike, runtime: str | None = None) -> dict[str, Any]:
    """``chita-edge inspect``: the sparsity lint of an exported file."""
    return inspect_file(path, runtime)


__all__ = ["export_checkpoint", "inspect_export"]
