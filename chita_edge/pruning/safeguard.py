"""The safeguard of a pruning stage: the quadratic model behind CHITA is only local, and with few gradients
(n << p) its exact refit can overshoot. So each stage checks on real training loss the solver's support with the
update scaled by alpha in (1, 1/2, 1/4, 0), and the magnitude solution, and keeps the lowest: never worse than
magnitude pruning on that loss.

In a model with BatchNorm the stage re-estimates the statistics next, and before that every pruned candidate is
judged with stale statistics (on MobileNetV1 at 80 % all of them sit near ln 10, docs/benchmarks.md, ninth
session). There each candidate is ranked after that same re-estimation (``then``), from the same statistics
(restored between candidates), by the held-out loss of the state the re-estimation keeps; the winner's weights
and statistics stay in the model and the stage does not re-estimate again.

When the layer-wise re-fit follows the last stage (``refit``), that re-fit -- an exact least-squares solve on the
support, after which alpha no longer matters -- decides the accuracy, and a ranking before it does not predict
the re-fitted result (ResNet20, docs/benchmarks.md, tenth session). There the stage compares *supports*: CHITA's
(its best alpha candidate by the ranking above) and magnitude's, each from its own weights and statistics through
the re-fit (with the re-fit's own keep-if-better rule), ranked by the re-fit's held-out loss; magnitude's support
replaces CHITA's only if its loss is lower and its top-1 on the same images is not (the re-fit's own guard).
The winner keeps its re-fitted weights, statistics and re-fit record. Since the re-fit re-solves the kept
weights, the alpha variants are left out there: CHITA's own solution and magnitude's go through the BatchNorm
step and the re-fit. Cost: two BatchNorm steps and two re-fits instead of five and one (on a ResNet50-sized model
the five BatchNorm steps alone took over 10 minutes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chita_edge.core.data import Dataset
from chita_edge.core.evaluate import loss_and_top1
from chita_edge.pruning.batchnorm import batchnorm_buffers, has_batchnorm, load_batchnorm_buffers
from chita_edge.pruning.layers import PrunableParam, flatten_weights, set_weights

ALPHAS = (1.0, 0.5, 0.25, 0.0)


@dataclass
class Choice:
    weights: torch.Tensor  # the winner (already set in the model when after_batchnorm)
    record: dict[str, Any]  # the stage's info["safeguard"]: which candidate won and the losses
    batchnorm: dict[str, Any] | None = None  # the winner's BatchNorm record (reestimate_if_better's)
    after_batchnorm: bool = False  # ranked after the re-estimation: the model holds the winner's statistics
    refit: dict[str, Any] | None = None  # the winner's layer-wise re-fit record (the model holds its result)


def candidates(w_bar: torch.Tensor, w: torch.Tensor, magnitude: torch.Tensor) -> dict[str, torch.Tensor]:
    """The solver's support with the update ``w - w_bar`` scaled by each alpha, then the magnitude solution."""
    support = w != 0
    out = {f"alpha={a}": torch.where(support, w_bar + a * (w - w_bar), torch.zeros_like(w)) for a in ALPHAS}
    out["magnitude"] = magnitude
    return out


def _kept_loss(rec: dict[str, Any]) -> float:
    """The held-out loss of the statistics ``reestimate_if_better`` kept."""
    return float(rec["loss_after"] if rec["kept"] == "re-estimated" else rec["loss_before"])


def choose(model: nn.Module, params: list[PrunableParam], data: Dataset, w_bar: torch.Tensor, w: torch.Tensor,
           magnitude: torch.Tensor, seed: int, *, then: Callable[[], dict[str, Any] | None] | None = None,
           refit: Callable[[], dict[str, Any]] | None = None, samples: int = 2000) -> Choice:
    """Rank the candidates and return the winner.

    ``then``: the BatchNorm step the stage runs next on its weights (``reestimate_if_better`` on the model as it
    stands; None: the stage runs none). In a model with BatchNorm, when some candidate changes ``w_bar``, every
    candidate is set, given back the statistics the model has now, passed through ``then`` and ranked by the
    held-out loss of what it kept; the model is left with the winner's weights and statistics. Otherwise the
    ranking is on ``samples`` training inputs with the model as it is (the rule without BatchNorm).

    ``refit``: the layer-wise re-fit that follows this (last) stage, run on the model as it stands (its record
    has ``kept``, ``loss_before/after`` and ``top1_before/after`` on its held-out images, and ``seconds``). Given,
    the supports of CHITA's best candidate and of magnitude's are each re-fitted from their ranked state, the
    winner is chosen on the re-fitted result and left in the model (``Choice.refit``: its record)."""
    cands = candidates(w_bar, w, magnitude)
    if refit is not None:  # the re-fit re-solves the kept weights: alpha does not matter, only the two supports
        cands = {k: cands[k] for k in ("alpha=1.0", "magnitude")}
    states = records = None
    if then is not None and has_batchnorm(model) and any(bool((c != w_bar).any()) for c in cands.values()):
        choice, states, records = _choose_after_batchnorm(model, params, cands, then)
    else:
        choice = _choose_on_training_loss(model, params, data, cands, seed, samples)
    if refit is None:
        return choice
    return _choose_support_after_refit(model, params, cands, choice, states, records, refit)


