"""CHITA on millions of weights in bounded memory (issue 17): peak RSS and wall time per row, one table.

Each row runs in a child process (``--row JSON``) and reports its own peak RSS as the OS counts it
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``). Rows:

- MobileNetV1 (``chita_edge.models.zoo.MobileNetV1``, 10 classes, CIFAR 32x32 input, 3.2 M prunable weights; the
  1000-class ImageNet head of the paper's 4.2 M is left out), trained first on the CIFAR-10 subset with the recipe
  in ``train`` (cached under --work), one-shot at each --sparsities with n = --grads:
  ``chita block`` (streamed block mode, OBS-saliency support, per-block CHITA, layer-wise re-fit, --memory-gb cap),
  ``reference block`` (the reference code: global magnitude support + per-block backsolve; no re-fit, no
  safeguard), ``magnitude`` (global) and ``magnitude + re-fit``. Accuracy on the 1017 test images.
- ``--resnet50``: a ResNet50-sized model (torchvision-style bottlenecks, 25.5 M prunable weights, random init, CIFAR
  input), streamed block mode at 80 % with n = 500.
- ``--gradients``: gradient collection alone (n = 1000 rows of MLPNet, ResNet20 and MobileNetV1): the hooked
  path, the torch.func path it replaced, and a plain per-sample forward/backward loop, each in a fresh process.

    python benchmarks/scale.py                                   # MobileNetV1, 50/70/80/90 %
    python benchmarks/scale.py --sparsities 0.8 --methods chita-block,magnitude-refit
    python benchmarks/scale.py --gradients
    python benchmarks/scale.py --resnet50 --sparsities 0.8 --methods chita-block

Needs ../shared (CIFAR-10 subset, MNIST, MLPNet and ResNet20 checkpoints). Rows are appended to
--work/rows.jsonl as they finish, so an interrupted run keeps them; the table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chita_edge.core.data import load_data
from chita_edge.core.evaluate import accuracy
from chita_edge.models.zoo import MobileNetV1, ResNet20, default_prunable, resnet_prunable
from chita_edge.pruning import gradients as gradmod
from chita_edge.pruning.layers import find_prunable
from chita_edge.pruning.prune import PruneConfig, prune
from chita_edge.training.finetune import FinetuneConfig, finetune

SHARED = Path(os.environ.get("CHITA_EDGE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
METHODS = ("chita-block", "reference-block", "magnitude", "magnitude-refit")


def mobilenet() -> nn.Module:
    return MobileNetV1(num_classes=10)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        out = mid * 4
        self.c1, self.b1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.c2, self.b2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.c3, self.b3 = nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out)
        self.down = (nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                     if stride != 1 or cin != out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)))
        return F.relu(self.b3(self.c3(h)) + self.down(x))


def resnet50() -> nn.Module:
    """ResNet50's layout (3/4/6/3 bottlenecks, widths 64..512, 1000-class head: 25.5 M weights) on 32x32 input."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for i, (mid, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for j in range(blocks):
            layers.append(Bottleneck(cin, mid, 2 if (j == 0 and i > 0) else 1))
            cin = mid * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers)


