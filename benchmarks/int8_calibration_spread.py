"""int8 top-1 agreement: how much of the 99 % verdict is the calibration images and the test sample.

The int8 parity gate counts the test images whose top-1 decision changes (99 % of 1017 CIFAR-10 test images
allows 10). Two things a user does not control move that count: which training images calibrate the activation
ranges, and which images happen to be in the test set. For each checkpoint and format this script quantises the
model all-int8 as the export does (per-channel int8 weights, min/max-calibrated int8 activations, average pooling
in float) once per calibration set -- ``--subsets`` disjoint slices of ``--size`` training images (slice 0 is the
export's default) -- and prints, on the first ``--parity-samples`` test images, the changed decisions, the
agreement and the output rms error; then, per row, the share of bootstrap resamples of the test images (the same
number of images, drawn with replacement, ``--bootstrap`` times) whose agreement reaches ``--gate``, i.e. how
often a test set like this one would let the file through. The last line per format summarises the slices.

    python benchmarks/int8_calibration_spread.py --ckpt r20=R20.pt [--formats onnx,tflite] [--parity-samples 1017]
        [--size 200] [--subsets 5] [--gate 0.99] [--bootstrap 10000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chita_edge.exporters import ExportConfig  # noqa: E402
from chita_edge.exporters.export import _check_parity  # noqa: E402
from int8_pooling import float_file, load, start  # noqa: E402


def pass_share(flips: int, n: int, gate: float, draws: int, rng: np.random.Generator) -> float:
    """Share of bootstrap resamples (n images drawn with replacement) of a test set with ``flips`` changed decisions
    whose agreement meets ``gate``: the changed count of a resample is Binomial(n, flips / n)."""
    counts = rng.binomial(n, flips / n, size=draws) if draws else np.array([flips])
    return float(np.mean(1.0 - counts / n >= gate - 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=200, help="calibration images per slice (the export's default)")
    ap.add_argument("--subsets", type=int, default=5, help="disjoint calibration slices of the training split")
    ap.add_argument("--gate", type=float, default=0.99)
    ap.add_argument("--bootstrap", type=int, default=10000)
    args = start(ap)
    rng = np.random.default_rng(0)
    for spec in args.ckpt:
        name, path, model, ds = load(spec)
        x = ds.x_test[:args.parity_samples]
        with torch.no_grad():
            ref = model(x).numpy().astype(np.float64)
        if len(ds.x_train) < args.size * args.subsets:
            raise SystemExit(f"{name}: {len(ds.x_train)} training images, fewer than {args.subsets} x {args.size}")
        print(f"\n## {name} ({path.name}): all-int8, calibration slices of {args.size} training images, "
              f"{len(x)} test images, gate {args.gate:.0%} (allows {int(len(x) * (1 - args.gate) + 1e-9)} changed)")
        print("| format | calibration images | changed decisions | agreement (95 % interval) | output rms error | "
              "verdict | bootstrap share passing |")
        print("|---|---|---|---|---|---|---|")
        for fmt in args.formats.split(","):
            F, art, extra = float_file(fmt, model, x[:1])
            flips, passed = [], 0
            for k in range(args.subsets):
                lo_i, hi_i = k * args.size, (k + 1) * args.size
                q = F.Int8Quantizer(art, ds.x_train[lo_i:hi_i].numpy(), *extra)
                got = q.run(q.quantize(()), x.numpy())
                p = _check_parity(ExportConfig(format=fmt, quantize="int8", min_agreement=args.gate), ref, got,
                                  "data", True)
                lo, hi = p.agreement_interval
                flips.append(p.flips)
                passed += p.passed
                print(f"| {fmt} | {lo_i}-{hi_i - 1} | {p.flips} | {p.top1_agreement:.2%} ({lo:.1%}-{hi:.1%}) | "
                      f"{p.logit_rmse:.3f} | {'passes' if p.passed else 'refused'} | "
                      f"{pass_share(p.flips, p.samples, args.gate, args.bootstrap, rng):.0%} |", flush=True)
            print(f"| {fmt} | all {args.subsets} slices | {min(flips)}-{max(flips)} (median "
                  f"{float(np.median(flips)):g}) | - | - | {passed} of {args.subsets} pass | - |", flush=True)


if __name__ == "__main__":
    main()
