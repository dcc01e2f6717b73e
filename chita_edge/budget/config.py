"""The budget search's settings, its result, and the budgets it plans for.

``BudgetConfig`` (the knobs; the method and what it does: ``budget.search``'s docstring), ``BudgetResult``,
the method / structure / resource names, and the small helpers every part of the search shares: the budgets
of a profile as ``{resource: limit}`` (``budget_targets``), a prediction as that mapping (``resources_of``),
the runtime's channel block (``resolve_block``) and the narrowest allowed widths (``min_widths``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from chita_edge.budget.costmodel import Prediction
from chita_edge.budget.timing import nchwc_block
from chita_edge.core.errors import BadInput, check_finite, check_seed
from chita_edge.devices.profiles import Budgets, Profile
from chita_edge.pruning.channels import StructuredConfig, allowed_widths
from chita_edge.pruning.defaults import DEFAULTS
from chita_edge.training.finetune import FinetuneConfig

Progress = Callable[[str, int, int], None]

# what each method is: ``chita-layerwise`` (group-OBS removal order on the layer-wise CHITA quadratic, probe curves,
# greedy search, layer-wise re-fit; the default), ``chita-fisher`` (the paper's global G from mini-batch gradients,
# group IHT + backsolve); the two baselines. The old names stay accepted (``ALIASES``).
METHODS = ("chita-layerwise", "chita-fisher", "l1-uniform", "norm-global")

# The fine-tuning recipe after a budget prune (``prune --profile --finetune-epochs``, and the head re-fit of the
# pipeline's finetune stage and ``chita-edge finetune`` on such a checkpoint: ``workflows.finetune``). The
# layer-wise re-fit leaves the output layer's weights large and cancelling on collinear features (8x the dense
# model's on ResNet20 at 0.35x); the usual recipe (lr 0.05) then threw the model away in its first epoch
# (51.5 -> 22.8 %). The output layer is re-fitted with a ridge first (``training.head``) and the peak learning
# rate is lower; measured in docs/finetune.md, "After a budget prune".
FINETUNE = {"lr": 0.03, "head_ridge": 0.3, "warmup_epochs": 1.0}
# with a dense teacher: the weight of the feature-map hints (FitNets) at the stages the pruned model shares with it
# (docs/benchmarks.md, "Twelfth session": ResNet20 at 0.45x after 20 epochs, seeds 0 / 1: 84.76 / 85.74 % without,
# 86.92 / 86.73 % at weight 10, 88.30 / 87.71 % at 30)
FINETUNE_HINTS = 30.0


def finetune_config(epochs: int, **given: Any) -> FinetuneConfig:
    """The budget path's fine-tuning recipe (``FINETUNE``) for ``epochs``; ``given`` values that are not None
    (the user's flags) override it."""
    return FinetuneConfig(epochs=epochs, **{**FINETUNE, **{k: v for k, v in given.items() if v is not None}})


ALIASES = {"chita": "chita-layerwise", "chita++": "chita-layerwise"}
PREFER = ("under", "nearest")
UNCERTAIN = ("fail", "pass")  # as check's --uncertain: what the landing window and the verdicts judge
STRUCTURES = ("auto", "channel", "block", "unstructured")
RESOURCES = ("latency_ms", "memory_mb", "file_mb")
OBJECTIVES = ("auto", "output", "weights")


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    """Knobs of the budget search (what they do: ``chita_edge.budget.search``'s docstring)."""

    method: str = "chita-layerwise"  # or an alias (``ALIASES``), turned into its name
    structure: str = "channel"
    stages: int = DEFAULTS["search_stages"]  # stages of the search (G recomputed at each), each measured
    n_grads: int = DEFAULTS["n_grads"]  # n: rows of G (chita-fisher)
    fisher_batch: int = DEFAULTS["fisher_batch"]  # m
    l2: float = DEFAULTS["l2"]  # lam = l2 * n / 2
    width_multiple: int | None = None  # None: the profile's
    channel_block: int | None = None  # widths between blocks left out (allowed_widths); None: the host's NCHWc block, 0: off
    margin: float = 0.97  # plan each resource to this fraction of its budget
    slack: float = 0.0  # a measurement within budget * (1 + slack) meets the budget (0: check's strict rule)
    verify: bool = True  # export + benchmark the result (and tighten on a miss)
    dense_anchor: bool = True  # with verify: measure the dense model first and correct the cost model by it
    max_tighten: int = 2
    depth: bool = True  # method chita: removing a whole residual block (identity shortcut) is one more move
    # method chita: what a step of the greedy costs, per unit of resource saved. "output": the one-shot divergence
    # of the model's outputs (probe curves, block costs) -- the most accurate model as pruned. "weights": the
    # weights it removes -- the most capacity for a fine-tuning after it (a removed block of few weights before a
    # narrowed wide layer); the held-out choice and the widths-only candidates judge one-shot accuracy, so they
    # are off. "auto": weights when the budget path fine-tunes afterwards and the model has residual blocks
    # (``for_finetuning``), else output.
    objective: str = "auto"
    relax_below: float = 0.9  # after a tightening round lands below this fraction of a budget: relax (bisection)
    relax_steps: int = 2  # bisection steps between the last missing and the tightened correction
    bench_runs: int = 100
    bench_repeats: int = 3  # benchmark processes per measurement (at least); the median is used
    precision: float | None = 0.03  # repeat them until the latency's 95 % interval is within this (None: don't)
    bench_max_repeats: int = 10  # ... but at most this many processes (then the floor reached is reported)
    reuse_measurements: bool = True  # a file measured before (same bytes, profile, host) is not re-timed
    land_low: float = 0.90  # after verifying: measured under this fraction of the budget gives width back
    land_aim: float = 0.95  # ... re-planned with the cost model corrected by the measurements, aiming here
    land_steps: int = 5  # at most this many re-plans to land in [land_low, 1] x the budget
    prefer: str = "under"  # when no width lands in the window: under (meet the budget) or nearest (either side)
    # Among the measured rounds that meet every budget, keep the one with the lowest loss on this many held-out
    # training images (not the calibration ones); 0: the one nearest under the budget. Widths and removed blocks
    # trade differently against latency, so the round nearest the budget is not always the most accurate.
    select_samples: int = 1024
    # A tightening round that removes a residual block is also run with widths only (no new block) and measured:
    # one more candidate for ``select_samples``' choice; the search goes on from the block's round.
    width_first: bool = True
    # a device estimate's latency: "fail" (check's default) judges the upper edge of its error band -- the window
    # [land_low, 1] and the verdicts apply to it, so that `check` passes; "pass" (check --uncertain pass) judges the
    # point estimate (a budget inside the band is accepted). Both judge with the measurement's interval.
    uncertain: str = "fail"
    # how the file will be checked: ``check --repeats K`` judges the median of K benchmark processes. A round
    # passes only where such a check of the same file would pass too (``budget.measure.check_interval``): one
    # process (K = 1) of a sub-millisecond model moves by +-10-20 % on a shared host, the median of 3 by ~0.7 x that.
    check_repeats: int = 1
    bn_batches: int = 16  # BatchNorm re-estimation batches when it is on
    refit: bool | None = None  # layer-wise re-fit after each stage; None: on for chita, off for the baselines
    bn_reestimate: bool | None = None  # None: on where there is no re-fit (it undoes a re-fit's calibration)
    calib_samples: int = 256  # training images for the layer statistics and the re-fit
    damp: float = 0.01  # ridge of the layer-wise problems, relative to the mean diagonal of H
    max_probes: int = 6  # widths per channel group at which the output divergence is measured
    probe_samples: int = 128  # calibration images for those measurements
    max_iter: int = 60
    seed: int = DEFAULTS["seed"]
    dtype: str = DEFAULTS["dtype"]  # structured CHITA's G and solve (chita-fisher)
    memory_gb: float | None = None  # chita-fisher: cap on G and its solver copy (GiB); None: half of the free RAM
    threads: int = 1  # host threads for timing (the benchmark's host setting)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", ALIASES.get(self.method, self.method))

    def for_finetuning(self, finetune: bool, blocks: bool = True) -> BudgetConfig:
        """``objective`` "auto" resolved: "weights" when a fine-tuning follows the search and the model has residual
        blocks it may remove (``blocks``), else "output". Measured after 20 epochs with distillation at 0.5x
        (docs/benchmarks.md, thirteenth session): weights won by 1.8-4.2 points on ResNet20, whose blocks go at full
        widths, and lost by 9-14 on MobileNetV1, where it can only narrow the layers of most weights."""
        if self.objective != "auto":
            return self
        weights = finetune and blocks and self.method == "chita-layerwise"
        return replace(self, objective="weights" if weights else "output")

    @property
    def one_shot(self) -> bool:
        """Whether the search judges rounds by their one-shot accuracy (every objective but "weights")."""
        return self.objective != "weights"

    def validate(self) -> None:
        check_finite(self, {"l2": "--l2"})
        check_seed(self.seed)
        if self.method not in METHODS:
            raise BadInput(f"method {self.method!r}: expected one of {', '.join(METHODS)} (or chita, an alias of "
                           "chita-layerwise)")
        if self.prefer not in PREFER:
            raise BadInput(f"--prefer {self.prefer!r}: expected one of {', '.join(PREFER)}")
        if self.uncertain not in UNCERTAIN:
            raise BadInput(f"--uncertain {self.uncertain!r}: expected one of {', '.join(UNCERTAIN)}")
        if not 0 < self.land_low <= self.land_aim <= 1 or self.land_steps < 0:
            raise BadInput("land_low and land_aim must satisfy 0 < land_low <= land_aim <= 1, land_steps >= 0")
        if self.precision is not None and not 0 < self.precision < 1 or self.bench_max_repeats < self.bench_repeats:
            raise BadInput("precision must be in (0, 1) and bench_max_repeats >= bench_repeats")
        if self.structure not in STRUCTURES:
            raise BadInput(f"--structure {self.structure!r}: expected one of {', '.join(STRUCTURES)}")
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise BadInput(f"--memory-gb {self.memory_gb}: expected > 0")
        if self.objective not in OBJECTIVES:
            raise BadInput(f"--objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if self.objective == "weights" and self.method != "chita-layerwise":
            raise BadInput(f"--objective weights: the greedy of method chita-layerwise only (got {self.method})")
        if self.select_samples < 0:
            raise BadInput(f"select_samples {self.select_samples}: expected >= 0 (0: the round nearest the budget)")
        if self.stages < 1:
            raise BadInput(f"--stages {self.stages}: expected >= 1")
        if self.width_multiple is not None and not 1 <= self.width_multiple <= 256:
            raise BadInput(f"--width-multiple {self.width_multiple}: expected 1..256")
        if self.channel_block is not None and self.channel_block < 0:
            raise BadInput(f"channel_block {self.channel_block}: expected >= 0 (0: off)")
        if not 0 < self.margin <= 1 or not 0 <= self.slack < 1:
            raise BadInput("margin must be in (0, 1] and slack in [0, 1)")
        if self.bench_runs < 1 or self.bench_repeats < 1:
            raise BadInput("bench_runs and bench_repeats must be >= 1")
        if self.check_repeats < 1:
            raise BadInput(f"--check-repeats {self.check_repeats}: expected >= 1 (the benchmark processes whose "
                           "median check --repeats judges)")
        if not 0 < self.relax_below <= 1 or self.relax_steps < 0 or self.max_tighten < 0:
            raise BadInput("relax_below must be in (0, 1], relax_steps and max_tighten >= 0")

    @property
    def do_refit(self) -> bool:
        return self.refit if self.refit is not None else self.method == "chita-layerwise"

    @property
    def do_bn(self) -> bool:
        return self.bn_reestimate if self.bn_reestimate is not None else not self.do_refit

    def structured(self, solver: str = "chita") -> StructuredConfig:
        return StructuredConfig(n_grads=self.n_grads, fisher_batch=self.fisher_batch, l2=self.l2, solver=solver,
                                max_iter=self.max_iter, bn_batches=self.bn_batches, seed=self.seed, dtype=self.dtype)


@dataclass
class BudgetResult:
    model: nn.Module  # the compacted model
    plan: dict[str, Any]
    widths: dict[str, int]
    sizes: dict[str, int]
    budgets: dict[str, float]
    percentile: str
    predicted: dict[str, float]
    measured: dict[str, Any] | None
    dense_measured: dict[str, Any] | None
    dense_predicted: dict[str, float]
    met: dict[str, bool]
    stages: list[dict[str, Any]] = field(default_factory=list)
    cost_model: dict[str, Any] = field(default_factory=dict)
    export: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # residual blocks removed whole (also in plan["drop"])
    landing: dict[str, Any] = field(default_factory=dict)  # where it landed in the window, the nearest either side
    decisions: list[dict[str, Any]] = field(default_factory=list)  # each measurement's verdict and its interval

    @property
    def passed(self) -> bool:
        return all(self.met.values())

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("plan", "widths", "sizes", "budgets", "percentile", "predicted",
                                           "measured", "dense_measured", "dense_predicted", "met", "stages",
                                           "cost_model", "export", "timings", "landing", "decisions")}
        d["passed"] = self.passed
        d["dropped_blocks"] = list(self.dropped)
        d["layers"] = [{"group": g, "width": self.widths[g], "of": self.sizes[g],
                        "kept_fraction": self.widths[g] / self.sizes[g]} for g in self.sizes
                       if g in self.widths]
        return d


def budget_targets(profile: Profile, budgets: Budgets) -> tuple[dict[str, float], str]:
    """{resource: limit} from the resolved budgets, and the latency percentile."""
    out: dict[str, float] = {}
    pct = "p50"
    if budgets.latency_ms is not None:
        out["latency_ms"] = float(budgets.latency_ms.value)
        pct = budgets.latency_ms.percentile
    if budgets.peak_memory_mb is not None:
        out["memory_mb"] = float(budgets.peak_memory_mb)
    if budgets.model_file_mb is not None:
        out["file_mb"] = float(budgets.model_file_mb)
    if not out:
        raise BadInput(f"profile {profile.id} has no budgets and none was given (--latency-ms, --memory-mb, --file-mb)")
    return out, pct


def resources_of(p: Prediction) -> dict[str, float]:
    """A prediction's resources by budget name."""
    return {"latency_ms": p.latency_ms, "memory_mb": p.memory_mb, "file_mb": p.file_mb}


def resolve_block(cfg: BudgetConfig) -> int:
    """The channel block of the runtime that verifies the budget: ONNX Runtime's NCHWc block on this host."""
    return nchwc_block() if cfg.channel_block is None else cfg.channel_block


def min_widths(sizes: Mapping[str, int], multiple: int) -> dict[str, int]:
    return {g: allowed_widths(s, multiple)[0] for g, s in sizes.items()}


