"""int8 float fallback: the held-out agreement it is asked for vs the agreement it gets on the test images.

The export chooses the layers to keep in float on held-out training images (the 1000 after the 200 calibration
ones) until their top-1 agreement with PyTorch reaches ``--min-agreement`` + 0.5 %; the parity gate then counts
changed decisions on the test images. For each checkpoint, format and held-out target this script runs the same
selection (``mixed.select_float_fallback`` on the format's ``Int8Quantizer``, calibrated as the export does) and
prints what it kept, its share of MACs, and the agreement, changed decisions (95 % interval) and output rms
error on the first ``--parity-samples`` test images; a target the selection cannot reach within
``--max-float-macs`` prints the selection's own message.

    python benchmarks/int8_fallback_targets.py --ckpt r20=R20.pt [--formats onnx,tflite]
        [--targets 0.995,0.997,0.999] [--max-float-macs 0.2] [--parity-samples 1017]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chita_edge.exporters import ExportConfig, mixed  # noqa: E402
from chita_edge.exporters.export import _check_parity  # noqa: E402
from int8_pooling import load, quantizer, start  # noqa: E402

from chita_edge.core.errors import ChitaError  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.995,0.997,0.999", help="held-out top-1 agreement targets")
    ap.add_argument("--max-float-macs", type=float, default=0.2)
    args = start(ap)
    for spec in args.ckpt:
        name, path, model, ds = load(spec)
        x, hold = ds.x_test[:args.parity_samples], ds.x_train[200:1200]
        with torch.no_grad():
            ref, ref_hold = model(x).numpy().astype(np.float64), model(hold).numpy()
        print(f"\n## {name} ({path.name}): float fallback chosen on {len(hold)} held-out training images, "
              f"checked on {len(x)} test images (cap {args.max_float_macs:.0%} of MACs)")
        print("| format | held-out target | held-out all-int8 -> kept | float layers (MACs) | test agreement | "
              "changed (95 % interval) | output rms error |")
        print("|---|---|---|---|---|---|---|")
        for fmt in args.formats.split(","):
            q, _ = quantizer(fmt, model, x[:1], ds.x_train[:200].numpy())
            for target in (float(t) for t in args.targets.split(",")):
                try:
                    fb = mixed.select_float_fallback(q, hold.numpy(), ref_hold, target=target,
                                                     max_float_macs=args.max_float_macs)
                except ChitaError as e:
                    print(f"| {fmt} | {target:.1%} | not reached: {str(e).split('; use ')[0]} | - | - | - | - |", flush=True)
                    continue
                p = _check_parity(ExportConfig(format=fmt, quantize="int8"), ref, q.run(fb.model, x.numpy()),
                                  "data", True)
                lo, hi = p.agreement_interval
                print(f"| {fmt} | {target:.1%} | {fb.agreement_int8:.2%} -> {fb.agreement:.2%} | {len(fb.kept)} "
                      f"({fb.float_mac_fraction:.1%}) | {p.top1_agreement:.2%} | {p.flips} ({lo:.1%}-{hi:.1%}) | "
                      f"{p.logit_rmse:.3f} |", flush=True)


if __name__ == "__main__":
    main()
