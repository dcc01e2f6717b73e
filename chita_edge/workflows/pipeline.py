"""``chita-edge run pipeline.yaml``: one file from model to CI verdict, with hash-keyed stages that resume.

Stages, per target profile: ``prune`` -> ``finetune`` (optional) -> ``export`` (one per format) -> ``check``
(benchmark the file, estimate it on every profile of the run, gate it on its own profile's budgets), plus a
``baseline`` export of the dense model for the comparison. Every stage writes its artefact into its own folder
of the output directory and a record into ``manifest.json``: a key (sha256 of its inputs' hashes, its settings
and the chita-edge version), the inputs and outputs with their hashes, the settings, the seconds it took.

A stage whose key and outputs are unchanged is skipped; a stage with the same key as one already done for
another profile copies that one's outputs (``reused_from``). The manifest is written atomically after every
stage, so a run that crashed or was killed starts again where it stopped; fine-tuning resumes from its last
epoch (its state file lives in the stage folder). The run ends with one comparative report (every file
estimated on every profile, an accuracy-vs-latency Pareto chart per device) and the verdict: ``GateFailed``
(exit 1) names every broken budget.
"""

from __future__ import annotations

import html as H
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chita_edge.core.checkpoint import save_checkpoint
from chita_edge.core.data import data_file, load_data
from chita_edge.core.errors import BadInput, GateFailed
from chita_edge.core.evaluate import accuracy
from chita_edge.core.io import atomic_write_text, refuse_overwrite
from chita_edge.devices.bench import BenchConfig, benchmark
from chita_edge.devices.gate import summary_markdown
from chita_edge.devices.headline import headline_html, headline_rows
from chita_edge.devices.profiles import load_profile, profile_file
from chita_edge.devices.report import CSS, device_charts, write_report
from chita_edge.models.loading import check_fits, load_model, model_file
from chita_edge.training.finetune import FinetuneConfig
from chita_edge.workflows import jobs
from chita_edge.workflows.finetune import state_path_for
from chita_edge.workflows.pipeline_spec import ExportSpec, PipelineSpec
from chita_edge.workflows.stages import Event, StageRunner, data_identity, digest

Progress = Callable[[str, int, int], None]


# -------------------------------------------------------------------------------------------- the stages
def _prune_stage(spec: PipelineSpec, profile: str, runner: StageRunner, progress: Progress | None) -> dict[str, Any]:
    """The same prune job as ``chita-edge prune`` with these settings (``chita_edge.workflows.jobs.run_prune``)."""
    pr = spec.prune
    w = {"weights": spec.weights, "sha256": runner.hashes(spec.weights)} if spec.weights else None
    inputs: dict[str, Any] = {"model": spec.model, "weights": w, "data": data_identity(spec.data, runner.hashes)}
    channel = pr.structure == "channel"
    prof = load_profile(profile) if channel else None
    resolved = jobs.prune_settings(pipeline=pr.settings(spec.sparsity_for(profile)), profile=prof)
    settings: dict[str, Any] = {"resolved": resolved.record()}
    budgets: dict[str, Any] = {}
    if prof is not None:
        inputs["profile"] = prof.model_dump(exclude_none=True)
        budgets = {k: v for k, v in (("latency_ms", spec.checks.latency_ms), ("percentile", spec.checks.percentile),
                                     ("memory_mb", spec.checks.memory_mb), ("file_mb", spec.checks.file_mb))
                   if v is not None}
        settings["budget_overrides"] = budgets
        settings["uncertain"] = spec.checks.uncertain  # the search judges the latency as the run's checks do
        settings["check_repeats"] = spec.checks.repeats

    def run(d: Path) -> dict[str, Any]:
        job = jobs.PruneJob(model=spec.model, weights=spec.weights, data=spec.data, out=d / "pruned.pt",
                       settings=resolved, profile=prof, budgets=budgets, uncertain=spec.checks.uncertain,
                       check_repeats=spec.checks.repeats, finetune_after=spec.finetune is not None)
        r = jobs.run_prune(job, progress=progress).to_dict()
        keys = {"channel": ("method", "accuracy", "dense_accuracy", "params_before", "params_after", "passed"),
                "block": ("sparsity", "accuracy", "dense_accuracy")}.get(pr.structure,
                                                                      ("method", "sparsity", "accuracy",
                                                                       "dense_accuracy"))
        return {k: r.get(k) for k in keys}

    return runner.stage(f"{_slug(profile)}/prune", inputs=inputs, settings=settings, outputs=["pruned.pt"], fn=run)


