"""``chita-edge prune`` and ``chita-edge eval``: build a job from the flags, run it, render the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chita_edge.budget.config import finetune_config
from chita_edge.cli import ui
from chita_edge.cli.app import app
from chita_edge.devices.gate import pruned_verdicts
from chita_edge.pruning.distributed import launch, launch_rank
from chita_edge.training.finetune import FinetuneConfig
from chita_edge.training.gradual import GradualConfig
from chita_edge.workflows import jobs
from chita_edge.workflows.budget_jobs import raise_if_missed
from chita_edge.workflows.prune import evaluate_model

JSON = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


@app.command("prune")
def prune_cmd(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="zoo:NAME, path/to/file.py:factory, or a torch.export .pt2 file.")],
    data: Annotated[str, typer.Option("--data", help="npz:PATH (x_train,y_train,x_test,y_test) or 'digits'.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the pruned checkpoint.")],
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="Fraction of prunable weights to zero, in [0,1).")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="State dict to load (weights_only=True).")] = None,
    method: Annotated[str | None, typer.Option("--method", help="chita, chita++, bso, magnitude or magnitude-uniform; with --profile: chita-layerwise (default; chita and chita++ are its old names), chita-fisher, l1-uniform or norm-global (default: chita++).")] = None,
    stages: Annotated[int | None, typer.Option("--stages", help="CHITA++ (and block pruning) stages T, cubic schedule (default: 25).")] = None,
    search_stages: Annotated[int | None, typer.Option("--search-stages", help="With --profile: stages of the budget search, each measured (default: 4).")] = None,
    grads: Annotated[int | None, typer.Option("--grads", help="Number of gradient rows n in G (default: 1000).")] = None,
    fisher_batch: Annotated[int | None, typer.Option("--fisher-batch", help="Samples per gradient row m (default: 1).")] = None,
    l2: Annotated[float | None, typer.Option("--l2", help="Ridge term; lambda = l2*n/2 (default: 0.03).")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Solver precision: float64 or float32 (default: float64).")] = None,
    first_order: Annotated[bool | None, typer.Option("--first-order/--no-first-order", help="Include the first-order term a (default: on for chita++, off otherwise).")] = None,
    block_size: Annotated[int | None, typer.Option("--block-size", help="Block mode: per-block solves of this many weights, gradients streamed by groups of blocks in bounded memory (default: 0, off).")] = None,
    block_support: Annotated[str | None, typer.Option("--block-support", help="Block mode's support: saliency (a global threshold over per-block OBS saliencies) or magnitude (the reference code's: the largest |w|) (default: saliency).")] = None,
    memory_gb: Annotated[float | None, typer.Option("--memory-gb", help="Block mode: cap on peak memory (GiB); sets the groups of blocks and passes over the data (default: this process plus half of the free RAM). With --profile --method chita-fisher: cap on its gradient matrix G (default: half of the free RAM).")] = None,
    layer_floor: Annotated[float | None, typer.Option("--layer-floor", help="Unstructured magnitude, chita, chita++: every layer keeps at least ceil(F x (1 - sparsity) x its size) weights, so that the global threshold never empties a layer; 0 turns it off (default: 0.1).")] = None,
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
    objective: Annotated[str | None, typer.Option("--objective", help="Budget mode: what each pruning step costs: output (the one-shot divergence of the outputs: the most accurate model as pruned), weights (the weights removed: the most capacity for fine-tuning), auto (default: weights with --finetune-epochs, else output).")] = None,
    gradual: Annotated[bool, typer.Option("--gradual", help="Prune in steps (cubic schedule from --gradual-start) with masked fine-tuning between them.")] = False,
    gradual_start: Annotated[float, typer.Option("--gradual-start", help="--gradual: sparsity of the first step (the paper: 0.5; MLPNet at 98 % did best from 0.8, docs/finetune.md).")] = 0.5,
    epochs: Annotated[int, typer.Option("--epochs", help="--gradual: fine-tuning epochs in all.")] = 5,
    prune_every: Annotated[int, typer.Option("--prune-every", help="--gradual: a pruning step every K epochs.")] = 1,
    lr: Annotated[float | None, typer.Option("--lr", help="--gradual or --finetune-epochs: fine-tuning learning rate (SGD, cosine; default: 0.05 with --gradual, the budget recipe's with --finetune-epochs, docs/finetune.md).")] = None,
    finetune_epochs: Annotated[int | None, typer.Option("--finetune-epochs", help="With --profile: fine-tune the pruned model this many epochs (SGD, cosine, --lr) before writing it; the output gives the accuracy before and after.")] = None,
    distill: Annotated[bool, typer.Option("--distill", help="With --finetune-epochs: distil from the dense model (the teacher).")] = False,
    prefer: Annotated[str, typer.Option("--prefer", help="With --profile, when no width lands in [0.90, 1.00] x the budget: under (the nearest that meets it) or nearest (the nearest either side, even over it).")] = "under",
    uncertain: Annotated[str, typer.Option("--uncertain", help="With --profile, as check's --uncertain: fail (default) lands the upper edge of the device estimate's error band in [0.90, 1.00] x the budget, so that check passes; pass lands the point estimate there and accepts a budget inside the band.")] = "fail",
    check_repeats: Annotated[int, typer.Option("--check-repeats", help="With --profile: how the file will be checked (check --repeats K, the median of K benchmark processes); a round meets the latency budget only where such a check would pass too. 1 (default): a single process, whose noise keeps a sub-millisecond model ~15 % under the budget on a shared host; 3 lands nearer.")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="--gradual or block mode: continue from the state saved beside --out.")] = False,
    device: Annotated[str, typer.Option("--device", help="Where gradients, solves and the re-fit run: cpu, cuda, or auto (cuda when PyTorch sees a GPU); unstructured pruning.")] = "cpu",
    workers: Annotated[int | None, typer.Option("--workers", help="Start N processes with torchrun (torch.distributed): gradient rows and block solves are split over them and gathered; the same result as one process, written by rank 0.")] = None,
    json_out: JSON = False,
) -> None:
    """Prune MODEL to a sparsity with CHITA or a baseline, or to a device budget (--profile), and write a
    checkpoint that reloads. Settings not given come from chita_edge.pruning.defaults (the same for the Python
    API and pipeline.yaml); the JSON output records each value and where it came from.

    Example: chita-edge prune zoo:mlpnet --weights mlpnet.pt --data npz:mnist.npz --sparsity 0.95 --out p.pt
    """
    if workers is not None:  # the same command in N processes under torchrun; their exit code is this one's
        raise typer.Exit(launch("chita_edge.cli", _argv_without(ctx, "workers"), workers))
    jobs.set_threads(threads)
    flags = {"sparsity": sparsity, "method": method, "stages": stages, "search_stages": search_stages,
             "n_grads": grads, "fisher_batch": fisher_batch, "l2": l2, "dtype": dtype, "first_order": first_order,
             "block_size": block_size, "block_support": block_support, "layer_floor": layer_floor, "seed": seed, "refit": refit,
             "structure": None if structure == "auto" else structure, "width_multiple": width_multiple,
             "depth": depth, "objective": objective}
    gcfg = None
    if gradual:
        gcfg = GradualConfig(epochs=epochs, prune_every=prune_every, start_sparsity=gradual_start,
                             finetune=FinetuneConfig(lr=0.05 if lr is None else lr, seed=seed or 0))
    budgets = {k: v for k, v in (("latency_ms", latency_ms), ("memory_mb", memory_mb), ("file_mb", file_mb))
               if v is not None}
    job = jobs.PruneJob(model=model, data=data, out=out, weights=weights, profile=profile, budgets=budgets,
                        export=export, gradual=gcfg, resume=resume, prefer=prefer, uncertain=uncertain,
                        check_repeats=check_repeats,
                        distill=distill,
                        finetune=None if finetune_epochs is None else finetune_config(finetune_epochs, lr=lr,
                                                                                      seed=seed or 0),
                        device=device, memory_gb=memory_gb,
                        settings=jobs.prune_settings(flags=flags, profile=profile))
    if launch_rank() != 0:  # one of torchrun's other processes: it prunes with rank 0, which alone reports
        jobs.run_prune(job)
        return
    with ui.progress() as cb:
        result = jobs.run_prune(job, progress=cb, announce=ui.info)
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
        raised = (r.get("layer_floor") or {}).get("raised") or {}
        if raised:
            ui.info(f"layer floor ({r['layer_floor']['floor']}) raised: "
                    + ", ".join(f"{name} +{n}" for name, n in raised.items()))
    if result.structure == "channel":
        raise_if_missed(r)


def _argv_without(ctx: typer.Context, skip: str) -> list[str]:
    """The command's arguments as given on the command line, less the option ``skip``."""
    args = [str(ctx.info_name)]
    for prm in ctx.command.params:
        value = ctx.params.get(prm.name)
        if prm.name == skip or ctx.get_parameter_source(prm.name).name != "COMMANDLINE":
            continue
        if prm.param_type_name == "argument":
            args.append(str(value))
        elif getattr(prm, "is_flag", False) or getattr(prm, "is_bool_flag", False):
            opts = prm.opts if value else prm.secondary_opts
            args += opts[:1]
        else:
            args += [prm.opts[0], str(value)]
    return args


