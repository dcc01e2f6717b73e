"""``chita-edge run``, ``chita-edge demo`` and ``chita-edge sweep``: whole pipelines, rendered."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from chita_edge.cli import ui
from chita_edge.cli.app import app
from chita_edge.core.errors import BadInput
from chita_edge.workflows.demo import run_demo
from chita_edge.workflows.pipeline import raise_if_failed, run_pipeline
from chita_edge.workflows.pipeline_spec import load_pipeline
from chita_edge.workflows.settings import resolve
from chita_edge.workflows.sweep import COLUMNS, SweepConfig, run_sweep, table_rows

JSON = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


def _event_printer(json_out: bool):
    def on_event(e: dict[str, Any]) -> None:
        if json_out or e["status"] == "running":
            return
        secs = f" ({e['seconds']:.1f} s)" if "seconds" in e else ""
        extra = f" from {e['from']}" if e.get("from") else ""
        if e.get("resumed_from"):
            extra = f" at epoch {e['resumed_from']['epoch'] + 1} step {e['resumed_from']['step']}"
        ui.info(f"{e['stage']}: {e['status']}{extra}{secs}")
    return on_event


def _margin(c: dict[str, Any]) -> str:
    """How far a check is from its limit: the upper edge of an estimate's error band (or the value) as a share of
    a ceiling, or the points above a floor."""
    if c["comparison"] == ">=":
        return f"{c['value'] - c['limit']:+.3g} {c['unit']}"
    edge = c.get("high") if c.get("high") is not None else c["value"]
    return f"{'upper edge ' if c.get('high') is not None else ''}{100 * edge / c['limit']:.0f} % of budget"


def _check_cell(c: dict[str, Any]) -> str:
    band = f" [{c['low']:.3g}-{c['high']:.3g}]" if c.get("high") is not None and c.get("low") is not None else ""
    word = "" if c.get("verdict", "pass" if c["passed"] else "fail") == "pass" else f" {c.get('verdict', 'fail').upper()}"
    return (f"{c['name']} {c['value']:.3g}{band}{word} {c['comparison']} {c['limit']:.3g} {c['unit']} "
            f"({_margin(c)})")


def _render(summary: dict[str, Any]) -> None:
    ui.table(f"{summary['name']}: verdict", ["target", "file", "result", "checks"],
             [[v["profile"], Path(v["file"]).name, "pass" if v["passed"] else "FAIL",
               ", ".join(_check_cell(c) for c in v["checks"])] for v in summary["verdicts"]])
    ran = sum(s["status"] == "ran" for s in summary["stages"])
    skipped = sum(s["status"] == "skipped" for s in summary["stages"])
    resumed = sum(s["status"] == "resumed" for s in summary["stages"])
    ui.info(f"{ran} stage(s) ran, {f'{resumed} resumed, ' if resumed else ''}{skipped} skipped (unchanged), "
            f"{summary['seconds']:.0f} s; "
            f"manifest: {summary['manifest']}")
    ui.info(f"report: {summary['report']['index']}")


@app.command("run")
def run_cmd(
    pipeline: Annotated[Path, typer.Argument(help="pipeline.yaml: model, data, profiles, prune, finetune, "
                                                  "export, checks (see docs/pipeline.md).")],
    out: Annotated[Path | None, typer.Option("--out", help="Output directory (default: the file's 'out', else "
                                                           "NAME.out beside the file).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Run every stage again even if unchanged.")] = False,
    json_out: JSON = False,
) -> None:
    """Run a pipeline: prune -> fine-tune -> export -> benchmark and check, per target profile, with a
    manifest.json; unchanged stages are skipped and an interrupted run resumes. Exit 0 when every budget
    holds, 1 when one breaks, 2 bad input, 3 runtime failure.

    Example: chita-edge run examples/pipeline-digits.yaml --out runs/digits
    """

    spec = load_pipeline(pipeline)
    with ui.progress() as cb:
        summary = run_pipeline(spec, out=out, force=force, progress=cb, on_event=_event_printer(json_out),
                               source=str(pipeline))
    if json_out:
        ui.print_json(summary)
    else:
        _render(summary)
    raise_if_failed(summary)


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("chita-edge-demo"),
    tflite: Annotated[bool | None, typer.Option("--tflite/--no-tflite", help="Also export TFLite (needs the tflite "
                                                                            "extra; adds about a minute on a fresh "
                                                                            "machine).")] = None,
    json_out: JSON = False,
) -> None:
    """Train an MLP on scikit-learn's digits, give a phone and a watch a file budget the dense model breaks (0.3x
    its ONNX file), prune whole hidden units to each device's budgets, fine-tune, export to ONNX (and TFLite),
    benchmark, check the budgets, and print what pruning bought and the HTML report's path. Offline, minutes.

    Example: chita-edge demo --out /tmp/demo
    """

    with ui.progress() as cb:
        summary = run_demo(out, tflite=tflite, progress=cb, on_event=_event_printer(json_out))
    if json_out:
        ui.print_json(summary)
    else:
        for n in summary["notes"]:
            ui.info(f"note: {n}")
        _render(summary)
        ui.info(f"demo finished in {summary['total_seconds']:.0f} s")
    raise_if_failed(summary)


def _fractions(text: str | None, flag: str) -> tuple[float, ...]:
    if text is None:
        return ()
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise BadInput(f"{flag} {text!r}: expected comma-separated fractions, e.g. 0.5,0.7,0.9") from None


@app.command("sweep")
def sweep_cmd(
    model: Annotated[str, typer.Argument(help="zoo:NAME, path/to/file.py:factory, or a torch.export .pt2 file.")],
    data: Annotated[str, typer.Option("--data", help="npz:PATH (x_train,y_train,x_test,y_test) or 'digits'.")],
    profiles: Annotated[str, typer.Option("--profiles", help="Comma-separated device profile ids or YAML paths.")],
    weights: Annotated[Path | None, typer.Option("--weights", help="Dense state dict or checkpoint "
                                                                   "(weights_only=True).")] = None,
    sparsities: Annotated[str | None, typer.Option("--sparsities", help="Unstructured sparsities, e.g. "
                                                                        "0.5,0.7,0.9.")] = None,
    latency_fractions: Annotated[str | None, typer.Option("--latency-fractions", help="Structured: prune to these "
                                                          "fractions of the dense model's estimated p50 on each "
                                                          "profile, e.g. 0.7,0.5,0.3.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="Pruning method (chita++, chita, bso, magnitude, ...; "
                                                                "with --latency-fractions: chita, l1-uniform, ...; "
                                                                "default: chita++).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Export format: onnx or tflite.")] = "onnx",
    grads: Annotated[int | None, typer.Option("--grads", help="Number of gradient rows n in G (default: 1000).")] = None,
    stages: Annotated[int | None, typer.Option("--stages", help="CHITA++ stages (default: 25).")] = None,
    search_stages: Annotated[int | None, typer.Option("--search-stages", help="With --latency-fractions: budget "
                                                                              "search stages (default: 4).")] = None,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per benchmark.")] = 50,
    warmup: Annotated[int, typer.Option("--warmup", help="Warm-up runs per benchmark.")] = 10,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for gradient sampling (default: 0).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Keep the files here and write report.json/.md/.html "
                                                           "(one Pareto chart per device).")] = None,
    json_out: JSON = False,
) -> None:
    """Sweep sparsities (or latency budgets) of MODEL: prune, export, benchmark, estimate on each device and
    evaluate; print the accuracy-vs-latency frontier per device as one table (and report with --out).

    Example: chita-edge sweep zoo:mlpnet --weights mlpnet.pt --data npz:mnist.npz --profiles phone-mid-sd670,watch-a55-dual --sparsities 0.5,0.7,0.9 --out sweep
    """

    s = resolve(flags={"method": method, "n_grads": grads, "stages": stages, "search_stages": search_stages,
                       "seed": seed})
    cfg = SweepConfig(sparsities=_fractions(sparsities, "--sparsities"),
                      latency_fractions=_fractions(latency_fractions, "--latency-fractions"), method=s["method"],
                      format=fmt, n_grads=s["n_grads"], stages=s["stages"], search_stages=s["search_stages"],
                      runs=runs, warmup=warmup, seed=s["seed"])
    plist = [p.strip() for p in profiles.split(",") if p.strip()]
    with ui.progress() as cb:
        doc = run_sweep(model, weights, data, plist, cfg, out=out, progress=cb)
    if json_out:
        ui.print_json(doc)
        return
    ui.table(f"sweep of {doc['model']} ({doc['method']}, {doc['mode']})", COLUMNS, table_rows(doc))
    ui.info(f"{len(doc['points'])} point(s) in {doc['seconds']:.0f} s; device p50 is estimated from this host "
            "(— where the profile is not calibrated)")
    if doc["report"]:
        ui.info(f"report: {doc['report']['html']}")