def _finetune_stage(spec: PipelineSpec, profile: str, pruned: Path, runner: StageRunner,
                    progress: Progress | None) -> dict[str, Any]:

    ft = spec.finetune
    assert ft is not None
    # the keys added later are left out unless the file sets them: an older file's stage key stays the same
    settings = ft.model_dump(exclude={k for k in ("warmup_epochs", "head_ridge", "hints")
                                      if k not in ft.model_fields_set})
    inputs = {"pruned": runner.hashes(pruned), "data": data_identity(spec.data, runner.hashes)}
    name = f"{_slug(profile)}/finetune"

    def run(d: Path) -> dict[str, Any]:
        out = d / "finetuned.pt"
        state = state_path_for(out)
        # the training state of an interrupted run is resumed only if it belongs to these inputs and settings
        key = digest({"inputs": inputs, "settings": settings})
        key_file = d / "state.key"
        resume = state.exists() and key_file.is_file() and key_file.read_text().strip() == key
        if state.exists() and not resume:
            state.unlink()
        atomic_write_text(key_file, key)
        cfg = FinetuneConfig(epochs=ft.epochs, lr=ft.lr, min_lr=ft.min_lr, batch_size=ft.batch_size,
                             optimizer=ft.optimizer, weight_decay=ft.weight_decay, augment=ft.augment,
                             bn_batches=ft.bn_batches, seed=ft.seed, warmup_epochs=ft.warmup_epochs,
                             head_ridge=ft.head_ridge, hints=ft.hints)
        r = jobs.run_finetune(jobs.FinetuneJob(pruned=pruned, data=spec.data, out=out, config=cfg, distill=ft.distill,
                                     resume=resume), progress=progress)
        key_file.unlink(missing_ok=True)
        return {"initial_accuracy": r.initial_accuracy, "accuracy": r.accuracy, "sparsity": r.sparsity,
                "resumed_from": r.resumed_from}

    return runner.stage(name, inputs=inputs, settings=settings, outputs=["finetuned.pt"], fn=run)


def _export_stage(name: str, ckpt: Path, fmt: str, filename: str, ex: ExportSpec, runner: StageRunner,
                  progress: Progress | None, model: str | None = None) -> dict[str, Any]:

    settings = {"format": fmt, "layout": ex.layout, "quantize": ex.quantize, "parity_samples": ex.parity_samples,
                "model": model}
    inputs = {"checkpoint": runner.hashes(ckpt)}

    def run(d: Path) -> dict[str, Any]:
        r = jobs.run_export(jobs.ExportJob(checkpoint=ckpt, out=d / filename, format=fmt, layout=ex.layout,
                                 quantize=ex.quantize, model=model, parity_samples=ex.parity_samples),
                       progress=progress)
        return {"bytes": r.bytes, "parity": r.parity, "notes": r.notes}

    return runner.stage(name, inputs=inputs, settings=settings, outputs=[filename], fn=run)


def _bench_stage(name: str, path: Path, gate_profile: Any | None, profiles: list[Any], spec: PipelineSpec,
                 runner: StageRunner, progress: Progress | None) -> dict[str, Any]:
    """Benchmark ``path`` (estimated on every profile) and, with ``gate_profile``, check its budgets."""
    ck = spec.checks
    inputs = {"file": runner.hashes(path), "data": data_identity(spec.data, runner.hashes),
              "profiles": [p.model_dump(exclude_none=True) for p in profiles]}
    settings = ck.model_dump(exclude={"baseline", "estimate_formats"})
    settings["estimate"] = _fmt_of(path) in ck.estimate_formats
    settings["gate"] = gate_profile.id if gate_profile is not None else None
    outputs = ["result.json"] + (["junit.xml"] if gate_profile is not None else [])

    def run(d: Path) -> dict[str, Any]:
        cfg = BenchConfig(threads=1, warmup=ck.warmup, runs=ck.runs)
        est = profiles if _fmt_of(path) in ck.estimate_formats else []
        if gate_profile is None:  # the baseline: measured and estimated, not gated
            doc: dict[str, Any] = {"file": str(path),
                                   "benchmark": benchmark(path, est, cfg, data=spec.data, progress=progress)}
        else:  # the same check job as ``chita-edge check``
            job = jobs.CheckJob(file=path, profile=gate_profile, bench=cfg, latency_ms=ck.latency_ms,
                           percentile=ck.percentile, memory_mb=ck.memory_mb, file_mb=ck.file_mb,
                           accuracy_min=ck.accuracy_min, data=spec.data, junit=d / "junit.xml",
                           estimate_on=tuple(est), step_summary="", uncertain=ck.uncertain,
                           repeats=ck.repeats)
            r = jobs.run_check(job, progress=progress)
            doc = {"file": str(path), "benchmark": r.details["benchmark"], "profile": r.profile, "passed": r.passed,
                   "budgets": r.details["budgets"], "checks": r.checks}
        atomic_write_text(d / "result.json", json.dumps(doc, indent=2, default=str))
        return {"passed": doc.get("passed"), "failed": [c["message"] for c in doc.get("checks", []) if not c["passed"]]}

    return runner.stage(name, inputs=inputs, settings=settings, outputs=outputs, fn=run)


