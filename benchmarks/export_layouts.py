"""What each export layout buys on ONNX Runtime and LiteRT: file size, peak memory and latency vs dense.

One run, three cases, every ratio against the dense export of the same model measured in the same run:

1. MLP 784-1024-1024-10 trained on MNIST, pruned to 90 % in 1x4 blocks (magnitude) and fine-tuned with the
   mask: TFLite dense vs sparse (direct sparse FULLY_CONNECTED, built-in kernels), ONNX dense vs sparse.
   Top-1 on the MNIST test set must be identical between the dense and the sparse file.
2. MLPNet (../shared checkpoint) pruned to 95 % (magnitude, or --mlpnet PRUNED for e.g. a chita++ checkpoint):
   dense vs sparse file sizes and speed on both runtimes.
3. ResNet20 (../shared checkpoint) structurally pruned: half of the inner channels of every BasicBlock removed
   (L1 norm of conv1's filters), exported dense (zeros stored) vs compact (channels physically gone).

Latency: batch 1, one thread, median over interleaved rounds of the files of a case (so load drift hits all
files alike); LiteRT files run with XNNPACK unless the file forbids it, and "dense, built-in" shows the dense
TFLite file on the same built-in kernels as the sparse one. Peak memory: a fresh process per file, the peak
RSS (``VmHWM``, reset after the imports) minus the RSS just before the model is loaded, 20 inferences.

    python benchmarks/export_layouts.py [--quick] [--json-out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from chita_edge.exporters import ExportConfig, export_model, load_session
from torch import nn

from chita_edge.core.data import load_data
from chita_edge.core.evaluate import accuracy
from chita_edge.models.zoo import BasicBlock, MLPNet, ResNet20

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHITA_EDGE_SHARED", ROOT.parent / "shared"))

_CHILD = r"""
import json, sys
import numpy as np
from chita_edge.exporters.runtime import load_session
import onnxruntime  # noqa: F401  (runtime libraries resident before the baseline)
try:
    import ai_edge_litert.interpreter  # noqa: F401
except ImportError:
    pass
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS: imports are not the model's
base = status("VmRSS")
s = load_session(sys.argv[1], 1, xnnpack=None if sys.argv[2] == "auto" else sys.argv[2] == "1")
x = np.random.default_rng(0).random(s.input_shape, dtype=np.float32)
run = s.prepare(x)
for _ in range(20):
    run()
