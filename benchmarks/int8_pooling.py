"""int8 average pooling: on its input's int8 grid (the runtimes' int8 ops) vs in float (what the export does).

Both runtimes' int8 average pooling keeps its input's scale (onnxruntime's QDQ AveragePool; TFLite's int8
AVERAGE_POOL_2D), so the averages are re-quantised on a grid made for the much wider range of the tensor they
average. ``chita-edge export --quantize int8`` runs the pooling in float instead, so the next layer quantises the
averages on their own calibrated range. For each checkpoint and format this script quantises all-int8 twice from
one calibration (the export's: the first 200 training images of the checkpoint's data set) -- pooling in int8,
pooling in float -- and prints, on the first ``--parity-samples`` test images, the top-1 agreement with PyTorch,
the changed decisions with the 95 % interval of the agreement, the output rms error and its ratio; then the
latency of the two files (batch 1, one thread, medians of interleaved rounds; ``--rounds 0`` skips it).

    python benchmarks/int8_pooling.py --ckpt r20=R20.pt [--formats onnx,tflite] [--parity-samples 1017]
        [--rounds 15] [--per-round 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chita_edge.exporters import ExportConfig  # noqa: E402
from chita_edge.exporters.export import _check_parity  # noqa: E402
from export_layouts import latencies  # noqa: E402

from chita_edge.core.checkpoint import read_weights  # noqa: E402
from chita_edge.core.data import load_data  # noqa: E402
from chita_edge.models.loading import load_model  # noqa: E402


def float_file(fmt: str, model: torch.nn.Module, example: torch.Tensor) -> tuple[Any, Any, tuple]:
    """The format's module holding ``Int8Quantizer``, the float file the export quantises, and the quantiser's
    extra arguments."""
    if fmt == "onnx":
        from chita_edge.exporters import onnx_format as F

        return F, F.export(model, example)[0], ()
    from chita_edge.exporters import tflite_format
    from chita_edge.exporters import tflite_quantize as F  # type: ignore[no-redef]

    return F, tflite_format.convert(model, example), ({n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() >= 2},)


def quantizer(fmt: str, model: torch.nn.Module, example: torch.Tensor, calib: np.ndarray):
    F, art, extra = float_file(fmt, model, example)
    return F.Int8Quantizer(art, calib, *extra), F


def load(spec: str) -> tuple[str, Path, torch.nn.Module, Any]:
    """``NAME=PATH`` of a chita-edge checkpoint -> its name, path, model (eval mode) and data set."""
    name, path = spec.split("=", 1)
    meta = read_weights(Path(path))[1] or {}
    return name, Path(path), load_model(None, Path(path)).module.eval(), load_data(meta["data"])


def start(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The options both int8 scripts share (``--ckpt``, ``--formats``, ``--parity-samples``), parsed; one thread;
    the header line."""
    ap.add_argument("--ckpt", action="append", required=True, help="NAME=PATH of a chita-edge checkpoint")
    ap.add_argument("--formats", default="onnx,tflite")
    ap.add_argument("--parity-samples", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{Path(sys.argv[0]).stem}: torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=50)
    args = start(ap)
    with tempfile.TemporaryDirectory(prefix="int8-pooling-") as d:
        for spec in args.ckpt:
            name, path, model, ds = load(spec)
            x = ds.x_test[:args.parity_samples]
            with torch.no_grad():
                ref = model(x).numpy().astype(np.float64)
            print(f"\n## {name} ({path.name}): all-int8, {len(x)} test images")
            print("| format | pooling | top-1 agreement | changed decisions (95 % interval) | output rms error | "
                  "vs int8 pooling | latency ms | vs int8 pooling |")
            print("|---|---|---|---|---|---|---|---|")
            for fmt in args.formats.split(","):
                q, F = quantizer(fmt, model, x[:1], ds.x_train[:200].numpy())
                rows = []
                for label, pooling in (("int8 (input's grid)", []), ("float (export)", list(q.float_pooling))):
                    q.float_pooling = pooling
                    qm = q.quantize(())
                    out = Path(d) / f"{name}-{len(rows)}.{fmt}"
                    if fmt == "onnx":
                        F.save(qm, out)
                    else:
                        out.write_bytes(qm)
                    got = q.run(qm, x.numpy())
                    p = _check_parity(ExportConfig(format=fmt, quantize="int8"), ref, got, "data", True)
                    rows.append({"name": label, "path": out, "xnnpack": True if fmt == "tflite" else None, "parity": p})
                lat = latencies(rows, np.random.default_rng(0).random(tuple(x[:1].shape), dtype=np.float32),
                                args.rounds, args.per_round) if args.rounds > 0 else {}
                base = rows[0]
                for r in rows:
                    p = r["parity"]
                    lo, hi = p.agreement_interval
                    ms, ms0 = lat.get(r["name"]), lat.get(base["name"])
                    print(f"| {fmt} | {r['name']} | {p.top1_agreement:.2%} | {p.flips} ({lo:.1%}-{hi:.1%}) | "
                          f"{p.logit_rmse:.3f} | {p.logit_rmse / base['parity'].logit_rmse:.2f}x | "
                          f"{'-' if ms is None else f'{ms:.4f}'} | "
                          f"{'-' if ms is None else f'{ms / ms0:.2f}x'} |", flush=True)


if __name__ == "__main__":
    main()
