"""Issue 20: chita-edge's budget pruning beside Torch-Pruning 1.6 on ResNet20 (CIFAR-10 subset), same run.

``--model SPEC --weights W`` runs another CIFAR-10 model the same way (a MODEL spec as ``chita-edge prune`` takes,
and a state dict or checkpoint), e.g. MobileNetV1 with 10 classes (``benchmarks/cifar_models.py``):

    python benchmarks/budget_vs_torch_pruning.py --model benchmarks/cifar_models.py:mobilenetv1_cifar10 \
        --weights mobilenetv1_cifar_e18_b128.pt --fractions 0.5     # the weights: benchmarks/scale.py trains them

For each profile (default: phone-flagship-sd8g2, width multiple 8, and sbc-rpi4, width multiple 4) the dense
model's device p90 estimate is measured (benchmark processes repeated until the p90 is known to +-3 %), and
budgets are set at 0.7 / 0.5 / 0.3 x of it. Then, with every file measured the same way (``measure_model``):

* chita-edge: ``prune_to_budget`` (method ``chita-layerwise``, the default: lands in [0.90, 1.00] x the budget
  or reports the nearest configurations either side), with ``--uncertain pass`` (default here): the point
  estimate is what lands, the rule Torch-Pruning's files are picked by; ``--uncertain fail`` lands the upper
  edge of the estimate's error band instead (``prune``'s default, so that ``check`` passes). The table gives both
  ratios (``x budget``: point / budget; ``upper x budget``: band's upper edge / budget);
* Torch-Pruning 1.6 (DepGraph, ``MetaPruner``): importance ``GroupMagnitudeImportance`` (L2) and
  ``GroupTaylorImportance`` (gradients of the cross-entropy on 256 training images), uniform and global,
  ``round_to`` = the profile's width multiple, ``ignored_layers=[fc]``, BatchNorm re-estimated on 2048 training
  images (16 batches of 128). Its pruning ratio is swept on a grid (0.05 .. 0.6); chita-edge's cost model,
  anchored to the measured dense model, predicts each ratio's latency (a benchmark process costs ~8 s here), and
  files are measured from the highest predicted latency down until one *measures* within the budget: the
  comparison is at equal or lower measured latency for Torch-Pruning (``pick``); when no ratio meets the budget,
  its fastest measured file (over the budget, so at a higher latency than chita-edge's: ``fastest``).

Accuracy on the 1017 exact CIFAR-10 test images, one-shot; with ``--finetune-epochs E`` also after the same
fine-tuning of every compared model: the product's ``finetune`` with the budget path's recipe
(``chita_edge.budget.config.finetune_config``, what ``prune --profile --finetune-epochs E`` runs: the output
layer re-fitted with a ridge first, SGD Nesterov, lr and warm-up of ``FINETUNE``, cosine, batch 128, crop + flip,
BatchNorm re-estimated at the end), identical for chita-edge and Torch-Pruning (same epochs, optimiser,
distillation; ``--distill``: the dense model as teacher, T = 4, alpha = 0.5) -- on the fractions in
``--finetune-fractions``; of Torch-Pruning's four
settings, the one with the best one-shot accuracy (``--finetune-tp best``, default) or all (``all``). One table; latency ratios
are against the dense model measured in the same run. Torch-Pruning is imported only here (the ``bench`` extra).

    python benchmarks/budget_vs_torch_pruning.py --json-out tp.json
    python benchmarks/budget_vs_torch_pruning.py --profiles phone-flagship-sd8g2 --fractions 0.5 \\
        --finetune-epochs 5 --distill --finetune-fractions 0.5

Measuring wants a quiet machine and fine-tuning does not, so the two can be run apart: ``--save-dir DIR`` keeps
every compared model (chita-edge's as a checkpoint with its plan; Torch-Pruning's by setting and ratio, rebuilt
deterministically) and appends each row to ``DIR/rows.jsonl`` as it is measured; ``--finetune-saved DIR`` then
fine-tunes those at ``--finetune-fractions`` (under ``nice``, beside other measurements) and prints the table:

    python benchmarks/budget_vs_torch_pruning.py --save-dir runs/a
    nice -n 19 python benchmarks/budget_vs_torch_pruning.py --finetune-saved runs/a --profiles phone-flagship-sd8g2 \\
        --finetune-fractions 0.5 --finetune-epochs 20 --distill --finetune-tp all
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from chita_edge.budget.config import BudgetConfig, finetune_config
from chita_edge.budget.costmodel import CostModel, widths_of
from chita_edge.budget.measure import measure_model
from chita_edge.budget.search import prune_to_budget
from chita_edge.core.checkpoint import save_checkpoint
from chita_edge.core.data import Dataset, load_data
from chita_edge.core.errors import GateFailed
from chita_edge.core.evaluate import accuracy
from chita_edge.devices.profiles import load_profile, with_budgets
from chita_edge.models.loading import load_model
from chita_edge.pruning.channels import channel_structure
from chita_edge.training.finetune import finetune, reestimate_batchnorm
from chita_edge.workflows.finetune import resolve_recipe

SHARED = Path(os.environ.get("CHITA_EDGE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
PCT = "p90"
RATIOS = [round(0.05 * i, 2) for i in range(1, 13)]  # Torch-Pruning's channel pruning ratio grid


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tp_prune(dense: nn.Module, data: Dataset, importance: str, global_pruning: bool, ratio: float,
             round_to: int) -> nn.Module:
    """Torch-Pruning 1.6 one-shot at ``ratio``, then BatchNorm re-estimated on 2048 training images."""
    model = copy.deepcopy(dense).eval()
    x1 = data.x_train[:1]
    imp = (tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude"
           else tp.importance.GroupTaylorImportance())
    pruner = tp.pruner.MetaPruner(model, x1, importance=imp, pruning_ratio=ratio, global_pruning=global_pruning,
                                  max_pruning_ratio=0.95, round_to=round_to, ignored_layers=[model.fc])
    if importance == "taylor":
        model.zero_grad()
        xb, yb = data.x_train[:256], data.y_train[:256]
        nn.functional.cross_entropy(model(xb), yb).backward()
    pruner.step()
    model.zero_grad()
    reestimate_batchnorm(model, data.x_train[:2048], batches=16, batch_size=128, seed=0)
    return model.eval()


def pick(sweep: list[dict[str, Any]], limit: float, measure_one) -> dict[str, Any] | None:
    """An entry of ``sweep`` whose measured latency meets ``limit``, as near it as the predictions find: the
    entry with the highest prediction (corrected by the last measurement's measured / predicted) within the limit
    is measured, until one meets it (Torch-Pruning's latency is not monotone in its ratio: with ``round_to`` a
    layer whose kept count rounds to 0 is left whole). Each entry is measured at most once."""
    scale = 1.0
    while True:
        cand = [e for e in sweep if e["meas"] is None and e["pred"] * scale <= limit]
        if not cand:
            return None
        e = max(cand, key=lambda e: e["pred"])
        e["meas"] = measure_one(e)
        if e["meas"]["latency_ms"] <= limit:
            return e
        scale = max(scale, e["meas"]["latency_ms"] / e["pred"])


def fastest(sweep: list[dict[str, Any]], measure_one) -> dict[str, Any] | None:
    """When no entry of ``sweep`` meets the budget: its fastest measured entry (the lowest prediction measured
    first if none was), marked ``over_budget`` -- the issue compares at equal or *higher* measured latency, so a
    Torch-Pruning file over the budget still counts against a chita-edge file within it."""
    if not sweep:
        return None
    if all(e["meas"] is None for e in sweep):
        e = min(sweep, key=lambda e: e["pred"])
        e["meas"] = measure_one(e)
    e = min((e for e in sweep if e["meas"] is not None), key=lambda e: e["meas"]["latency_ms"])
    return {**e, "over_budget": True}


def chita_row(objective: str, dense: nn.Module, data: Dataset, prof, dm: dict[str, Any], cm: CostModel, limit: float,
              base: dict[str, Any], wd: Path, save: Path | None, args) -> tuple[dict[str, Any], nn.Module | None]:
    """chita-edge's budget search at ``limit`` with ``objective`` (output: the one-shot default; weights: what
    ``prune --profile --finetune-epochs`` runs), its row and model (None when the budget is unreachable)."""
    # the same rule as Torch-Pruning's files: the measured point estimate within the budget
    # (uncertain="pass", check --uncertain pass); by default prune lands the error band's upper edge
    cfg = BudgetConfig(method="chita-layerwise", bench_runs=args.runs, bench_max_repeats=args.max_repeats,
                       reuse_measurements=False, threads=args.threads, uncertain=args.uncertain, prefer=args.prefer,
                       objective=objective, check_repeats=args.check_repeats)
    method = "chita-layerwise" if objective == "output" else f"chita-layerwise-{objective}"
    t0 = time.perf_counter()
    row = {**base, "budget_ms": limit, "method": method}
    try:
        res = prune_to_budget(copy.deepcopy(dense), data.x_train[:1], data, prof,
                              with_budgets(prof, latency_ms=limit, percentile=PCT), cfg,
                              cost_model=cm, dense_measured=dm, work_dir=wd)
        row.update(measured_ms=res.measured["latency_ms"] if res.measured else None,
                   met=res.passed, accuracy=accuracy(res.model, data.x_test, data.y_test),
                   params=sum(p.numel() for p in res.model.parameters()),
                   in_window=res.landing.get("in_window"), seconds=time.perf_counter() - t0,
                   edge=res.cost_model.get("planned_edge", {}).get("latency_ms"),
                   landing=res.landing, decisions=res.decisions,
                   rounds="+".join("w" if d["kind"] == "tighten-widths" else d["kind"][0]
                                   for d in res.decisions if d["budget"] == "latency_ms"))
        chosen = res.model
        if save is not None:
            tag = "" if objective == "output" else f"{objective}-"
            row["checkpoint"] = str(save / f"chita-{tag}{base['profile']}-{base['fraction']:g}.pt")
            save_checkpoint(row["checkpoint"], chosen.state_dict(),
                            {"model": args.model, "plan": res.plan, "widths": res.widths})
    except GateFailed as e:
        row.update(error=str(e), met=False)
        chosen = None
    log(f"{row}")
    return row, chosen


def measure(model: nn.Module, prof, path: Path, data: Dataset, args) -> dict[str, Any]:
    return measure_model(model, data.x_train[:1], prof, path, percentile=PCT, runs=args.runs, repeats=3,
                         parity_inputs=data.x_test[:16], precision=0.03, max_repeats=args.max_repeats, reuse=False)


def tune(model: nn.Module, teacher: nn.Module | None, data: Dataset, args) -> float:
    """The product's fine-tuning (``training.finetune.finetune``) with the budget path's recipe
    (``budget.config.finetune_config``, what ``prune --profile --finetune-epochs`` runs), the same for every model."""
    m = copy.deepcopy(model)
    cfg = resolve_recipe(replace(finetune_config(args.finetune_epochs, seed=0), eval_each_epoch=False), m, teacher,
                         data.x_train[:8], budget_pruned=True)
    rep = finetune(m, data, cfg, masks={}, teacher=teacher)
    log(f"  fine-tuned: {rep.initial_accuracy:.2f} -> {rep.accuracy:.2f} % (head {rep.head}); config {rep.config}")
    return accuracy(m, data.x_test, data.y_test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="zoo:resnet20", help="MODEL spec (zoo:NAME or path/to/file.py:factory), "
                    "a 10-class CIFAR-10 model at 32x32")
    ap.add_argument("--weights", help="its trained weights (default: ../shared's ResNet20 checkpoint)")
    ap.add_argument("--profiles", nargs="+", default=["phone-flagship-sd8g2", "sbc-rpi4"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--max-repeats", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=0)
    ap.add_argument("--finetune-fractions", nargs="+", type=float, default=[0.5])
    ap.add_argument("--distill", action="store_true")
    ap.add_argument("--finetune-tp", choices=["best", "all"], default="best",
                    help="fine-tune the Torch-Pruning setting with the best one-shot accuracy (default) or all four")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--uncertain", choices=["pass", "fail"], default="pass",
                    help="chita-edge's rule (prune --uncertain): pass lands the point estimate in [0.9, 1] x the "
                         "budget, as Torch-Pruning's files are picked; fail, its error band's upper edge")
    ap.add_argument("--check-repeats", type=int, default=1,
                    help="chita-edge's rule (prune --check-repeats): a round passes where check --repeats K, the "
                         "median of K benchmark processes, would pass too")
    ap.add_argument("--prefer", choices=["under", "nearest"], default="under",
                    help="chita-edge's rule when no width lands in [0.9, 1] x the budget (prune --prefer)")
    ap.add_argument("--objectives", nargs="+", choices=["output", "weights"], default=["output", "weights"],
                    help="chita-edge's budget searches: output (one-shot, the default of prune --profile) and "
                         "weights (what prune --profile --finetune-epochs runs: the most weights for fine-tuning)")
    ap.add_argument("--json-out")
    ap.add_argument("--save-dir", help="keep each compared model (chita-edge's as a checkpoint with its plan, "
                    "Torch-Pruning's by its setting and ratio) and append every row to DIR/rows.jsonl")
    ap.add_argument("--finetune-saved", metavar="DIR",
                    help="no pruning or measuring: fine-tune the models a --save-dir run kept (rows of "
                         "--profiles at --finetune-fractions) and print the table with both accuracies")
    ap.add_argument("--finetune-methods", nargs="+", help="with --finetune-saved: only these methods (to split the "
                    "fine-tuning over processes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    ckpt = Path(args.weights) if args.weights else SHARED / "checkpoints/resnet20_cifar10.pt"
    npz = SHARED / "data/cifar10.npz"
    if not ckpt.is_file() or not npz.is_file():
        sys.exit(f"needs {ckpt} and {npz} (../shared)")
    dense = load_model(args.model, ckpt).module.eval()
    data = load_data(f"npz:{npz}")
    x1 = data.x_train[:1]
    dense_acc = accuracy(dense, data.x_test, data.y_test)
    # a copy: fine-tuning freezes its teacher's parameters, and Torch-Pruning's Taylor importance needs the dense
    # model's gradients afterwards (--finetune-saved rebuilds its models between fine-tunings)
    teacher = copy.deepcopy(dense) if args.distill else None
    if args.finetune_saved:
        t_all = time.perf_counter()
        rows = finetune_saved(Path(args.finetune_saved), dense, teacher, data, args)
        print_table(rows, args, time.perf_counter() - t_all)
        return
    save = Path(args.save_dir) if args.save_dir else None
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tp-vs-chita-") as td:
        wd = Path(td)
        for pid in args.profiles:
            prof = load_profile(pid)
            dm = measure(dense, prof, wd / f"dense-{pid}.onnx", data, args)
            log(f"{pid}: dense p90 {dm['latency_ms']:.4g} ms (+-{100 * (dm['latency_precision'] or 0):.1f} %, "
                f"{dm['repeats']} processes)")
            base = {"profile": pid, "width_multiple": prof.width_multiple, "dense_ms": dm["latency_ms"],
                    "band_high": (dm.get("latency_band") or {}).get("high")}
            rows.append({**base, "fraction": 1.0, "method": "dense", "measured_ms": dm["latency_ms"],
                         "params": sum(p.numel() for p in dense.parameters()), "accuracy": dense_acc})
            cm = CostModel.build(dense, x1, prof)
            cs = channel_structure(dense, x1)
            anchor = dm["latency_ms"] / cm.with_op_mix(float(dm["dense_fraction"])).latency({}) \
                if dm.get("dense_fraction") else dm["latency_ms"] / cm.latency({})
            cm_mix = cm.with_op_mix(float(dm["dense_fraction"])) if dm.get("dense_fraction") else cm
            # Torch-Pruning: the ratio grid with predicted latencies; files measured on demand (``pick``)
            sweeps: dict[str, list[dict[str, Any]]] = {}
            for imp in ("magnitude", "taylor"):
                for glob in (False, True):
                    name = f"tp-{imp}-{'global' if glob else 'uniform'}"
                    sweeps[name] = []
                    for r in RATIOS:
                        try:
                            m = tp_prune(dense, data, imp, glob, r, prof.width_multiple)
                        except Exception as e:  # noqa: BLE001 - a ratio TP cannot reach ends the sweep
                            log(f"{name} {r}: {type(e).__name__}: {e}")
                            break
                        pred = anchor * cm_mix.latency(widths_of(m, cs.specs))
                        sweeps[name].append({"ratio": r, "model": m, "pred": pred, "meas": None})
                    log(f"{pid} {name}: predicted x dense " + ", ".join(
                        f"{e['ratio']:g}: {e['pred'] / dm['latency_ms']:.2f}" for e in sweeps[name]))
            for frac in args.fractions:
                limit = frac * dm["latency_ms"]
                picked = [chita_row(objective, dense, data, prof, dm, cm, limit, {**base, "fraction": frac}, wd, save,
                                    args) for objective in args.objectives]
                for name, sweep in sweeps.items():
                    def one(e, name=name, prof=prof, pid=pid):
                        return measure(e["model"], prof, wd / f"{name}-{pid}-{e['ratio']}.onnx", data, args)
                    e = pick(sweep, limit, one) or fastest(sweep, one)
                    trow = {**base, "fraction": frac, "budget_ms": limit, "method": name,
                            "measurements": sum(x["meas"] is not None for x in sweep)}
                    if e is None:
                        trow.update(error="no ratio on the grid meets the budget", met=False)
                        picked.append((trow, None))
                    else:
                        trow.update(ratio=e["ratio"], measured_ms=e["meas"]["latency_ms"],
                                    met=not e.get("over_budget"), error="fastest, over the budget"
                                    if e.get("over_budget") else None,
                                    accuracy=accuracy(e["model"], data.x_test, data.y_test),
                                    params=sum(p.numel() for p in e["model"].parameters()))
                        picked.append((trow, e["model"]))
                    log(f"{trow}")
                if args.finetune_epochs and frac in args.finetune_fractions:
                    ours = [(r, m) for r, m in picked if not r["method"].startswith("tp-")]
                    tps = [(r, m) for r, m in picked if r["method"].startswith("tp-") and m is not None]
                    if args.finetune_tp == "best" and tps:
                        tps = [max(tps, key=lambda rm: rm[0]["accuracy"])]
                    for r, m in ours + tps:
                        if m is not None:
                            r["accuracy_finetuned"] = tune(m, teacher, data, args)
                            log(f"fine-tuned {r['method']} {frac}: {r['accuracy_finetuned']:.2f}")
                rows.extend(r for r, _ in picked)
                if save is not None:
                    with open(save / "rows.jsonl", "a") as fh:
                        for r, _ in picked:
                            fh.write(json.dumps(r, default=str) + "\n")
    print_table(rows, args, time.perf_counter() - t_all)


def finetune_saved(d: Path, dense: nn.Module, teacher: nn.Module | None, data: Dataset, args) -> list[dict[str, Any]]:
    """The rows a ``--save-dir`` run kept, each model rebuilt (chita-edge's checkpoint replayed by ``load_model``;
    Torch-Pruning's setting re-run at its ratio: deterministic, and its one-shot accuracy is checked against the
    row's) and fine-tuned with ``tune`` where the row is at one of ``--finetune-fractions``."""
    rows = [json.loads(line) for line in (d / "rows.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["profile"] in args.profiles]
    for r in rows:
        if r["method"] == "dense" or r["fraction"] not in args.finetune_fractions \
                or (args.finetune_methods and r["method"] not in args.finetune_methods):
            continue
        tps = [t for t in rows if t["profile"] == r["profile"] and t["fraction"] == r["fraction"]
               and t["method"].startswith("tp-") and t.get("ratio") is not None]
        if r["method"].startswith("tp-") and args.finetune_tp == "best" and tps \
                and r is not max(tps, key=lambda t: t["accuracy"]):
            continue
        if r["method"].startswith("chita-layerwise") and r.get("checkpoint"):
            m = load_model(args.model, r["checkpoint"]).module.eval()
        elif r["method"].startswith("tp-") and r.get("ratio") is not None:
            _, imp, scope = r["method"].split("-")
            m = tp_prune(dense, data, imp, scope == "global", r["ratio"], r["width_multiple"])
        else:
            continue
        again = accuracy(m, data.x_test, data.y_test)
        if abs(again - r["accuracy"]) > 1e-9:
            log(f"{r['method']} {r['profile']} {r['fraction']}: rebuilt one-shot {again:.2f} % != {r['accuracy']:.2f} %")
        r["accuracy_finetuned"] = tune(m, teacher, data, args)
        log(f"fine-tuned {r['method']} {r['profile']} {r['fraction']}: {r['accuracy_finetuned']:.2f}")
    return rows


def landing_cell(land: dict[str, Any] | None) -> str:
    """chita-edge's landing: in the window, or the nearest measured configurations under and over the budget."""
    if not land:
        return "-"
    if land.get("in_window"):
        return "in [0.90, 1.00]"
    side = {k: (land.get(k) or {}).get("judged_over_budget") for k in ("under", "over")}
    return "nearest: " + ", ".join(f"{k} {v:.3f}x" for k, v in side.items() if v is not None) + \
        f"; kept {land.get('chosen')}"


def print_table(rows: list[dict[str, Any]], args, seconds: float) -> None:
    """The one table (Markdown), ratios against the dense model measured in the same run; ``--json-out``."""
    for r in rows:
        if r.get("measured_ms") is not None:
            r["x_dense"] = r["measured_ms"] / r["dense_ms"]
            if r.get("budget_ms"):
                r["x_budget"] = r["measured_ms"] / r["budget_ms"]
                r["upper_x_budget"] = r["x_budget"] * (r.get("band_high") or 1.0)
    ft = f"acc. after {args.finetune_epochs} ep.{' + distill' if args.distill else ''} %"
    cols = ["profile", "budget x dense", "method", "p90 ms", "x dense", "x budget", "upper x budget", "landing",
            "params",
            "acc. one-shot %",
            ft, "acc. - chita (one-shot)"]
    print(f"\n## {args.model}, CIFAR-10 subset: chita-edge vs Torch-Pruning 1.6 (device p90 estimates, dense measured "
          f"in the same run; {seconds:.0f} s, load {'/'.join(f'{v:.1f}' for v in os.getloadavg())})\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        ref = next((c for c in rows if c["profile"] == r["profile"] and c["fraction"] == r["fraction"]
                    and c["method"] == "chita-layerwise"), None)
        diff = (r["accuracy"] - ref["accuracy"]) if ref and r.get("accuracy") is not None and ref.get("accuracy") \
            is not None and r["method"] != "chita-layerwise" else None
        print(f"| {r['profile']} | {r['fraction']:g} | {r['method']}{' r=' + format(r['ratio'], 'g') if 'ratio' in r else ''}"
              f"{' (' + r['error'][:60] + ')' if r.get('error') else ''} | {f(r.get('measured_ms'), '.4g')} | "
              f"{f(r.get('x_dense'), '.3f')} | {f(r.get('x_budget'), '.3f')} | {f(r.get('upper_x_budget'), '.3f')} | "
              f"{landing_cell(r.get('landing'))} | "
              f"{f(r.get('params'), 'd')} | "
              f"{f(r.get('accuracy'), '.2f')} | {f(r.get('accuracy_finetuned'), '.2f')} | {f(diff, '+.2f')} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
