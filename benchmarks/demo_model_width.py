"""Why the demo's model is 64-1024-1024-10: batch-1 latency of the digits MLP against its hidden width, and of
the old demo's CNN, on ONNX Runtime with one thread (``python benchmarks/demo_model_width.py``).

Each model (random weights: latency does not depend on them) is exported to ONNX and timed in this process:
``--warmup`` runs, then ``--runs`` timed runs; the table gives the median and the ratio to the widest MLP,
measured in the same run. A width whose latency is near the CNN's is mostly the runtime's per-call cost: there,
removing hidden units cannot be a measurable speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from chita_edge.workflows.demo import DigitsCNN, DigitsMLP


def median_ms(model: torch.nn.Module, path: Path, runs: int, warmup: int) -> float:
    x = torch.rand(1, 1, 8, 8)
    torch.onnx.export(model.eval(), (x,), str(path), dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {s.get_inputs()[0].name: x.numpy()}
    for _ in range(warmup):
        s.run(None, feed)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, feed)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for h in (1024, 512, 384, 256, 128):
            rows.append((f"DigitsMLP(hidden={h})", median_ms(DigitsMLP(hidden=h), Path(td) / f"m{h}.onnx", a.runs,
                                                             a.warmup)))
        rows.append(("DigitsCNN (the old demo)", median_ms(DigitsCNN(), Path(td) / "cnn.onnx", a.runs, a.warmup)))
    base = rows[0][1]
    print(f"{'model':<28} {'p50 ms':>8} {'x vs 1024':>10}")
    for name, ms in rows:
        print(f"{name:<28} {ms:>8.4f} {ms / base:>10.3f}")


if __name__ == "__main__":
    main()
