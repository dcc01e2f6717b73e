"""Issue 20: which fine-tuning recipe recovers a budget-pruned model best (20 epochs, distillation, same run).

One pruned checkpoint (a budget prune, e.g. ResNet20 at 0.5x of ``phone-flagship-sd8g2``), its dense teacher, the
CIFAR-10 subset (5085 training / 1017 exact test images). Every variant is the budget path's recipe
(``chita_edge.budget.config.finetune_config``: what ``prune --profile --finetune-epochs E --distill`` runs) with a
few fields changed (``VARIANTS``), run through the product's ``training.finetune.finetune`` from the same file,
with the same seed, masks from the checkpoint's zeros (as ``workflows.finetune.finetune_checkpoint``) and the
dense model as teacher. ``current`` is the recipe as it stands in this checkout, run in the same invocation, so
every row's difference is against it (or ``ninth``, the recipe before this study, when ``current`` is not
run; the first row when neither is). One table: top-1 after the ridge re-fit of the head, after every 5
epochs and at the end (BatchNorm re-estimated), and the seconds.

Variants (``--list``): pure distillation (alpha 1), "patient and consistent" function matching (Beyer et al.,
CVPR 2022: the teacher relabels the same strongly augmented image, here crop + flip + mixup or CutMix, alpha 1),
temperatures, weight decay, batch 64, higher peak learning rates.

    nice -n 19 python benchmarks/finetune_recipe.py /tmp/t20e/r20_05.pt --variants ninth b64 kd-a1-t4 wd5e-4 \\
        lr0.06 fm-cutmix-t4 fm-mixup-t1 ninth+seed=1 --threads 1 --json-out /tmp/t20e/recipe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from chita_edge.budget.config import FINETUNE, finetune_config
from chita_edge.core.data import load_data
from chita_edge.core.io import atomic_write_text
from chita_edge.models.loading import load_model
from chita_edge.pruning.layers import find_prunable
from chita_edge.training.finetune import finetune
from chita_edge.training.masks import masks_from_zeros
from chita_edge.workflows.finetune import resolve_recipe

SHARED = Path(os.environ.get("CHITA_EDGE_SHARED", Path(__file__).resolve().parents[2] / "shared"))

# the Ninth session's recipe (before issue 20's study), so that it stays comparable once FINETUNE changes
NINTH = {"lr": 0.03, "head_ridge": 0.3, "hints": 0.0, "warmup_epochs": 1.0, "temperature": 4.0, "distill_weight": 0.5,
         "weight_decay": 0.0, "batch_size": 128, "mix": "none"}
VARIANTS: dict[str, dict[str, Any]] = {
    "current": {},  # FINETUNE as it stands (and FINETUNE_HINTS where the model shares stages with the teacher)
    "no-hints": {"hints": 0.0},
    "ninth": NINTH,
    "kd-a1-t4": {**NINTH, "distill_weight": 1.0},
    "fm-mixup-t1": {**NINTH, "distill_weight": 1.0, "temperature": 1.0, "mix": "mixup"},
    "fm-mixup-t4": {**NINTH, "distill_weight": 1.0, "temperature": 4.0, "mix": "mixup"},
    "fm-cutmix-t1": {**NINTH, "distill_weight": 1.0, "temperature": 1.0, "mix": "cutmix"},
    "fm-cutmix-t4": {**NINTH, "distill_weight": 1.0, "temperature": 4.0, "mix": "cutmix"},
    "kd-mixup-a05": {**NINTH, "mix": "mixup"},
    "wd5e-4": {**NINTH, "weight_decay": 5e-4},
    "b64": {**NINTH, "batch_size": 64},
    "lr0.06": {**NINTH, "lr": 0.06},
    "lr0.1": {**NINTH, "lr": 0.1},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_variant(name: str) -> dict[str, Any]:
    """A name of ``VARIANTS``, optionally with ``+field=value`` overrides (``fm-mixup-t1+lr=0.06``)."""
    base, *mods = name.split("+")
    if base not in VARIANTS:
        sys.exit(f"variant '{base}': expected one of {', '.join(VARIANTS)}")
    out = dict(VARIANTS[base])
    for m in mods:
        k, _, v = m.partition("=")
        out[k] = v if k == "mix" else float(v) if "." in v or "e" in v else int(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", nargs="?", help="the budget-pruned checkpoint")
    ap.add_argument("--teacher", default=str(SHARED / "checkpoints/resnet20_cifar10.pt"))
    ap.add_argument("--teacher-model", default="zoo:resnet20")
    ap.add_argument("--data", default=f"npz:{SHARED / 'data/cifar10.npz'}")
    ap.add_argument("--variants", nargs="+", default=["current", "fm-mixup-t1"])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    args = ap.parse_args()
    if args.list or not args.checkpoint:
        for k, v in VARIANTS.items():
            print(f"{k}: {v or FINETUNE}")
        return
    torch.set_num_threads(args.threads)
    variants = {v: parse_variant(v) for v in args.variants}
    data = load_data(args.data)
    teacher = load_model(args.teacher_model, args.teacher).module.eval()
    rows: list[dict[str, Any]] = []
    for name, over in variants.items():
        lm = load_model(None, args.checkpoint)
        cfg = resolve_recipe(replace(finetune_config(args.epochs, seed=0), **over), lm.module, teacher,
                             data.x_train[:8], budget_pruned=True)  # as finetune_checkpoint after a budget prune
        masks = masks_from_zeros(lm.module, find_prunable(lm.module, lm.prunable))
        t0 = time.perf_counter()
        rep = finetune(lm.module, data, cfg, masks=masks, teacher=teacher,
                       on_epoch=lambda r, name=name: log(f"  {name} epoch {r['epoch']}: test {r['test_accuracy']:.2f} %"
                                                         f" ({r['seconds']:.0f} s)"))
        hist = [h["test_accuracy"] for h in rep.history]
        row = {"variant": name, "changes": over, "initial": rep.initial_accuracy,
               "epochs": {i + 1: hist[i] for i in range(4, len(hist), 5)}, "final": rep.accuracy,
               "best_epoch": max(hist), "last_train_accuracy": rep.history[-1]["train_accuracy"], "seconds": time.perf_counter() - t0, "config": asdict(cfg),
               "head": rep.head, "load": os.getloadavg()}
        rows.append(row)
        log(f"{name}: {rep.initial_accuracy:.2f} -> {rep.accuracy:.2f} % ({row['seconds']:.0f} s; per epoch "
            + " ".join(f"{a:.1f}" for a in hist) + f"; load {row['load'][0]:.1f})")
        if args.json_out:
            atomic_write_text(args.json_out, json.dumps(rows, indent=1, default=str))
    base = next((r["final"] for r in rows if r["variant"] in ("current", "ninth")), rows[0]["final"])
    marks = sorted({e for r in rows for e in r["epochs"]})
    print("| variant | changes from the ninth-session recipe | one-shot % | "
          + " | ".join(f"ep {e} %" for e in marks) + " | final % | vs baseline (pts) | s |")
    print("|---|---|---|" + "---|" * len(marks) + "---|---|---|")
    for r in rows:
        ch = {k: v for k, v in r["changes"].items() if NINTH.get(k, object()) != v} if r["changes"] else "FINETUNE"
        eps = " | ".join(f"{r['epochs'].get(e, float('nan')):.2f}" for e in marks)
        print(f"| {r['variant']} | {ch or '-'} | {r['initial']:.2f} | {eps} | {r['final']:.2f} | "
              f"{r['final'] - base:+.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
