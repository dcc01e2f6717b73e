"""``chita-edge prune`` and ``chita-edge eval``: build a config, call the library, render the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chita_edge.budget import search as budget
from chita_edge.cli import ui
from chita_edge.cli.app import app
from chita_edge.core.errors import BadInput
from chita_edge.workflows import jobs as api

JSON = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


@app.command("prune")
def prune_cmd(
    model: Annotated[str, typer.Argument(help="zoo:NAME, path/to/file.py:factory, or a torch.export .pt2 file.")],
    data: Annotated[str, typer.Option("--data", help="npz:PATH (x_train,y_train,x_test,y_test) or 'digits'.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the pruned checkpoint.")],
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="Fraction of prunable weights to zero, in [0,1).")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="State dict to load (weights_only=True).")] = None,
    method: Annotated[str, typer.Option("--method", help="chita, chita++, bso, magnitude or magnitude-uniform.")] = "chita++",
    stages: Annotated[int, typer.Option("--stages", help="CHITA++ stages T (cubic schedule).")] = 25,
    grads: Annotated[int, typer.Option("--grads", help="Number of gradient rows n in G.")] = 1000,
    fisher_batch: Annotated[int, typer.Option("--fisher-batch", help="Samples per gradient row m.")] = 1,
    l2: Annotated[float, typer.Option("--l2", help="Ridge term; lambda = l2*n/2.")] = 0.03,
    first_order: Annotated[bool | None, typer.Option("--first-order/--no-first-order", help="Include the first-order term a (default: on for chita++, off otherwise).")] = None,
    block_size: Annotated[int, typer.Option("--block-size", help="Block mode: per-block solves of this many weights (0: off).")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for gradient sampling.")] = 0,
    refit: Annotated[bool | None, typer.Option("--refit/--no-refit", help="Layer-wise re-fit of the pruned layers to the dense outputs after the last stage (default: on for chita, chita++, bso).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="PyTorch threads (default: PyTorch's; 1 is often faster on a busy machine).")] = None,
    profile: Annotated[str | None, typer.Option("--profile", help="Device profile id or YAML: prune to its budgets (structured).")] = None,
    latency_ms: Annotated[float | None, typer.Option("--latency-ms", help="Latency budget (ms, at the profile's percentile); overrides the profile.")] = None,
    memory_mb: Annotated[float | None, typer.Option("--memory-mb", help="Peak memory budget (MB); overrides the profile.")] = None,
    file_mb: Annotated[float | None, typer.Option("--file-mb", help="Model file budget (MB); overrides the profile.")] = None,
    structure: Annotated[str | None, typer.Option("--structure", help="auto, channel, block or unstructured (budget mode: channel).")] = None,
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
    checkpoint that reloads.

    Example: chita-edge prune zoo:mlpnet --weights mlpnet.pt --data npz:mnist.npz --sparsity 0.95 --out p.pt
    """
    api.set_threads(threads)
    if profile is not None or structure == "channel":
        _prune_budget(model, data, out, weights, profile, latency_ms, memory_mb, file_mb, structure or "auto",
                      width_multiple, export, stages, grads, seed, json_out, depth)
        return
    if sparsity is None:
        raise BadInput("--sparsity is required (or give --profile to prune to a device budget)")
    if structure == "block":
        bcfg = budget.BlockConfig(sparsity=sparsity, n_grads=grads, fisher_batch=fisher_batch, l2=l2, seed=seed,
                                  stages=stages if stages <= 8 else budget.BlockConfig(sparsity=sparsity).stages)
        with ui.progress() as cb:
            result = budget.prune_blocks_checkpoint(model, weights, data, bcfg, out, progress=cb)
        if json_out:
            ui.print_json(result)
        else:
            ui.info(f"1x4 blocks: sparsity {result['sparsity']:.4f} of the Linear weights, accuracy "
                    f"{result['accuracy']:.2f} % (dense {result['dense_accuracy']:.2f} %) -> {out}")
        return
    if structure in ("auto", "unstructured"):
        structure = None
    if any(v is not None for v in (latency_ms, memory_mb, file_mb, width_multiple, export, structure, depth)):
        raise BadInput("--latency-ms, --memory-mb, --file-mb, --width-multiple, --export and --depth need --profile")
    cfg = api.PruneConfig(sparsity=sparsity, method=method, stages=stages, n_grads=grads, fisher_batch=fisher_batch,
                          l2=l2, first_order=first_order, block_size=block_size, seed=seed, layerwise_refit=refit)
    gcfg = None
    if gradual:
        from chita_edge.training.finetune import FinetuneConfig
        from chita_edge.training.gradual import GradualConfig

        gcfg = GradualConfig(epochs=epochs, prune_every=prune_every, start_sparsity=gradual_start,
                             finetune=FinetuneConfig(lr=lr, seed=seed))
    with ui.progress() as cb:
        result = api.prune_checkpoint(model, weights, data, cfg, out, progress=cb, gradual=gcfg, resume=resume)
    if json_out:
        ui.print_json(result)
    else:
        ui.info(f"{result['method']}: sparsity {result['sparsity']:.4f}, accuracy {result['accuracy']:.2f} % "
                f"(dense {result['dense_accuracy']:.2f} %), {result['timings']['total_s']:.1f} s -> {out}")


def _prune_budget(model: str, data: str, out: Path, weights: Path | None, profile: str | None,
                  latency_ms: float | None, memory_mb: float | None, file_mb: float | None, structure: str,
                  width_multiple: int | None, export: Path | None, stages: int, grads: int, seed: int,
                  json_out: bool, depth: bool | None = None) -> None:
    if profile is None:
        raise BadInput(f"--structure {structure}: structured pruning prunes to a device budget; give --profile "
                       "(e.g. --profile phone-mid-sd670, with --latency-ms to override its budget)")
    # --stages defaults to CHITA++'s long schedule; the budget search takes at most 8 (its own default: 4)
    cfg = budget.BudgetConfig(structure=structure, width_multiple=width_multiple,
                              stages=stages if stages <= 8 else budget.BudgetConfig().stages, n_grads=grads, seed=seed,
                              depth=budget.BudgetConfig().depth if depth is None else depth)
    with ui.progress() as cb:
        result = budget.prune_budget_checkpoint(model, weights, data, profile=profile, out=out, cfg=cfg,
                                                latency_ms=latency_ms, memory_mb=memory_mb, file_mb=file_mb,
                                                export=export, progress=cb)
    if json_out:
        ui.print_json(result)
    else:
        ui.table(f"{result['model']} on {result['profile']} ({result['method']})",
                 ["budget", "limit", "predicted", "measured", "met"],
                 [[c["budget"], f"{c['limit']:.4g} {c['unit']}", f"{c['predicted']:.4g}",
                   "-" if c["measured"] is None else f"{c['measured']:.4g}", "yes" if c["met"] else "NO"]
                  for c in result["checks"]])
        widths = ", ".join(f"{r['group']} {r['width']}/{r['of']}" for r in result["layers"])
        acc = "" if result["accuracy"] is None else (f"accuracy {result['accuracy']:.2f} % (dense "
                                                     f"{result['dense_accuracy']:.2f} %), ")
        ui.info(f"widths: {widths}")
        ui.info(f"{acc}{result['params_after']} of {result['params_before']} parameters -> {out}")
    budget.raise_if_missed(result)


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
    result = api.evaluate_model(model, weights, data)
    if json_out:
        ui.print_json(result)
    else:
        ui.info(f"accuracy {result['accuracy']:.2f} % on {result['test_examples']} test examples; "
                f"sparsity {result['sparsity']:.4f}")