def _fmt_of(path: Path) -> str:
    return "tflite" if path.suffix == ".tflite" else "onnx"


def _slug(profile: str) -> str:
    """A profile id, or a YAML path's file stem, as a folder name."""
    return Path(profile).stem if profile.endswith((".yaml", ".yml")) else profile


# ----------------------------------------------------------------------------------------------- the run
def run_pipeline(spec: PipelineSpec, *, out: str | os.PathLike | None = None, force: bool = False,
                 progress: Progress | None = None, on_event: Event | None = None,
                 source: str | None = None) -> dict[str, Any]:
    """Run every stage of ``spec`` (paths already resolved); returns the summary with ``passed``. Does not
    raise on a broken budget: call ``raise_if_failed``."""

    out_dir = Path(out or spec.out or f"{spec.name}.out").resolve()
    profiles = [load_profile(p) for p in spec.profiles]
    ids = [p.id for p in profiles]
    if len(set(ids)) != len(ids):
        raise BadInput(f"profiles: two entries name the same profile id ({', '.join(ids)})")
    if "tflite" in spec.export.formats:
        from chita_edge.exporters import tflite_format  # deferred: the LiteRT stack

        tflite_format.stack("TFLite export (export.formats: tflite)")  # a missing extra fails now, not later
    header = {"name": spec.name, "pipeline": {"source": source, "sha256": digest(spec.model_dump())},
              "spec": spec.model_dump()}
    refuse_overwrite([("--out", out_dir / rel) for rel in ("manifest.json", "runs.jsonl", "baseline/dense.pt")],
                     [("pipeline file", source), ("weights", spec.weights), ("data", data_file(spec.data)),
                      ("model file", model_file(spec.model)), *(("profile", profile_file(p)) for p in spec.profiles)])
    runner = StageRunner(out_dir, header, on_event=on_event, force=force,
                         own=("baseline", *ids, *(_slug(p) for p in spec.profiles)))
    t0 = time.perf_counter()
    files: list[tuple[str | None, str, Path, str]] = []  # (profile id or None, format, file, stage)
    if spec.checks.baseline:
        dense = _dense_checkpoint(spec, runner)
        for fmt in spec.export.formats:
            rec = _export_stage(f"baseline/export-{fmt}", dense, fmt, f"dense.{_ext(fmt)}",
                                spec.export.model_copy(update={"layout": "dense", "quantize": "none"}), runner,
                                progress, model=spec.model)
            files.append((None, fmt, runner.file(rec, _ext(fmt)), "baseline"))
    for prof, pspec in zip(profiles, spec.profiles, strict=True):
        rec = _prune_stage(spec, pspec, runner, progress)
        ckpt = runner.file(rec, "pruned.pt")
        if spec.finetune is not None:
            rec = _finetune_stage(spec, pspec, ckpt, runner, progress)
            ckpt = runner.file(rec, "finetuned.pt")
        for fmt in spec.export.formats:
            rec = _export_stage(f"{prof.id}/export-{fmt}", ckpt, fmt, f"{prof.id}.{_ext(fmt)}", spec.export,
                                runner, progress)
            files.append((prof.id, fmt, runner.file(rec, _ext(fmt)), prof.id))
    results, checks, verdicts = [], [], []
    for pid, fmt, path, where in files:
        gate = next(p for p in profiles if p.id == pid) if pid else None
        rec = _bench_stage(f"{where}/check-{fmt}", path, gate, profiles, spec, runner, progress)
        doc = json.loads(runner.file(rec, "result.json").read_text(encoding="utf-8"))
        results.append(doc["benchmark"])
        if gate is not None:
            verdicts.append({"profile": pid, "format": fmt, "file": str(path), "passed": doc["passed"],
                             "checks": doc["checks"]})
            checks += [{**c, "name": f"{path.name} on {pid}: {c['name']}"} for c in doc["checks"]]
    report = write_comparative_report(out_dir / "report", results, profiles, checks, verdicts, spec.name)
    passed = all(v["passed"] for v in verdicts)
    _step_summary(verdicts)
    runner.manifest["verdict"] = {"passed": passed, "targets": [
        {k: v[k] for k in ("profile", "format", "passed")} | {"failed": [c["message"] for c in v["checks"]
                                                                           if not c["passed"]]}
        for v in verdicts]}
    runner.manifest["report"] = {k: str(Path(v).relative_to(out_dir)) for k, v in report.items()}
    runner.save()
    with open(out_dir / "runs.jsonl", "a", encoding="utf-8") as f:  # what each invocation did (not the manifest)
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.perf_counter() - t0, 2),
                            "stages": runner.log_rows, "passed": passed}) + "\n")
    return {"name": spec.name, "out": str(out_dir), "manifest": str(runner.path), "passed": passed,
            "verdicts": verdicts, "report": report, "stages": runner.log_rows,
            "seconds": time.perf_counter() - t0}