def _render_budget(result: dict, out: Path) -> None:
    # check's rule: the same budgets, percentile, no slack, the error band (and --uncertain)
    rows = pruned_verdicts(result, result.get("uncertain", "fail"))
    what = result["method"] + (f", objective {result['objective']}" if result.get("objective") else "")
    ui.table(f"{result['model']} on {result['profile']} ({what})",
             ["budget", "limit", "predicted", "value", "source", "band", "x budget", "upper x budget", "verdict"],
             [[c["budget"], f"{c['limit']:.4g} {c['unit']}", f"{c['predicted']:.4g}",
               "-" if c["measured"] is None else f"{c['measured']:.4g}", c["source"],
               "-" if c["low"] is None else f"{c['low']:.4g}–{c['high']:.4g}",
               "-" if c["measured"] is None else f"{c['measured'] / c['limit']:.3f}",
               "-" if c["measured"] is None else f"{(c['high'] or c['measured']) / c['limit']:.3f}",
               c["verdict"] if c["verdict"] != "uncertain" else "UNCERTAIN"] for c in rows])
    widths = ", ".join(f"{r['group']} {r['width']}/{r['of']}" for r in result["layers"])
    acc = "" if result["accuracy"] is None else (f"accuracy {result['accuracy']:.2f} % (dense "
                                                 f"{result['dense_accuracy']:.2f} %), ")
    ui.info(f"widths: {widths}")
    land = result.get("landing") or {}
    if land.get("note"):
        def side(k: str) -> str:
            r = land.get(k)
            return "none" if not r else (f"{r['measured_over_budget']:.3f} x the budget (band's upper edge "
                                         f"{r['upper_edge_over_budget']:.3f} x)")
        ui.info(f"{land['note']}: under {side('under')}, over {side('over')}; kept the {land.get('chosen')} one")
    ft = result.get("finetune")
    if ft:
        ui.info(f"fine-tuned {ft['epochs']} epochs{' with distillation' if ft['distill'] else ''}: accuracy "
                f"{ft['accuracy_before']:.2f} % -> {ft['accuracy_after']:.2f} %")
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
