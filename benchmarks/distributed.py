"""One process against two (torchrun, gloo on CPU) on MLPNet: wall time, pruning time and the same result.

    python benchmarks/distributed.py [--reps 3] [--block-size 1024]

Runs ``chita-edge prune zoo:mlpnet ... --sparsity 0.95 --method chita`` (and the same in block mode,
``--block-size``) as a user would, each ``--reps`` times: one process with 1 thread, one process with 2 threads,
and ``--workers 2`` (two processes of 1 thread each). Prints the medians of the command's wall time (process
start, torchrun's rendezvous, loading and evaluation included) and of the pruning time the JSON reports (rank 0's
``timings.total_s``), with ratios against one process of 1 thread measured in the same run, and checks that the
two-process checkpoint has the one-process mask and weights (relative difference <= 1e-6).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from chita_edge.core.checkpoint import read_weights

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def run(args: list[str]) -> tuple[float, float, float]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "chita_edge.cli", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"exit {r.returncode}: {' '.join(args)}\n{r.stderr}")
    t = json.loads(r.stdout)["timings"]
    return wall, t["total_s"], t["gradients_s"]


def same(a: Path, b: Path) -> tuple[bool, float]:
    wa, wb = read_weights(a)[0], read_weights(b)[0]
    masks = all(torch.equal(wa[k] == 0, wb[k] == 0) for k in wa)
    rel = max(float((wa[k] - wb[k]).abs().max() / wa[k].abs().max().clamp_min(1e-30)) for k in wa)
    return masks, rel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=1024)
    a = ap.parse_args()
    base = ["prune", "zoo:mlpnet", "--weights", str(SHARED / "checkpoints/mlpnet_mnist.pt"), "--data",
            f"npz:{SHARED / 'data/mnist.npz'}", "--sparsity", "0.95", "--method", "chita", "--json"]
    modes = {"chita 95 %": [], f"chita 95 %, --block-size {a.block_size}": ["--block-size", str(a.block_size)]}
    runs = {"1 process, 1 thread": ["--threads", "1"], "1 process, 2 threads": ["--threads", "2"],
            "--workers 2 (1 thread each)": ["--threads", "1", "--workers", "2"]}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for mode, extra in modes.items():
            res: dict[str, tuple[float, float, float]] = {}
            for name, flags in runs.items():
                times = []
                for i in range(a.reps):
                    out = Path(d) / f"{len(rows)}-{name[:2]}-{i}.pt"
                    times.append(run([*base, *extra, *flags, "--out", str(out)]))
                res[name] = tuple(statistics.median(t[j] for t in times) for j in range(3))  # type: ignore[assignment]
                ref = res[next(iter(runs))]
                rows.append((mode, name, *res[name], res[name][0] / ref[0], res[name][1] / ref[1], out))
            one, two = rows[-3][-1], rows[-1][-1]
            masks, rel = same(one, two)
            print(f"{mode}: 2 processes vs 1: same mask {masks}, max relative weight difference {rel:.2e}")
    print(f"\n| run | processes | wall s (median of {a.reps}) | x vs 1 process, 1 thread | pruning s | x vs 1 "
          "process, 1 thread | of which gradients s |")
    print("|---|---|---|---|---|---|---|")
    for mode, name, wall, prune, grads, rw, rp, _ in rows:
        print(f"| {mode} | {name} | {wall:.2f} | {rw:.2f} | {prune:.2f} | {rp:.2f} | {grads:.2f} |")


if __name__ == "__main__":
    main()
