"""``chita-edge run``, ``chita-edge demo`` and ``chita-edge sweep``: whole pipelines, rendered."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from chita_edge.cli import ui
from chita_edge.cli.app import app

JSON = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


def _event_printer(json_out: bool):
    def on_event(e: dict[str, Any]) -> None:
        if json_out or e["status"] == "running":
            return
        secs = f" ({e['seconds']:.1f} s)" if "seconds" in e else ""
        extra = f" from {e['from']}" if e.get("from") else ""
        ui.info(f"{e['stage']}: {e['status']}{extra}{secs}")
    return on_event


def _render(summary: dict[str, Any]) -> None:
    ui.table(f"{summary['name']}: verdict", ["target", "file", "result", "checks"],
             [[v["profile"], Path(v["file"]).name, "pass" if v["passed"] else "FAIL",
               ", ".join(f"{c['name']} {c['value']:.3g}{'' if c['passed'] else ' BREAKS'} {c['comparison']} "
                         f"{c['limit']:.3g} {c['unit']}" for c in v["checks"])] for v in summary["verdicts"]])
    ran = sum(s["status"] == "ran" for s in summary["stages"])
    skipped = sum(s["status"] == "skipped" for s in summary["stages"])
    ui.info(f"{ran} stage(s) ran, {skipped} skipped (unchanged), {summary['seconds']:.0f} s; "
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
    from chita_edge.pipeline import load_pipeline, raise_if_failed, run_pipeline

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
    tflite: Annotated[bool | None, typer.Option("--tflite/--no-tflite", help="Also export TFLite (default: when "
                                                                            "the tflite extra is installed).")] = None,
    json_out: JSON = False,
) -> None:
    """Train a small CNN on scikit-learn's digits, prune it for a phone and a watch, fine-tune, export to ONNX
    (and TFLite), benchmark, check the budgets and print the HTML report's path. Offline, a few minutes.

    Example: chita-edge demo --out /tmp/demo
    """
    from chita_edge.demo import run_demo
    from chita_edge.pipeline import raise_if_failed

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
