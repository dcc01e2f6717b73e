"""The checkpoint-writing jobs of ``chita-edge prune --profile`` and ``--structure block``.

``prune_budget_checkpoint`` loads a model and its data, prunes it to a device budget (``budget.search``'s
``prune_to_budget``), evaluates it and writes a checkpoint that reloads (and the measured ONNX file on request);
``raise_if_missed`` turns its report's missed budgets into ``GateFailed``. ``prune_blocks_checkpoint`` does the
same for 1x4 blocks of the Linear weights at a sparsity (``pruning.blocks``).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chita_edge.budget.config import BudgetConfig
from chita_edge.budget.search import prune_to_budget
from chita_edge.core.checkpoint import save_checkpoint
from chita_edge.core.data import load_data
from chita_edge.core.errors import BadInput, GateFailed
from chita_edge.core.evaluate import accuracy
from chita_edge.core.io import atomic_path, sha256_file
from chita_edge.devices.gate import pruned_verdicts
from chita_edge.devices.profiles import Profile, load_profile, with_budgets
from chita_edge.exporters import ExportConfig, export_model
from chita_edge.graph.residual import residual_blocks
from chita_edge.models.loading import check_fits, load_model
from chita_edge.pruning.blocks import BlockConfig, prune_blocks
from chita_edge.training.finetune import FinetuneConfig
from chita_edge.workflows.finetune import finetune_checkpoint

Progress = Callable[[str, int, int], None]


def prune_budget_checkpoint(model_spec: str, weights: str | os.PathLike | None, data: str | None, *,
                            profile: str | Profile, out: str | os.PathLike, cfg: BudgetConfig,
                            latency_ms: float | None = None, percentile: str | None = None,
                            memory_mb: float | None = None, file_mb: float | None = None,
                            export: str | os.PathLike | None = None, progress: Progress | None = None,
                            settings: dict[str, Any] | None = None, finetune: FinetuneConfig | None = None,
                            distill: bool = False, finetune_after: bool = False) -> dict[str, Any]:
    """What ``chita-edge prune --profile P`` does; returns the JSON-able report (``passed`` says whether every
    budget was met when measured). Raises ``GateFailed`` before pruning when the budget is unreachable.
    ``settings``: the resolved settings with their sources, recorded in the checkpoint and the result.
    ``finetune``: then fine-tune the pruned model (the finetune job, ``finetune_checkpoint``; ``distill``: the
    dense model as teacher) and write that to ``out`` (and ``export``); the report gives the accuracy before and
    after (``finetune``). The architecture does not change, so the latency measured before it still holds.
    ``finetune_after``: a fine-tuning stage follows elsewhere (a pipeline's), for ``objective="auto"``."""
    cfg.validate()
    if finetune is not None:
        finetune.validate()
        if not data:
            raise BadInput("--finetune-epochs needs --data (training images)")
    elif distill:
        raise BadInput("--distill with --profile needs --finetune-epochs (it distils while fine-tuning)")
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    budgets = with_budgets(prof, latency_ms=latency_ms, percentile=percentile, memory_mb=memory_mb, file_mb=file_mb)
    lm = load_model(model_spec, weights)
    if lm.meta and lm.meta.get("plan"):
        raise BadInput(f"{weights}: already structurally pruned (its checkpoint carries a plan); prune the dense "
                       "model to the budget instead")
    ds = load_data(data) if data else None
    if ds is not None:
        check_fits(lm, ds.x_train, data or "")
        example = ds.x_train[:1]
    elif lm.input_shape is not None:
        example = torch.rand(1, *lm.input_shape, generator=torch.Generator().manual_seed(cfg.seed))
    else:
        raise BadInput(f"model '{model_spec}': its input shape is unknown; give --data")
    # "auto": price the steps by the weights they remove where fine-tuning follows and the model has residual blocks
    # the search may remove, else by the outputs' divergence (``BudgetConfig.for_finetuning``)
    # (the graph is traced only where that decides it)
    follows = finetune is not None or finetune_after
    cfg = cfg.for_finetuning(follows, blocks=follows and cfg.objective == "auto" and cfg.depth
                             and bool(residual_blocks(lm.module, example)))
    structure = cfg.structure
    if structure == "auto":
        structure = "channel"
    if structure != "channel":
        raise BadInput(f"--structure {cfg.structure} with --profile: only channel pruning lowers latency and memory "
                       "on dense kernels (ONNX Runtime, LiteRT/XNNPACK); use --structure channel, or prune to a "
                       "sparsity with --sparsity and export --layout sparse for a smaller file")
    dense_acc = accuracy(lm.module, ds.x_test, ds.y_test) if ds is not None and len(ds.x_test) else None
    export_dir = Path(export).parent if export else None
    if export_dir is not None and not export_dir.exists():
        raise BadInput(f"--export {export}: directory {export_dir} does not exist")
    with tempfile.TemporaryDirectory(prefix="chita-edge-budget-") as wd:
        res = prune_to_budget(lm.module, example, ds, prof, budgets, cfg, work_dir=wd, progress=progress)
        acc = accuracy(res.model, ds.x_test, ds.y_test) if ds is not None and len(ds.x_test) else None
        meta = {
            "model": lm.spec,
            "source_weights": str(weights) if weights else None,
            "source_sha256": sha256_file(weights) if weights else None,
            "data": data,
            "method": cfg.method,  # what ran: chita-layerwise, chita-fisher, l1-uniform or norm-global
            "objective": cfg.objective if cfg.method == "chita-layerwise" else None,  # output or weights
            "structure": structure,
            "profile": prof.id,
            "budgets": res.budgets,
            "widths": res.widths,
            "plan": res.plan,
            "accuracy": acc,
            "dense_accuracy": dense_acc,
            "input_shape": list(example.shape[1:]),
            "params_fraction": sum(p.numel() for p in res.model.parameters())
            / max(1, sum(p.numel() for p in lm.module.parameters())),
            "settings": settings,
        }
        tuned = None
        if finetune is not None and data:
            pruned = Path(wd) / "pruned.pt"
            save_checkpoint(pruned, res.model.state_dict(), meta)
            tuned = finetune_checkpoint(pruned, data, finetune, out, distill=distill, teacher_weights=weights,
                                        model=model_spec, progress=progress)
        else:
            save_checkpoint(out, res.model.state_dict(), meta)
        exported = None
        if export and res.export and tuned is not None:  # the measured file's weights are the pruned ones
            lt = load_model(model_spec, out)
            export_model(lt.module, ExportConfig(format="onnx", layout="compact"), example_input=example, out=export,
                         parity_inputs=ds.x_test[:16] if ds is not None and len(ds.x_test) else None,
                         parity_source="data" if ds is not None and len(ds.x_test) else "random")
            exported = str(export)
        elif export and res.export:
            with atomic_path(export) as tmp:
                tmp.write_bytes(Path(res.export).read_bytes())
            exported = str(export)
    unit = {"latency_ms": "ms", "memory_mb": "MB", "file_mb": "MB"}
    checks = []
    for k, limit in res.budgets.items():
        m = res.measured[k] if res.measured else None
        checks.append({"budget": k if k != "latency_ms" else f"latency_ms.{res.percentile}", "limit": limit,
                       "predicted": res.predicted[k], "measured": m, "unit": unit[k], "met": res.met[k]})
    d = res.to_dict()
    d.pop("export", None)
    ft = None
    if tuned is not None:
        ft = {"epochs": tuned["epochs"], "distill": distill, "accuracy_before": acc, "accuracy_after": tuned["accuracy"],
              "config": tuned.get("config"), "seconds": tuned.get("seconds"),
              "note": "the latency was measured before fine-tuning; fine-tuning keeps the architecture"}
        acc = tuned["accuracy"]
    return {"model": lm.spec, "profile": prof.id, "method": meta["method"], "objective": meta["objective"],
            "structure": structure,
            "passed": res.passed, "checks": checks, "dense_accuracy": dense_acc, "accuracy": acc, "finetune": ft,
            "params_before": sum(p.numel() for p in lm.module.parameters()),
            "params_after": sum(p.numel() for p in res.model.parameters()),
            "out": str(out), "export": exported, "slack": cfg.slack, "uncertain": cfg.uncertain,
            "check_repeats": cfg.check_repeats,
            "settings": settings, **d}


def raise_if_missed(result: dict[str, Any]) -> None:
    """``GateFailed`` naming every budget the pruned model misses by ``check``'s rule (``gate.pruned_verdicts``: the
    same budgets and percentile, no slack, the estimate's error band; a host timing cannot pass a device latency
    budget, and an uncertain verdict fails as it does by default in ``check``, unless the result was pruned with
    ``uncertain="pass"``, as ``check --uncertain pass``)."""
    rows = pruned_verdicts(result, result.get("uncertain", "fail"))
    bad = [r for r in rows if not r["passed"]]
    if not bad:
        return

    def say(r: dict[str, Any]) -> str:
        band = "" if r["low"] is None else f" (band {r['low']:.4g}–{r['high']:.4g} {r['unit']})"
        what = f"{r['budget']} {'predicted ' if r['source'] == 'predicted' else ''}{r['value']:.4g} {r['unit']}{band}"
        if r["verdict"] == "fail":
            return f"{what} > {r['limit']:.4g} {r['unit']}"
        return f"{what} vs {r['limit']:.4g} {r['unit']}: uncertain, {r['note']}"

    parts = [say(r) for r in bad]
    beyond = {k: v for s in result.get("stages", []) for k, v in s.get("unreachable", {}).items()}
    if beyond:
        advice = ("; the measurements put the smallest reachable at " + ", ".join(f"{k} {v:.4g}" for k, v in beyond.items())
                  + ": raise the budget or lower --width-multiple")
    elif any(r["verdict"] == "fail" for r in bad):
        advice = "; prune again with a tighter --latency-ms / --memory-mb"
    else:
        fit = [f"--latency-ms {r['limit'] / r['band_high']:.4g}" for r in bad if r.get("band_high")]
        advice = ("; `check` applies the same rule: prune to " + " / ".join(fit) + " so that the band's upper edge "
                  "fits the budget, or measure on the device (chita-edge check --remote)") if fit else ""
    head = "misses its budget" if any(r["verdict"] == "fail" for r in bad) else "is not verified within its budget"
    raise GateFailed(f"the pruned model {head} on {result['profile']} when measured: {'; '.join(parts)} "
                     f"(checkpoint written to {result['out']}){advice}")


def prune_blocks_checkpoint(model_spec: str, weights: str | os.PathLike | None, data: str, cfg: BlockConfig,
                            out: str | os.PathLike, progress: Progress | None = None,
                            settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``chita-edge prune --structure block --sparsity S`` does: 1x4 blocks of the Linear weights."""
    cfg.validate()
    lm = load_model(model_spec, weights)
    ds = load_data(data)
    check_fits(lm, ds.x_train, data)
    dense_acc = accuracy(lm.module, ds.x_test, ds.y_test)
    t0 = time.perf_counter()
    rep = prune_blocks(lm.module, ds, cfg, lm.prunable, progress=progress)
    acc = accuracy(lm.module, ds.x_test, ds.y_test)
    meta = {"model": lm.spec, "source_weights": str(weights) if weights else None,
            "source_sha256": sha256_file(weights) if weights else None, "data": data, "method": "chita-block",
            "structure": f"block{cfg.block[0]}x{cfg.block[1]}", "sparsity": rep["sparsity"], "accuracy": acc,
            "dense_accuracy": dense_acc, "input_shape": list(lm.input_shape or ds.input_shape), "settings": settings}
    save_checkpoint(out, lm.module.state_dict(), meta)
    return {"model": lm.spec, "method": "chita-block", **rep, "accuracy": acc, "dense_accuracy": dense_acc,
            "out": str(out), "seconds": time.perf_counter() - t0, "settings": settings}
