"""``chita-edge export`` and ``chita-edge inspect``: build the arguments, call the library, render the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chita_edge.cli import ui
from chita_edge.cli.app import app
from chita_edge.workflows import jobs
from chita_edge.workflows.export import inspect_export

JSON = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _short(row: dict) -> str:
    """The PyTorch parameter a weight came from, else the tail of its (often long) tensor name."""
    return row.get("param") or ("..." + row["tensor"][-30:] if len(row["tensor"]) > 33 else row["tensor"])


@app.command("export")
def export_cmd(
    pruned: Annotated[Path, typer.Argument(help="A chita-edge checkpoint (from prune / finetune), or a plain "
                                                "state dict together with --model.")],
    out: Annotated[Path, typer.Option("--out", help="The file to write (.onnx or .tflite); written only after "
                                                   "the parity check passed.")],
    fmt: Annotated[str | None, typer.Option("--format", help="onnx or tflite (default: from --out's suffix).")] = None,
    layout: Annotated[str, typer.Option("--layout", help="dense, compact (zero channels removed), sparse "
                                                        "(sparse encodings / kernels) or auto (per layer, "
                                                        "with reasons).")] = "dense",
    quantize: Annotated[str, typer.Option("--quantize", help="none, fp16 or int8 (static, calibrated).")] = "none",
    calibration_data: Annotated[str | None, typer.Option(
        "--calibration-data", help="int8 calibration inputs: npz:PATH or digits (training split) or a .npy "
                                   "array (default: the checkpoint's training data).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="zoo:NAME or path/to/file.py:factory, for a plain "
                                                             "state dict.")] = None,
    parity_samples: Annotated[int, typer.Option("--parity-samples", help="Test inputs for the parity check.")] = 1000,
    min_agreement: Annotated[float, typer.Option("--min-agreement", help="fp16 / int8 parity: least top-1 "
                                                                         "agreement with PyTorch.")] = 0.99,
    int8_fallback: Annotated[bool, typer.Option(
        "--int8-fallback/--no-int8-fallback",
        help="int8: when all-int8 misses --min-agreement on held-out training inputs, keep the most "
             "quantisation-sensitive layers (measured) in float32.")] = True,
    max_float_macs: Annotated[float, typer.Option("--max-float-macs", help="int8 fallback: at most this fraction "
                                                                           "of MACs in float32.")] = 0.2,
    threads: Annotated[int, typer.Option("--threads", help="Runtime threads for the parity check.")] = 1,
    json_out: JSON = False,
) -> None:
    """Export a pruned checkpoint to ONNX or TFLite in a layout that turns its zeros into real wins.

    Every export is run in its runtime and compared with PyTorch (fp32: |error| <= 1e-4 + 1e-3 * max|output| per
    sample; fp16 / int8: top-1 agreement >= 99 %); a failure exits 3 and leaves nothing at --out.

    Example: chita-edge export pruned.pt --format tflite --layout sparse --out model.tflite
    """
    with ui.progress() as cb:
        job = jobs.ExportJob(checkpoint=pruned, out=out, format=fmt, layout=layout, quantize=quantize, model=model,
                             calibration_data=calibration_data, parity_samples=parity_samples,
                             min_agreement=min_agreement, int8_fallback=int8_fallback, max_float_macs=max_float_macs,
                             threads=threads)
        r = jobs.run_export(job, progress=cb).to_dict()
    if json_out:
        ui.print_json(r)
        return
    rows = [[_short(row), f"{row['zero_fraction']:.1%}", row["encoding"], row["kernel"]] for row in r["layers"]]
    ui.table(f"{r['out']}: {r['format']} {r['layout']}/{r['quantize']}", ["weight", "zeros", "encoding", "runtime"],
             rows)
    p = r["parity"]
    req = "" if r["requires"].get("xnnpack", True) or r["format"] != "tflite" else "; requires: no XNNPACK"
    ui.info(f"wrote {r['out']} ({_kb(r['bytes'])}); parity on {p['samples']} {p['inputs']} inputs: max abs error "
            f"{p['max_abs_error']:.2g}, top-1 agreement {p['top1_agreement']:.2%} ({p['criterion']}){req}")
    if r["quantize"] != "none":
        ui.info(f"parity: {p['summary']}")
    if r.get("compact"):
        c = r["compact"]
        ui.info(f"compact: {c['removed_channels']} channels removed, parameters {c['params_before']} -> "
                f"{c['params_after']}, MACs {c['macs_before']} -> {c['macs_after']}")
    for k in (r.get("int8_fallback") or {}).get("kept", []):
        ui.info(f"float32: {k['param'] or k['op']} ({k['mac_fraction']:.1%} of MACs): {k['why']}")
    for note in r["notes"]:
        ui.info(f"note: {note}")


@app.command("inspect")
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="An exported .onnx or .tflite file.")],
    runtime: Annotated[str | None, typer.Option("--runtime", help="onnxruntime or litert (default: the "
                                                                 "file's own).")] = None,
    json_out: JSON = False,
) -> None:
    """Sparsity lint: per weight, its zeros, how the file stores them and what the runtime does with them.

    Example: chita-edge inspect model.onnx --json
    """
    r = inspect_export(file, runtime)
    if json_out:
        ui.print_json(r)
        return
    rows = [[_short(w), "x".join(map(str, w["shape"])), f"{w['zero_fraction']:.1%}", w["encoding"],
             w["runtime_action"], f"{w['macs']:,}"] for w in r["weights"]]
    ui.table(f"{r['file']} on {r['runtime']} ({_kb(r['bytes'])}, gzip {_kb(r['gzip_bytes'])})",
             ["weight", "shape", "zeros", "encoding", "runtime does", "MACs"], rows)
    ui.info(f"zeros {r['zero_fraction']:.1%} of weights; {r['sparse_mac_share']:.0%} of MACs run sparse"
            + ("" if r["requires"].get("xnnpack", True) or r["format"] != "tflite" else "; requires: no XNNPACK"))
    ui.info(f"verdict: {r['verdict']}")
