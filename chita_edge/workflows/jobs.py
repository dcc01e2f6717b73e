"""The jobs: what ``chita-edge prune / finetune / export / check`` do and what the pipeline's stages do.

One job per verb, each a frozen dataclass of its inputs and a function that runs it and returns a typed result::

    job = PruneJob(model="zoo:mlpnet", weights="mlpnet.pt", data="npz:mnist.npz", out="p.pt",
                   settings=resolve(flags={"sparsity": 0.95}))
    result = run_prune(job)            # PruneResult; result.to_dict() is the --json output

The CLI commands build a job from their flags and render its result; the pipeline builds the same job from its
file. Both therefore prune, fine-tune, export and gate in exactly one way. Pruning settings arrive resolved
(``chita_edge.workflows.settings``: flag > pipeline file > profile > default); the result and the checkpoint
record every value and where it came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chita_edge.budget.config import ALIASES as BUDGET_ALIASES
from chita_edge.budget.config import METHODS as BUDGET_METHODS
from chita_edge.budget.config import BudgetConfig
from chita_edge.core.data import data_file
from chita_edge.core.errors import BadInput
from chita_edge.core.io import check_out, refuse_overwrite
from chita_edge.devices.bench import BenchConfig
from chita_edge.devices.gate import run_check as gate_check
from chita_edge.devices.profiles import Profile, load_profile, profile_file
from chita_edge.models.loading import model_file
from chita_edge.pruning.blocks import BlockConfig
from chita_edge.pruning.distributed import launched, process_group, resolve_device
from chita_edge.pruning.prune import METHODS as PRUNE_METHODS
from chita_edge.pruning.prune import PruneConfig
from chita_edge.training.finetune import FinetuneConfig
from chita_edge.training.gradual import GradualConfig
from chita_edge.workflows.budget_jobs import prune_blocks_checkpoint, prune_budget_checkpoint
from chita_edge.workflows.export import export_checkpoint
from chita_edge.workflows.finetune import finetune_checkpoint
from chita_edge.workflows.prune import block_state_path, prune_checkpoint
from chita_edge.workflows.settings import Resolved, resolve

Progress = Callable[[str, int, int], None]
STRUCTURES = ("unstructured", "block", "channel")


def set_threads(threads: int | None) -> None:
    """PyTorch's intra-op threads for this process (None: leave PyTorch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise BadInput(f"--threads {threads}: expected >= 1")
    torch.set_num_threads(threads)


class _Result:
    """A job's typed result; ``details`` holds the whole report of the library call, ``to_dict`` is the --json
    output (the typed fields over the details)."""

    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {**self.details, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                                   if f.name != "details"}}


# ----------------------------------------------------------------------------------------------------- prune
@dataclass(frozen=True, kw_only=True)
class PruneJob:
    """Prune ``model`` (with ``weights``) on ``data`` and write the checkpoint ``out``.

    ``settings`` are the resolved pruning settings (``structure``: unstructured or block to ``settings["sparsity"]``,
    channel to the budgets of ``profile``). ``budgets`` override the profile's (latency_ms, percentile, memory_mb,
    file_mb); ``export`` keeps the verified ONNX file of a budget run; ``gradual`` prunes in steps with masked
    fine-tuning between them (unstructured only). ``device`` (auto, cpu or cuda): where an unstructured prune
    runs its gradients, solves and re-fit; launched by torchrun, the job joins its process group
    (``chita_edge.pruning.distributed``) and only rank 0 writes."""

    model: str
    data: str
    out: Path
    settings: Resolved
    weights: Path | None = None
    profile: str | Profile | None = None
    budgets: dict[str, Any] = field(default_factory=dict)
    export: Path | None = None
    gradual: GradualConfig | None = None
    resume: bool = False
    device: str = "cpu"
    finetune: FinetuneConfig | None = None  # budget mode: fine-tune the pruned model (distill: dense teacher)
    distill: bool = False
    finetune_after: bool = False  # budget mode: a fine-tuning stage follows (objective "auto" prices by weights)
    prefer: str = "under"  # budget mode, when no width lands in [0.9, 1] x the budget: under or nearest
    uncertain: str = "fail"  # budget mode, as check's: fail judges the band's upper edge, pass the point estimate
    check_repeats: int = 1  # budget mode: a round passes where check --repeats K (the median of K) would pass too
    memory_gb: float | None = None  # block mode's cap on peak memory, chita-fisher's on G (None: from the free RAM)


