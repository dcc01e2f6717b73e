"""Issue 20: the budget search's probe curves (``probe_curves``) with one Cholesky factor per consumer for all of a
group's probes (``nested_backsolve``) against the old computation (a fresh ``layer_backsolve`` factorisation of
the kept columns at every probe), on one stage: the dense model, the probes ``_chita`` would place
(``--max-probes`` widths per group, multiples of ``--mult``). Prints seconds (median of ``--repeats``), the
ratio, and the largest relative difference of the curves. 1 thread. Needs ../shared (CIFAR-10, ResNet20).

    python benchmarks/probe_curves.py --model resnet20
    python benchmarks/probe_curves.py --model resnet18 --groups layer4   # torchvision resnet18, random init
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from chita_edge.core.data import load_data
from chita_edge.models.loading import build_model, load_model
from chita_edge.pruning import probes as probes_mod
from chita_edge.pruning.batchnorm import reestimate_on_random_batches
from chita_edge.pruning.channels import alive_channels, allowed_widths, channel_structure
from chita_edge.pruning.probes import probe_curves, removal_curves
from chita_edge.pruning.refit import LayerStats, _gram, layer_inputs
from chita_edge.solvers.group_chita import layer_backsolve, nested_backsolve

SHARED = Path(__file__).resolve().parents[2] / "shared"
RESNET18 = "torchvision:resnet18?num_classes=10&input_size=32"  # as `prune` builds it


def direct(H: torch.Tensor, W: torch.Tensor, rank: torch.Tensor, lam: float):
    """The old computation: a fresh factorisation of the kept columns at every probe."""
    return lambda keep: layer_backsolve(H, H, W, keep, lam)


def timed(fn, acc: list[float]):
    """``fn`` (a solver factory) with the seconds of its factorisations and solves added to ``acc[0]``."""
    def factory(*a):
        t = time.perf_counter()
        solve = fn(*a)
        acc[0] += time.perf_counter() - t

        def call(keep: torch.Tensor) -> torch.Tensor:
            t = time.perf_counter()
            out = solve(keep)
            acc[0] += time.perf_counter() - t
            return out
        return call
    return factory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["resnet20", "resnet18"], default="resnet20")
    ap.add_argument("--groups", default="", help="probe only the channel groups whose id contains this")
    ap.add_argument("--max-probes", type=int, default=6)
    ap.add_argument("--mult", type=int, default=8)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--probe-samples", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (SHARED / "data/cifar10.npz").exists():
        print(f"needs {SHARED}/data/cifar10.npz", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    data = load_data(f"npz:{SHARED / 'data/cifar10.npz'}")
    if args.model == "resnet20":
        model = load_model("zoo:resnet20", SHARED / "checkpoints/resnet20_cifar10.pt").module
    else:
        model = build_model(RESNET18).module
        reestimate_on_random_batches(model, data.x_train, batches=16, batch_size=128, seed=0)
    model.eval()
    x = data.x_train[torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(17))[:args.calib]]
    cs = channel_structure(model, x[:1])
    alive = alive_channels(model, cs)
    stats = LayerStats(model, x)
    curves = removal_curves(model, cs, x, alive, min_width={s.id: args.mult for s in cs.specs}, stats=stats)
    probes = {}
    for f, spec in enumerate(cs.specs):
        w_now = int(alive[cs.channels(f)].sum())
        lower = [w for w in allowed_widths(spec.size, args.mult, 1) if w < w_now] if args.groups in spec.id else []
        if len(lower) > args.max_probes:
            step = (len(lower) - 1) / (args.max_probes - 1)
            lower = sorted({lower[round(i * step)] for i in range(args.max_probes)})
        probes[f] = [w_now - w for w in lower]
    pcal = x[:args.probe_samples]
    mods = dict(model.named_modules())
    names = sorted({m.module for f, s in enumerate(cs.specs) if probes[f] for m in s.consumers})
    xs = layer_inputs(model, names, x)
    for n in names:  # the current Gram matrices, as the previous stage's re-fit leaves them in ``stats``
        stats.gram[n] = _gram(mods[n], xs[n])[0]
    del xs
    times: dict[str, list[float]] = {"old": [], "new": []}
    solves: dict[str, list[float]] = {"old": [], "new": []}
    res = {}
    for _ in range(args.repeats):
        for name, fn in (("old", direct), ("new", nested_backsolve)):
            acc = [0.0]
            probes_mod.nested_backsolve = timed(fn, acc)
            t = time.perf_counter()
            res[name] = probe_curves(model, cs, pcal, curves, stats, probes=probes)
            times[name].append(time.perf_counter() - t)
            solves[name].append(acc[0])
    probes_mod.nested_backsolve = nested_backsolve
    rel = max((float((a[1] - b[1]).abs().max()) / max(float(b[1].abs().max()), 1e-30)
               for a, b in zip(res["new"], res["old"], strict=True) if b[1].numel()), default=0.0)
    n_probes = sum(len(v) for v in probes.values())
    q = max(mods[n].weight[0].numel() for n in names)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    so, sn = statistics.median(solves["old"]), statistics.median(solves["new"])
    print(f"model {args.model}  groups '{args.groups or 'all'}': {sum(1 for v in probes.values() if v)} groups, "
          f"{n_probes} probes, largest Gram {q}x{q}, {args.probe_samples} probe images, 1 thread, "
          f"median of {args.repeats}")
    print(f"{'computation':<34}{'probe_curves s':>15}{'ratio':>7}{'re-fits s':>11}{'ratio':>7}")
    print(f"{'old: layer_backsolve per probe':<34}{old:>15.2f}{1.0:>7.2f}{so:>11.2f}{1.0:>7.2f}")
    print(f"{'new: nested_backsolve (1 factor)':<34}{new:>15.2f}{old / new:>7.2f}{sn:>11.2f}{so / max(sn, 1e-9):>7.2f}")
    print(f"largest relative difference of the curves: {rel:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
