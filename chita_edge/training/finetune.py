"""Masked fine-tuning: train a pruned model without reviving what pruning removed.

One verb, ``finetune(model, data, FinetuneConfig) -> FinetuneReport``:

1. The masks are the exact zeros of the prunable weights (or given): ``mask[name]`` is True where a weight may live.
2. Each step: loss = (1 - alpha) CE(student, y) + alpha T^2 KL(softmax(teacher/T) || softmax(student/T)) when a
   teacher (the dense model) is given, else CE (with ``cfg.mix``: mixup or CutMix of the augmented batch, which
   the teacher sees too, and the CE split between both labels by the mixing share); gradients of masked entries
   are zeroed, the optimiser (SGD + momentum or Adam) steps, and the weights are multiplied by their masks, so
   zeros stay exactly zero.
3. The learning rate follows a per-step cosine from ``lr`` to ``min_lr`` (or stays constant), after a linear
   warm-up over ``warmup_epochs`` when set.
4. After every epoch the whole training state (model, optimiser, scheduler, RNG, history, masks) is written
   atomically to ``state_path``; SIGINT/SIGTERM finish the current step, write the state and raise
   ``Interrupted``. The data order and the augmentation depend on (seed, epoch, step) only, so a run resumed
   from a state file ends with bit-identical weights to an uninterrupted one.
5. At the end, BatchNorm running statistics are re-estimated on training batches (cumulative average).

With ``cfg.head_ridge`` the output Linear is first re-fitted to its own outputs with a ridge
(``chita_edge.training.head``: a least-squares re-fit after pruning leaves it ill-conditioned, and training
from there at the usual learning rate throws the model away).

With ``cfg.qat`` the forward pass runs through ``chita_edge.training.qat.QATModel``: int8 weights and activations are
simulated where the exporters quantise (straight-through gradients), BatchNorm stays frozen in eval mode and is
not re-estimated at the end (its statistics are what the exporters fold); the model itself stays a plain float
module and the per-epoch history adds the simulated-int8 test accuracy.

The loss's distillation term is ``chita_edge.training.distill``, the augmentation ``chita_edge.training.augment``,
the masks ``chita_edge.training.masks``.

``chita_edge.workflows.finetune.finetune_checkpoint`` is the same on files: a pruned chita-edge checkpoint in, a checkpoint out that keeps the
input's metadata (model spec, structural plan, ...) and adds the fine-tuning record.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput, Interrupted, check_finite, check_seed
from chita_edge.core.evaluate import accuracy
from chita_edge.core.io import atomic_path
from chita_edge.models.zoo import default_prunable
from chita_edge.pruning import batchnorm
from chita_edge.pruning.batchnorm import keyed_generator
from chita_edge.pruning.layers import find_prunable
from chita_edge.training.augment import MIXES, augment_batch, default_augment, mix_batch
from chita_edge.training.distill import FeatureHints, distillation_loss, hard_loss
from chita_edge.training.head import condition_head
from chita_edge.training.masks import _check_masks, apply_masks, masks_from_zeros
from chita_edge.training.qat import QATModel

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
STATE_FORMAT = "chita-edge/finetune-state-v1"
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")
FLAGS = {"lr": "--lr", "weight_decay": "--weight-decay", "temperature": "--temperature",
         "distill_weight": "--distill-weight", "qat_agreement": "--qat-agreement", "warmup_epochs": "--warmup-epochs",
         "head_ridge": "--head-ridge", "mix_alpha": "--mix-alpha", "hints": "--hints"}  # the fields `finetune` sets


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Knobs of one masked fine-tuning run."""

    epochs: int = 5
    lr: float = 0.05
    min_lr: float = 0.0  # end of the cosine schedule
    schedule: str = "cosine"  # cosine (per step) or constant
    warmup_epochs: float = 0.0  # linear warm-up of the learning rate over this many epochs (per step) first
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (momentum) or adam
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    augment: bool | None = None  # random crop (zero padding) + flip; None: on for colour images (default_augment)
    crop_padding: int = 4
    flip: bool = True
    # mixup / cutmix of each (augmented) batch with a permutation of itself, lam ~ Beta(mix_alpha, mix_alpha): the
    # teacher sees the mixed image too (chita_edge.training.augment.mix_batch); "none": off
    mix: str = "none"
    mix_alpha: float = 1.0
    temperature: float = 4.0  # distillation temperature T (used when a teacher is given)
    distill_weight: float = 0.5  # alpha: share of the distillation term in the loss
    # with a teacher: + hints x the feature-map hint loss (chita_edge.training.distill.FeatureHints) at hint_points
    # (None: the stages matched by name and map size), its projections fitted on the first hint_samples images.
    # None: off here, the budget path's recipe where a budget prune made the model and a teacher distils
    # (chita_edge.workflows.finetune.finetune_checkpoint); 0: off
    hints: float | None = None
    hint_points: tuple[str, ...] | None = None
    hint_samples: int = 256
    bn_batches: int = 100  # batches for re-estimating BatchNorm statistics at the end (0: keep them)
    eval_each_epoch: bool = True  # test accuracy in the per-epoch history
    seed: int = 0
    qat: bool = False  # quantisation-aware: train through simulated int8 (chita_edge.training.qat), BatchNorm frozen
    qat_calibration: int = 200  # first training samples whose min/max start the activation ranges (as export)
    qat_ema: float = 0.01  # per-step moving-average weight of the batch min/max in the activation ranges
    qat_agreement: float = 0.0  # > 0: loss = (L(float) + L(int8)) / 2 + this x KL(p_float || p_int8)
    qat_dither: bool = False  # activations rounded on randomly shifted grids while training (chita_edge.training.qat)
    # ridge re-fit of the output Linear to its own outputs before training (chita_edge.training.head), damp relative
    # to its features' mean square; None: off here, the budget path's recipe where a re-fit made the weights
    # (chita_edge.workflows.finetune.finetune_checkpoint); 0: off
    head_ridge: float | None = None

    def validate(self) -> None:
        check_finite(self, FLAGS)
        check_seed(self.seed)
        if self.epochs < 1:
            raise BadInput(f"--epochs {self.epochs}: expected >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BadInput(f"--lr {self.lr}: expected a positive number")
        if not (0 <= self.min_lr <= self.lr):
            raise BadInput(f"min_lr {self.min_lr}: expected 0 <= min_lr <= lr ({self.lr})")
        if self.batch_size < 1:
            raise BadInput(f"--batch-size {self.batch_size}: expected >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise BadInput(f"--optimizer '{self.optimizer}': expected one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise BadInput(f"schedule '{self.schedule}': expected one of {', '.join(SCHEDULES)}")
        if not 0 <= self.momentum < 1:
            raise BadInput(f"momentum {self.momentum}: expected a fraction in [0, 1)")
        if self.weight_decay < 0:
            raise BadInput(f"--weight-decay {self.weight_decay}: expected >= 0")
        if not self.temperature > 0:
            raise BadInput(f"--temperature {self.temperature}: expected > 0")
        if not (0 <= self.distill_weight <= 1):
            raise BadInput(f"--distill-weight {self.distill_weight}: expected a fraction in [0, 1]")
        if self.mix not in MIXES:
            raise BadInput(f"--mix '{self.mix}': expected one of {', '.join(MIXES)}")
        if not self.mix_alpha > 0:
            raise BadInput(f"--mix-alpha {self.mix_alpha}: expected > 0 (the Beta distribution's parameter)")
        if self.crop_padding < 0 or self.bn_batches < 0:
            raise BadInput("crop padding and BatchNorm batches must be >= 0")
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)) or self.warmup_epochs > self.epochs:
            raise BadInput(f"--warmup-epochs {self.warmup_epochs}: expected warm-up epochs in [0, --epochs "
                           f"({self.epochs})]")
        if self.hints is not None and not (self.hints >= 0 and math.isfinite(self.hints)) or self.hint_samples < 1:
            raise BadInput(f"--hints {self.hints}: expected a weight >= 0 (0: off), fitted on >= 1 image")
        if self.hints and self.qat:
            raise BadInput("--hints with --qat: feature hints train the float model; give one of them")
        if self.head_ridge is not None and not (self.head_ridge >= 0 and math.isfinite(self.head_ridge)):
            raise BadInput(f"--head-ridge {self.head_ridge}: expected a head ridge >= 0 (0: off)")
        if self.qat_agreement < 0 or not math.isfinite(self.qat_agreement):
            raise BadInput(f"QAT agreement weight {self.qat_agreement}: expected >= 0")
        if self.qat_calibration < 1 or not (0 <= self.qat_ema <= 1):
            raise BadInput(f"QAT calibration samples {self.qat_calibration} (expected >= 1) / EMA weight "
                           f"{self.qat_ema} (expected in [0, 1])")