@dataclass(frozen=True, kw_only=True)
class PruneResult(_Result):
    model: str
    method: str
    structure: str
    out: str
    accuracy: float | None
    dense_accuracy: float | None
    sparsity: float | None
    passed: bool  # budget mode: every budget met (measured); otherwise True
    settings: dict[str, dict[str, Any]]  # {name: {"value": v, "source": flag|pipeline|profile|default}}
    details: dict[str, Any]  # the mode's whole report


def prune_settings(*, flags: dict[str, Any] | None = None, pipeline: dict[str, Any] | None = None,
                   profile: str | Profile | None = None) -> Resolved:
    """Resolve the pruning settings: flag > pipeline file > the device profile (its width multiple) > default.
    A profile makes the default structure ``channel`` (pruning to its budgets)."""
    prof_layer: dict[str, Any] = {}
    if profile is not None:
        prof = profile if isinstance(profile, Profile) else load_profile(profile)
        prof_layer = {"width_multiple": prof.width_multiple, "structure": "channel"}
    return resolve(flags=flags, pipeline=pipeline, profile=prof_layer)


def _check_combination(job: PruneJob) -> str:
    """The structure, after refusing settings that this structure would ignore."""
    s = job.settings
    structure = s["structure"]
    if structure not in STRUCTURES:
        raise BadInput(f"--structure {structure!r}: expected one of {', '.join(STRUCTURES)} (or auto)")
    given = {k for k, src in s.sources.items() if src in ("flag", "pipeline")}
    if structure == "channel":
        if job.profile is None:
            raise BadInput("--structure channel: structured pruning prunes to a device budget; give --profile "
                           "(e.g. --profile phone-mid-sd670, with --latency-ms to override its budget)")
        unused = sorted(given & {"sparsity", "stages", "block_size", "block_support", "first_order", "refit",
                                 "layer_floor"})
        if unused:
            raise BadInput(f"{', '.join('--' + u.replace('_', '-') for u in unused)}: not used when pruning to a "
                           "device budget (--profile); the search sets the widths (use --search-stages)")
        method = BUDGET_ALIASES.get(s["method"], s["method"])
        if method not in BUDGET_METHODS:
            raise BadInput(f"--method {s['method']}: pruning to a budget takes one of {', '.join(BUDGET_METHODS)} "
                           "(chita and chita++ are aliases of chita-layerwise)")
        if job.memory_gb is not None and method != "chita-fisher":
            raise BadInput("--memory-gb caps chita-fisher's G with --profile (--method chita-fisher)")
        return structure
    if job.finetune is not None or job.distill:
        raise BadInput("--finetune-epochs and --distill fine-tune after pruning to a device budget (--profile); "
                       "without one, prune and then run chita-edge finetune")
    if job.profile is not None and "structure" in given:
        raise BadInput(f"--structure {structure} with --profile: only channel pruning lowers latency and memory "
                       "on dense kernels; use --structure channel, or prune to a sparsity without --profile")
    if job.resume and job.gradual is None and not s["block_size"]:
        raise BadInput("--resume continues a --gradual run or block mode (--block-size) from its state beside "
                       "--out; give --gradual or the same --block-size")
    if job.memory_gb is not None and (structure != "unstructured" or not s["block_size"]):
        raise BadInput("--memory-gb caps block mode (--block-size > 0, unstructured); give --block-size too")
    if s["sparsity"] is None:
        raise BadInput("--sparsity is required (or give --profile to prune to a device budget)")
    if not 0.0 <= s["sparsity"] < 1.0:
        raise BadInput(f"--sparsity {s['sparsity']}: expected a fraction in [0, 1)")
    if not 0.0 <= s["layer_floor"] <= 1.0:
        raise BadInput(f"--layer-floor {s['layer_floor']}: expected a fraction in [0, 1] (0: off)")
    unused = sorted(given & {"search_stages", "width_multiple", "depth", "objective"})
    if job.budgets or job.export or unused:
        raise BadInput("--latency-ms, --memory-mb, --file-mb, --width-multiple, --export, --search-stages, "
                       "--depth and --objective need --profile")
    if structure == "block":
        if s["method"] not in ("chita", "chita++"):
            raise BadInput(f"--method {s['method']}: block pruning is structured CHITA (chita or chita++)")
        if job.gradual is not None:
            raise BadInput("--gradual prunes unstructured; leave out --structure block")
        unused = sorted(given & {"block_size", "block_support", "first_order", "refit", "layer_floor"})
        if unused:
            raise BadInput(f"{', '.join('--' + u.replace('_', '-') for u in unused)}: not used by block pruning "
                           "(--structure block)")
    elif s["method"] not in PRUNE_METHODS:
        raise BadInput(f"--method '{s['method']}': expected one of {', '.join(PRUNE_METHODS)}")
    return structure


