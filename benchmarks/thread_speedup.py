"""Does the calibration's thread correction hold for small models? The published thread speed-ups of the anchors.

    python benchmarks/thread_speedup.py

The host is timed with 1 thread, the anchors are at the device's thread count, so a profile's factor carries the
anchors' speed-up from 1 to N threads (``Fit.threads`` in ``chita_edge/devices/calibration.py``). This prints,
for every bundled profile, the rows of its calibration runtime (CPU, fp32) where the same device, model and input
were published at 1 thread and at the profile's device thread count: the speed-up t(1) / t(N), beside each model's
multiply-accumulates (the zoo's or ``calibration.py``'s models counted here; MobileNetV3 and EfficientNet-B0
from their papers), and the CIFAR ResNet20's MACs for comparison. A speed-up that falls with the model's size
means the estimate is optimistic for small models, by up to the anchors' speed-up (a model that gets no
speed-up from threads runs at ``estimate × speed-up`` on the device).
"""

from __future__ import annotations

import statistics

import torch

from chita_edge.devices.band import thread_speedups
from chita_edge.devices.calibration import REFERENCE_MODELS
from chita_edge.devices.profiles import load_all
from chita_edge.graph.macs import count_macs
from chita_edge.models.zoo import ResNet20

# Published multiply-accumulates at 224 px (MobileNetV3 paper, Howard et al. 2019, Table 3; EfficientNet paper,
# Tan & Le 2019, Table 2: 0.39 B FLOPs counted as multiply-adds).
PUBLISHED_MMACS = {"mobilenet_v3_large": 219.0, "mobilenet_v3_small": 56.0, "efficientnet_b0": 390.0}


def mmacs() -> dict[str, float]:
    out = dict(PUBLISHED_MMACS)
    for name, make in REFERENCE_MODELS.items():
        out[name] = sum(count_macs(make().eval(), torch.rand(1, 3, 224, 224)).values()) / 1e6
    out["resnet20 (CIFAR, 32 px)"] = sum(count_macs(ResNet20().eval(), torch.rand(1, 3, 32, 32)).values()) / 1e6
    return out


def main() -> None:
    macs = mmacs()
    print("| profile | device threads | row:model | MMACs | speed-up t(1)/t(N) | anchor model |")
    print("|---|---|---|---|---|---|")
    by_model: dict[str, list[float]] = {}
    for p in load_all():
        if p.calibration is None:
            continue
        n = p.device_threads("onnxruntime")
        for key, s in thread_speedups(p, n).items():
            model = key.split(":", 1)[1]
            by_model.setdefault(model, []).append(s)
            print(f"| {p.id} | {n} | {key} | {macs.get(model, float('nan')):.0f} | {s:.2f} | "
                  f"{'yes' if model in REFERENCE_MODELS else 'no'} |")
    print("\nmedian speed-up per model (MMACs):")
    for model, ss in sorted(by_model.items(), key=lambda kv: -macs.get(kv[0], 0.0)):
        print(f"  {model:20s} {macs.get(model, float('nan')):6.0f} MMACs  x{statistics.median(ss):.2f} over {len(ss)}")
    print(f"  resnet20 (CIFAR)     {macs['resnet20 (CIFAR, 32 px)']:6.1f} MMACs  (no published device row)")


if __name__ == "__main__":
    main()