@dataclass
class FinetuneReport:
    epochs: int
    initial_accuracy: float  # test accuracy before fine-tuning
    accuracy: float  # test accuracy at the end (after BatchNorm re-estimation)
    sparsity: float  # fraction of masked-out prunable weights
    masked_weights: int
    history: list[dict[str, Any]]
    bn_reestimated: bool
    resumed_from: dict[str, int] | None
    timings: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)
    qat: dict[str, Any] | None = None  # simulated-int8 accuracy before / after, quantisation points (cfg.qat)
    head: dict[str, Any] | None = None  # the output layer's ridge re-fit before training (cfg.head_ridge)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, x: torch.Tensor, *, batches: int, batch_size: int, seed: int,
                         augment: bool = False, crop_padding: int = 4, flip: bool = True) -> bool:
    """Reset every BatchNorm's running statistics and re-estimate them as a cumulative average over ``batches``
    random training batches (train-mode forward), augmented as in training when ``augment`` (the weights were
    trained on augmented batch statistics; clean ones would shift every normalisation). Returns False when
    there is no BatchNorm."""
    def aug(xb: torch.Tensor, b: int) -> torch.Tensor:
        return augment_batch(xb, keyed_generator(seed, -1, b), crop_padding, flip)

    return batchnorm.reestimate_on_random_batches(model, x, batches=batches, batch_size=batch_size, seed=seed,
                                                  transform=aug if augment else None)


