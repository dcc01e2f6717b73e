"""Acceptance benchmark of issue 6: one-shot pruning + masked fine-tuning, CHITA++ beside magnitude.

- MLPNet (MNIST) at 98 %: one-shot chita++ then <= 5 epochs of masked fine-tuning on the 60000 training images;
  target >= 94.0 % on the 10000 test images (dense 93.97 %).
- ResNet20 (CIFAR-10, ../shared subset) at 90 %: one-shot chita++ then <= 20 epochs on the 5085 training
  images; target >= 85 % on the 1017 test images (dense 90.86 %).

Magnitude pruning gets the same fine-tuning in the same run. Needs ../shared (data and checkpoints).

    python benchmarks/finetune.py --model mlpnet
    python benchmarks/finetune.py --model resnet20 --json-out resnet.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from chita_edge.core.data import load_data
from chita_edge.core.evaluate import accuracy
from chita_edge.models.loading import load_model
from chita_edge.pruning.layers import find_prunable
from chita_edge.pruning.prune import PruneConfig, prune_weights
from chita_edge.training.finetune import FinetuneConfig, finetune
from chita_edge.training.gradual import GradualConfig, gradual_prune

SHARED = Path(os.environ.get("CHITA_EDGE_SHARED", Path(__file__).resolve().parents[2] / "shared"))

SETUPS = {
    "mlpnet": dict(spec="zoo:mlpnet", weights="checkpoints/mlpnet_mnist.pt", data="data/mnist.npz", sparsity=0.98,
                   target=94.0, max_epochs=5,
                   ft=dict(epochs=5, lr=0.1, batch_size=64, optimizer="sgd", augment=False)),
    "resnet20": dict(spec="zoo:resnet20", weights="checkpoints/resnet20_cifar10.pt", data="data/cifar10.npz",
                     sparsity=0.9, target=85.0, max_epochs=20,
                     ft=dict(epochs=20, lr=0.05, batch_size=64, optimizer="sgd", augment=True, weight_decay=5e-4)),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(name: str, args: argparse.Namespace) -> list[dict]:
    s = SETUPS[name]
    ds = load_data(f"npz:{SHARED / s['data']}")
    dense = load_model(s["spec"], SHARED / s["weights"])
    dense_acc = accuracy(dense.module, ds.x_test, ds.y_test)
    ft_kw = dict(s["ft"])
    for k in ("epochs", "lr", "batch_size", "optimizer", "weight_decay"):
        if getattr(args, k) is not None:
            ft_kw[k] = getattr(args, k)
    if args.distill:
        ft_kw.update(distill_weight=args.distill_weight, temperature=args.temperature)
    ft_cfg = FinetuneConfig(**ft_kw, seed=args.seed)
    if ft_cfg.epochs > s["max_epochs"]:
        log(f"note: {ft_cfg.epochs} epochs is above the acceptance limit of {s['max_epochs']}")
    rows = []
    for method in args.methods:
        lm = load_model(s["spec"], SHARED / s["weights"])
        params = find_prunable(lm.module, lm.prunable)
        pcfg = PruneConfig(method=method, sparsity=s["sparsity"],
                           **({k: v for k, v in (("n_grads", args.grads), ("stages", args.stages), ("l2", args.l2))
                               if v is not None} if method.startswith("chita") else {}))
        teacher = copy.deepcopy(dense.module) if args.distill else None

        def on_epoch(r: dict, _m: str = method) -> None:
            log(f"  {_m} {'step ' + str(r['step']) + ' ' if 'step' in r else ''}epoch {r['epoch']}: loss "
                f"{r['loss']:.4f} train {r['train_accuracy']:.2f} % test {r['test_accuracy']:.2f} % ({r['seconds']:.0f} s)")

        if args.gradual_start is not None:  # gradual pruning: the same epochs in all, pruning steps between them
            gcfg = GradualConfig(epochs=ft_cfg.epochs, prune_every=args.prune_every,
                                 start_sparsity=args.gradual_start, finetune=ft_cfg)
            t = time.perf_counter()
            gr = gradual_prune(lm.module, ds, pcfg, gcfg, filter_fn=lm.prunable, teacher=teacher, on_epoch=on_epoch)
            rows.append(dict(model=name, method=f"gradual {method}", sparsity=gr.sparsity, dense=dense_acc,
                             one_shot=float("nan"), finetuned=gr.accuracy, target=s["target"],
                             prune_s=sum(st["prune_s"] for st in gr.steps), finetune_s=time.perf_counter() - t,
                             epochs=ft_cfg.epochs, history=gr.steps, finetune_config=gr.config["gradual"],
                             prune_config=gr.config["prune"]))
            continue
        t = time.perf_counter()
        rep = prune_weights(lm.module, params, ds, pcfg)
        t_prune = time.perf_counter() - t
        one_shot = accuracy(lm.module, ds.x_test, ds.y_test)
        log(f"{name} {method}: sparsity {rep.sparsity:.4f}, one-shot {one_shot:.2f} % ({t_prune:.0f} s)")
        fr = finetune(lm.module, ds, ft_cfg, masks=None, filter_fn=lm.prunable, teacher=teacher, on_epoch=on_epoch)
        rows.append(dict(model=name, method=method, sparsity=rep.sparsity, dense=dense_acc, one_shot=one_shot,
                         finetuned=fr.accuracy, target=s["target"], prune_s=t_prune,
                         finetune_s=fr.timings["total_s"], epochs=ft_cfg.epochs, history=fr.history,
                         finetune_config=fr.config, prune_config=rep.config))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=[*SETUPS, "all"], default="all")
    ap.add_argument("--methods", nargs="+", default=["chita++", "magnitude"])
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--optimizer", choices=["sgd", "adam"])
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--distill", action="store_true", help="distil from the dense model")
    ap.add_argument("--distill-weight", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--grads", type=int, help="chita++: gradient rows n (default PruneConfig's)")
    ap.add_argument("--stages", type=int, help="chita++: stages T (default PruneConfig's)")
    ap.add_argument("--l2", type=float, help="chita++: ridge l2 (default PruneConfig's)")
    ap.add_argument("--gradual-start", type=float,
                    help="gradual pruning instead of one-shot + fine-tuning: cubic schedule from this sparsity, "
                         "a pruning step every --prune-every epochs (the acceptance item is one-shot; this is the paper's setting)")
    ap.add_argument("--prune-every", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"needs {SHARED} (MNIST/CIFAR-10 data and the paper's checkpoints)")
    torch.set_num_threads(args.threads)
    rows = []
    for name in (SETUPS if args.model == "all" else [args.model]):
        rows += run(name, args)
    base = {(r["model"]): r["finetuned"] for r in rows if r["method"] == "magnitude"}
    print(f"{'model':9} {'method':18} {'sparsity':>8} {'dense':>6} {'one-shot':>8} {'fine-tuned':>10} "
          f"{'vs magnitude':>12} {'target':>6} {'ok':>3} {'epochs':>6} {'prune s':>8} {'tune s':>7}")
    for r in rows:
        d = r["finetuned"] - base[r["model"]] if r["model"] in base else float("nan")
        ok = "yes" if r["finetuned"] >= r["target"] else "no"
        print(f"{r['model']:9} {r['method']:18} {r['sparsity']:8.4f} {r['dense']:6.2f} {r['one_shot']:8.2f} "
              f"{r['finetuned']:10.2f} {d:+12.2f} {r['target']:6.1f} {ok:>3} {r['epochs']:6d} "
              f"{r['prune_s']:8.0f} {r['finetune_s']:7.0f}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
