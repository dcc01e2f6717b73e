"""CHITA on millions of weights in bounded memory (issue 17): peak RSS and wall time per row, one table.

Each row runs in a child process (``--row JSON``) and reports its own peak RSS as the OS counts it
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``). Rows:

- MobileNetV1 (``chita_edge.models.zoo.MobileNetV1``, 10 classes, CIFAR 32x32 input, 3.2 M prunable weights; the
  1000-class ImageNet head of the paper's 4.2 M is left out), trained first on the CIFAR-10 subset with the recipe
  in ``train`` (cached under --work), one-shot at each --sparsities with n = --grads:
  ``chita block`` (streamed block mode, OBS-saliency support, per-block CHITA, layer-wise re-fit, --memory-gb cap),
  ``chita block, no safeguard`` (the same, CHITA's support and weights kept whatever the safeguard's loss check
  says), ``reference block`` (the reference code: global magnitude support + per-block backsolve; no re-fit, no
  safeguard), ``magnitude`` (global) and ``magnitude + re-fit``. Accuracy on the 1017 test images.
- ``--resnet50``: a ResNet50-sized model (torchvision-style bottlenecks, 25.5 M prunable weights, random init, CIFAR
  input), streamed block mode at 80 % with n = 500.
- ``--gradients``: gradient collection alone (n = 1000 rows of MLPNet, ResNet20 and MobileNetV1): the hooked
  path, the torch.func path it replaced, and a plain per-sample forward/backward loop, each in a fresh process.

    python benchmarks/scale.py                                   # MobileNetV1, 50/70/80/90 %
    python benchmarks/scale.py --sparsities 0.8 --methods chita-block,magnitude-refit
    python benchmarks/scale.py --gradients
    python benchmarks/scale.py --refit --sparsities 0.8                  # the re-fit's solves, now vs before
    python benchmarks/scale.py --resnet50 --sparsities 0.8 --methods chita-block
    python benchmarks/scale.py --resnet50 --sparsities 0.8 --estimate 8     # its plan and estimated time only

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
from chita_edge.pruning import blockwise
from chita_edge.pruning import gradients as gradmod
from chita_edge.pruning import refit as refitmod
from chita_edge.pruning.layers import find_prunable, flatten_weights, set_weights
from chita_edge.pruning.prune import PruneConfig, prune
from chita_edge.solvers import chita as solver
from chita_edge.solvers.group_chita import masked_layer_backsolve
from chita_edge.training.finetune import FinetuneConfig, finetune

SHARED = Path(os.environ.get("CHITA_EDGE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
METHODS = ("chita-block", "reference-block", "magnitude", "magnitude-refit", "chita-block-no-safeguard")


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


def train(work: Path, epochs: int, batch_size: int) -> Path:
    """The recipe: MobileNetV1 from random init on the 5085 CIFAR images, SGD (Nesterov 0.9, lr 0.1 cosine per
    step, weight decay 5e-4, ``batch_size``), random crop + flip, ``epochs`` epochs, 1 thread; BatchNorm
    re-estimated. Cached per (epochs, batch size); the 8th session's 4-epoch model was batch 64 (``..._e4.pt``)."""
    path = work / (f"mobilenetv1_cifar_e{epochs}.pt" if batch_size == 64 else
                   f"mobilenetv1_cifar_e{epochs}_b{batch_size}.pt")
    if path.exists():
        return path
    torch.manual_seed(0)
    model = mobilenet()
    ds = load_data(f"npz:{SHARED / 'data/cifar10.npz'}")
    t0 = time.perf_counter()

    def on_epoch(rec: dict) -> None:
        print(f"epoch {rec.get('epoch')}: {time.perf_counter() - t0:.0f} s, loss {rec.get('loss', 0):.3f}, "
              f"test {rec.get('test_accuracy', 0):.2f} %", file=sys.stderr, flush=True)

    r = finetune(model, ds, FinetuneConfig(epochs=epochs, lr=0.1, batch_size=batch_size, weight_decay=5e-4,
                                           eval_each_epoch=True), on_epoch=on_epoch)
    print(f"trained MobileNetV1 {epochs} epochs in {time.perf_counter() - t0:.0f} s: "
          f"{[round(h.get('test_accuracy', 0), 2) for h in r.history]}", file=sys.stderr)
    torch.save(model.state_dict(), path)
    return path


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def cpu_s() -> float:
    """This process's CPU seconds (user + system): what the row costs on a core of its own, whatever the load."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


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
        "chita-block-no-safeguard": PruneConfig(method="chita", block_size=spec["block_size"], block_support="saliency",
                                                memory_budget_gb=spec["memory_gb"], block_stream=spec["stream"],
                                                safeguard=False, **common),
        "reference-block": PruneConfig(method="bso", block_size=spec["block_size"], block_support="magnitude",
                                       memory_budget_gb=spec["memory_gb"], layerwise_refit=False, safeguard=False,
                                       block_stream=spec["stream"], **common),
        "magnitude": PruneConfig(method="magnitude", layerwise_refit=False, **common),
        "magnitude-refit": PruneConfig(method="magnitude", layerwise_refit=True, **common),
    }[method]
    dense = accuracy(model, ds.x_test, ds.y_test) if spec["model"] == "mobilenetv1" else None
    params = find_prunable(model, default_prunable)
    w_bar = flatten_weights(model, params)
    t0, c0 = time.perf_counter(), cpu_s()
    phases: dict[str, float] = {}  # peak RSS (GiB) when each phase of prune reported progress: where the peak was

    def on_progress(what: str, i: int, n: int) -> None:
        phases[f"{what} {i}/{n}"] = round(peak_rss_gb(), 3)

    phases["start"] = round(peak_rss_gb(), 3)
    rep = prune(model, cfg, ds, filter_fn=default_prunable, progress=on_progress)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    acc = accuracy(model, ds.x_test, ds.y_test)
    plan = rep.stages[0].get("plan") if rep.stages else None
    return {**spec, "dense_accuracy": dense, "accuracy": acc, "sparsity_reached": rep.sparsity, "wall_s": wall,
            "cpu_s": cpu, "load_avg": os.getloadavg()[0], "timings": rep.timings, "refit_s": (rep.refit or {}).get("seconds"),
            "refit_kept": (rep.refit or {}).get("kept"), "peak_rss_gb": peak_rss_gb(), "peak_rss_by_phase": phases,
            "passes": rep.stages[0].get("passes") if rep.stages else None,
            "groups": plan["groups"] if plan else None, "p": len(w_bar),
            "safeguard": rep.stages[0].get("safeguard") if rep.stages else None,
            **support_overlap(model, params, w_bar)}


def support_overlap(model: nn.Module, params: list, w_bar: torch.Tensor) -> dict:
    """Share of the kept weights that global magnitude would keep too, overall and per layer (1.0: the
    magnitude support; the safeguard's "magnitude" candidate or a support CHITA did not change)."""
    kept = flatten_weights(model, params) != 0
    mag = solver.hard_threshold(w_bar, int(kept.sum())) != 0
    per = {q.name: round(float((kept[q.slice] & mag[q.slice]).sum()) / max(1, int(kept[q.slice].sum())), 4)
           for q in params}
    return {"same_as_magnitude": float((kept & mag).sum()) / max(1, int(kept.sum())),
            "same_as_magnitude_per_layer": per}


def estimate_row(spec: dict) -> dict:
    """The block plan of the row (bytes, groups, passes) and its time estimated from measured pieces, without the
    whole run: all p columns of G for ``probe`` rows (t_all) and the first layer's columns alone (t_min: one
    forward and the whole backward, the fixed cost of a pass), scaled to n rows; then per-block OBS saliency and
    CHITA solves timed on ``probe_blocks`` blocks of n Gaussian rows with the measured column scales, at the
    uniform share k_b = (1 - sparsity) |b|. Passes: spill collects each group once (t_all - t_min spread over the
    groups, plus g x t_min); recompute adds the g - 1 second passes. The re-fit, safeguard and BatchNorm steps are
    not in the estimate."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    ds = load_data(f"npz:{SHARED / 'data/cifar10.npz'}")
    model = resnet50() if spec["model"] == "resnet50" else mobilenet()
    params = find_prunable(model, default_prunable)
    p, n, probe, bs = sum(q.numel for q in params), spec["grads"], spec["probe"], spec["block_size"]
    plan = blockwise.plan_blocks(params, n, bs, int(spec["memory_gb"] * 2**30), solver_bytes=4,
                                 spill=spec["stream"] == "spill")
    print(plan.describe(), file=sys.stderr, flush=True)

    def timed(columns: slice) -> tuple[float, torch.Tensor]:
        t = time.perf_counter()
        G = gradmod.collect_gradients(model, params, ds.x_train, ds.y_train, n=probe, columns=columns)
        return time.perf_counter() - t, G

    timed(slice(0, params[0].numel))  # the first call's one-off costs
    t_min, _ = timed(slice(0, params[0].numel))
    t_all, G = timed(slice(0, p))
    scale_n = n / probe
    g = len(plan.groups)
    grad_s = (g * t_min + max(0.0, t_all - t_min)) * scale_n
    if spec["stream"] != "spill":
        grad_s += (g - 1) * t_min * scale_n + max(0.0, t_all - t_min) * scale_n * (g - 1) / g
    blocks = blockwise.block_slices(params, bs)
    pick = [blocks[i] for i in torch.linspace(0, len(blocks) - 1, spec["probe_blocks"]).long().tolist()]
    lam = 0.03 * n / 2
    sal = sol = 0.0
    gen = torch.Generator().manual_seed(0)
    for b in pick:
        Gb = torch.randn(n, b.stop - b.start, generator=gen) * G[:, b].std(0).clamp_min(1e-12)
        wb = flatten_weights(model, params)[b]
        t = time.perf_counter()
        blockwise.obs_saliency(Gb, wb, lam)
        sal += time.perf_counter() - t
        t = time.perf_counter()
        solver.chita(Gb, wb, max(1, round((1 - spec["sparsity"]) * (b.stop - b.start))), lam)
        sol += time.perf_counter() - t
    per_block = (sal + sol) / len(pick)
    return {**spec, "p": p, "plan": plan.to_dict(), "plan_text": plan.describe(), "t_min_s": t_min, "t_all_s": t_all,
            "gradients_est_s": grad_s, "saliency_per_block_s": sal / len(pick), "solve_per_block_s": sol / len(pick),
            "blocks_est_s": per_block * len(blocks), "total_est_s": grad_s + per_block * len(blocks),
            "peak_rss_gb": peak_rss_gb(), "cpu_s": cpu_s(), "load_avg": os.getloadavg()[0]}


def backsolve_in_q_by_q(H: torch.Tensor, C: torch.Tensor, W_bar: torch.Tensor, mask: torch.Tensor, lam: float,
                        rows_per_chunk: int = 32) -> torch.Tensor:
    """The re-fit's per-row systems as ``masked_layer_backsolve`` solved them before this session (the baseline):
    each row's system embedded in q x q, the identity off its support, in chunks of rows."""
    R = (C @ W_bar.T).T + lam * W_bar
    W = torch.zeros_like(W_bar)
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for s in range(0, len(W_bar), rows_per_chunk):
        m = mask[s:s + rows_per_chunk].to(H.dtype)
        A = H.unsqueeze(0) * (m.unsqueeze(2) * m.unsqueeze(1)) + eye * (lam * m + 1 - m).unsqueeze(1)
        W[s:s + rows_per_chunk] = torch.cholesky_solve((R[s:s + rows_per_chunk] * m).unsqueeze(2),
                                                        torch.linalg.cholesky(A)).squeeze(2) * m
    return W


def refit_row(spec: dict) -> dict:
    """The layer-wise re-fit's per-row solves on MobileNetV1 at global magnitude ``sparsity``: for each re-fitted
    layer, H = X_p^T X_p and C = X_p^T X_d on the 1024 calibration images as ``prune`` takes them; the solver
    now (support-size systems, median of 3) against the q x q systems before (timed on the first ``old_rows``
    rows of the layer and scaled to all rows: each row costs the same there), and their largest relative
    difference on those rows."""
    torch.set_num_threads(spec["threads"])
    ds = load_data(f"npz:{SHARED / 'data/cifar10.npz'}")
    dense = mobilenet()
    dense.load_state_dict(torch.load(spec["weights"], weights_only=True))
    model = mobilenet()
    model.load_state_dict(dense.state_dict())
    params = find_prunable(model, default_prunable)
    w_bar = flatten_weights(model, params)
    set_weights(model, params, solver.hard_threshold(w_bar, round((1 - spec["sparsity"]) * len(w_bar))))
    x = ds.x_train[torch.randperm(len(ds.x_train), generator=torch.Generator().manual_seed(30_000))[:1024]]
    mods, dmods = dict(model.named_modules()), dict(dense.named_modules())
    names = [q.module_name for q in params if refitmod._refittable(mods[q.module_name])]
    xs_p, xs_d = refitmod.layer_inputs(model, names, x), refitmod.layer_inputs(dense, names, x)
    layers = []
    for name in names:
        H, C = refitmod._gram(mods[name], xs_p[name], xs_d[name])
        Wc = mods[name].weight.detach().reshape(mods[name].weight.shape[0], -1)
        Wd = dmods[name].weight.detach().reshape(Wc.shape[0], -1).double()
        mask, lam = Wc != 0, 0.01 * float(H.diagonal().mean()) + 1e-12
        times = []
        for _ in range(3):
            t = time.perf_counter()
            W = masked_layer_backsolve(H, C, Wd, mask, lam)
            times.append(time.perf_counter() - t)
        r = min(spec["old_rows"], len(Wd))
        t = time.perf_counter()
        W_old = backsolve_in_q_by_q(H, C, Wd[:r], mask[:r], lam)
        old = (time.perf_counter() - t) * len(Wd) / r
        diff = float((W[:r] - W_old).abs().max() / W_old.abs().max().clamp_min(1e-300))
        layers.append({"layer": name, "shape": list(Wd.shape), "density": float(mask.float().mean()),
                       "now_s": sorted(times)[1], "before_s": old, "max_rel_diff": diff})
        print(layers[-1], file=sys.stderr, flush=True)
    return {**spec, "layers": layers, "load_avg": os.getloadavg()[0]}


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
    ap.add_argument("--epochs", type=int, default=18, help="MobileNetV1 training epochs (the recipe; default 18)")
    ap.add_argument("--train-batch", type=int, default=128, help="MobileNetV1 training batch (default 128)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resnet50", action="store_true", help="the ResNet50-sized row instead of MobileNetV1")
    ap.add_argument("--gradients", action="store_true", help="the gradient-collection table instead")
    ap.add_argument("--refit", action="store_true",
                    help="time the layer-wise re-fit's solves (now against the q x q systems before) instead")
    ap.add_argument("--estimate", type=int, default=0, metavar="ROWS",
                    help="print the block plan and estimate the row's time from ROWS gradient rows and a few "
                         "timed block solves (estimate_row) instead of running it")
    args = ap.parse_args()
    if args.row:
        spec = json.loads(args.row)
        row = (gradient_row(spec) if "how" in spec else estimate_row(spec) if "probe" in spec else
               refit_row(spec) if "old_rows" in spec else run_row(spec))
        print(json.dumps(row))
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
    if args.refit:
        weights = str(train(args.work, args.epochs, args.train_batch))
        for s in [float(v) for v in args.sparsities.split(",")]:
            r = child({"model": model, "weights": weights, "sparsity": s, "old_rows": 64, "threads": args.threads}, log)
            if not r:
                continue
            print(f"re-fit solves, MobileNetV1 at global magnitude {s:.0%} (load {r['load_avg']:.1f}):")
            print("| layer | out x q | density | before s (q x q) | now s (median of 3) | x faster | max rel diff |")
            print("|---|---|---|---|---|---|---|")
            for L in r["layers"]:
                print(f"| {L['layer']} | {L['shape'][0]} x {L['shape'][1]} | {L['density']:.3f} | {L['before_s']:.2f} | "
                      f"{L['now_s']:.3f} | {L['before_s'] / max(L['now_s'], 1e-9):.1f} | {L['max_rel_diff']:.1e} |")
            b, n_ = sum(L["before_s"] for L in r["layers"]), sum(L["now_s"] for L in r["layers"])
            print(f"| all {len(r['layers'])} layers | | | {b:.1f} | {n_:.1f} | {b / n_:.1f} | "
                  f"{max(L['max_rel_diff'] for L in r['layers']):.1e} |")
        return
    if args.estimate:
        for s in [float(v) for v in args.sparsities.split(",")]:
            r = child({"model": model, "probe": args.estimate, "probe_blocks": 20, "sparsity": s,
                       "grads": args.grads or (500 if args.resnet50 else 1000), "block_size": args.block_size,
                       "memory_gb": args.memory_gb, "stream": args.stream, "threads": args.threads}, log)
            if r:
                print(f"{model} {s:.0%}: p = {r['p']}; {r['plan_text']}")
                print(f"  measured: {r['probe']} rows of all p columns {r['t_all_s']:.1f} s, of the first layer "
                      f"alone {r['t_min_s']:.1f} s; per block: saliency {r['saliency_per_block_s'] * 1e3:.1f} ms, "
                      f"CHITA {r['solve_per_block_s'] * 1e3:.1f} ms ({r['plan']['blocks']} blocks)")
                print(f"  estimate: gradients {r['gradients_est_s'] / 60:.1f} min + blocks {r['blocks_est_s'] / 60:.1f} "
                      f"min = {r['total_est_s'] / 60:.1f} min (re-fit, safeguard, BatchNorm not included); "
                      f"probe peak RSS {r['peak_rss_gb']:.2f} GB, CPU {r['cpu_s']:.0f} s, load {r['load_avg']:.1f}")
        return
    weights = None if args.resnet50 else str(train(args.work, args.epochs, args.train_batch))
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
    print("| model | sparsity | method | stream | n | top-1 % | vs magnitude+re-fit | wall (s) | CPU (s) | of which re-fit (s) | "
          "peak RSS (GB) | passes | safeguard chose | kept = magnitude's | re-fit kept |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ref = {r["sparsity"]: r["accuracy"] for r in rows if r["method"] == "magnitude-refit"}
    for r in rows:
        d = f"{r['accuracy'] - ref[r['sparsity']]:+.2f}" if r["sparsity"] in ref else "-"
        stream = r["stream"] if "block" in r["method"] else "-"
        chose = (r.get("safeguard") or {}).get("chosen", "-")
        refit = f"{r['refit_s']:.0f}" if r.get("refit_s") is not None else "-"
        kept = {True: "yes", False: "no", None: "-"}[r.get("refit_kept")]
        print(f"| {r['model']} | {r['sparsity']:.0%} | {r['method']} | {stream} | {r['grads']} | {r['accuracy']:.2f} | {d} | "
              f"{r['wall_s']:.0f} | {r.get('cpu_s', float('nan')):.0f} | {refit} | {r['peak_rss_gb']:.2f} | {r['passes'] or '-'} | {chose} | "
              f"{r.get('same_as_magnitude', 1.0):.1%} | {kept} |")


if __name__ == "__main__":
    main()
