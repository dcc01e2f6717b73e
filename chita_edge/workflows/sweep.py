"""``chita-edge sweep``: the accuracy-vs-latency frontier of one model on several devices.

Two ways to place the points:

* ``sparsities``: prune the dense model once per sparsity (unstructured, ``chita_edge.workflows.prune.prune_checkpoint``),
  export each pruned checkpoint (``chita_edge.workflows.export.export_checkpoint``), benchmark the file on this host
  and estimate it on every profile (``chita_edge.devices.bench.benchmark``); the same files are points of every device.
* ``latency_fractions``: per profile, prune to a latency budget of ``fraction`` x the dense model's estimated
  p50 on that profile (structured, ``chita_edge.workflows.budget_jobs.prune_budget_checkpoint``), then export and benchmark the
  result for that profile; every device gets its own files.

The dense model is always exported and benchmarked too: the reference point of every frontier. Each point's
accuracy is the exported file's top-1 on the data set's test split, run by its runtime. With ``out`` the files
stay in ``out/files`` and ``report.json`` / ``report.md`` / ``report.html`` (``chita_edge.devices.report``, plus the
sweep table and one Pareto chart per device) are written into ``out``.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chita_edge.budget.config import BudgetConfig
from chita_edge.core.checkpoint import save_checkpoint
from chita_edge.core.data import data_file, load_data
from chita_edge.core.errors import BadInput, check_finite, check_seed
from chita_edge.core.evaluate import accuracy
from chita_edge.core.io import atomic_write_text, refuse_overwrite, sha256_file
from chita_edge.devices.bench import BenchConfig, benchmark, best_latency
from chita_edge.devices.profiles import Budgets, load_profile, profile_file
from chita_edge.devices.report import pareto_svg, write_report
from chita_edge.models.loading import check_fits, load_model, model_file
from chita_edge.pruning.defaults import DEFAULTS
from chita_edge.workflows.budget_jobs import prune_budget_checkpoint
from chita_edge.workflows.export import export_checkpoint
from chita_edge.workflows.prune import PruneConfig, prune_checkpoint

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
FORMAT = "chita-edge/sweep-v1"


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """One sweep: exactly one of ``sparsities`` / ``latency_fractions``; pruning and benchmark knobs."""

    sparsities: tuple[float, ...] = ()
    latency_fractions: tuple[float, ...] = ()
    method: str = DEFAULTS["method"]
    format: str = "onnx"
    n_grads: int = DEFAULTS["n_grads"]
    stages: int = DEFAULTS["stages"]  # CHITA++ stages (sparsity mode)
    search_stages: int = DEFAULTS["search_stages"]  # budget search stages (latency-fraction mode)
    runs: int = 50
    warmup: int = 10
    parity_samples: int = 200
    seed: int = DEFAULTS["seed"]

    @property
    def mode(self) -> str:
        return "sparsity" if self.sparsities else "latency-fraction"

    @property
    def points(self) -> tuple[float, ...]:
        return self.sparsities or self.latency_fractions

    def validate(self) -> None:
        check_finite(self, {"sparsities": "--sparsities", "latency_fractions": "--latency-fractions"})
        check_seed(self.seed)
        if bool(self.sparsities) == bool(self.latency_fractions):
            raise BadInput("sweep: give exactly one of --sparsities and --latency-fractions")
        for s in self.sparsities:
            if not 0.0 < s < 1.0 or math.isnan(s):
                raise BadInput(f"--sparsities {s}: expected fractions in (0, 1)")
        for f in self.latency_fractions:
            if not 0.0 < f < 1.0 or math.isnan(f):
                raise BadInput(f"--latency-fractions {f}: expected fractions of the dense latency in (0, 1)")
        if len(set(self.points)) != len(self.points):
            raise BadInput(f"sweep: each point once, got {', '.join(f'{p:g}' for p in self.points)}")
        if self.format not in ("onnx", "tflite"):
            raise BadInput(f"--format {self.format!r}: expected onnx or tflite")
        if self.n_grads < 1 or self.stages < 1 or self.runs < 1 or self.warmup < 0 or self.parity_samples < 1:
            raise BadInput("sweep: --grads, --stages, --runs and parity samples must be >= 1, --warmup >= 0")


def _ext(fmt: str) -> str:
    return "tflite" if fmt == "tflite" else "onnx"


def _dense_checkpoint(model: str, weights: str | None, data: str, out: Path) -> dict[str, Any]:
    """The dense model as a chita-edge checkpoint (what the exporter reads), with its torch accuracy."""

    lm = load_model(model, weights)
    ds = load_data(data)
    check_fits(lm, ds.x_test, data, (ds.y_train, ds.y_test))
    if lm.meta and lm.meta.get("plan"):
        raise BadInput(f"{weights}: already structurally pruned (its checkpoint carries a plan); sweep the dense model")
    acc = accuracy(lm.module, ds.x_test, ds.y_test)
    meta = {"model": lm.spec, "source_weights": weights, "source_sha256": sha256_file(weights) if weights else None,
            "data": data, "method": "dense", "sparsity": 0.0, "accuracy": acc,
            "input_shape": list(lm.input_shape or ds.input_shape)}
    save_checkpoint(out, lm.module.state_dict(), meta)
    return {"model": lm.spec, "accuracy": acc}


def _point(profile_id: str, label: str, value: float | None, sparsity: float, bench: dict[str, Any],
           extra: dict[str, Any] | None = None) -> dict[str, Any]:

    lat, prov = best_latency(bench, profile_id)
    est = (bench.get("device_estimates") or {}).get(profile_id, {})
    return {"profile": profile_id, "point": label, "value": value, "sparsity": sparsity,
            "accuracy": bench["accuracy"]["accuracy"], "host_p50_ms": bench["latency_ms"]["p50"],
            "device_p50_ms": est["latency_ms"]["p50"] if est.get("available") else None,
            "frontier_p50_ms": lat["p50"], "latency_provenance": prov, "file_mb": bench["file_mb"],
            "file": bench["file"], **(extra or {})}


def _refuse_inputs_under(out_dir: Path, inputs: list[tuple[str, str | os.PathLike | None]]) -> None:
    """BadInput before any work when the sweep would write over an input: its report files, or anything in
    ``out_dir/files`` (the sweep's own checkpoints and exported files)."""
    refuse_overwrite([("--out", out_dir / f"report.{ext}") for ext in ("json", "md", "html")], inputs)
    files = out_dir / "files"
    for name, inp in inputs:
        if inp is not None and str(inp) and Path(inp).resolve().parent == files.resolve():
            raise BadInput(f"--out {out_dir}: the sweep writes its files into {files}, where the input {name} {inp} "
                           "lies; choose another --out (an input is never overwritten)")


def run_sweep(model: str, weights: str | os.PathLike | None, data: str, profiles: Sequence[str], cfg: SweepConfig,
              *, out: str | os.PathLike | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Prune, export, benchmark and evaluate at every point of ``cfg`` for every profile; returns the JSON-able
    sweep (``points``: one row per (profile, point), dense first). ``out``: keep the files and write the report."""

    cfg.validate()
    if not profiles:
        raise BadInput("--profiles: expected at least one profile id or YAML path")
    profs = [load_profile(p) for p in profiles]
    ids = [p.id for p in profs]
    if len(set(ids)) != len(ids):
        raise BadInput(f"--profiles: two entries name the same profile ({', '.join(ids)})")
    if cfg.format == "tflite":
        from chita_edge.exporters import tflite_format  # deferred: the LiteRT stack

        tflite_format.stack("sweep --format tflite")  # a missing extra fails now, not after pruning
    out_dir = Path(out).resolve() if out is not None else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise BadInput(f"--out {out_dir}: exists and is not a directory")
        _refuse_inputs_under(out_dir, [("--weights", weights), ("--data", data_file(data)),
                                       ("--model file", model_file(model)),
                                       *(("--profiles", profile_file(p)) for p in profiles)])
        (out_dir / "files").mkdir(parents=True, exist_ok=True)
    w = str(weights) if weights is not None else None
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="chita-edge-sweep-") if out_dir is None else None
    work = out_dir / "files" if out_dir is not None else Path(tmp.name)  # type: ignore[union-attr]
    try:
        doc = _sweep(model, w, data, profs, cfg, work, progress)
        results = doc.pop("_results")
        if out_dir is not None:
            doc["report"] = write_sweep_report(out_dir, doc, results, profs)
        else:
            doc["report"] = None
            for p in doc["points"]:
                p["file"] = Path(p["file"]).name  # the temporary files are gone
    finally:
        if tmp is not None:
            tmp.cleanup()
    doc["seconds"] = time.perf_counter() - t0
    return doc


def _sweep(model: str, weights: str | None, data: str, profs: list[Any], cfg: SweepConfig, work: Path,
           progress: Progress | None) -> dict[str, Any]:

    bcfg = BenchConfig(threads=1, warmup=cfg.warmup, runs=cfg.runs)
    ext = _ext(cfg.format)
    total = 1 + len(cfg.points) * (1 if cfg.mode == "sparsity" else len(profs))
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress("sweep points", done, total)

    def export_and_bench(ckpt: Path, name: str, on: list[Any]) -> dict[str, Any]:
        f = work / f"{name}.{ext}"
        export_checkpoint(ckpt, out=f, fmt=cfg.format, parity_samples=cfg.parity_samples, progress=progress)
        return benchmark(f, on, bcfg, data=data, progress=progress)

    dense_info = _dense_checkpoint(model, weights, data, work / "dense.pt")
    dense = export_and_bench(work / "dense.pt", "dense", profs)
    step()
    results: list[dict[str, Any]] = [dense]
    points = [_point(p.id, "dense", None, 0.0, dense) for p in profs]
    if cfg.mode == "sparsity":

        for s in cfg.sparsities:
            ckpt = work / f"s{s:.2f}.pt"
            pc = PruneConfig(sparsity=s, method=cfg.method, stages=cfg.stages, n_grads=cfg.n_grads, seed=cfg.seed)
            r = prune_checkpoint(model, weights, data, pc, ckpt, progress=progress)
            res = export_and_bench(ckpt, f"s{s:.2f}", profs)
            results.append(res)
            points += [_point(p.id, f"s={s:g}", s, r["sparsity"], res,
                              {"torch_accuracy": r["accuracy"]}) for p in profs]
            step()
    else:

        bm = "chita" if cfg.method in ("chita", "chita++") else cfg.method
        bc = BudgetConfig(method=bm, n_grads=cfg.n_grads, stages=cfg.search_stages, seed=cfg.seed,
                          bench_runs=cfg.runs, bench_repeats=1)
        for prof in profs:
            dense_p50 = float(best_latency(dense, prof.id)[0]["p50"])
            for f in cfg.latency_fractions:
                target = f * dense_p50
                # the sweep's one budget: latency p50 (the profile's memory and file budgets are not the question)
                only = prof.model_copy(update={"budgets": Budgets.model_validate(
                    {"latency_ms": {"value": target, "percentile": "p50"}})})
                ckpt = work / f"{prof.id}-f{f:.2f}.pt"
                r = prune_budget_checkpoint(model, weights, data, profile=only, out=ckpt, cfg=bc,
                                            progress=progress)
                res = export_and_bench(ckpt, f"{prof.id}-f{f:.2f}", [prof])
                results.append(res)
                points.append(_point(prof.id, f"{f:g} x dense p50", f,
                                     1.0 - r["params_after"] / max(1, r["params_before"]), res,
                                     {"target_p50_ms": target, "budget_met": r["passed"],
                                      "torch_accuracy": r["accuracy"]}))
                step()
    return {"format": FORMAT, "model": dense_info["model"], "weights": weights, "data": data, "mode": cfg.mode,
            "method": cfg.method, "export_format": cfg.format, "profiles": [p.id for p in profs],
            "dense_torch_accuracy": dense_info["accuracy"], "points": points, "_results": results}


# ------------------------------------------------------------------------------------------------ report
COLUMNS = ["profile", "point", "sparsity", "accuracy %", "host p50 ms", "device p50 ms (est.)", "file MB"]


def table_rows(doc: dict[str, Any]) -> list[list[str]]:
    """The sweep table: one row per (profile, point)."""
    def f(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    return [[p["profile"], p["point"], f(p["sparsity"], ".3f"), f(p["accuracy"], ".2f"), f(p["host_p50_ms"], ".3g"),
             f(p["device_p50_ms"], ".3g"), f(p["file_mb"], ".3g")] for p in doc["points"]]


def write_sweep_report(out_dir: Path, doc: dict[str, Any], results: list[dict[str, Any]],
                       profs: list[Any]) -> dict[str, str]:
    """report.json/.md/.html (``chita_edge.devices.report.write_report``) with the sweep's table and points added, and
    one accuracy-vs-latency Pareto chart per device in the HTML."""

    paths = write_report(out_dir, results, profs)
    rep = json.loads(Path(paths["json"]).read_text(encoding="utf-8"))
    rep["sweep"] = {k: v for k, v in doc.items() if k != "report"}
    atomic_write_text(paths["json"], json.dumps(rep, indent=2, default=str))
    rows = table_rows(doc)
    md = ["# chita-edge sweep", "", f"{doc['model']} on {doc['data']}, {doc['method']}, {doc['mode']} sweep.", "",
          "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    text = Path(paths["markdown"]).read_text(encoding="utf-8")
    atomic_write_text(paths["markdown"], "\n".join(md) + "\n\n" + text)
    parts = ["<h2>Sweep: accuracy vs latency per device</h2><table><tr>"
             + "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts.append("</table>")
    for p in profs:
        mine = [r for r in results if p.id in (r.get("profiles") or [])]  # the files benchmarked for this device
        svg = pareto_svg(mine, p)
        if svg:
            parts.append(f"<figure>{svg}</figure>")
    page = Path(paths["html"]).read_text(encoding="utf-8")
    i = page.find("<table>")
    page = page[:i] + "".join(parts) + page[i:] if i >= 0 else page
    atomic_write_text(paths["html"], page)
    return paths


__all__ = ["COLUMNS", "SweepConfig", "run_sweep", "table_rows", "write_sweep_report"]
