"""int8 parity of the paper's pruned models in every layout, with and without the measured float fallback.

For each checkpoint (chita-edge checkpoints carrying their data set), exports int8 ONNX and TFLite in every
layout through ``chita_edge.workflows.export.export_checkpoint`` (what ``chita-edge export`` runs): once all-int8
(``--no-int8-fallback``, written with the gate lowered so it can be measured) and once with the fallback (the
default). Prints the top-1 agreement with PyTorch on the parity inputs (the first 1000 test images; the
fallback is chosen on 1000 held-out training images after the 200 calibration ones), the layers kept in
float32 and their share of MACs; then ONNX Runtime latency of the dense-layout files -- fp32, all-int8,
int8 + fallback -- batch 1, one thread, medians of interleaved rounds (ratios vs fp32 in the same run;
``--rounds 0`` skips them). With the checkpoint's data set at hand, each row also gives the top-1 accuracy of
the PyTorch model and of the int8 file on the parity images, and the checkpoint's ``qat`` flag (quantisation-
aware fine-tuning, ``chita-edge finetune --qat``).

    python benchmarks/export_int8.py --ckpt r20=R20.pt --ckpt mlpnet=MLP.pt [--layouts dense,compact,sparse,auto]
        [--formats onnx,tflite] [--fallback-layouts L,...] [--max-float-macs F] [--parity-samples N]
        [--rounds 15 (0: no latency)] [--per-round 50] [--json-out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_layouts import latencies  # noqa: E402

from chita_edge.core.errors import ChitaError  # noqa: E402
from chita_edge.workflows.export import export_checkpoint  # noqa: E402


def run_one(ck: Path, fmt: str, layout: str, out: Path, fallback: bool, max_float_macs: float = 0.2,
            parity_samples: int = 1000) -> dict:
    t0 = time.perf_counter()
    try:
        r = export_checkpoint(ck, out=out, fmt=fmt, layout=layout, quantize="int8", int8_fallback=fallback,
                              min_agreement=0.99 if fallback else 0.01, max_float_macs=max_float_macs, threads=1,
                              parity_samples=parity_samples)
    except ChitaError as e:
        return {"error": str(e), "seconds": time.perf_counter() - t0}
    fb = r.get("int8_fallback") or {}
    acc = r["parity"]["accuracy_file"]  # on the parity images' labels (None without a data set)
    return {"int8_accuracy": None if acc is None else 100.0 * acc, "agreement": r["parity"]["top1_agreement"],
            "samples": r["parity"]["samples"],
            "kept": [k["param"] or k["op"] for k in fb.get("kept", [])],
            "float_mac_fraction": fb.get("float_mac_fraction", 0.0), "holdout_int8": fb.get("agreement_int8"),
            "holdout": fb.get("agreement"), "zeros_kept": r["zeros"]["zeros_kept"],
            "zero_fraction_file": r["zeros"]["zero_fraction_file"], "bytes": r["bytes"],
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", action="append", required=True, help="NAME=PATH of a chita-edge checkpoint")
    ap.add_argument("--layouts", default="dense,compact,sparse,auto")
    ap.add_argument("--formats", default="onnx,tflite")
    ap.add_argument("--fallback-layouts", default="dense,compact,sparse,auto",
                    help="layouts exported with the fallback too (it is chosen on the quantised model, which the "
                         "dense and sparse layouts share)")
    ap.add_argument("--max-float-macs", type=float, default=0.2, help="the fallback's cap (the export's default: 0.2)")
    ap.add_argument("--parity-samples", type=int, default=1000, help="test images for the parity check")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=50)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"export_int8: torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    results: dict = {}
    from chita_edge.core.checkpoint import read_weights
    from chita_edge.core.data import load_data
    from chita_edge.core.evaluate import accuracy
    from chita_edge.models.loading import load_model

    with tempfile.TemporaryDirectory(prefix="export-int8-") as d:
        tmp = Path(d)
        for spec in args.ckpt:
            name, path = spec.split("=", 1)
            ck = Path(path)
            meta = read_weights(ck)[1] or {}
            acc_f = None
            if meta.get("data"):
                ds = load_data(meta["data"])
                acc_f = accuracy(load_model(None, ck).module, ds.x_test[:args.parity_samples],
                                 ds.y_test[:args.parity_samples])
            print(f"\n## {name} ({ck.name}, qat: {bool(meta.get('qat'))}): int8 top-1 agreement with PyTorch on the "
                  f"parity inputs; PyTorch top-1 {acc_f if acc_f is None else f'{acc_f:.2f} %'}")
            print("| format | layout | all-int8 | int8 top-1 | int8 + fallback | float32 layers (share of MACs) | "
                  "zeros kept |")
            print("|---|---|---|---|---|---|---|")
            for fmt in args.formats.split(","):
                for layout in args.layouts.split(","):
                    suffix = ".onnx" if fmt == "onnx" else ".tflite"
                    plain = run_one(ck, fmt, layout, tmp / f"{name}-{layout}-int8{suffix}", False,
                                    parity_samples=args.parity_samples)
                    fb = (run_one(ck, fmt, layout, tmp / f"{name}-{layout}-fb{suffix}", True, args.max_float_macs,
                                  args.parity_samples)
                          if layout in args.fallback_layouts.split(",") else {"error": "not run"})
                    results[f"{name}/{fmt}/{layout}"] = {"int8": plain, "fallback": fb}
                    a0 = f"{plain['agreement']:.2%}" if "agreement" in plain else "error"
                    t0 = f"{plain['int8_accuracy']:.2f} %" if plain.get("int8_accuracy") is not None else "-"
                    if "agreement" in fb:
                        a1 = f"{fb['agreement']:.2%} ({fb['samples']})"
                        kept = (", ".join(fb["kept"]) + f" ({fb['float_mac_fraction']:.1%})") if fb["kept"] else "none"
                        zk = f"{fb['zeros_kept']} ({fb['zero_fraction_file']:.1%} zeros)"
                    else:
                        a1, kept, zk = "FAILED", fb["error"][:120], "-"
                    print(f"| {fmt} | {layout} | {a0} | {t0} | {a1} | {kept} | {zk} |", flush=True)
                    print(f"<!-- {json.dumps(results[f'{name}/{fmt}/{layout}'])} -->", flush=True)
            results[f"{name}/pytorch_accuracy"], results[f"{name}/qat"] = acc_f, bool(meta.get("qat"))
            if args.rounds <= 0:
                continue
            # latency of the dense-layout ONNX files: fp32 vs all-int8 vs int8 + fallback
            fp32 = tmp / f"{name}-fp32.onnx"
            export_checkpoint(ck, out=fp32, fmt="onnx", layout="dense", threads=1)
            variants = [{"name": "fp32", "path": fp32}]
            for key, label in (("int8", "int8"), ("fb", "int8 + fallback")):
                p = tmp / f"{name}-dense-{key}.onnx"
                if p.exists():
                    variants.append({"name": label, "path": p})
            from chita_edge.exporters import load_session

            x = np.random.default_rng(0).random(load_session(fp32).input_shape, dtype=np.float32)
            print(f"\nONNX Runtime, dense layout, batch 1, 1 thread, median of {args.rounds} interleaved rounds x "
                  f"{args.per_round}; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
            lat = latencies(variants, x, args.rounds, args.per_round)
            print("| file | latency ms | vs fp32 |\n|---|---|---|")
            for v in variants:
                print(f"| {v['name']} | {lat[v['name']]:.4f} | {lat[v['name']] / lat['fp32']:.2f}x |")
            results[f"{name}/latency_onnx_dense_ms"] = lat
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
