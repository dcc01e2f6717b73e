"""One-shot pruning on the CHITA paper's benchmarks: accuracy and seconds per method and sparsity.

Methods run in the same engine and the same process: magnitude (global), bso (magnitude support + exact
backsolve), chita (single stage), chita++ (multi-stage, gradients recomputed per stage). No fine-tuning.

    python benchmarks/paper_one_shot.py --model mlpnet
    python benchmarks/paper_one_shot.py --model resnet20 --sparsities 0.5,0.7,0.8,0.9,0.95 --stages 8

Needs ../shared (MNIST / CIFAR-10 and the paper's checkpoints). Prints a Markdown table; --json for machine use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from chita_edge.core.data import load_data
from chita_edge.core.evaluate import accuracy
from chita_edge.models.loading import load_model
from chita_edge.pruning.prune import PruneConfig, prune

SHARED = Path(os.environ.get("CHITA_EDGE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SETUPS = {
    "mlpnet": ("zoo:mlpnet", "checkpoints/mlpnet_mnist.pt", "data/mnist.npz", "0.5,0.6,0.7,0.8,0.9,0.95,0.98"),
    "resnet20": ("zoo:resnet20", "checkpoints/resnet20_cifar10.pt", "data/cifar10.npz", "0.5,0.7,0.8,0.9,0.95"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SETUPS), default="mlpnet")
    ap.add_argument("--sparsities", default=None, help="comma-separated; default: the paper's range")
    ap.add_argument("--methods", default="magnitude,bso,chita,chita++",
                    help="comma-separated; a suffix +refit / +norefit forces the layer-wise re-fit on / off "
                         "(default: on for chita, chita++, bso)")
    ap.add_argument("--plusplus-sparsities", default=None, help="run chita++ only at these (default: all)")
    ap.add_argument("--stages", type=int, default=25)
    ap.add_argument("--grads", type=int, default=1000)
    ap.add_argument("--l2", type=float, default=0.03)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bn-rule", choices=("if-better", "always"), default="if-better",
                    help="BatchNorm re-estimation after a stage: kept only where it lowers a held-out loss (the "
                         "default), or always (the rule before 2026-12-06; an ablation)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec, ckpt, data, default_s = SETUPS[args.model]
    if not (SHARED / ckpt).exists():
        sys.exit(f"needs {SHARED / ckpt} (the paper's checkpoint under ../shared)")
    ds = load_data(f"npz:{SHARED / data}")
    sparsities = [float(s) for s in (args.sparsities or default_s).split(",")]
    pp = [float(s) for s in args.plusplus_sparsities.split(",")] if args.plusplus_sparsities else sparsities
    dense = load_model(spec, SHARED / ckpt)
    dense_acc = accuracy(dense.module, ds.x_test, ds.y_test)
    rows = []
    for s in sparsities:
        for method in args.methods.split(","):
            if method.startswith("chita++") and s not in pp:
                continue
            lm = load_model(spec, SHARED / ckpt)
            base, refit = method, None  # "magnitude+refit", "chita+++norefit": the re-fit ablation
            for suffix, value in (("+refit", True), ("+norefit", False)):
                if method.endswith(suffix):
                    base, refit = method[: -len(suffix)], value
            cfg = PruneConfig(sparsity=s, method=base, stages=args.stages, n_grads=args.grads, l2=args.l2,
                              bn_rule=args.bn_rule,
                              layerwise_refit=refit)
            t0 = time.perf_counter()
            rep = prune(lm.module, cfg, ds, lm.prunable)
            wall = time.perf_counter() - t0
            acc = accuracy(lm.module, ds.x_test, ds.y_test)
            rows.append({"model": args.model, "sparsity": s, "method": method, "accuracy": acc,
                         "achieved_sparsity": rep.sparsity, "gradients_s": rep.timings["gradients_s"],
                         "solve_s": rep.timings["solve_s"], "total_s": wall})
            print(f"# {args.model} s={s} {method}: {acc:.2f} % in {wall:.1f} s", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"dense_accuracy": dense_acc, "rows": rows}, indent=2))
        return
    mag = {r["sparsity"]: r["accuracy"] for r in rows if r["method"] == "magnitude"}
    print(f"\n{args.model}: dense {dense_acc:.2f} % on {len(ds.x_test)} test images; "
          f"n={args.grads} gradients, l2={args.l2}, chita++ stages={args.stages}, threads={args.threads}\n")
    print("| sparsity | method | accuracy % | vs magnitude (pts) | gradients s | solve s | total s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d = f"{r['accuracy'] - mag[r['sparsity']]:+.2f}" if r["sparsity"] in mag else "-"
        print(f"| {r['sparsity']:.2f} | {r['method']} | {r['accuracy']:.2f} | {d} | {r['gradients_s']:.1f} | "
              f"{r['solve_s']:.1f} | {r['total_s']:.1f} |")


if __name__ == "__main__":
    main()
