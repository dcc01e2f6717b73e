"""``chita-edge finetune``: masked fine-tuning of a pruned checkpoint (zeros stay zero), resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from chita_edge.cli import ui
from chita_edge.cli.app import app
from chita_edge.core.errors import BadInput
from chita_edge.training.finetune import FinetuneConfig
from chita_edge.workflows import jobs


def default_out(pruned: Path) -> Path:
    return pruned.with_name(f"{pruned.stem}.ft{pruned.suffix or '.pt'}")


@app.command("finetune")
def finetune_cmd(
    pruned: Annotated[Path, typer.Argument(help="A pruned chita-edge checkpoint (from `chita-edge prune`).")],
    data: Annotated[str, typer.Option("--data", help="npz:PATH (x_train,y_train,x_test,y_test) or 'digits'.")],
    model: Annotated[str | None, typer.Option("--model", help="Model spec (zoo:NAME, file.py:factory), only when "
                                                              "PRUNED is a plain state dict.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs of masked fine-tuning (>= 1).")] = 5,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate, cosine down to 0 (adam: try 0.001-0.01).")] = 0.05,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch size.")] = 128,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd (momentum 0.9, Nesterov) or adam.")] = "sgd",
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="L2 weight decay.")] = 0.0,
    distill: Annotated[bool, typer.Option("--distill", help="Distil from the dense model the checkpoint was "
                                                            "pruned from (or --teacher).")] = False,
    teacher: Annotated[Path | None, typer.Option("--teacher", help="Dense weights to distil from (default: the "
                                                                   "checkpoint's recorded source).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Distillation temperature T.")] = 4.0,
    distill_weight: Annotated[float, typer.Option("--distill-weight", help="Share of the distillation loss, "
                                                                           "in [0,1].")] = 0.5,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment", help="Random crop + flip (default: on "
                                                                               "for 3-channel images).")] = None,
    mix: Annotated[str, typer.Option("--mix", help="none, mixup or cutmix: mix each augmented batch with a "
                                                   "permutation of itself (with --distill the teacher relabels "
                                                   "the mixed image: function matching).")] = "none",
    mix_alpha: Annotated[float, typer.Option("--mix-alpha", help="With --mix: the mixing share is drawn from "
                                                                 "Beta(a, a).")] = 1.0,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up of the learning rate "
                                                                         "over this many epochs first (at most "
                                                                         "--epochs).")] = 0.0,
    head_ridge: Annotated[float | None, typer.Option("--head-ridge", help="Ridge re-fit of the output Linear to "
                                                                          "its own outputs before training (damp "
                                                                          "relative to its features' mean square; "
                                                                          "0: off; default: 0.3 for a checkpoint "
                                                                          "pruned to a budget, else off).")] = None,
    hints: Annotated[float | None, typer.Option("--hints", help="With --distill: weight of the feature-map hints "
                                                               "(the teacher's stage outputs, FitNets) in the loss "
                                                               "(0: off; default: 30 for a checkpoint pruned to a "
                                                               "budget, else off).")] = None,
    bn_batches: Annotated[int, typer.Option("--bn-batches", help="Batches for re-estimating BatchNorm "
                                                                 "statistics at the end (0: off).")] = 100,
    qat: Annotated[bool, typer.Option("--qat", help="Quantisation-aware: train through simulated int8 weights "
                                                    "and activations as `export --quantize int8` quantises "
                                                    "(BatchNorm frozen); start from a fine-tuned model, small "
                                                    "--lr, 1-3 epochs.")] = False,
    qat_agreement: Annotated[float, typer.Option("--qat-agreement", help="With --qat: also train the float "
                                                                         "model and add this weight x "
                                                                         "KL(float || int8), so that the int8 "
                                                                         "file agrees with it (0: off).")] = 0.0,
    qat_dither: Annotated[bool, typer.Option("--qat-dither", help="With --qat: round activations on randomly "
                                                                  "shifted int8 grids while training (robust to "
                                                                  "the runtimes' own rounding).")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Output checkpoint (default: PRUNED.ft.pt; never "
                                                           "the input).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUT.state.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order and augmentation.")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="PyTorch threads (default: PyTorch's; 1 is "
                                                                   "often faster on a busy machine).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")] = False,
) -> None:
    """Fine-tune a pruned checkpoint with its sparsity pattern kept (SGD/Adam, cosine lr, optional distillation).

    The training state is saved after every epoch to OUT.state; Ctrl-C saves it too, and --resume continues.

    Example: chita-edge finetune p.pt --data npz:mnist.npz --epochs 5 --lr 0.1 --out p.ft.pt
    """
    jobs.set_threads(threads)
    target = out or default_out(pruned)
    if (qat_agreement or qat_dither) and not qat:
        raise BadInput("--qat-agreement and --qat-dither are only used with --qat")
    if teacher is not None and not distill:
        raise BadInput("--teacher is only used with --distill")
    cfg = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                         weight_decay=weight_decay, augment=augment, mix=mix, mix_alpha=mix_alpha,
                         warmup_epochs=warmup_epochs,
                         head_ridge=head_ridge, hints=hints, temperature=temperature,
                         distill_weight=distill_weight, bn_batches=bn_batches, seed=seed, qat=qat,
                         qat_agreement=qat_agreement, qat_dither=qat_dither)
    cfg.validate()

    def on_epoch(rec: dict[str, Any]) -> None:
        if not json_out:
            test = f", test {rec['test_accuracy']:.2f} %" if rec.get("test_accuracy") is not None else ""
            if rec.get("int8_test_accuracy") is not None:
                test += f" (simulated int8 {rec['int8_test_accuracy']:.2f} %)"
            ui.info(f"epoch {rec['epoch']}/{epochs}: loss {rec['loss']:.4f}, train {rec['train_accuracy']:.2f} %"
                    f"{test}, lr {rec['lr']:.2e}, {rec['seconds']:.1f} s")

    with ui.progress() as cb:
        job = jobs.FinetuneJob(pruned=pruned, data=data, out=target, config=cfg, model=model, distill=distill,
                               teacher=teacher, resume=resume)
        result = jobs.run_finetune(job, progress=cb, on_epoch=on_epoch).to_dict()
    if json_out:
        ui.print_json(result)
    else:
        ui.info(f"fine-tuned {result['epochs']} epochs: accuracy {result['initial_accuracy']:.2f} % -> "
                f"{result['accuracy']:.2f} %, sparsity {result['sparsity']:.4f} kept -> {result['out']}")
        if result.get("qat"):
            ui.info(f"QAT: simulated int8 accuracy {result['qat']['initial_int8_accuracy']:.2f} % -> "
                    f"{result['qat']['int8_accuracy']:.2f} % ({len(result['qat']['points'])} activation tensors)")