class _StopFlag:
    """SIGINT/SIGTERM set a flag (the loop finishes its step, saves and raises); a second SIGINT aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signum = signum
            log.warning("signal %d: finishing the current step and saving the training state", signum)

        for s in old:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _make_optimizer(model: nn.Module, cfg: FinetuneConfig, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    params = [p for m in (model, extra) if m is not None for p in m.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def _make_scheduler(opt: torch.optim.Optimizer, cfg: FinetuneConfig, total_steps: int, steps_per_epoch: int):
    """Per step: a linear warm-up over ``cfg.warmup_epochs`` (from lr / warm-up steps), then constant or a cosine
    from ``lr`` to ``min_lr`` over the remaining steps."""
    warm = min(total_steps - 1, round(cfg.warmup_epochs * steps_per_epoch))
    if warm <= 0:
        if cfg.schedule == "constant":
            return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps), eta_min=cfg.min_lr)
    floor = cfg.min_lr / cfg.lr
    rest = max(1, total_steps - warm)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step - warm, rest) / rest))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _rng_state() -> dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state()}


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a training state (tensors and plain containers) atomically; serialised in memory first, so that a
    full disk surfaces as an OSError of the plain write (BadInput from ``atomic_path``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _load_state(path: Path, cfg: FinetuneConfig, n_train: int) -> dict[str, Any]:
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"{path}: not a readable fine-tuning state file ({type(e).__name__}); "
                       f"remove it to start over") from None
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        raise BadInput(f"{path}: not a chita-edge fine-tuning state file (format {STATE_FORMAT} expected)")
    old = st.get("config", {})
    new = asdict(cfg)
    diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    if diff:
        raise BadInput(f"{path}: written with other settings ({', '.join(diff[:4])}); resume with the same "
                       f"options, or remove the state file to start over")
    if st.get("n_train") != n_train:
        raise BadInput(f"{path}: written for {st.get('n_train')} training examples, the data has {n_train}")
    return st


def _sparsity(masks: dict[str, torch.Tensor]) -> tuple[float, int]:
    total = sum(m.numel() for m in masks.values())
    off = sum(int((~m).sum()) for m in masks.values())
    return (off / total if total else 0.0), off


def finetune(
    model: nn.Module,
    data: Dataset,
    cfg: FinetuneConfig,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] = default_prunable,
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    state_path: str | os.PathLike | None = None,
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> FinetuneReport:
    """Fine-tune ``model`` in place on ``data`` keeping ``masks`` (default: the exact zeros of the prunable
    weights found by ``filter_fn``) at zero.

    ``progress(stage, done, total)``: stage "steps" after every optimiser step, "epochs" after every epoch;
    ``on_epoch(record)`` receives each epoch's history record (loss, train/test accuracy, lr). ``state_path``:
    where the training state is written after every epoch and on interruption; ``resume=True`` continues from
    it. ``should_stop()`` is polled after every step, like SIGINT/SIGTERM: the state is written and
    ``Interrupted`` raised.
    """
    cfg.validate()
    t0 = time.perf_counter()
    x, y = data.x_train, data.y_train
    n = len(x)
    if n == 0:
        raise BadInput("the training set is empty; fine-tuning needs at least one example")
    if masks is None:
        masks = masks_from_zeros(model, find_prunable(model, filter_fn))
    masks = {k: v.detach().clone().bool() for k, v in masks.items()}
    _check_masks(model, masks)
    state_file = Path(state_path) if state_path is not None else None
    if resume and (state_file is None or not state_file.exists()):
        raise BadInput(f"{state_file}: no fine-tuning state to resume from (run without --resume to start)")
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if cfg.hints and teacher is None:  # (None: off here)
        raise BadInput(f"--hints {cfg.hints}: feature hints distil from the dense teacher; give --distill")
    hints = FeatureHints(model, teacher, x[:cfg.hint_samples], cfg.hint_points) if cfg.hints else None

    augment = cfg.augment if cfg.augment is not None else default_augment(data.input_shape)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    opt = _make_optimizer(model, cfg, hints)
    sched = _make_scheduler(opt, cfg, total_steps, steps_per_epoch)
    named = dict(model.named_parameters())
    masked = [(named[k], m) for k, m in masks.items()]

    history: list[dict[str, Any]] = []
    epoch, step = 0, 0
    run = {"loss_sum": 0.0, "correct": 0, "seen": 0}
    resumed_from = None
    rng0 = keyed_generator(cfg.seed, -2).get_state()  # the global RNG (dropout, ...) during training, from the seed
    initial_acc = accuracy(model, data.x_test, data.y_test)
    head = None
    if cfg.head_ridge and not resume:  # after the accuracy before: that is the pruned model's; a resumed run has it
        head = condition_head(model, x, damp=cfg.head_ridge)
    if resume:
        assert state_file is not None
        st = _load_state(state_file, cfg, n)
        saved_masks = st["masks"]
        if set(saved_masks) != set(masks) or any(saved_masks[k].shape != masks[k].shape for k in masks):
            raise BadInput(f"{state_file}: its masks do not fit this model; remove it to start over")
        masks = {k: saved_masks[k].clone() for k in masks}
        masked = [(named[k], m) for k, m in masks.items()]
        model.load_state_dict(st["model"], strict=True)
        if hints is not None:
            hints.load_state_dict(st["hints"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        rng0 = st["rng"]["torch"]
        epoch, step = int(st["epoch"]), int(st["step"])
        history, run = list(st["history"]), dict(st["running"])
        initial_acc = float(st["initial_accuracy"])
        resumed_from = {"epoch": epoch, "step": step}
        log.info("resuming from epoch %d step %d (%s)", epoch, step, state_file)

    def snapshot() -> dict[str, Any]:
        return {"format": STATE_FORMAT, "config": asdict(cfg), "n_train": n, "epoch": epoch, "step": step,
                "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(),
                "masks": masks, "history": history, "running": dict(run), "initial_accuracy": initial_acc,
                **({"hints": hints.state_dict()} if hints is not None else {}),
                **({"qat_ranges": net.ranges()} if cfg.qat else {})}

    stop = _StopFlag()
    apply_masks(model, masks)
    net: nn.Module = model
    qat_info: dict[str, Any] | None = None
    if cfg.qat:

        net = QATModel(model, x[:cfg.qat_calibration], ema=cfg.qat_ema, dither=cfg.qat_dither)
        qat_info = {"points": list(net.points), "calibration": min(n, cfg.qat_calibration), "ema": cfg.qat_ema,
                    "agreement": cfg.qat_agreement, "dither": cfg.qat_dither,
                    "initial_int8_accuracy": accuracy(net, data.x_test, data.y_test)}
        if resume:
            net.load_ranges(st["qat_ranges"])
    with stop.installed(), torch.random.fork_rng(devices=[]), \
            contextlib.closing(hints) if hints is not None else contextlib.nullcontext():  # hooks off at the end
        # the caller's global RNG is left as it was
        torch.set_rng_state(rng0)
        while epoch < cfg.epochs:
            t_epoch = time.perf_counter()
            net.train()
            perm = torch.randperm(n, generator=keyed_generator(cfg.seed, epoch))
            while step < steps_per_epoch:
                idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                xb, yb = x[idx], y[idx]
                g = keyed_generator(cfg.seed, epoch, step)
                if augment:
                    xb = augment_batch(xb, g, cfg.crop_padding, cfg.flip)
                mix = None
                if cfg.mix != "none":  # after the crop + flip, from the same generator: (perm, lam)
                    xb, perm_b, lam = mix_batch(xb, g, cfg.mix, cfg.mix_alpha)
                    mix = (perm_b, lam)
                out = net(xb)
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(xb)
                    loss = distillation_loss(out, t_out, yb, cfg.temperature, cfg.distill_weight, mix)
                    if hints is not None:
                        loss = loss + cfg.hints * hints.loss()
                else:
                    loss = hard_loss(out, yb, mix)
                if cfg.qat and cfg.qat_agreement > 0:  # the float model is the reference the int8 file must match
                    out_f = model(xb)
                    loss_f = (hard_loss(out_f, yb, mix) if t_out is None else
                              distillation_loss(out_f, t_out, yb, cfg.temperature, cfg.distill_weight, mix))
                    kl = F.kl_div(F.log_softmax(out, 1), F.log_softmax(out_f, 1), log_target=True,
                                  reduction="batchmean")
                    loss = 0.5 * (loss + loss_f) + cfg.qat_agreement * kl
                if not torch.isfinite(loss):
                    raise BadInput(f"the loss became {float(loss)} at epoch {epoch + 1} step {step + 1}; "
                                   f"lower --lr (now {cfg.lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p, m in masked:
                    if p.grad is not None:
                        p.grad.mul_(m)
                opt.step()
                sched.step()
                apply_masks(model, masks)
                run["loss_sum"] += float(loss.detach()) * len(idx)
                run["correct"] += int((out.detach().argmax(1) == yb).sum())
                run["seen"] += len(idx)
                step += 1
                if progress:
                    progress("steps", epoch * steps_per_epoch + step, total_steps)
                if stop() or (should_stop is not None and should_stop()):
                    if state_file is not None:
                        save_state(state_file, snapshot())
                    where = (f"; state saved to {state_file} (`chita-edge finetune ... --resume`, or `chita-edge run` "
                             "of the same pipeline, continues from it)") if state_file else ""
                    raise Interrupted(f"fine-tuning interrupted at epoch {epoch + 1} step {step}{where}")
            rec = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "loss": run["loss_sum"] / run["seen"],
                   "train_accuracy": 100.0 * run["correct"] / run["seen"],
                   "test_accuracy": accuracy(model, data.x_test, data.y_test) if cfg.eval_each_epoch else None,
                   "seconds": time.perf_counter() - t_epoch}
            if cfg.qat:
                rec["int8_test_accuracy"] = accuracy(net, data.x_test, data.y_test) if cfg.eval_each_epoch else None
            history.append(rec)
            epoch, step = epoch + 1, 0
            run = {"loss_sum": 0.0, "correct": 0, "seen": 0}
            if state_file is not None:
                save_state(state_file, snapshot())
            log.info("epoch %d/%d loss %.4f train %.2f %% test %s", epoch, cfg.epochs, rec["loss"],
                     rec["train_accuracy"], rec["test_accuracy"])
            if on_epoch:
                on_epoch(dict(rec))
            if progress:
                progress("epochs", epoch, cfg.epochs)

    t_train = time.perf_counter() - t0
    if qat_info is not None:  # frozen BatchNorm: the statistics QAT trained with are the ones export folds
        bn = False
        net.snap_weights()
        qat_info["int8_accuracy"] = accuracy(net, data.x_test, data.y_test)
    else:
        bn = reestimate_batchnorm(model, x, batches=cfg.bn_batches, batch_size=cfg.batch_size, seed=cfg.seed,
                                  augment=augment, crop_padding=cfg.crop_padding, flip=cfg.flip)
    model.eval()
    acc = accuracy(model, data.x_test, data.y_test)
    s, off = _sparsity(masks)
    return FinetuneReport(
        epochs=cfg.epochs, initial_accuracy=initial_acc, accuracy=acc, sparsity=s, masked_weights=off,
        history=history, bn_reestimated=bn, resumed_from=resumed_from,
        timings={"train_s": t_train, "total_s": time.perf_counter() - t0},
        config={**asdict(cfg), "augment": augment, **({"hint_points": hints.points} if hints is not None else {})},
        qat=qat_info, head=head,
    )


__all__ = ["FinetuneConfig", "FinetuneReport", "finetune", "reestimate_batchnorm"]