def prune_config(s: Resolved, memory_gb: float | None = None) -> PruneConfig:
    return PruneConfig(sparsity=s["sparsity"], method=s["method"], stages=s["stages"], n_grads=s["n_grads"],
                       fisher_batch=s["fisher_batch"], l2=s["l2"], first_order=s["first_order"],
                       block_size=s["block_size"], block_support=s["block_support"], seed=s["seed"], dtype=s["dtype"],
                       layerwise_refit=s["refit"], layer_floor=s["layer_floor"], memory_budget_gb=memory_gb)


def block_config(s: Resolved) -> BlockConfig:
    return BlockConfig(sparsity=s["sparsity"], stages=s["stages"], n_grads=s["n_grads"],
                       fisher_batch=s["fisher_batch"], l2=s["l2"], seed=s["seed"], dtype=s["dtype"])


def budget_config(s: Resolved) -> BudgetConfig:
    return BudgetConfig(method=BUDGET_ALIASES.get(s["method"], s["method"]), structure="channel",
                        stages=s["search_stages"], n_grads=s["n_grads"], fisher_batch=s["fisher_batch"], l2=s["l2"],
                        dtype=s["dtype"], seed=s["seed"], width_multiple=s["width_multiple"], depth=s["depth"],
                        objective=s["objective"])


def run_prune(job: PruneJob, progress: Progress | None = None,
              announce: Callable[[str], None] | None = None) -> PruneResult:
    """Run one prune job (unstructured, block or to a device budget) and write its checkpoint. ``announce``
    gets block mode's memory plan before work starts."""
    refuse_overwrite([("--out", job.out), ("--export", job.export),
                      ("--out state", f"{job.out}.gradual-state" if job.gradual is not None else None),
                      ("--out state", block_state_path(job.out))],
                     [("--weights", job.weights), ("--data", data_file(job.data)),
                      ("model file", model_file(job.model)), ("--profile", profile_file(job.profile))])
    structure = _check_combination(job)
    device = resolve_device(job.device)
    if (device.type != "cpu" or launched()) and (structure != "unstructured" or job.gradual is not None):
        raise BadInput("--device cuda and several processes (torchrun, --workers) run unstructured one-shot pruning "
                       "only; leave them out with --structure block, --profile or --gradual")
    check_out(Path(job.out))  # a bad --out fails now, not after the pruning
    if job.export is not None:
        check_out(Path(job.export), "--export")
    s = job.settings
    record = s.record()
    if structure == "channel":
        b = job.budgets
        r = prune_budget_checkpoint(job.model, job.weights, job.data, profile=job.profile, out=job.out,
                                    cfg=dataclasses.replace(budget_config(s), prefer=job.prefer,
                                                            uncertain=job.uncertain, memory_gb=job.memory_gb,
                                                            check_repeats=job.check_repeats),
                                    finetune_after=job.finetune_after,
                                    latency_ms=b.get("latency_ms"),
                                    percentile=b.get("percentile"), memory_mb=b.get("memory_mb"),
                                    file_mb=b.get("file_mb"), export=job.export, progress=progress,
                                    settings=record, finetune=job.finetune, distill=job.distill)
        passed = bool(r.get("passed", True))
    elif structure == "block":
        r = prune_blocks_checkpoint(job.model, job.weights, job.data, block_config(s), job.out, progress=progress,
                                    settings=record)
        passed = True
    else:
        with process_group(device):
            r = prune_checkpoint(job.model, job.weights, job.data, prune_config(s, job.memory_gb), job.out,
                                 progress=progress, gradual=job.gradual, resume=job.resume, settings=record,
                                 device=device, announce=announce)
        passed = True
    return PruneResult(model=r.get("model", job.model), method=r.get("method", s["method"]), structure=structure,
                       out=str(job.out), accuracy=r.get("accuracy"), dense_accuracy=r.get("dense_accuracy"),
                       sparsity=r.get("sparsity"), passed=passed, settings=record, details=r)


# -------------------------------------------------------------------------------------------------- finetune
@dataclass(frozen=True, kw_only=True)
class FinetuneJob:
    pruned: Path
    data: str
    out: Path
    config: FinetuneConfig
    model: str | None = None
    distill: bool = False
    teacher: Path | None = None
    resume: bool = False


