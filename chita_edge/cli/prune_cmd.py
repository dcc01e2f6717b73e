"""``chita-edge prune`` and ``chita-edge eval``: build a job from the flags, run it, render the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chita_edge.cli import ui
from chita_edge.cli.app import app
from chita_edge.devices.gate import pruned_verdicts
from chita_edge.training.finetune import FinetuneConfig
from chita_edge.training.gradual import GradualConfig
from chita_edge.workflows import jobs
from chita_edge.workflows.budget_jobs import raise_if_missed
from chita_edge.workflows.prune import evaluate_model

JSON = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


@app.command("prune")
def prune_cmd(
    model: Annotated[str, typer.Argument(help="zoo:NAME, path/to/file.py:factory, or a torch.export .pt2 file.")],
    data: Annotated[str, typer.Option("--data", help="npz:PATH (x_train,y_train,x_test,y_test) or 'digits'.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the pruned checkpoint.")],
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="Fraction of prunable weights to zero, in [0,1).")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="State dict to load (weights_only=True).")] = None,
    method: Annotated[str | None, typer.Option("--method", help="chita, chita++, bso, magnitude or magnitude-uniform; with --profile: chita (= chita++), chita-fisher, l1-uniform or norm-global (default: chita++).")] = None,
    stages: Annotated[int | None, typer.Option("--stages", help="CHITA++ (and block pruning) stages T, cubic schedule (default: 25).")] = None,
    search_stages: Annotated[int | None, typer.Option("--search-stages", help="With --profile: stages of the budget search, each measured (default: 4).")] = None,
    grads: Annotated[int | None, typer.Option("--grads", help="Number of gradient rows n in G (default: 1000).")] = None,
    fisher_batch: Annotated[int | None, typer.Option("--fisher-batch", help="Samples per gradient row m (default: 1).")] = None,
    l2: Annotated[float | None, typer.Option("--l2", help="Ridge term; lambda = l2*n/2 (default: 0.03).")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Solver precision: float64 or float32 (default: float64).")] = None,
    first_order: Annotated[bool | None, typer.Option("--first-order/--no-first-order", help="Include the first-order term a (default: on for chita++, off otherwise).")] = None,
    block_size: Annotated[int | None, typer.Option("--block-size", help="Block mode: per-block solves of this many weights (default: 0, off).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for gradient sampling (default: 0).")] = None,
    refit: Annotated[bool | None, typer.Option("--refit/--no-refit", help="Layer-wise re-fit of the pruned layers to the dense outputs after the last stage (default: on for chita, chita++, bso).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="PyTorch threads (default: PyTorch's; 1 is often faster on a busy machine).")] = None,
    profile: Annotated[str | None, typer.Option("--profile", help="Device profile id or YAML: prune to its budgets (structured).")] = None,
    latency_ms: Annotated[float | None, typer.Option("--latency-ms", help="Latency budget (ms, at the profile's percentile); overrides the profile.")] = None,
    memory_mb: Annotated[float | None, typer.Option("--memory-mb", help="Peak memory budget (MB); overrides the profile.")] = None,
    file_mb: Annotated[float | None, typer.Option("--file-mb", help="Model file budget (MB); overrides the profile.")] = None,
    structure: Annotated[str | None, typer.Option("--structure", help="unstructured, block (1x4, Linear weights) or channel (to --profile's budgets); default: channel with --profile, else unstructured.")] = None,
    width_multiple: Annotated[int | None, typer.Option("--width-multiple", help="Round channel counts to this multiple (default: the profile's).")] = None,
    export: Annotated[Path | None, typer.Option("--export", help="Budget mode: also keep the verified ONNX file here.")] = None,
    depth: Annotated[bool | None, typer.Option("--depth/--no-depth", help="Budget mode: may remove whole residual blocks with an identity shortcut (default: on).")] = None,
    gradual: Annotated[bool, typer.Option("--gradual", help="Prune in steps (cubic schedule from --gradual-start) with masked fine-tuning between them.")] = False,
    gradual_start: Annotated[float, typer.Option("--gradual-start", help="--gradual: sparsity of the first step (the paper: 0.5; MLPNet at 98 % did best from 0.8, docs/finetune.md).")] = 0.5,
    epochs: Annotated[int, typer.Option("--epochs", help="--gradual: fine-tuning epochs in all.")] = 5,
    prune_every: Annotated[int, typer.Option("--prune-every", help="--gradual: a pruning step every K epochs.")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="--gradual: fine-tuning learning rate (SGD, cosine).")] = 0.05,
    resume: Annotated[bool, typer.Option("--resume", help="--gradual: continue from the state saved beside --out.")] = False,
    json_out: JSON = False,
) -> None:
    """Prune MODEL to a sparsity with CHITA or a baseline, or to a device budget (--profile), and write a
    checkpoint that reloads. Settings not given come from chita_edge.pruning.defaults (the same for the Python
    API and pipeline.yaml); the JSON output records each value and where it came from.

    Example: chita-edge prune zoo:mlpnet --weights mlpnet.pt --data npz:mnist.npz --sparsity 0.95 --out p.pt
    """
    jobs.set_threads(threads)
    flags = {"sparsity": sparsity, "method": method, "stages": stages, "search_stages": search_stages,
             "n_grads": grads, "fisher_batch": fisher_batch, "l2": l2, "dtype": dtype, "first_order": first_order,
             "block_size": block_size, "seed": seed, "refit": refit,
             "structure": None if structure == "auto" else structure, "width_multiple": width_multiple,
             "depth": depth}
    gcfg = None
    if gradual:
        gcfg = GradualConfig(epochs=epochs, prune_every=prune_every, start_sparsity=gradual_start,
                             finetune=FinetuneConfig(lr=lr, seed=seed or 0))
    budgets = {k: v for k, v in (("latency_ms", latency_ms), ("memory_mb", memory_mb), ("file_mb", file_mb))
               if v is not None}
    job = jobs.PruneJob(model=model, data=data, out=out, weights=weights, profile=profile, budgets=budgets,
                        export=export, gradual=gcfg, resume=resume,
                        settings=jobs.prune_settings(flags=flags, profile=profile))
    with ui.progress() as cb:
        result = jobs.run_prune(job, progress=cb)
    r = result.to_dict()
    if json_out:
        ui.print_json(r)
    elif result.structure == "channel":
        _render_budget(r, out)
    elif result.structure == "block":
        ui.info(f"1x4 blocks: sparsity {r['sparsity']:.4f} of the Linear weights, accuracy "
                f"{r['accuracy']:.2f} % (dense {r['dense_accuracy']:.2f} %) -> {out}")
    else:
        ui.info(f"{r['method']}: sparsity {r['sparsity']:.4f}, accuracy {r['accuracy']:.2f} % "
                f"(dense {r['dense_accuracy']:.2f} %), {r['timings']['total_s']:.1f} s -> {out}")
        if r.get("note"):
            ui.info(f"note: {r['note']}")
    if result.structure == "channel":
        raise_if_missed(r)


def _render_budget(result: dict, out: Path) -> None:
    rows = pruned_verdicts(result)  # check's rule: the same budgets, percentile, no slack, the error band
    ui.table(f"{result['model']} on {result['profile']} ({result['method']})",
             ["budget", "limit", "predicted", "value", "source", "band", "verdict"],
             [[c["budget"], f"{c['limit']:.4g} {c['unit']}", f"{c['predicted']:.4g}",
               "-" if c["measured"] is None else f"{c['measured']:.4g}", c["source"],
               "-" if c["low"] is None else f"{c['low']:.4g}–{c['high']:.4g}",
               c["verdict"] if c["verdict"] != "uncertain" else "UNCERTAIN"] for c in rows])
    widths = ", ".join(f"{r['group']} {r['width']}/{r['of']}" for r in result["layers"])
    acc = "" if result["accuracy"] is None else (f"accuracy {result['accuracy']:.2f} % (dense "
                                                 f"{result['dense_accuracy']:.2f} %), ")
    ui.info(f"widths: {widths}")
    ui.info(f"{acc}{result['params_after']} of {result['params_before']} parameters -> {out}")


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="zoo:NAME, path/to/file.py:factory, .pt2, or 'ckpt' to take it from --weights.")],
    data: Annotated[str, typer.Option("--data", help="npz:PATH or 'digits'.")],
    weights: Annotated[Path | None, typer.Option("--weights", help="State dict or chita-edge checkpoint.")] = None,
    json_out: JSON = False,
) -> None:
    """Test-set top-1 accuracy and sparsity of a model.

    Example: chita-edge eval zoo:resnet20 --weights resnet20.pt --data npz:cifar10.npz --json
    """
    result = evaluate_model(model, weights, data)
    if json_out:
        ui.print_json(result)
    else:
        ui.info(f"accuracy {result['accuracy']:.2f} % on {result['test_examples']} test examples; "
                f"sparsity {result['sparsity']:.4f}")