def train(work: Path, epochs: int) -> Path:
    """The recipe: MobileNetV1 from random init on the 5085 CIFAR images, SGD (Nesterov 0.9, lr 0.1 cosine,
    weight decay 5e-4, batch 64), random crop + flip, ``epochs`` epochs, 1 thread; BatchNorm re-estimated."""
    path = work / f"mobilenetv1_cifar_e{epochs}.pt"
    if path.exists():
        return path
    torch.manual_seed(0)
    model = mobilenet()
    ds = load_data(f"npz:{SHARED / 'data/cifar10.npz'}")
    t0 = time.perf_counter()
    r = finetune(model, ds, FinetuneConfig(epochs=epochs, lr=0.1, batch_size=64, weight_decay=5e-4,
                                           eval_each_epoch=True))
    print(f"trained MobileNetV1 {epochs} epochs in {time.perf_counter() - t0:.0f} s: "
          f"{[round(h.get('test_accuracy', 0), 2) for h in r.history]}", file=sys.stderr)
    torch.save(model.state_dict(), path)
    return path


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def run_row(spec: dict) -> dict:
    """One row, in this (child) process."""
    torch.set_num_threads(spec["threads"])
    ds = load_data(f"npz:{SHARED / 'data/cifar10.npz'}")
    if spec["model"] == "mobilenetv1":
        model = mobilenet()
        model.load_state_dict(torch.load(spec["weights"], weights_only=True))
    else:
        torch.manual_seed(0)
        model = resnet50()
    method = spec["method"]
    common = {"sparsity": spec["sparsity"], "n_grads": spec["grads"], "dtype": spec["dtype"], "seed": 0}
    cfg = {
        "chita-block": PruneConfig(method="chita", block_size=spec["block_size"], block_support="saliency",
                                   memory_budget_gb=spec["memory_gb"], block_stream=spec["stream"], **common),
        "reference-block": PruneConfig(method="bso", block_size=spec["block_size"], block_support="magnitude",
                                       memory_budget_gb=spec["memory_gb"], layerwise_refit=False, safeguard=False,
                                       block_stream=spec["stream"], **common),
        "magnitude": PruneConfig(method="magnitude", layerwise_refit=False, **common),
        "magnitude-refit": PruneConfig(method="magnitude", layerwise_refit=True, **common),
    }[method]
    dense = accuracy(model, ds.x_test, ds.y_test) if spec["model"] == "mobilenetv1" else None
    t0 = time.perf_counter()
    rep = prune(model, cfg, ds, filter_fn=default_prunable, progress=None)
    wall = time.perf_counter() - t0
    acc = accuracy(model, ds.x_test, ds.y_test)
    plan = rep.stages[0].get("plan") if rep.stages else None
    return {**spec, "dense_accuracy": dense, "accuracy": acc, "sparsity_reached": rep.sparsity, "wall_s": wall,
            "timings": rep.timings, "refit_s": (rep.refit or {}).get("seconds"),
            "peak_rss_gb": peak_rss_gb(), "passes": rep.stages[0].get("passes") if rep.stages else None,
            "groups": plan["groups"] if plan else None, "p": sum(q.numel for q in find_prunable(model, default_prunable))}


def gradient_row(spec: dict) -> dict:
    """Seconds for n rows of G in a fresh process (the first call included, as ``chita-edge prune`` pays it)."""
    torch.set_num_threads(spec["threads"])
    name, how, n = spec["model"], spec["how"], spec["grads"]
    if name == "mlpnet":
        from chita_edge.models.loading import load_model  # noqa: PLC0415 (benchmark script)
        lm = load_model("zoo:mlpnet", SHARED / "checkpoints/mlpnet_mnist.pt")
        model, filt = lm.module, default_prunable
        ds = load_data(f"npz:{SHARED / 'data/mnist.npz'}")
    else:
        model = ResNet20() if name == "resnet20" else mobilenet()
        filt = resnet_prunable if name == "resnet20" else default_prunable
        ds = load_data(f"npz:{SHARED / 'data/cifar10.npz'}")
    params = find_prunable(model, filt)
    x, y = ds.x_train, ds.y_train
    t0 = time.perf_counter()
    if how == "loop":  # one forward/backward per sample, the gradient copied into a row
        model.eval()
        idx = gradmod.sample_indices(len(x), n, 1, 0)
        named = dict(model.named_parameters())
        G = torch.empty((n, sum(q.numel for q in params)))
        for i in range(n):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx[i:i + 1]]), y[idx[i:i + 1]]).backward()
            G[i] = torch.cat([named[q.name].grad.reshape(-1) for q in params])
    else:
        if how == "func":
            gradmod._hookable = lambda *a: None  # the torch.func path that was the only one before
        G = gradmod.collect_gradients(model, params, x, y, n=n)
    return {**spec, "seconds": time.perf_counter() - t0, "p": G.shape[1], "peak_rss_gb": peak_rss_gb()}


