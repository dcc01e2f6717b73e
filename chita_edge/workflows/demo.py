"""``chita-edge demo``: the whole toolchain on scikit-learn's ``digits`` in a few minutes, offline.

1. Train a small CNN (``digits_cnn`` below, 8x8 grey images, about 15 k weights) for a few seconds.
2. Run a pipeline (``chita_edge.workflows.pipeline``) with one phone and one watch profile: prune with CHITA++ (a milder
   sparsity for the phone, a stronger one for the watch), fine-tune briefly with the masks, export to ONNX and,
   when the ``tflite`` extra is installed, TFLite; benchmark every file and estimate it on both devices; gate
   each on its own profile's budgets plus an accuracy floor; write the comparative report.

Nothing is downloaded and ``../shared`` is not used. To stay within a few minutes on a fresh machine the demo
times the host with a reduced reference calibration (two reference models, one round of 10 runs) unless a
``$CHITA_EDGE_CALIB_*`` setting is given: its device estimates are a demonstration; run
``chita-edge profiles calibrate`` for the full calibration before trusting one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chita_edge.core.checkpoint import save_checkpoint
from chita_edge.core.data import load_data
from chita_edge.core.errors import BadInput, MissingExtra
from chita_edge.core.evaluate import accuracy
from chita_edge.workflows.pipeline import run_pipeline
from chita_edge.workflows.pipeline_spec import PipelineSpec

PHONE, WATCH = "phone-mid-sd670", "watch-a55-dual"
QUICK_CALIBRATION = {"CHITA_EDGE_CALIB_RUNS": "10", "CHITA_EDGE_CALIB_REPEATS": "1", "CHITA_EDGE_CALIB_WARMUP": "2",
                     "CHITA_EDGE_CALIB_MODELS": "mobilenet_v1,resnet18"}


class DigitsCNN(nn.Module):
    """conv(1->16)-BN-ReLU, conv(16->32)-BN-ReLU, 2x2 max-pool, conv(32->32)-ReLU, global average, fc(32->10).
    Input (N, 1, 8, 8) in [0, 1]; returns logits."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x - 0.5)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.conv3(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits_cnn() -> nn.Module:
    """The factory that model specs name: ``path/to/chita_edge/workflows/demo.py:digits_cnn``."""
    return DigitsCNN()


def model_spec() -> str:
    return f"{os.path.abspath(__file__)}:digits_cnn"


def train_digits_cnn(out: Path, *, epochs: int = 12, seed: int = 0) -> dict[str, Any]:
    """Train DigitsCNN on digits (Adam, deterministic) and save a chita-edge checkpoint to ``out``."""

    t0 = time.perf_counter()
    ds = load_data("digits")
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    n = len(ds.x_train)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n, generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx]).backward()
            opt.step()
        sched.step()
    model.eval()
    acc = accuracy(model, ds.x_test, ds.y_test)
    save_checkpoint(out, model.state_dict(), {"model": model_spec(), "data": "digits", "method": "dense",
                                              "sparsity": 0.0, "accuracy": acc, "input_shape": [1, 8, 8]})
    return {"accuracy": acc, "seconds": time.perf_counter() - t0, "epochs": epochs, "out": str(out)}


def tflite_available() -> bool:
    from chita_edge.exporters import tflite_format  # deferred: the LiteRT stack

    try:
        tflite_format.stack("the demo's TFLite export")
    except MissingExtra:
        return False
    return True


@contextlib.contextmanager
def quick_calibration() -> Iterator[bool]:
    """Reduced host calibration settings for the duration of the demo, unless the user set any."""
    if any(k.startswith("CHITA_EDGE_CALIB_") for k in os.environ):
        yield False
        return
    old = {k: os.environ.get(k) for k in QUICK_CALIBRATION}
    os.environ.update(QUICK_CALIBRATION)
    try:
        yield True
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def demo_spec(weights: Path, out: Path, formats: list[str]) -> Any:

    return PipelineSpec.model_validate({
        "name": "digits-demo",
        "model": model_spec(),
        "weights": str(weights),
        "data": "digits",
        "profiles": [PHONE, WATCH],
        "prune": {"method": "chita++", "sparsity": {PHONE: 0.5, WATCH: 0.75}, "stages": 4, "grads": 128},
        "finetune": {"epochs": 3, "lr": 0.01, "batch_size": 64, "bn_batches": 10},
        "export": {"formats": formats, "layout": "dense", "parity_samples": 200},
        # every format gets a device estimate: a host timing cannot pass a device budget (the reduced LiteRT
        # calibration adds about 35 s on a fresh machine)
        "checks": {"accuracy_min": 85.0, "runs": 30, "warmup": 5, "estimate_formats": ["onnx", "tflite"]},
        "out": str(out),
    })


def run_demo(out: str | os.PathLike = "chita-edge-demo", *, tflite: bool | None = None,
             progress: Callable[[str, int, int], None] | None = None,
             on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train, prune for a phone and a watch, fine-tune, export, benchmark, check; returns the pipeline summary
    plus ``notes``. Does not raise on a broken budget (see ``chita_edge.workflows.pipeline.raise_if_failed``)."""

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out_dir = Path(out).resolve()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise BadInput(f"--out {out}: is a file (or under one); the demo writes a directory: choose a new or "
                           "existing directory") from None
        notes = []
        have_tflite = tflite_available()
        if tflite and not have_tflite:
            raise MissingExtra("tflite", "the demo's TFLite export (--tflite)")
        formats = ["onnx"] + (["tflite"] if (have_tflite if tflite is None else tflite) else [])
        if not have_tflite:
            notes.append("TFLite skipped: the 'tflite' extra is not installed (pip install 'chita-edge[tflite]')")
        weights = out_dir / "digits_cnn.pt"
        if weights.is_file():
            trained = {"out": str(weights), "reused": True}
        else:
            trained = train_digits_cnn(weights)
        if on_event:
            on_event({"stage": "train digits_cnn", "status": "skipped" if trained.get("reused") else "ran",
                      **({"seconds": trained["seconds"]} if "seconds" in trained else {})})
        with quick_calibration() as quick:
            if quick:
                notes.append("device estimates use a reduced host calibration (2 reference models, 10 runs) to keep "
                             "the demo short; run 'chita-edge profiles calibrate' for the full one")
            summary = run_pipeline(demo_spec(weights, out_dir / "pipeline", formats), progress=progress,
                                   on_event=on_event, source="chita-edge demo")
        summary.update(notes=notes, trained=trained, formats=formats, total_seconds=time.perf_counter() - t0)
        return summary
    finally:
        torch.set_num_threads(threads)


__all__ = ["DigitsCNN", "digits_cnn", "run_demo", "train_digits_cnn"]
