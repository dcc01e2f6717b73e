"""How far one benchmark process of a file moves, and how much ``check --repeats K`` narrows what a check sees.

    python benchmarks/check_repeats.py CKPT_OR_ONNX --profile phone-flagship-sd8g2 --processes 12 --runs 100 1000

For each ``--runs`` value, ``--processes`` benchmark processes of the same file (``devices.bench.benchmark``, as
``check`` runs one), the device estimate's p90 of each. One table: the median, the standard deviation of the log
over processes (the spread one ``check`` process has), and the half-width of the 95 % interval around the median
where a check judging the median of K processes is expected (``budget.measure.check_interval`` from those
processes: what ``prune --check-repeats K`` decides with), for K = 1, 3 and 5, and their ratio to K = 1's. A
``.pt`` is a chita-edge checkpoint, exported first (compact layout); an ``.onnx`` is timed as it is.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

import torch
from chita_edge.exporters import ExportConfig, export_model

from chita_edge.budget.measure import check_interval, precision_of
from chita_edge.devices.bench import BenchConfig, benchmark, best_latency
from chita_edge.devices.profiles import load_profile
from chita_edge.models.loading import load_model


def onnx_of(path: Path, td: Path) -> Path:
    if path.suffix == ".onnx":
        return path
    lm = load_model(None, path)
    x = torch.rand(1, 3, 32, 32)
    out = td / "model.onnx"
    export_model(lm.module.eval(), ExportConfig(format="onnx", layout="compact"), example_input=x, out=out,
                 parity_inputs=x, parity_source="random")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="a chita-edge checkpoint (.pt, 3x32x32 input) or an .onnx file")
    ap.add_argument("--profile", default="phone-flagship-sd8g2")
    ap.add_argument("--processes", type=int, default=12)
    ap.add_argument("--runs", type=int, nargs="+", default=[100, 1000])
    args = ap.parse_args()
    prof = load_profile(args.profile)
    rows = []
    with tempfile.TemporaryDirectory(prefix="chita-edge-repeats-") as td:
        f = onnx_of(args.model, Path(td))
        for runs in args.runs:
            lat = [float(best_latency(benchmark(f, [prof], BenchConfig(runs=runs, warmup=max(5, runs // 10),
                                                                        profile_runs=3)), prof.id)[0]["p90"])
                   for _ in range(args.processes)]
            v, h = statistics.median(lat), precision_of(lat)
            m = {"latency_ms": v, "latency_interval": [v * math.exp(-h), v * math.exp(h)], "repeats": len(lat)}
            half = {k: math.log(check_interval(m, k)[1] / v) for k in (1, 3, 5)}
            sd = statistics.stdev(math.log(x) for x in lat)
            rows.append((runs, v, sd, half))
            print(f"runs {runs}: " + ", ".join(f"{x:.4f}" for x in lat), flush=True)
    print(f"\n{f.name if f.suffix == '.onnx' else args.model.name} on {prof.id}, {args.processes} processes each\n")
    print("| runs per process | median p90 ms | sd of log, one process | check K=1 +- | K=3 +- | K=5 +- | K=3 / K=1 |")
    print("|---|---|---|---|---|---|---|")
    for runs, v, sd, half in rows:
        print(f"| {runs} | {v:.4f} | {100 * sd:.1f} % | {100 * half[1]:.1f} % | {100 * half[3]:.1f} % | "
              f"{100 * half[5]:.1f} % | {half[3] / half[1]:.2f} |")


if __name__ == "__main__":
    main()