print(json.dumps({"peak_bytes": status("VmHWM") - base}))
"""


def peak_memory(path: Path, xnnpack: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), xnnpack], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def latencies(variants: list[dict], x: np.ndarray, rounds: int, per_round: int) -> dict[str, float]:
    """Median ms per inference of each variant, interleaved: round r times every file ``per_round`` times."""
    runs = {}
    for v in variants:
        s = load_session(v["path"], 1, xnnpack=v.get("xnnpack"))
        runs[v["name"]] = (s, s.prepare(x))
        for _ in range(10):
            runs[v["name"]][1]()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, (_, fn) in runs.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[name].append((time.perf_counter() - t0) / per_round * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def top1(path: Path, x: torch.Tensor, xnnpack: bool | None = None) -> np.ndarray:
    return load_session(path, 1, xnnpack=xnnpack).run(x.numpy()).argmax(1)


def export(model: nn.Module, fmt: str, layout: str, out: Path, parity: torch.Tensor) -> dict:
    r = export_model(model, ExportConfig(format=fmt, layout=layout), example_input=parity[:1], out=out,
                     parity_inputs=parity)
    return r.to_dict()


def table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    print(f"| {'variant':<28} | {'file KiB':>9} | {'size':>6} | {'peak MiB':>8} | {'memory':>6} | "
          f"{'latency ms':>10} | {'latency':>7} | {'top-1 %':>7} |")
    print("|" + "|".join("-" * (w + 2) for w in (28, 9, 6, 8, 6, 10, 7, 7)) + "|")
    base = rows[0]
    for r in rows:
        acc = f"{r['top1']:.2f}" if r.get("top1") is not None else "-"
        print(f"| {r['name']:<28} | {r['bytes'] / 1024:>9.1f} | {r['bytes'] / base['bytes']:>5.2f}x | "
              f"{r['peak'] / 2**20:>8.2f} | {r['peak'] / max(1, base['peak']):>5.2f}x | {r['ms']:>10.4f} | "
              f"{r['ms'] / base['ms']:>6.2f}x | {acc:>7} |")


def measure(title: str, variants: list[dict], x: np.ndarray, args: argparse.Namespace,
            groups: list[list[str]]) -> list[dict]:
    """Latency, memory and size of each variant; ``groups``: lists of names sharing the first as baseline."""
    lat = latencies(variants, x, args.rounds, args.per_round)
    for v in variants:
        v["ms"] = lat[v["name"]]
        v["peak"] = peak_memory(v["path"], "auto" if v.get("xnnpack") is None else str(int(v["xnnpack"])))
        v["bytes"] = v["path"].stat().st_size
    by = {v["name"]: v for v in variants}
    for g in groups:
        table(f"{title} ({g[0]} = 1.00x)", [by[n] for n in g])
    return variants


@torch.no_grad()
def block_prune_(model: nn.Module, sparsity: float, block: int = 4) -> dict[str, torch.Tensor]:
    """Magnitude pruning of every Linear weight to ``sparsity`` in 1 x ``block`` blocks; returns the masks."""
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight
            score = w.abs().reshape(w.shape[0], -1, block).sum(-1)
            k = int(sparsity * score.numel())
            mask = (score > score.flatten().kthvalue(k).values).repeat_interleave(block, dim=1).float()
            w.mul_(mask)
            masks[name] = mask
    return masks


def train(model: nn.Module, ds, epochs: float, masks: dict[str, torch.Tensor] | None = None) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    steps = int(epochs * len(ds.x_train) / 128)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ds.x_train), (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx]).backward()
        opt.step()
        if masks:
            with torch.no_grad():
                for name, m in model.named_modules():
                    if name in masks:
                        m.weight.mul_(masks[name])
    model.eval()


def case_mlp1024(tmp: Path, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 10))
    mnist = SHARED / "data" / "mnist.npz"
    ds = load_data(f"npz:{mnist}") if mnist.exists() else None
    if ds is not None:
        train(model, ds, 0.3 if args.quick else 1.0)
        masks = block_prune_(model, 0.9, 4)
        train(model, ds, 0.2 if args.quick else 0.5, masks)
        x_test = ds.x_test if not args.quick else ds.x_test[:2000]
        print(f"MLP 784-1024-1024-10, 90 % in 1x4 blocks: PyTorch top-1 {accuracy(model, x_test, ds.y_test[:len(x_test)]):.2f} %")
    else:
        block_prune_(model, 0.9, 4)
        x_test = torch.rand(200, 1, 28, 28)
        print("MLP 784-1024-1024-10 (random weights: ../shared/data/mnist.npz absent), 90 % in 1x4 blocks")
    model.eval()
    parity = x_test[:500]
    for fmt in ("tflite", "onnx"):
        for layout in ("dense", "sparse"):
            export(model, fmt, layout, tmp / f"mlp1024_{layout}.{fmt}", parity)
    v = [
        {"name": "tflite dense (XNNPACK)", "path": tmp / "mlp1024_dense.tflite"},
        {"name": "tflite dense (built-in)", "path": tmp / "mlp1024_dense.tflite", "xnnpack": False},
        {"name": "tflite sparse (built-in)", "path": tmp / "mlp1024_sparse.tflite"},
        {"name": "onnx dense", "path": tmp / "mlp1024_dense.onnx"},
        {"name": "onnx sparse_initializer", "path": tmp / "mlp1024_sparse.onnx"},
    ]
    if ds is not None:
        y = ds.y_test[:len(x_test)].numpy()
        preds = {}
        for item in v:
            preds[item["name"]] = top1(item["path"], x_test, item.get("xnnpack"))
            item["top1"] = 100.0 * float((preds[item["name"]] == y).mean())
        same = bool((preds["tflite sparse (built-in)"] == preds["tflite dense (built-in)"]).all())
        print(f"identical top-1 predictions, TFLite sparse vs dense on {len(x_test)} MNIST test images: {same}")
    return measure("MLP 784-1024-1024-10, 1x4 blocks at 90 %", v, x_test[:1].numpy(), args,
                   [["tflite dense (built-in)", "tflite sparse (built-in)", "tflite dense (XNNPACK)"],
                    ["onnx dense", "onnx sparse_initializer"]])


def case_mlpnet(tmp: Path, args: argparse.Namespace) -> list[dict] | None:
    ckpt, mnist = SHARED / "checkpoints" / "mlpnet_mnist.pt", SHARED / "data" / "mnist.npz"
    if args.mlpnet:
        from chita_edge.models.loading import load_model

        model = load_model(None, args.mlpnet).module
        how = f"checkpoint {args.mlpnet}"
    elif ckpt.exists():
        model = MLPNet().eval()
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        with torch.no_grad():  # global magnitude pruning to 95 %
            w = torch.cat([p.abs().flatten() for p in model.parameters()])
            thr = w.kthvalue(int(0.95 * w.numel())).values
            for p in model.parameters():
                p.mul_((p.abs() > thr).float())
        how = "global magnitude pruning to 95 %"
    else:
        print("\n(MLPNet skipped: ../shared/checkpoints/mlpnet_mnist.pt absent)")
        return None
    ds = load_data(f"npz:{mnist}") if mnist.exists() else None
    x = ds.x_test[:1000] if ds is not None else torch.rand(200, 1, 28, 28)
    for fmt in ("tflite", "onnx"):
        for layout in ("dense", "sparse"):
            export(model, fmt, layout, tmp / f"mlpnet_{layout}.{fmt}", x)
    v = [{"name": "tflite dense", "path": tmp / "mlpnet_dense.tflite"},
         {"name": "tflite sparse", "path": tmp / "mlpnet_sparse.tflite"},
         {"name": "onnx dense", "path": tmp / "mlpnet_dense.onnx"},
         {"name": "onnx sparse_initializer", "path": tmp / "mlpnet_sparse.onnx"}]
    if ds is not None:
        for item in v:
            item["top1"] = 100.0 * float((top1(item["path"], ds.x_test) == ds.y_test.numpy()).mean())
    return measure(f"MLPNet ({how})", v, x[:1].numpy(), args,
                   [["tflite dense", "tflite sparse"], ["onnx dense", "onnx sparse_initializer"]])


def case_resnet20(tmp: Path, args: argparse.Namespace) -> list[dict] | None:
    ckpt, cifar = SHARED / "checkpoints" / "resnet20_cifar10.pt", SHARED / "data" / "cifar10.npz"
    if not ckpt.exists():
        print("\n(ResNet20 skipped: ../shared/checkpoints/resnet20_cifar10.pt absent)")
        return None
    model = ResNet20().eval()
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    with torch.no_grad():  # structured: drop half of every block's inner channels (conv1 filters + bn1)
        for b in model.modules():
            if isinstance(b, BasicBlock):
                w = b.conv1.weight
                drop = w.abs().sum((1, 2, 3)).argsort()[: w.shape[0] // 2]
                w[drop] = 0
                b.bn1.weight[drop] = 0
                b.bn1.bias[drop] = 0
    ds = load_data(f"npz:{cifar}") if cifar.exists() else None
    x = ds.x_test if ds is not None else torch.rand(200, 3, 32, 32)
    reports = {}
    for fmt in ("onnx", "tflite"):
        for layout in ("dense", "compact"):
            reports[(fmt, layout)] = export(model, fmt, layout, tmp / f"resnet20_{layout}.{fmt}", x[:500])
    c = reports[("onnx", "compact")]["compact"]
    print(f"\nResNet20 compact: {c['removed_channels']} channels removed, parameters {c['params_before']:,} -> "
          f"{c['params_after']:,}, MACs {c['macs_before']:,} -> {c['macs_after']:,} "
          f"({c['macs_after'] / c['macs_before']:.2f}x)")
    v = [{"name": "onnx dense", "path": tmp / "resnet20_dense.onnx"},
         {"name": "onnx compact", "path": tmp / "resnet20_compact.onnx"},
         {"name": "tflite dense", "path": tmp / "resnet20_dense.tflite"},
         {"name": "tflite compact", "path": tmp / "resnet20_compact.tflite"}]
    if ds is not None:
        for item in v:
            item["top1"] = 100.0 * float((top1(item["path"], ds.x_test) == ds.y_test.numpy()).mean())
    return measure("ResNet20, half of the inner channels removed (no fine-tuning)", v, x[:1].numpy(), args,
                   [["onnx dense", "onnx compact"], ["tflite dense", "tflite compact"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter training and fewer timing rounds")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    ap.add_argument("--per-round", type=int, default=50, help="inferences per file per round")
    ap.add_argument("--mlpnet", help="a pruned MLPNet checkpoint to use instead of magnitude pruning")
    ap.add_argument("--cases", default="mlp1024,mlpnet,resnet20")
    ap.add_argument("--json-out", help="write every measurement here")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.per_round = min(args.rounds, 5), min(args.per_round, 20)
    torch.set_num_threads(1)
    print(f"export_layouts: batch 1, 1 thread, median of {args.rounds} interleaved rounds x {args.per_round} "
          f"inferences; torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    results = {}
    with tempfile.TemporaryDirectory(prefix="chita-edge-layouts-") as d:
        tmp = Path(d)
        cases = {"mlp1024": case_mlp1024, "mlpnet": case_mlpnet, "resnet20": case_resnet20}
        for name in args.cases.split(","):
            rows = cases[name](tmp, args)
            if rows:
                results[name] = [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in rows]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