def _choose_on_training_loss(model: nn.Module, params: list[PrunableParam], data: Dataset,
                             cands: dict[str, torch.Tensor], seed: int, samples: int) -> Choice:
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(data.x_train), generator=g)[:samples]
    x, y = data.x_train[idx], data.y_train[idx]
    losses = {}
    for name, c in cands.items():
        set_weights(model, params, c)
        losses[name] = loss_and_top1(model, x, y)[0]
    model.train(was)
    best = min(losses, key=lambda n: losses[n])
    return Choice(cands[best], {"chosen": best, "losses": losses})


def _choose_after_batchnorm(
        model: nn.Module, params: list[PrunableParam], cands: dict[str, torch.Tensor],
        then: Callable[[], dict[str, Any] | None],
) -> tuple[Choice, dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    start = batchnorm_buffers(model)
    records: dict[str, dict[str, Any]] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name, c in cands.items():
        load_batchnorm_buffers(model, start)
        set_weights(model, params, c)
        rec = then()
        assert rec is not None  # the model has BatchNorm
        records[name], states[name] = rec, batchnorm_buffers(model)
    losses = {name: _kept_loss(rec) for name, rec in records.items()}
    best = min(losses, key=lambda n: losses[n])
    set_weights(model, params, cands[best])
    load_batchnorm_buffers(model, states[best])
    record = {"chosen": best, "losses": losses, "after_batchnorm": True,
              "losses_before_batchnorm": {name: float(rec["loss_before"]) for name, rec in records.items()},
              "batchnorm_kept": {name: rec["kept"] for name, rec in records.items()},
              "check_samples": records[best]["check_samples"]}
    return Choice(cands[best], record, records[best], after_batchnorm=True), states, records


def _refit_result(rec: dict[str, Any]) -> tuple[float, float]:
    """(held-out loss, top-1) of the state the re-fit kept."""
    after = "after" if rec["kept"] else "before"
    return float(rec[f"loss_{after}"]), float(rec[f"top1_{after}"])


def _choose_support_after_refit(
        model: nn.Module, params: list[PrunableParam], cands: dict[str, torch.Tensor], choice: Choice,
        states: dict[str, dict[str, torch.Tensor]] | None, records: dict[str, dict[str, Any]] | None,
        refit: Callable[[], dict[str, Any]],
) -> Choice:
    losses = choice.record["losses"]
    starts = {"chita": min((n for n in cands if n != "magnitude"), key=lambda n: losses[n])}
    if not torch.equal(cands[starts["chita"]] != 0, cands["magnitude"] != 0):  # bso: one support, one re-fit
        starts["magnitude"] = "magnitude"
    start = batchnorm_buffers(model)
    done: dict[str, tuple[dict[str, Any], torch.Tensor, dict[str, torch.Tensor]]] = {}
    for support, name in starts.items():
        set_weights(model, params, cands[name])
        load_batchnorm_buffers(model, states[name] if states is not None else start)
        rec = refit()
        done[support] = rec, flatten_weights(model, params), batchnorm_buffers(model)
    best = "chita"
    if "magnitude" in done:
        (lm, tm), (lc, tc) = _refit_result(done["magnitude"][0]), _refit_result(done["chita"][0])
        if lm < lc and tm >= tc:  # the re-fit's own guard: a lower loss that loses labels does not win
            best = "magnitude"
    rec, weights, bufs = done[best]
    set_weights(model, params, weights)
    load_batchnorm_buffers(model, bufs)
    after = {support: {"candidate": starts[support], "loss": _refit_result(r)[0], "top1": _refit_result(r)[1],
                       "refit_kept": bool(r["kept"]), "seconds": float(r.get("seconds", 0.0))}
             for support, (r, _, _) in done.items()}
    record = {**choice.record, "chosen": starts[best], "support": best,
              "chosen_before_refit": choice.record["chosen"], "after_refit": after}
    refit_record = {**rec, "seconds": sum(a["seconds"] for a in after.values()), "refits": len(done),
                    "support": best}
    return Choice(weights, record, records[starts[best]] if records is not None else None,
                  after_batchnorm=choice.after_batchnorm, refit=refit_record)
