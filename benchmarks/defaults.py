"""The shared pruning defaults (chita_edge.pruning.defaults), measured: accuracy and seconds per setting.

Before the one table of defaults, block pruning (``prune --structure block``) ran with 5 stages and l2 = 1e-3 and
unstructured CHITA++ with 25 stages and l2 = 0.03. This script prunes MLPNet (the paper's dense checkpoint) in
1x4 blocks and unstructured, over a grid of (stages, l2), in one process, so the defaults are chosen by the
same measurement for both.

    python benchmarks/defaults.py                       # block 1x4 at 90 %: stages 5/25 x l2 1e-3/0.03
    python benchmarks/defaults.py --unstructured        # also chita++ at 98 %: l2 1e-3/0.03 at 25 stages

Needs ../shared (MNIST and the paper's MLPNet checkpoint). Prints a Markdown table (ratios against the defaults'
row); --json for machine use.
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
from chita_edge.pruning.blocks import BlockConfig, prune_blocks
from chita_edge.pruning.defaults import DEFAULTS
from chita_edge.pruning.prune import PruneConfig, prune

SHARED = Path(os.environ.get("CHITA_EDGE_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block-sparsity", type=float, default=0.9)
    ap.add_argument("--block-stages", default="5,25")
    ap.add_argument("--l2s", default="0.001,0.03")
    ap.add_argument("--unstructured", action="store_true", help="also chita++ at --sparsity")
    ap.add_argument("--sparsity", type=float, default=0.98)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = SHARED / "checkpoints/mlpnet_mnist.pt"
    if not ckpt.exists():
        sys.exit(f"needs {ckpt} (the paper's checkpoint under ../shared)")
    ds = load_data(f"npz:{SHARED / 'data/mnist.npz'}")
    l2s = [float(x) for x in args.l2s.split(",")]
    rows = []
    for stages in [int(x) for x in args.block_stages.split(",")]:
        for l2 in l2s:
            lm = load_model("zoo:mlpnet", ckpt)
            t0 = time.perf_counter()
            r = prune_blocks(lm.module, ds, BlockConfig(sparsity=args.block_sparsity, stages=stages, l2=l2))
            rows.append({"mode": f"block 1x4 {args.block_sparsity:.0%}", "stages": stages, "l2": l2,
                         "sparsity": r["sparsity"], "accuracy": accuracy(lm.module, ds.x_test, ds.y_test),
                         "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), file=sys.stderr)
    if args.unstructured:
        for l2 in l2s:
            lm = load_model("zoo:mlpnet", ckpt)
            t0 = time.perf_counter()
            rep = prune(lm.module, PruneConfig(sparsity=args.sparsity, method="chita++", l2=l2), ds)
            rows.append({"mode": f"chita++ {args.sparsity:.0%}", "stages": rep.config["stages"], "l2": l2,
                         "sparsity": rep.sparsity, "accuracy": accuracy(lm.module, ds.x_test, ds.y_test),
                         "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| mode | stages | l2 | accuracy % | seconds | accuracy - defaults' | seconds / defaults' |"
          "\n|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((x for x in rows if x["mode"] == r["mode"] and x["l2"] == DEFAULTS["l2"]
                    and x["stages"] == DEFAULTS["stages"]), None)
        d_acc = f"{r['accuracy'] - ref['accuracy']:+.2f}" if ref else "-"
        d_t = f"{r['seconds'] / ref['seconds']:.2f}x" if ref else "-"
        print(f"| {r['mode']} | {r['stages']} | {r['l2']:g} | {r['accuracy']:.2f} | {r['seconds']:.1f} | {d_acc} | {d_t} |")


if __name__ == "__main__":
    main()
