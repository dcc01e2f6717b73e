"""``chita-edge profiles list|show|validate|calibrate``: the device profiles and their host calibration."""

from __future__ import annotations

from typing import Annotated

import typer

from chita_edge.cli import ui
from chita_edge.cli.app import app
from chita_edge.devices.band import Band
from chita_edge.devices.calibration import fit_profile, host_calibration
from chita_edge.devices.profiles import dump_yaml, load_all, load_profile

profiles_app = typer.Typer(help="Device profiles: list, show, validate a YAML file, calibrate this host.",
                           no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")

JSON = Annotated[bool, typer.Option("--json", help="Print exactly one JSON value on stdout.")]


@profiles_app.command("list")
def list_cmd(json_out: JSON = False) -> None:
    """List the bundled device profiles.

    Example: chita-edge profiles list --json
    """

    profs = load_all()
    if json_out:
        ui.print_json([p.summary() for p in profs])
        return
    ui.table("device profiles", ["id", "name", "form factor", "threads", "confidence", "calibrated"],
             [[p.id, p.name, p.form_factor, p.threads, p.confidence, "yes" if p.calibration else "no"] for p in profs])


@profiles_app.command("show")
def show_cmd(
    profile: Annotated[str, typer.Argument(help="Profile id or path to a profile YAML file.")],
    json_out: JSON = False,
) -> None:
    """Show one profile: CPU, runtimes, budgets and calibration rows.

    Example: chita-edge profiles show sbc-rpi4
    """

    p = load_profile(profile)
    if json_out:
        ui.print_json(p.model_dump(exclude_none=True))
    else:
        ui.out.print(dump_yaml(p), markup=False, highlight=False, soft_wrap=True)


@profiles_app.command("validate")
def validate_cmd(
    file: Annotated[str, typer.Argument(help="Profile YAML file to check against the schema.")],
    json_out: JSON = False,
) -> None:
    """Check a profile YAML file; a problem is reported as FILE:LINE: field 'F': expected ... (exit 2).

    Example: chita-edge profiles validate my-board.yaml
    """

    p = load_profile(file if file.endswith((".yaml", ".yml")) or "/" in file else f"./{file}")
    if json_out:
        ui.print_json({"file": file, "valid": True, **p.summary()})
    else:
        ui.info(f"{file}: valid profile '{p.id}' ({p.name})")


@profiles_app.command("calibrate")
def calibrate_cmd(
    profile: Annotated[list[str] | None, typer.Argument(help="Profile ids or YAML paths (default: all bundled).")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help="onnxruntime or litert.")] = "onnxruntime",
    threads: Annotated[int, typer.Option("--threads", help="Host threads (as used by bench).")] = 1,
    refresh: Annotated[bool, typer.Option("--refresh", help="Re-time the reference models even if cached.")] = False,
    json_out: JSON = False,
) -> None:
    """Time the reference models on this host (cached) and show each profile's host→device fit: its in-sample
    fit error, its leave-one-out error (each own anchor predicted by a fit without it) and the error band its
    estimates carry.

    Example: chita-edge profiles calibrate sbc-rpi4 --refresh
    """

    profs = [load_profile(p) for p in profile] if profile else load_all()
    with ui.progress() as cb:
        host = host_calibration(runtime, threads, refresh=refresh, progress=cb)
    fits = {p.id: fit_profile(p, host) for p in profs}
    if json_out:
        ui.print_json({"host_calibration": host.to_dict(), "cache": host.path,
                       "fits": {k: (f.to_dict() if f else None) for k, f in fits.items()}})
        return
    ui.info(f"host calibration ({runtime}, {threads} thread(s), {host.resolution} px): " + ", ".join(
        f"{m} {r['p50_ms']:.3g} ms (dense {100 * r['dense']:.0f} %)" for m, r in host.references.items())
        + f"; cached at {host.path}")
    conf = {p.id: p.confidence for p in profs}
    rho = {f"{f.rho:.3g}" for f in fits.values() if f}
    ui.table(f"host→device fits (rho {', '.join(sorted(rho)) or '—'})",
             ["profile", "confidence", "threads", "scale", "anchors", "fit error in-sample", "leave-one-out error (RMS)",
              "error band"],
             [[k, conf[k], f.device_threads, f"{f.scale:.3g}",
               f"{len(f.anchors)}: {', '.join(dict.fromkeys(a.row for a in f.anchors))}",
               f"{100 * f.fit_error:.0f} %", _loo_text(f.band), _band_text(f.band)] if f else
              [k, conf[k], "—", "—", "not calibrated", "—", "—", "unknown"] for k, f in fits.items()])


def _loo_text(band: Band | None) -> str:
    """RMS of the profile's own held-out anchors (each predicted by a fit without it)."""
    if band is None or band.own_rms is None:
        return "—"
    return f"{100 * band.own_rms:.0f} % (n={len(band.own_errors)})"


def _band_text(band: Band | None) -> str:
    if band is None or band.low is None or band.high is None:
        return "unknown"
    return f"{100 * (band.low - 1):+.0f}/{100 * (band.high - 1):+.0f} % ({band.basis})"
