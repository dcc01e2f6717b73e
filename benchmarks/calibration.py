"""Host→device calibration quality and bench repeatability, measured on this machine.

    python benchmarks/calibration.py                 # uses the cached host calibration if there is one
    python benchmarks/calibration.py --refresh       # re-time the reference models first
    python benchmarks/calibration.py --repeat-file model.onnx   # repeatability of bench on that file too
    python benchmarks/calibration.py --runtime litert --no-repeat   # the LiteRT calibration (tflite extra)

Prints:
1. the host calibration: p50 of MobileNetV1 / MobileNetV2 / ResNet18 (224 px, random weights, batch 1) and the
   share of their host time in dense operators;
2. every profile's fit (scale, rho, in-sample fit error);
3. leave-one-out: each profile anchor predicted from a fit without it, against the published figure, for the
   op-mix model and for the scalar-factor baseline (one ratio per profile) measured in the same run; target
   |error| <= 35 % for >= 80 % of rows;
4. repeatability: ``bench`` run 3 times on the same files (ResNet20 at 32 px and MobileNetV1 at 224 px by
   default), p50 of each run and the largest deviation from their median; target <= 10 %.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from chita_edge.devices.calibration import fit_profile, host_calibration, leave_one_out
from chita_edge.devices.child import run_child
from chita_edge.devices.profiles import load_all

TOL = 0.35


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)))


def loo_summary(rows: list[dict]) -> tuple[int, int]:
    scored = [r for r in rows if r["error"] is not None]
    return sum(abs(r["error"]) <= TOL for r in scored), len(scored)


def export_examples(out: Path) -> list[Path]:
    from chita_edge.exporters import onnx_format

    from chita_edge.models.zoo import MobileNetV1, ResNet20

    files = []
    for name, module, shape in (("resnet20", ResNet20(), (1, 3, 32, 32)),
                                ("mobilenetv1", MobileNetV1(), (1, 3, 224, 224))):
        torch.manual_seed(0)
        mp, _ = onnx_format.export(module.eval(), torch.rand(*shape))
        p = out / f"{name}.onnx"
        onnx_format.save(mp, p)
        files.append(p)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refresh", action="store_true", help="re-time the reference models (else use the cache)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runtime", choices=("onnxruntime", "litert"), default="onnxruntime",
                    help="host runtime to calibrate (litert needs the tflite extra)")
    ap.add_argument("--repeat-file", action="append", default=[], help="file(s) for the repeatability part")
    ap.add_argument("--repeat-runs", type=int, default=50, help="timed runs per bench in the repeatability part")
    ap.add_argument("--no-repeat", action="store_true", help="skip the repeatability part")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)

    host = host_calibration(a.runtime, a.threads, refresh=a.refresh,
                            progress=lambda s, d, t: print(f"  {s} {d}/{t}", file=sys.stderr, flush=True))
    print(f"# Host calibration: {host.runtime} {host.runtime_version}, op mix by {host.basis}, {host.threads} thread(s), {host.resolution} px, "
          f"{host.host.get('cpu')} ({host.host.get('cores')} cores); cache {host.path}\n")
    table([[m, f"{r['p50_ms']:.2f}", f"{100 * r['dense']:.0f} %", f"{100 * r['p50_spread']:.0f} %"]
           for m, r in host.references.items()], ["reference", "host p50 ms", "dense share", "spread of p50s"])

    profiles = load_all()
    print("\n# Fits (device_ms = scale × host_ms × (dense + rho × (1 − dense)))\n")
    rows = []
    for p in profiles:
        f = fit_profile(p, host)
        rows.append([p.id, f.device_threads, f"{f.scale:.3g}", f"{f.rho:.3g}", len(f.anchors),
                     f"{100 * f.fit_error:.0f} %"])
    table(rows, ["profile", "device threads", "scale", "rho", "anchors", "fit error"])

    model_rows = leave_one_out(profiles, host)
    scalar_rows = leave_one_out(profiles, host, fixed_rho=1.0)
    print("\n# Leave-one-out on the profiles' own anchors (estimate without the row vs the published figure)\n")
    rows = []
    for m, s in zip(model_rows, scalar_rows, strict=True):
        rows.append([m["profile"], m["row"], m["model"], m["threads"], f"{m['published_ms']:.2f}",
                     "—" if m["estimate_ms"] is None else f"{m['estimate_ms']:.2f}",
                     "—" if m["error"] is None else f"{100 * m['error']:+.0f} %",
                     "—" if s["error"] is None else f"{100 * s['error']:+.0f} %"])
    table(rows, ["profile", "row", "model", "threads", "published ms", "estimate ms", "error (op-mix)",
                 "error (scalar)"])
    ok, n = loo_summary(model_rows)
    ok_s, n_s = loo_summary(scalar_rows)
    med = statistics.median(abs(r["error"]) for r in model_rows if r["error"] is not None)
    med_s = statistics.median(abs(r["error"]) for r in scalar_rows if r["error"] is not None)
    print(f"\nwithin ±35 %: op-mix model {ok}/{n} = {100 * ok / n:.0f} % (median |error| {100 * med:.0f} %); "
          f"scalar baseline {ok_s}/{n_s} = {100 * ok_s / n_s:.0f} % (median |error| {100 * med_s:.0f} %); "
          f"target >= 80 %: {'met' if ok >= 0.8 * n else 'NOT met'}")

    if a.no_repeat:
        return 0
    print("\n# Repeatability: bench 3 times on the same file (p50 of each run, ms)\n")
    with tempfile.TemporaryDirectory() as td:
        files = [Path(f) for f in a.repeat_file] or export_examples(Path(td))
        rows = []
        for f in files:
            p50s = [run_child(f, threads=a.threads, warmup=10, runs=a.repeat_runs, profile_runs=0)["latency_ms"]["p50"]
                    for _ in range(3)]
            m = statistics.median(p50s)
            dev = max(abs(x - m) / m for x in p50s)
            rows.append([f.name, *[f"{x:.3f}" for x in p50s], f"{m:.3f}", f"{100 * dev:.1f} %",
                         "yes" if dev <= 0.10 else "NO"])
        table(rows, ["file", "run 1", "run 2", "run 3", "median", "max deviation", "within 10 %"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