@dataclass(frozen=True, kw_only=True)
class FinetuneResult(_Result):
    out: str
    initial_accuracy: float
    accuracy: float
    sparsity: float
    epochs: int
    resumed_from: int | None
    details: dict[str, Any]


def run_finetune(job: FinetuneJob, progress: Progress | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> FinetuneResult:
    check_out(Path(job.out))  # a bad --out fails now, not after the training
    r = finetune_checkpoint(job.pruned, job.data, job.config, job.out, distill=job.distill,
                            teacher_weights=job.teacher, resume=job.resume, model=job.model, progress=progress,
                            on_epoch=on_epoch)
    return FinetuneResult(out=r["out"], initial_accuracy=r["initial_accuracy"], accuracy=r["accuracy"],
                          sparsity=r["sparsity"], epochs=r["epochs"], resumed_from=r.get("resumed_from"), details=r)


# ---------------------------------------------------------------------------------------------------- export
@dataclass(frozen=True, kw_only=True)
class ExportJob:
    checkpoint: Path
    out: Path
    format: str | None = None
    layout: str = "dense"
    quantize: str = "none"
    model: str | None = None
    calibration_data: str | None = None
    parity_samples: int = 1000
    min_agreement: float = 0.99
    int8_fallback: bool = True
    max_float_macs: float = 0.2
    threads: int = 1


@dataclass(frozen=True, kw_only=True)
class ExportResult(_Result):
    out: str
    format: str
    layout: str
    quantize: str
    bytes: int
    parity: dict[str, Any]
    notes: list[str]
    details: dict[str, Any]


def run_export(job: ExportJob, progress: Progress | None = None) -> ExportResult:
    r = export_checkpoint(job.checkpoint, out=job.out, fmt=job.format, layout=job.layout, quantize=job.quantize,
                          model=job.model, calibration_data=job.calibration_data, parity_samples=job.parity_samples,
                          min_agreement=job.min_agreement, int8_fallback=job.int8_fallback,
                          max_float_macs=job.max_float_macs, threads=job.threads, progress=progress)
    return ExportResult(out=r["out"], format=r["format"], layout=r["layout"], quantize=r["quantize"],
                        bytes=r["bytes"], parity=r["parity"], notes=r["notes"], details=r)


# ----------------------------------------------------------------------------------------------------- check
@dataclass(frozen=True, kw_only=True)
class CheckJob:
    file: Path
    profile: str | Profile
    bench: BenchConfig = field(default_factory=BenchConfig)
    latency_ms: float | None = None
    percentile: str | None = None
    memory_mb: float | None = None
    file_mb: float | None = None
    accuracy_min: float | None = None
    data: str | None = None
    junit: Path | None = None
    estimate_on: tuple[Profile, ...] | None = None  # None: the gated profile
    step_summary: str | None = None  # None: $GITHUB_STEP_SUMMARY when set; "": none
    uncertain: str = "fail"  # how an uncertain verdict counts: fail (default) or pass (chita_edge.devices.gate)
    repeats: int = 1  # benchmark processes; the median one is judged (chita_edge.devices.gate.median_run)


@dataclass(frozen=True, kw_only=True)
class CheckResult(_Result):
    file: str
    profile: str
    passed: bool
    checks: list[dict[str, Any]]
    details: dict[str, Any]


def run_check(job: CheckJob, progress: Progress | None = None) -> CheckResult:
    if job.junit is not None:
        check_out(Path(job.junit), "--junit")  # a bad --junit fails now, not after the timing runs
    refuse_overwrite([("--junit", job.junit)], [("model", job.file), ("--profile", profile_file(job.profile)),
                                                ("--data", data_file(job.data))])
    prof = job.profile if isinstance(job.profile, Profile) else load_profile(job.profile)
    r = gate_check(str(job.file), prof, latency_ms=job.latency_ms, percentile=job.percentile,
                   memory_mb=job.memory_mb, file_mb=job.file_mb, accuracy_min=job.accuracy_min, data=job.data,
                   cfg=job.bench, junit=job.junit, estimate_on=job.estimate_on, step_summary=job.step_summary,
                   progress=progress, uncertain=job.uncertain, repeats=job.repeats)
    return CheckResult(file=str(job.file), profile=prof.id, passed=bool(r["passed"]), checks=r["checks"], details=r)


__all__ = ["CheckJob", "CheckResult", "ExportJob", "ExportResult", "FinetuneJob", "FinetuneResult", "PruneJob",
           "PruneResult", "prune_settings", "run_check", "run_export", "run_finetune", "run_prune", "set_threads"]
