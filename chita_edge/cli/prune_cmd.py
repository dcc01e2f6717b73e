"""``chita-edge prune`` and ``chita-edge eval``: build a config, call the library, render the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chita_edge import api
from chita_edge.cli import ui
from chita_edge.cli.app import app

JSON = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


@app.command("prune")
def prune_cmd(
    model: Annotated[str, typer.Argument(help="zoo:NAME, path/to/file.py:factory, or a torch.export .pt2 file.")],
    data: Annotated[str, typer.Option("--data", help="npz:PATH (x_train,y_train,x_test,y_test) or 'digits'.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the pruned checkpoint.")],
    sparsity: Annotated[float, typer.Option("--sparsity", help="Fraction of prunable weights to zero, in [0,1).")],
    weights: Annotated[Path | None, typer.Option("--weights", help="State dict to load (weights_only=True).")] = None,
    method: Annotated[str, typer.Option("--method", help="chita, chita++, bso, magnitude or magnitude-uniform.")] = "chita++",
    stages: Annotated[int, typer.Option("--stages", help="CHITA++ stages T (cubic schedule).")] = 15,
    grads: Annotated[int, typer.Option("--grads", help="Number of gradient rows n in G.")] = 1000,
    fisher_batch: Annotated[int, typer.Option("--fisher-batch", help="Samples per gradient row m.")] = 1,
    l2: Annotated[float, typer.Option("--l2", help="Ridge term; lambda = l2*n/2.")] = 1e-3,
    first_order: Annotated[bool, typer.Option("--first-order", help="Include the first-order term a.")] = False,
    block_size: Annotated[int, typer.Option("--block-size", help="Block mode: per-block solves of this many weights (0: off).")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for gradient sampling.")] = 0,
    json_out: JSON = False,
) -> None:
    """Prune MODEL to a sparsity with CHITA or a baseline, and write a checkpoint that reloads.

    Example: chita-edge prune zoo:mlpnet --weights mlpnet.pt --data npz:mnist.npz --sparsity 0.95 --out p.pt
    """
    cfg = api.PruneConfig(sparsity=sparsity, method=method, stages=stages, n_grads=grads, fisher_batch=fisher_batch,
                          l2=l2, first_order=first_order, block_size=block_size, seed=seed)
    with ui.progress() as cb:
        result = api.prune_checkpoint(model, weights, data, cfg, out, progress=cb)
    if json_out:
        ui.print_json(result)
    else:
        ui.info(f"{result['method']}: sparsity {result['sparsity']:.4f}, accuracy {result['accuracy']:.2f} % "
                f"(dense {result['dense_accuracy']:.2f} %), {result['timings']['total_s']:.1f} s -> {out}")


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