def _ext(fmt: str) -> str:
    return "onnx" if fmt == "onnx" else "tflite"


def _dense_checkpoint(spec: PipelineSpec, runner: StageRunner) -> Path:
    """The dense model as a chita-edge checkpoint (the baseline's export input)."""
    inputs = {"model": spec.model,
              "weights": {"weights": spec.weights, "sha256": runner.hashes(spec.weights)} if spec.weights else None,
              "data": data_identity(spec.data, runner.hashes)}

    def run(d: Path) -> dict[str, Any]:

        lm = load_model(spec.model, spec.weights)
        ds = load_data(spec.data)
        check_fits(lm, ds.x_test, spec.data)
        acc = accuracy(lm.module, ds.x_test, ds.y_test)
        meta = {"model": lm.spec, "source_weights": spec.weights,
                "source_sha256": inputs["weights"]["sha256"] if spec.weights else None, "data": spec.data,
                "method": "dense", "sparsity": 0.0, "accuracy": acc,
                "input_shape": list(lm.input_shape or ds.input_shape)}
        save_checkpoint(d / "dense.pt", lm.module.state_dict(), meta)
        return {"accuracy": acc}

    rec = runner.stage("baseline/dense", inputs=inputs, settings={}, outputs=["dense.pt"], fn=run)
    return runner.file(rec, "dense.pt")


def _step_summary(verdicts: list[dict[str, Any]]) -> None:
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return

    try:
        with open(path, "a", encoding="utf-8") as f:  # GitHub's protocol: append
            for v in verdicts:
                f.write(summary_markdown(v))
    except OSError as e:
        raise BadInput(f"{path}: cannot append the step summary ({e.strerror})") from None


def write_comparative_report(out_dir: Path, results: list[dict[str, Any]], profiles: list[Any],
                             checks: list[dict[str, Any]], verdicts: list[dict[str, Any]],
                             title: str) -> dict[str, str]:
    """report.json/.md/.html (chita_edge.devices.report) plus index.html: the verdict per target and one
    accuracy-vs-latency Pareto chart per device, every file estimated on every profile."""


    paths = write_report(out_dir, results, profiles, checks or None)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>chita-edge: {H.escape(title)}"
             f"</title><style>{CSS}</style></head><body><h1>chita-edge pipeline: {H.escape(title)}</h1>"]
    parts.append(headline_html(headline_rows(results, profiles)))  # what pruning bought, first
    if verdicts:
        ok = all(v["passed"] for v in verdicts)
        parts.append(f"<p class='{'pass' if ok else 'fail'}'>Verdict: "
                     f"{'every budget holds' if ok else 'a budget is broken'}</p>")
        parts.append("<table><tr><th>target profile</th><th>file</th><th>result</th><th>checks</th></tr>")
        for v in verdicts:
            cls, word = ("pass", "pass") if v["passed"] else ("fail", "FAIL")
            msgs = "<br>".join(H.escape(c["message"]) for c in v["checks"])
            parts.append(f"<tr><td>{H.escape(v['profile'])}</td><td>{H.escape(os.path.basename(v['file']))}</td>"
                         f"<td class='{cls}'>{word}</td><td class='prov'>{msgs}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Accuracy vs latency, per device</h2><p class='prov'>Every file (the dense baseline and the "
                 "model pruned for each target) is estimated on every device; the orange line is the Pareto "
                 "front, the black diamond the dense baseline, the red dashed line the device's budget (latency, "
                 "and model file size where the profile sets one).</p>")
    for p in profiles:
        # one latency axis per chart: the files estimated for this device (others were measured on this host)
        mine = [r for r in results if (r.get("device_estimates") or {}).get(p.id, {}).get("available")]
        parts += [f"<figure>{svg}</figure>" for svg in device_charts(mine if len(mine) >= 2 else results, p)]
    parts.append("<p><a href='report.html'>Full benchmark report</a> (latency distributions, budgets, layers) · "
                 "<a href='report.md'>Markdown</a> · <a href='report.json'>JSON</a></p></body></html>\n")
    index = out_dir / "index.html"
    atomic_write_text(index, "".join(parts))
    return {"index": str(index), **paths}


def raise_if_failed(summary: dict[str, Any]) -> None:
    broken = [f"{os.path.basename(v['file'])} on {v['profile']}: " + "; ".join(
        c["message"] for c in v["checks"] if not c["passed"]) for v in summary["verdicts"] if not v["passed"]]
    if broken:
        raise GateFailed(" | ".join(broken))


__all__ = ["raise_if_failed", "run_pipeline",
           "write_comparative_report"]
