"""``chita-edge bench`` and ``chita-edge check``: measure exported files, estimate them on device profiles, gate CI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from chita_edge.cli import ui
from chita_edge.cli.app import app
from chita_edge.core.data import data_file
from chita_edge.core.io import refuse_overwrite
from chita_edge.devices.bench import BenchConfig, benchmark_many
from chita_edge.devices.gate import raise_if_failed
from chita_edge.devices.profiles import load_profile, profile_file
from chita_edge.devices.report import write_report
from chita_edge.workflows import jobs

JSON = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
RUNTIME = Annotated[str | None, typer.Option("--runtime", help="onnxruntime or litert (default: from the file).")]
THREADS = Annotated[int | None, typer.Option("--threads", help="Runtime threads (default: 1 on this host, the "
                                                               "profile's device threads with --remote).")]
WARMUP = Annotated[int, typer.Option("--warmup", help="Untimed inferences before timing.")]
RUNS = Annotated[int, typer.Option("--runs", help="Timed inferences.")]
XNNPACK = Annotated[bool | None, typer.Option("--xnnpack/--no-xnnpack", help="LiteRT: XNNPACK delegate on/off "
                                                                          "(default: off if the file needs it, else "
                                                                          "the profile's setting).")]
REMOTE = Annotated[str | None, typer.Option("--remote", help="ssh://user@host[:port]: run on the device "
                                                              "(chita-edge installed there).")]
REMOTE_PY = Annotated[str, typer.Option("--remote-python", help="Python on the device that has chita-edge.")]
SSH_OPT = Annotated[list[str] | None, typer.Option("--ssh-option", help="Extra ssh -o option, e.g. "
                                                                        "IdentityFile=~/.ssh/pi (repeatable).")]


def _cfg(runtime: str | None, threads: int | None, warmup: int, runs: int, xnnpack: bool | None,
         remote: str | None, remote_python: str, ssh_option: list[str] | None) -> BenchConfig:
    return BenchConfig(runtime=runtime, threads=threads, warmup=warmup, runs=runs, xnnpack=xnnpack, remote=remote,
                       remote_python=remote_python, ssh_options=tuple(ssh_option or ()))


def _refuse_over_inputs(report: Path | None, junit: Path | None, files: list[Path], profiles: list[str],
                        data: str | None) -> None:
    """--report DIR writes DIR/report.json, .md and .html, --junit its file: none may be an input of the command."""
    outputs = [("--report", report / f"report.{ext}") for ext in ("json", "md", "html")] if report else []
    refuse_overwrite([*outputs, ("--junit", junit)],
                     [*(("model", f) for f in files), *(("--profile", profile_file(p)) for p in profiles),
                      ("--data", data_file(data))])


def _render_bench(r: dict[str, Any]) -> None:
    lat = r["latency_ms"]
    name = Path(r["file"]).name
    acc = f", top-1 {r['accuracy']['accuracy']:.2f} %" if r.get("accuracy") else ""
    ui.info(f"{name}: {r['runtime']} {r['runtime_version']}, {r['threads']} thread(s), {r['runs']} runs: "
            f"p50 {lat['p50']:.3g} / p90 {lat['p90']:.3g} / p99 {lat['p99']:.3g} ms ({r['provenance']}); "
            f"load {r['load_ms']:.0f} ms, peak memory {r['peak_memory_mb']:.3g} MB, file {r['file_mb']:.3g} MB{acc}")
    for pid, est in (r.get("device_estimates") or {}).items():
        conf = f"; profile confidence: {est['confidence']}" if est.get("confidence") else ""
        if est.get("available"):
            e = est["latency_ms"]
            b = (est.get("band") or {}).get("latency_ms")
            band = f" (band {b['p50'][0]:.3g}–{b['p50'][1]:.3g} / {b['p90'][0]:.3g}–{b['p90'][1]:.3g})" if b else \
                " (error band unknown)"
            ui.info(f"  {pid}: p50 {e['p50']:.3g} / p90 {e['p90']:.3g} ms{band}, {est['provenance']}{conf}")
        else:
            ui.info(f"  {pid}: no estimate ({est['reason']}{conf})")


@app.command("bench")
def bench_cmd(
    files: Annotated[list[Path], typer.Argument(help="Exported model file(s): .onnx or .tflite.")],
    profile: Annotated[list[str] | None, typer.Option("--profile", help="Profile id or YAML path (repeatable).")] = None,
    runtime: RUNTIME = None,
    threads: THREADS = None,
    warmup: WARMUP = 10,
    runs: RUNS = 50,
    xnnpack: XNNPACK = None,
    data: Annotated[str | None, typer.Option("--data", help="npz:PATH or 'digits': also measure top-1 accuracy "
                                                            "(for the Pareto chart).")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write report.json, report.md and report.html "
                                                                 "into this directory.")] = None,
    remote: REMOTE = None,
    remote_python: REMOTE_PY = "python3",
    ssh_option: SSH_OPT = None,
    json_out: JSON = False,
) -> None:
    """Measure latency (p50/p90/p99/mean), load time, peak memory and size of exported files, and estimate
    their latency on device profiles. Several files give one JSON object {"results": [...]}.

    Example: chita-edge bench model.onnx --profile sbc-rpi4 --runs 100 --report out/ --json
    """
    _refuse_over_inputs(report, None, files, profile or [], data)
    profs = [load_profile(p) for p in profile or []]
    cfg = _cfg(runtime, threads, warmup, runs, xnnpack, remote, remote_python, ssh_option)
    with ui.progress() as cb:
        results = benchmark_many([str(f) for f in files], profs, cfg, data=data, progress=cb)
    paths = write_report(report, results, profs) if report else None
    if json_out:
        obj: dict[str, Any] = dict(results[0]) if len(results) == 1 else {"results": results}
        if paths:
            obj["report"] = paths
        ui.print_json(obj)
        return
    for r in results:
        _render_bench(r)
    if paths:
        ui.info(f"report: {paths['html']}")


@app.command("check")
def check_cmd(
    file: Annotated[Path, typer.Argument(help="Exported model file: .onnx or .tflite.")],
    profile: Annotated[str, typer.Option("--profile", help="Profile id or YAML path whose budgets apply.")],
    latency_ms: Annotated[float | None, typer.Option("--latency-ms", help="Latency budget override (ms).")] = None,
    percentile: Annotated[str | None, typer.Option("--percentile", help="p50, p90 or p99 for the latency budget.")] = None,
    memory_mb: Annotated[float | None, typer.Option("--memory-mb", help="Peak memory budget override (MB).")] = None,
    file_mb: Annotated[float | None, typer.Option("--file-mb", help="Model file budget override (MB).")] = None,
    accuracy_min: Annotated[float | None, typer.Option("--accuracy-min", help="Minimum top-1 accuracy (%) on --data.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="npz:PATH or 'digits' for --accuracy-min.")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML (one test case per budget).")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Also write report.json/.md/.html here.")] = None,
    uncertain: Annotated[str, typer.Option("--uncertain", help="How an uncertain verdict counts (the budget inside "
                                                               "the estimate's error band, or a device latency "
                                                               "timed only on this host): fail (exit 1, JUnit "
                                                               "failure) or pass (exit 0, JUnit skipped, flagged).")] = "fail",
    repeats: Annotated[int, typer.Option("--repeats", help="Benchmark processes; the one with the median latency "
                                                           "is judged (a sub-millisecond model's single process "
                                                           "moves by +-10-20 % on a shared host; give prune "
                                                           "--check-repeats the same number).")] = 1,
    runtime: RUNTIME = None,
    threads: THREADS = None,
    warmup: WARMUP = 10,
    runs: RUNS = 50,
    xnnpack: XNNPACK = None,
    remote: REMOTE = None,
    remote_python: REMOTE_PY = "python3",
    ssh_option: SSH_OPT = None,
    json_out: JSON = False,
) -> None:
    """Gate a model on a profile's budgets: exit 0 when all hold, 1 when one breaks (named) or is uncertain
    (unless --uncertain pass), 2 bad input, 3 runtime failure. A latency verdict is pass when the estimate's
    error band lies within the budget, fail when it lies over it, uncertain otherwise; a host timing never passes
    a device budget. Appends a Markdown summary to $GITHUB_STEP_SUMMARY when set.

    Example: chita-edge check model.onnx --profile watch-a55-dual --latency-ms 20 --junit budgets.xml
    """
    _refuse_over_inputs(report, junit, [file], [profile], data)
    prof = load_profile(profile)
    cfg = _cfg(runtime, threads, warmup, runs, xnnpack, remote, remote_python, ssh_option)
    job = jobs.CheckJob(file=file, profile=prof, bench=cfg, latency_ms=latency_ms, percentile=percentile,
                        memory_mb=memory_mb, file_mb=file_mb, accuracy_min=accuracy_min, data=data, junit=junit,
                        uncertain=uncertain, repeats=repeats)
    with ui.progress() as cb:
        rep = jobs.run_check(job, progress=cb).to_dict()
    if report:
        rep["report"] = write_report(report, [rep["benchmark"]], [prof], rep["checks"])
    if json_out:
        ui.print_json(rep)
    else:
        reps = (rep.get("benchmark") or {}).get("repeats")
        if reps:
            ui.info(f"latency {reps['percentile']}: the median of {reps['processes']} processes judged ("
                    + ", ".join(f"{v:.4g}" for v in reps["latency_ms"]) + " ms)")
        for c in rep["checks"]:
            v = c.get("verdict") or ("pass" if c["passed"] else "fail")
            ui.info({"pass": "ok    ", "fail": "FAIL  "}.get(v, "UNSURE ") + c["message"])
    raise_if_failed(rep)