def child(spec: dict, log: Path) -> dict | None:
    cmd = [sys.executable, __file__, "--row", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"row {spec} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    row = json.loads(r.stdout.strip().splitlines()[-1])
    with log.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/chita-scale"))
    ap.add_argument("--sparsities", default="0.5,0.7,0.8,0.9")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--grads", type=int, default=None, help="n (default: 1000; 500 with --resnet50)")
    ap.add_argument("--block-size", type=int, default=500)
    ap.add_argument("--memory-gb", type=float, default=6.0, help="block mode's cap (default: 6, the target)")
    ap.add_argument("--stream", default="spill", help="block mode's second pass: spill (the default) or recompute")
    ap.add_argument("--dtype", default="float32", help="solver precision in the rows (default: float32)")
    ap.add_argument("--epochs", type=int, default=4, help="MobileNetV1 training epochs (the recipe)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resnet50", action="store_true", help="the ResNet50-sized row instead of MobileNetV1")
    ap.add_argument("--gradients", action="store_true", help="the gradient-collection table instead")
    args = ap.parse_args()
    if args.row:
        spec = json.loads(args.row)
        print(json.dumps(gradient_row(spec) if "how" in spec else run_row(spec)))
        return
    if not (SHARED / "data/cifar10.npz").exists():
        sys.exit(f"needs {SHARED} (the CIFAR-10 subset, MNIST and the checkpoints)")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "rows.jsonl"
    if args.gradients:
        rows = [child({"model": m, "how": h, "grads": 1000 if m != "mobilenetv1" else 200, "threads": args.threads},
                      log) for m in ("mlpnet", "resnet20", "mobilenetv1") for h in ("hooks", "func", "loop")]
        print("| model | rows n | p | hooks (s) | torch.func (s) | plain loop (s) | hooks / loop |")
        print("|---|---|---|---|---|---|---|")
        by = {(r["model"], r["how"]): r for r in rows if r}
        for m in ("mlpnet", "resnet20", "mobilenetv1"):
            h, f, lp = (by.get((m, k)) for k in ("hooks", "func", "loop"))
            if h and f and lp:
                print(f"| {m} | {h['grads']} | {h['p']} | {h['seconds']:.2f} | {f['seconds']:.2f} | "
                      f"{lp['seconds']:.2f} | {h['seconds'] / lp['seconds']:.2f} |")
        return
    model = "resnet50" if args.resnet50 else "mobilenetv1"
    weights = None if args.resnet50 else str(train(args.work, args.epochs))
    n = args.grads or (500 if args.resnet50 else 1000)
    rows = []
    for s in [float(v) for v in args.sparsities.split(",")]:
        for method in args.methods.split(","):
            if method not in METHODS:
                sys.exit(f"--methods {method!r}: expected some of {', '.join(METHODS)}")
            spec = {"model": model, "weights": weights, "method": method, "sparsity": s, "grads": n,
                    "block_size": args.block_size, "memory_gb": args.memory_gb, "dtype": args.dtype,
                    "stream": args.stream,
                    "threads": args.threads}
            row = child(spec, log)
            if row:
                rows.append(row)
                print(f"{model} {method} {s:.0%}: {row['accuracy']:.2f} %, {row['wall_s']:.0f} s, "
                      f"{row['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
    if rows and rows[0].get("dense_accuracy") is not None:
        print(f"{model}: dense accuracy {rows[0]['dense_accuracy']:.2f} % on {1017} test images, p = {rows[0]['p']}")
    print("| model | sparsity | method | stream | n | top-1 % | vs magnitude+re-fit | wall (s) | peak RSS (GB) | passes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ref = {r["sparsity"]: r["accuracy"] for r in rows if r["method"] == "magnitude-refit"}
    for r in rows:
        d = f"{r['accuracy'] - ref[r['sparsity']]:+.2f}" if r["sparsity"] in ref else "-"
        stream = r["stream"] if "block" in r["method"] else "-"
        print(f"| {r['model']} | {r['sparsity']:.0%} | {r['method']} | {stream} | {r['grads']} | {r['accuracy']:.2f} | {d} | "
              f"{r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} | {r['passes'] or '-'} |")


if __name__ == "__main__":
    main()
