"""Per-layer cost model of a model on a device profile, as a function of its channel widths.

Latency: the model's graph (``torch.fx``) is cut into *units* the way ONNX Runtime fuses it on CPU: a Conv or
Linear with the BatchNorm, activation and residual add that follow it (ONNX Runtime folds BatchNorm into the
conv and fuses Conv+Add+ReLU in its NCHWc kernels), a depthwise conv with its BatchNorm and activation, and
every other op on its own. Each unit is rebuilt alone at several widths of the channel spaces it touches
(``chita_edge.graph.channels`` channel groups), exported to ONNX and timed on this host with ONNX Runtime's own
profiler (the kernel times of the unit's nodes, not the layout reorders around a lone op), with the thread count
the benchmark uses on this host. The tables are cached per host, runtime and threads in ``$CHITA_EDGE_CACHE``
(else ``~/.cache/chita-edge``). A width between the measured ones is interpolated (multilinear), so

    host_ms(widths)   = overhead + sum over units of table_u(widths of its channel spaces)
    device_ms(widths) = scale * (d + rho * (1 - d)) * host_ms,   d = dense share of the unit time

with ``overhead`` the per-inference cost of a call into the runtime (timed on a trivial model) and
``scale``/``rho`` the profile's host-to-device fit (``chita_edge.devices.calibration``): exactly the estimate that
``chita-edge bench`` makes from a measured host latency.

Memory (what ``bench`` measures: the peak resident-set growth of a process that loads and runs the file):

    peak_mb = base + alpha * fc_weight_bytes + alpha_conv * conv_weight_bytes + gamma * largest_conv_bytes
              + beta * activation_peak_bytes

``weight_bytes``: the fp32 weights and (BatchNorm-folded) biases of the units; ``activation_peak_bytes``: the
largest sum of live unit outputs over the execution order (a tensor lives from its unit to its last consumer),
channels padded to the runtime's NCHWc block. ONNX Runtime keeps a re-laid-out copy of every conv weight and,
while it optimises the graph at load, briefly holds further copies of one layer at a time, hence the separate
conv term and the largest-conv-layer term (measured: a model whose weights sit in one conv peaks at ~4.5x its
weight bytes, MobileNetV1 at ~2.7x). The coefficients are fitted once per host and runtime on
synthetic models (Linear-weight, one-big-conv, many-conv and activation series), exported by the exporters and
measured by ``bench``'s child process.
File size: the weight bytes plus a small per-tensor overhead.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from chita_edge.core.errors import BadInput, RuntimeFailure
from chita_edge.core.io import atomic_write_text
from chita_edge.devices.profiles import Profile
from chita_edge.graph.channels import ChannelGroupSpec, channel_groups
from chita_edge.graph.residual import residual_blocks
from chita_edge.graph.trace import BN, is_add_node, is_bn_node, is_conv, is_depthwise, trace_shapes

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]

MiB = 1024 * 1024
TABLE_FORMAT = "chita-edge/layer-latency-v2"
MEMORY_FORMAT = "chita-edge/memory-model-v4"
RUNTIME = "onnxruntime"
DENSE, DEPTHWISE, OTHER = "dense", "depthwise", "other"
# Grid of widths timed per channel space (fractions of the full width, rounded down to the width multiple).
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
_REORDER_OPS = ("ReorderInput", "ReorderOutput")
FILE_OVERHEAD_BYTES = 2048  # per weight tensor (names, shapes) + graph, measured ~1-3 KB on ONNX files

_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout)
_ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.sigmoid, torch.tanh,
                  F.hardswish, F.hardsigmoid, F.hardtanh, F.dropout}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_"}


def cache_dir() -> Path:
    """$CHITA_EDGE_CACHE, else ~/.cache/chita-edge (shared with the host calibration)."""
    from chita_edge.devices.calibration import cache_dir as cd

    return cd()


# --------------------------------------------------------------------------------------------------------------
# Units


@dataclass(frozen=True)
class Unit:
    """A group of graph nodes timed together; ``axes`` are the channel spaces whose widths it depends on."""

    name: str
    kind: str  # dense / depthwise / other
    nodes: tuple[str, ...]
    axes: tuple[str, ...]
    signature: str


@dataclass
class _Graph:
    gm: fx.GraphModule
    shapes: dict[str, tuple[int, ...]]
    fam: dict[str, tuple[str | None, int]]  # node -> (channel space of dim 1, features per channel)
    sizes: dict[str, int]
    users: dict[str, list[str]]
    order: dict[str, int]


def _is_act(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _ACT_MODULES)
    if n.op == "call_function":
        return n.target in _ACT_FUNCTIONS
    return n.op == "call_method" and n.target in _ACT_METHODS


def _trace(model: nn.Module, example: torch.Tensor, specs: Sequence[ChannelGroupSpec]) -> _Graph:
    gm, node_shapes = trace_shapes(model, example[:1], needed_by="the cost model")
    shapes = {n.name: s for n, s in node_shapes.items()}
    out_fam, dw_fam = {}, {}
    for s in specs:
        for m in s.members:
            if m.kind == "out":
                out_fam[m.module] = s.id
            elif m.kind == "dw":
                dw_fam[m.module] = s.id
    fam: dict[str, tuple[str | None, int]] = {}
    users: dict[str, list[str]] = {}
    order: dict[str, int] = {}
    for i, n in enumerate(gm.graph.nodes):
        order[n.name] = i
        users[n.name] = [u.name for u in n.users]
        ins = [a for a in n.all_input_nodes if a.name in shapes]
        if n.op == "call_module" and is_conv(gm.get_submodule(n.target)) and not is_depthwise(gm.get_submodule(n.target)):
            fam[n.name] = (out_fam.get(n.target), 1)
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear):
            fam[n.name] = (out_fam.get(n.target), 1)
        elif n.op == "call_module" and is_depthwise(gm.get_submodule(n.target)):
            fam[n.name] = (dw_fam.get(n.target), 1)
        elif ins and n.name in shapes:
            src = ins[0]
            f, r = fam.get(src.name, (None, 1))
            si, so = shapes[src.name], shapes[n.name]
            if f is not None and len(si) >= 3 and len(so) == 2:  # flatten: a channel becomes H*W features
                r = r * math.prod(si[2:])
            elif f is not None and (len(so) < 2 or (len(si) >= 2 and si[1] * 1 != so[1] and len(so) == len(si))):
                f, r = None, 1
            fam[n.name] = (f, r)
        else:
            fam[n.name] = (None, 1)
    return _Graph(gm, shapes, fam, {s.id: s.size for s in specs}, users, order)


def _units(g: _Graph) -> list[Unit]:
    gm = g.gm
    nodes = list(gm.graph.nodes)
    byname = {n.name: n for n in nodes}
    units: list[Unit] = []
    taken: set[str] = set()
    for n in nodes:
        if n.op in ("placeholder", "output", "get_attr") or n.name in taken or n.name not in g.shapes:
            continue
        members = [n]
        kind = OTHER
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if is_depthwise(mod):
                kind = DEPTHWISE
            elif is_conv(mod) or isinstance(mod, nn.Linear):
                kind = DENSE
        if kind != OTHER:  # absorb what ONNX Runtime fuses into the kernel
            tail, added = n, False
            while len(g.users[tail.name]) == 1:
                u = byname[g.users[tail.name][0]]
                if u.name in taken or u.name not in g.shapes:
                    break
                first = next(iter(u.all_input_nodes), None)
                if is_bn_node(gm, u) or (_is_act(gm, u) and first is tail):
                    pass
                elif is_add_node(u) and kind == DENSE and not added and is_conv(gm.get_submodule(n.target)):
                    added = True
                else:
                    break
                members.append(u)
                tail = u
        for m in members:
            taken.add(m.name)
        # non-tensor helpers used only by this unit (size queries) come along
        axes: list[str] = []
        ext = _external_inputs(members, g)
        for a in [*ext, members[-1]]:
            f = g.fam.get(a.name, (None, 1))[0]
            if f is not None and f not in axes:
                axes.append(f)
        for m in members:
            if m.op == "call_module":
                mod = gm.get_submodule(m.target)
                if (is_conv(mod) or isinstance(mod, nn.Linear)) and m is members[0]:
                    f = g.fam.get(m.name, (None, 1))[0]
                    if f is not None and f not in axes:
                        axes.append(f)
        units.append(Unit(n.target if n.op == "call_module" else n.name, kind, tuple(m.name for m in members),
                          tuple(axes), _signature(members, g)))
    return units


def _external_inputs(members: list[fx.Node], g: _Graph) -> list[fx.Node]:
    names = {m.name for m in members}
    out: list[fx.Node] = []
    for m in members:
        for a in m.all_input_nodes:
            if a.name not in names and a not in out and a.op != "get_attr":
                out.append(a)
    return out


def _describe_module(mod: nn.Module) -> str:
    if is_conv(mod):
        return (f"{type(mod).__name__}(k={tuple(mod.kernel_size)},s={tuple(mod.stride)},p={mod.padding},"
                f"d={tuple(mod.dilation)},dw={is_depthwise(mod)},g={1 if is_depthwise(mod) else mod.groups},"
                f"b={mod.bias is not None},pm={mod.padding_mode})")
    if isinstance(mod, nn.Linear):
        return f"Linear(b={mod.bias is not None})"
    if isinstance(mod, BN):
        return type(mod).__name__
    return repr(mod).replace("\n", "")


def _signature(members: list[fx.Node], g: _Graph) -> str:
    """What the unit computes, without names: ops, module configs and the fixed parts of its shapes."""
    parts = []
    for m in members:
        if m.op == "call_module":
            parts.append(_describe_module(g.gm.get_submodule(m.target)))
        else:
            parts.append(f"{m.op}:{getattr(m.target, '__name__', str(m.target))}")
    for a in [*_external_inputs(members, g), members[-1]]:
        s = g.shapes.get(a.name)
        f, r = g.fam.get(a.name, (None, 1))
        if s is not None:
            dims = list(s[1:])
            if f is not None and dims:
                dims[0] = f"{g.sizes[f]}*{r}c"  # scaled dim: full size and features per channel
            parts.append("x".join(str(d) for d in dims))
    return ";".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Building a unit alone at given widths


def _resized(mod: nn.Module, cin: int | None, cout: int | None) -> nn.Module:
    if is_conv(mod):
        dw = is_depthwise(mod)
        cin = cin or mod.in_channels
        cout = cin if dw else (cout or mod.out_channels)
        groups = cin if dw else mod.groups
        return type(mod)(cin, cout, mod.kernel_size, mod.stride, mod.padding, mod.dilation, groups,
                         mod.bias is not None, mod.padding_mode)
    if isinstance(mod, nn.Linear):
        return nn.Linear(cin or mod.in_features, cout or mod.out_features, mod.bias is not None)
    if isinstance(mod, BN):
        c = cin or mod.num_features
        bn = type(mod)(c, mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
        with torch.no_grad():
            if bn.running_var is not None:
                bn.running_var.uniform_(0.5, 1.5)
                bn.running_mean.normal_(0, 0.1)
        return bn
    return copy.deepcopy(mod)


def _scaled_shape(g: _Graph, name: str, widths: Mapping[str, int]) -> tuple[int, ...]:
    s = list(g.shapes[name])
    f, r = g.fam.get(name, (None, 1))
    if f is not None and len(s) >= 2:
        s[1] = widths[f] * r
    s[0] = 1
    return tuple(s)


def _build_unit(g: _Graph, unit: Unit, widths: Mapping[str, int]) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    byname = {n.name: n for n in g.gm.graph.nodes}
    members = [byname[n] for n in unit.nodes]
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    root: dict[str, Any] = {}
    inputs: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(0)
    names = set(unit.nodes)

    def bring(a: fx.Node) -> None:
        if a.name in env or a.name in names:
            return
        if a.op == "get_attr":
            root[a.target] = _attr(g.gm, a.target)
            env[a.name] = graph.get_attr(a.target)
        elif a.name in g.shapes and not inputs:
            env[a.name] = graph.placeholder("in0")
            inputs.append(torch.rand(_scaled_shape(g, a.name, widths), generator=gen))
        elif a.name in g.shapes:  # a second operand (a residual add): a constant of the same shape
            key = f"_const{len(root)}"
            root[key] = torch.rand(_scaled_shape(g, a.name, widths), generator=gen)
            env[a.name] = graph.get_attr(key)
        elif a.op in ("call_function", "call_method"):  # a size query or similar helper: recompute it here
            for b in a.all_input_nodes:
                bring(b)
            env[a.name] = graph.node_copy(a, lambda b: env[b.name])
        else:
            raise BadInput(f"cost model: layer {unit.name} depends on '{a.name}', which is not a tensor")

    for m in members:
        for a in m.all_input_nodes:
            bring(a)
        if m.op == "call_module":
            mod = g.gm.get_submodule(m.target)
            src = next(iter(m.all_input_nodes))
            cin = _scaled_shape(g, src.name, widths)[1] if len(g.shapes.get(src.name, ())) >= 2 else None
            cout = _scaled_shape(g, m.name, widths)[1] if len(g.shapes.get(m.name, ())) >= 2 else None
            root[m.target] = _resized(mod, cin, cout).eval()
        env[m.name] = graph.node_copy(m, lambda a: env[a.name])
    graph.output(env[members[-1].name])
    return fx.GraphModule(root, graph), inputs


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------------------------
# Timing on this host


def _export(module: nn.Module, inputs: list[torch.Tensor], path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs), str(path), dynamo=False, opset_version=17,
                          input_names=[f"in{i}" for i in range(len(inputs))], output_names=["out"],
                          do_constant_folding=True)


def _time_file(path: Path, x: np.ndarray, threads: int, runs: int) -> tuple[float, int]:
    """(median kernel time in ms summed over the file's nodes, number of nodes), layout reorders excluded, from
    ONNX Runtime's profiler."""
    from chita_edge.devices.runtimes import profile_onnx

    layers, _ = profile_onnx(path, x, threads=threads, runs=runs)
    nodes = [lc for lc in layers if lc.op not in _REORDER_OPS]
    return float(sum(lc.ms or 0.0 for lc in nodes)), len(nodes)


class _Chain(nn.Module):
    """k cheap element-wise nodes on a tiny tensor: what a node costs beyond its arithmetic."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.k):
            x = torch.relu(x) + 0.001 if i % 2 else torch.relu(x) * 1.001
        return x


def _wall_p50(path: Path, threads: int, runs: int) -> float:
    from chita_edge.devices.bench_child import timed_runs
    from chita_edge.exporters import load_session

    sess = load_session(path, threads)
    x = np.random.default_rng(0).random((1, 8), dtype=np.float32)
    samples = timed_runs(sess, x, warmup=50, runs=runs)
    del sess
    return float(np.median(samples))


def _time_overhead(threads: int, runs: int = 400) -> tuple[float, float, str]:
    """(call_ms, node_ms, runtime version). ``call_ms``: wall time (p50) of one inference of a trivial model
    through the benchmark's session class, the fixed cost of a call into the runtime. ``node_ms``: how much the
    profiler's per-node time exceeds a node's real share of the wall time (its timestamps have microsecond
    resolution and their own cost): the slope of profiled time minus the slope of wall time over chains of 2
    and 60 trivial nodes. Unit timings are corrected by it, per node."""
    from chita_edge.devices.bench_child import runtime_version

    with tempfile.TemporaryDirectory(prefix="chita-edge-cost-") as td:
        p = Path(td) / "trivial.onnx"
        _export(nn.ReLU(), [torch.rand(1, 8)], p)
        call = _wall_p50(p, threads, runs)
        prof, wall, nodes = [], [], []
        x = torch.rand(1, 8)
        for k in (2, 60):
            pk = Path(td) / f"chain{k}.onnx"
            _export(_Chain(k), [x], pk)
            ms, n = _time_file(pk, x.numpy(), threads, 100)
            prof.append(ms)
            nodes.append(n)
            wall.append(_wall_p50(pk, threads, runs))
        dn = max(nodes[1] - nodes[0], 1)
        node = max(0.0, (prof[1] - prof[0]) / dn - (wall[1] - wall[0]) / dn)
        return call, node, runtime_version(RUNTIME)


def _fingerprint(version: str, threads: int) -> str:
    from chita_edge.devices.bench_child import host_info

    h = host_info()
    key = json.dumps([h["machine"], h["cpu"], h["cores"], h["system"], RUNTIME, version, threads])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _nchwc_block() -> int:
    """ONNX Runtime's NCHWc channel block on this CPU: 16 with AVX-512, else 8."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return 16 if "avx512f" in line.split() else 8
    except OSError:
        pass
    return 8


def nchwc_block() -> int:
    """ONNX Runtime's NCHWc channel block on this host (16 with AVX-512, else 8)."""
    return _nchwc_block()


class _Cache:
    """One JSON file of timings per host, runtime and threads:
    ``{"entries": {key: [profiled ms, nodes]}, "overhead_ms": ..., "node_ms": ...}``."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path, self.meta, self.dirty = path, meta, False
        self.entries: dict[str, list[float]] = {}
        self.overhead_ms: float | None = None
        self.node_ms: float | None = None
        if path.is_file():
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
                if d.get("format") == TABLE_FORMAT:
                    self.entries = {str(k): [float(v[0]), float(v[1])] for k, v in d.get("entries", {}).items()}
                    self.overhead_ms = d.get("overhead_ms")
                    self.node_ms = d.get("node_ms")
            except (OSError, ValueError, TypeError, AttributeError, IndexError):
                log.warning("ignoring unreadable latency table cache %s", path)

    def ms(self, key: str) -> float:
        """A unit's time with the profiler's per-node excess removed."""
        raw, nodes = self.entries[key]
        return max(0.0, raw - (self.node_ms or 0.0) * nodes)

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"format": TABLE_FORMAT, **self.meta, "overhead_ms": self.overhead_ms,
                                                     "node_ms": self.node_ms, "entries": self.entries}, indent=0,
                                                    sort_keys=True))
            self.dirty = False
        except (OSError, BadInput) as e:
            log.warning("could not cache the latency tables at %s: %s", self.path, e)


# --------------------------------------------------------------------------------------------------------------
# Memory model


@dataclass(frozen=True)
class MemoryModel:
    """peak_mb = base + alpha * fc_mb + alpha_conv * conv_mb + gamma * largest_conv_mb + beta * activation_mb."""

    base_mb: float
    alpha: float
    alpha_conv: float
    gamma: float
    beta: float
    block: int  # NCHWc channel block used for activation sizes
    points: tuple[tuple[float, ...], ...] = ()  # (fc MB, conv MB, largest conv MB, activation MB, measured MB)

    def predict(self, fc_bytes: int, conv_bytes: int, largest_conv_bytes: int, activation_bytes: int) -> float:
        return (self.base_mb + self.alpha * fc_bytes / MiB + self.alpha_conv * conv_bytes / MiB
                + self.gamma * largest_conv_bytes / MiB + self.beta * activation_bytes / MiB)


def _export_like_bench(module: nn.Module, x: torch.Tensor, path: Path) -> None:
    """Export as the verified files are exported (``chita_edge.exporters``), so that memory matches them."""
    from chita_edge.exporters import ExportConfig, export_model

    export_model(module, ExportConfig(format="onnx"), example_input=x, out=path, parity_inputs=x,
                 parity_source="random")


def _memory_series(td: Path) -> list[tuple[Path, float, float, float, float]]:
    """Synthetic models: (file, Linear weight MB, conv weight MB, largest conv MB, activation MB)."""
    out = []
    _export = _export_like_bench  # noqa: N806 - the same call shape as the timing export

    def mb(mods: list[nn.Module]) -> float:
        return sum(q.numel() for m in mods for q in m.parameters()) * 4 / MiB

    for n in (64, 1024, 3072):
        m = nn.Sequential(nn.Linear(1024, n), nn.ReLU(), nn.Linear(n, 10)).eval()
        p = td / f"w{n}.onnx"
        _export(m, torch.rand(1, 1024), p)
        out.append((p, mb([m]), 0.0, 0.0, (1024 + n + 10) * 4 / MiB))
    block = _nchwc_block()
    for c in (256, 768, 1536):  # one big conv
        convs = [nn.Conv2d(64, c, 1), nn.Conv2d(c, c, 1)]
        m = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        p = td / f"c{c}.onnx"
        _export(m, torch.rand(1, 64, 8, 8), p)
        out.append((p, 0.0, mb(convs), max(mb([c_]) for c_ in convs), (64 + 2 * c) * 64 * 4 / MiB))
    for c in (192, 384):  # many equal convs
        convs = [nn.Conv2d(c, c, 3, padding=1) for _ in range(6)]
        layers: list[nn.Module] = []
        for cv in convs:
            layers += [cv, nn.ReLU()]
        m = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        p = td / f"k{c}.onnx"
        _export(m, torch.rand(1, c, 8, 8), p)
        out.append((p, 0.0, mb(convs), mb(convs[:1]), 3 * c * 64 * 4 / MiB))
    for c in (16, 48, 96):  # activations
        convs = [nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)]
        m = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        p = td / f"a{c}.onnx"
        _export(m, torch.rand(1, 3, 160, 160), p)
        cp = math.ceil(c / block) * block
        out.append((p, 0.0, mb(convs), max(mb([c_]) for c_ in convs), (2 * cp * 160 * 160 + 3 * 160 * 160) * 4 / MiB))
    return out


def _nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (active set on a handful of columns)."""
    free = list(range(A.shape[1]))
    while True:
        coef = np.zeros(A.shape[1])
        sol, *_ = np.linalg.lstsq(A[:, free], y, rcond=None)
        coef[free] = sol
        neg = [j for j in free if coef[j] < 0]
        if not neg:
            return coef
        free.remove(min(neg, key=lambda j: coef[j]))


def memory_model(threads: int = 1, *, refresh: bool = False, progress: Progress | None = None) -> MemoryModel:
    """Fit (cached per host/runtime/threads) the peak-memory model on synthetic models measured like ``bench``."""
    from chita_edge.devices import bench_child
    from chita_edge.devices.bench_child import runtime_version
    from chita_edge.devices.child import run_child

    method = hashlib.sha256(Path(bench_child.__file__).read_bytes() + MEMORY_FORMAT.encode()).hexdigest()[:8]
    path = cache_dir() / f"memory-{RUNTIME}-t{threads}-{_fingerprint(runtime_version(RUNTIME), threads)}-{method}.json"
    if path.is_file() and not refresh:
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if d.get("format") == MEMORY_FORMAT:
                return MemoryModel(d["base_mb"], d["alpha"], d["alpha_conv"], d["gamma"], d["beta"], d["block"],
                                   tuple(map(tuple, d["points"])))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable memory model cache %s", path)
    rows = []
    with tempfile.TemporaryDirectory(prefix="chita-edge-mem-") as td:
        series = _memory_series(Path(td))
        for i, (p, fmb, cmb, lmb, amb) in enumerate(series):
            r = run_child(p, runtime=RUNTIME, threads=threads, warmup=2, runs=5, profile_runs=0)
            rows.append((fmb, cmb, lmb, amb, float(r["peak_memory_mb"])))
            if progress:
                progress("memory model", i + 1, len(series))
    A = np.array([[1.0, *r[:4]] for r in rows])
    y = np.array([r[4] for r in rows])
    coef = _nnls(A, y)
    base, alpha, alpha_conv, gamma, beta = (float(c) for c in coef)
    mm = MemoryModel(base, alpha, alpha_conv, gamma, beta, _nchwc_block(), tuple(rows))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"format": MEMORY_FORMAT, "base_mb": base, "alpha": alpha,
                                            "alpha_conv": alpha_conv, "gamma": gamma, "beta": beta,
                                            "block": mm.block, "points": rows}, indent=1))
    except (OSError, BadInput) as e:
        log.warning("could not cache the memory model at %s: %s", path, e)
    return mm


# --------------------------------------------------------------------------------------------------------------
# The cost model


@dataclass(frozen=True)
class Prediction:
    latency_ms: float  # device estimate (p50) when the profile is calibrated, else the host figure
    host_ms: float  # predicted host p50 (overhead + units)
    dense_fraction: float
    memory_mb: float
    file_mb: float
    weight_bytes: int
    activation_bytes: int
    provenance: str
    units: dict[str, float] = field(default_factory=dict)  # host ms per unit

    def to_dict(self, units: bool = False) -> dict[str, Any]:
        d = {"latency_ms": self.latency_ms, "host_ms": self.host_ms, "dense_fraction": self.dense_fraction,
             "memory_mb": self.memory_mb, "file_mb": self.file_mb, "weight_bytes": self.weight_bytes,
             "activation_bytes": self.activation_bytes, "provenance": self.provenance}
        if units:
            d["units"] = dict(self.units)
        return d


@dataclass
class _UnitTable:
    unit: Unit
    grid: tuple[tuple[int, ...], ...]  # widths measured per axis
    ms: np.ndarray  # shape = (len(grid[0]), len(grid[1]), ...)
    raw: np.ndarray | None = None  # the profiler's times as measured (per-node excess kept): the bench's op mix

    def at(self, widths: Mapping[str, int], *, raw: bool = False) -> float:
        table = self.raw if raw and self.raw is not None else self.ms
        if not self.unit.axes:
            return float(table.reshape(-1)[0])
        # multilinear interpolation (extrapolates linearly beyond the grid's ends)
        weights: list[list[tuple[int, float]]] = []
        for ax, pts in zip(self.unit.axes, self.grid, strict=True):
            v = widths[ax]
            if len(pts) == 1:
                weights.append([(0, 1.0)])
                continue
            j = int(np.searchsorted(pts, v, side="right")) - 1
            j = min(max(j, 0), len(pts) - 2)
            t = (v - pts[j]) / (pts[j + 1] - pts[j])
            weights.append([(j, 1.0 - t), (j + 1, t)])
        total = 0.0
        for combo in itertools.product(*weights):
            idx = tuple(i for i, _ in combo)
            wgt = math.prod(w for _, w in combo)
            total += wgt * float(table[idx])
        return max(total, 0.0)


def grid_widths(size: int, multiple: int) -> tuple[int, ...]:
    """The widths timed for a channel space of ``size``: GRID fractions rounded down to the width multiple."""
    m = max(1, multiple)
    pts = set()
    for q in GRID:
        w = size if q >= 1.0 else max(m, int(math.floor(size * q / m)) * m)
        pts.add(min(w, size))
    return tuple(sorted(pts))


class CostModel:
    """Latency, memory and file size of a model as a function of its channel widths on one profile.

    Build with ``CostModel.build(model, example_input, profile)``; ``predict(widths)`` takes
    ``{channel space id: width}`` (missing spaces keep their full width).
    """

    def __init__(self, *, graph: _Graph, tables: list[_UnitTable], overhead_ms: float, fit: Any, memory: MemoryModel,
                 profile_id: str | None, threads: int, width_multiple: int, runtime_version: str,
                 blocks: Mapping[str, frozenset[str]] | None = None):
        self._g = graph
        # removable residual blocks: id -> the trace's node names that go with the block (``residual_blocks``)
        self.blocks = dict(blocks or {})
        self.tables = tables
        self.overhead_ms = overhead_ms
        self.fit = fit
        self.memory = memory
        self.profile_id = profile_id
        self.threads = threads
        self.width_multiple = width_multiple
        self.runtime_version = runtime_version
        self.sizes = dict(graph.sizes)
        self._weights = self._weight_terms()
        # profiled time outside the units (layout reorders at the model's edges, ...), counted as non-dense by
        # the benchmark's op mix; set from a measured dense model by ``with_op_mix``
        self.extra_other_ms = 0.0

    # -- building
    @classmethod
    def build(cls, model: nn.Module, example_input: torch.Tensor, profile: Profile | None, *,
              specs: Sequence[ChannelGroupSpec] | None = None, threads: int = 1, width_multiple: int | None = None,
              runs: int = 25, refresh: bool = False, progress: Progress | None = None) -> CostModel:
        """Trace ``model``, time every unit on its width grid (cached), fit memory, attach the profile's fit."""
        if threads < 1:
            raise BadInput(f"threads {threads}: expected >= 1")
        mult = width_multiple or (profile.width_multiple if profile is not None else 1)
        if specs is None:
            specs = channel_groups(model, example_input[:1])
        g = _trace(model, example_input, specs)
        units = _units(g)
        from chita_edge.devices.bench_child import runtime_version

        version = runtime_version(RUNTIME)
        cache = _Cache(cache_dir() / f"layer-latency-v2-{RUNTIME}-t{threads}-{_fingerprint(version, threads)}.json",
                       {"runtime": RUNTIME, "runtime_version": version, "threads": threads})
        if refresh:
            cache.entries = {}
        if cache.overhead_ms is None or cache.node_ms is None or refresh:
            cache.overhead_ms, cache.node_ms, _ = _time_overhead(threads)
            cache.dirty = True
        todo = []
        for u in units:
            grid = tuple(grid_widths(g.sizes[a], mult) for a in u.axes)
            for combo in itertools.product(*grid):
                key = f"{u.signature}|{combo}"
                if key not in cache.entries:
                    todo.append((u, combo, key))
        if todo:
            log.info("timing %d layer configurations on this host (%s, %d thread(s))", len(todo), RUNTIME, threads)
        with tempfile.TemporaryDirectory(prefix="chita-edge-cost-") as td:
            seen: set[str] = set()
            for i, (u, combo, key) in enumerate(todo):
                if key in seen:
                    continue
                seen.add(key)
                widths = dict(zip(u.axes, combo, strict=True))
                mod, inputs = _build_unit(g, u, {**g.sizes, **widths})
                p = Path(td) / f"u{i}.onnx"
                try:
                    _export(mod, inputs, p)
                except Exception as e:
                    raise RuntimeFailure(f"cost model: cannot export layer {u.name} alone "
                                         f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
                ms, nodes = _time_file(p, inputs[0].numpy(), threads, runs)
                cache.entries[key] = [ms, float(nodes)]
                cache.dirty = True
                p.unlink(missing_ok=True)
                if progress:
                    progress("timing layers", i + 1, len(todo))
                if i % 25 == 24:
                    cache.save()
        cache.save()
        tables = []
        for u in units:
            grid = tuple(grid_widths(g.sizes[a], mult) for a in u.axes)
            shape = tuple(len(x) for x in grid) or (1,)
            ms, raw = np.zeros(shape), np.zeros(shape)
            for pos, combo in zip(itertools.product(*[range(len(x)) for x in grid]), itertools.product(*grid), strict=True):
                ms[pos if pos else (0,)] = cache.ms(f"{u.signature}|{combo}")
                raw[pos if pos else (0,)] = cache.entries[f"{u.signature}|{combo}"][0]
            tables.append(_UnitTable(u, grid, ms, raw))
        fit = None
        if profile is not None and profile.calibration is not None:
            from chita_edge.devices.calibration import fit_profile, host_calibration

            fit = fit_profile(profile, host_calibration(RUNTIME, threads, progress=progress))
        mem = memory_model(threads, progress=progress)
        blocks = {b.id: frozenset(b.nodes) for b in residual_blocks(model, example_input[:1])}
        return cls(graph=g, tables=tables, overhead_ms=float(cache.overhead_ms or 0.0), fit=fit, memory=mem,
                   profile_id=profile.id if profile is not None else None, threads=threads, width_multiple=mult,
                   runtime_version=version, blocks=blocks)

    # -- prediction
    def _live(self, dropped: Collection[str]) -> list[bool]:
        """Per unit table: False when a dropped residual block removes it (its first node goes with the block;
        an activation the block leaves in place is not timed)."""
        if not dropped:
            return [True] * len(self.tables)
        unknown = [b for b in dropped if b not in self.blocks]
        if unknown:
            raise BadInput(f"block '{unknown[0]}': not a removable residual block of this model "
                           f"(blocks: {', '.join(self.blocks) or 'none'})")
        gone = frozenset().union(*(self.blocks[b] for b in dropped))
        return [t.unit.nodes[0] not in gone for t in self.tables]

    def _weight_terms(self) -> list[tuple[str | None, int, str | None, int, int, bool, bool, int]]:
        """(in space, fixed in, out space, fixed out, kernel elements, bias, conv, unit index) per Conv/Linear
        unit head."""
        out = []
        g = self._g
        byname = {n.name: n for n in g.gm.graph.nodes}
        for ti, t in enumerate(self.tables):
            head = byname[t.unit.nodes[0]]
            if head.op != "call_module":
                continue
            mod = g.gm.get_submodule(head.target)
            if not (is_conv(mod) or isinstance(mod, nn.Linear)):
                continue
            src = next(iter(head.all_input_nodes))
            fi, ri = g.fam.get(src.name, (None, 1))
            fo, _ = g.fam.get(head.name, (None, 1))
            has_bias = mod.bias is not None or any(is_bn_node(g.gm, byname[n]) for n in t.unit.nodes[1:])
            if isinstance(mod, nn.Linear):
                out.append((fi, mod.in_features if fi is None else ri, fo, mod.out_features, 1, has_bias, False, ti))
            elif is_depthwise(mod):
                out.append((None, 1, fi, mod.out_channels, math.prod(mod.kernel_size), has_bias, True, ti))
            else:
                cin_per_group = mod.in_channels // mod.groups
                out.append((fi, cin_per_group if fi is None else 1, fo, mod.out_channels,
                            math.prod(mod.kernel_size), has_bias, True, ti))
        return out

    def weight_bytes(self, widths: Mapping[str, int], *, split: bool = False,
                     dropped: Collection[str] = ()) -> tuple[int, ...]:
        """(bytes, tensors) of the fp32 weights and biases (BatchNorm folded) at ``widths`` without the
        ``dropped`` residual blocks; with ``split``, (Linear bytes, conv bytes, largest conv layer bytes, tensors)."""
        fc = conv = tensors = largest = 0
        live = self._live(dropped)
        for fi, cin, fo, cout, k, bias, conv_layer, ti in self._weights:
            if not live[ti]:
                continue
            ci = widths.get(fi, self.sizes[fi]) * cin if fi is not None else cin
            co = widths.get(fo, self.sizes[fo]) if fo is not None else cout
            n = (ci * co * k + (co if bias else 0)) * 4
            if conv_layer:
                conv += n
                largest = max(largest, n)
            else:
                fc += n
            tensors += 2 if bias else 1
        return (fc, conv, largest, tensors) if split else (fc + conv, tensors)

    def activation_bytes(self, widths: Mapping[str, int], dropped: Collection[str] = ()) -> int:
        """Peak of the live unit outputs (plus the model input) over the execution order, fp32; conv outputs are
        padded to the NCHWc block, other tensors (the input, element-wise ops on it) are not. Units of
        ``dropped`` residual blocks are left out."""
        g = self._g
        w = {**self.sizes, **{k: v for k, v in widths.items() if k in self.sizes}}
        live = self._live(dropped)
        unit_of = {n: i for i, t in enumerate(self.tables) for n in t.unit.nodes if live[i]}
        step = {i: max(g.order[n] for n in t.unit.nodes) for i, t in enumerate(self.tables)}
        tensors: list[tuple[int, int, int]] = []  # (start, end, bytes)
        block = self.memory.block
        for n in g.gm.graph.nodes:
            if n.name not in g.shapes:
                continue
            if n.op == "placeholder":
                start = -1
            elif n.name in unit_of and self.tables[unit_of[n.name]].unit.nodes[-1] == n.name:
                start = step[unit_of[n.name]]
            else:
                continue
            consumers = [unit_of[u] for u in g.users[n.name] if u in unit_of and unit_of[u] != unit_of.get(n.name)]
            end = max((step[c] for c in consumers), default=start)
            shape = list(_scaled_shape(g, n.name, w))
            if len(shape) == 4 and n.name in unit_of and self.tables[unit_of[n.name]].unit.kind != OTHER:
                shape[1] = math.ceil(shape[1] / block) * block  # conv outputs live in the NCHWc layout
            tensors.append((start, end, math.prod(shape) * 4))
        times = sorted({s for s, _, _ in tensors} | {e for _, e, _ in tensors})
        peak = 0
        for t in times:
            peak = max(peak, sum(b for s, e, b in tensors if s <= t <= e))
        return peak

    def host_latency(self, widths: Mapping[str, int],
                     dropped: Collection[str] = ()) -> tuple[float, float, dict[str, float]]:
        """(host ms, dense share, per-unit ms). The dense share is the one ``bench`` measures and scales its
        device estimate by: the share of dense nodes in the profiler's per-node times, which carry the
        profiler's own per-node cost, plus ``extra_other_ms`` of non-dense time outside the units. Pruning
        shrinks the dense time but not those, so the share (and with it the device factor) moves with widths."""
        w = {**self.sizes, **{k: v for k, v in widths.items() if k in self.sizes}}
        per = {}
        tot = dense_raw = other_raw = 0.0
        for t, alive in zip(self.tables, self._live(dropped), strict=True):
            if not alive:
                continue
            ms = t.at(w)
            per[t.unit.name] = per.get(t.unit.name, 0.0) + ms
            tot += ms
            raw = t.at(w, raw=True)
            if t.unit.kind == DENSE:
                dense_raw += raw
            else:
                other_raw += raw
        prof = dense_raw + other_raw + self.extra_other_ms
        return self.overhead_ms + tot, (dense_raw / prof if prof > 0 else 1.0), per

    def with_op_mix(self, dense_fraction: float) -> CostModel:
        """A copy whose dense share at full width equals ``dense_fraction`` (``bench``'s op mix of the dense
        model): the non-dense profiled time the units do not see (layout reorders, ...) is set from it and
        kept fixed at every width."""
        if not 0 < dense_fraction <= 1:
            raise BadInput(f"dense fraction {dense_fraction}: expected in (0, 1]")
        w = dict(self.sizes)
        dense_raw = sum(t.at(w, raw=True) for t in self.tables if t.unit.kind == DENSE)
        other_raw = sum(t.at(w, raw=True) for t in self.tables if t.unit.kind != DENSE)
        out = copy.copy(self)
        out.extra_other_ms = max(0.0, dense_raw / dense_fraction - dense_raw - other_raw)
        return out

    def latency(self, widths: Mapping[str, int], dropped: Collection[str] = ()) -> float:
        host, d, _ = self.host_latency(widths, dropped)
        return self.fit.predict(host, d) if self.fit is not None else host

    def predict(self, widths: Mapping[str, int] | None = None, dropped: Collection[str] = ()) -> Prediction:
        """Latency, memory and file size at ``widths`` with the residual blocks ``dropped`` removed."""
        widths = widths or {}
        for k, v in widths.items():
            if k in self.sizes and not 1 <= v <= self.sizes[k]:
                raise BadInput(f"width {v} of channel group '{k}': expected 1..{self.sizes[k]}")
        host, d, per = self.host_latency(widths, dropped)
        fc, conv, largest, nt = self.weight_bytes(widths, split=True, dropped=dropped)
        wb = fc + conv
        ab = self.activation_bytes(widths, dropped)
        if self.fit is not None:
            lat, prov = self.fit.predict(host, d), self.fit.provenance.replace("estimated-device", "cost-model estimate")
        else:
            lat, prov = host, "cost-model estimate of this host (profile not calibrated)"
        return Prediction(lat, host, d, self.memory.predict(fc, conv, largest, ab), (wb + FILE_OVERHEAD_BYTES * nt) / MiB,
                          wb, ab, prov, per)

    def describe(self) -> dict[str, Any]:
        return {"runtime": RUNTIME, "runtime_version": self.runtime_version, "threads": self.threads,
                "profile": self.profile_id, "width_multiple": self.width_multiple, "overhead_ms": self.overhead_ms,
                "residual_blocks": sorted(self.blocks),
                "extra_other_ms": self.extra_other_ms, "units": len(self.tables), "channel_groups": dict(self.sizes),
                "memory_model": {"base_mb": self.memory.base_mb, "alpha": self.memory.alpha,
                                 "alpha_conv": self.memory.alpha_conv, "gamma": self.memory.gamma,
                                 "beta": self.memory.beta,
                                 "nchwc_block": self.memory.block},
                "device_fit": None if self.fit is None else {"scale": self.fit.scale, "rho": self.fit.rho,
                                                              "provenance": self.fit.provenance}}


def widths_of(model: nn.Module, specs: Sequence[ChannelGroupSpec]) -> dict[str, int]:
    """Current widths of a (compacted) model's channel groups: the output size of each group's first producer."""
    out = {}
    mods = dict(model.named_modules())
    for s in specs:
        m = mods.get(s.producers[0].module) if s.producers else None
        if m is None:
            continue
        out[s.id] = m.out_features if isinstance(m, nn.Linear) else m.out_channels
    return out


__all__ = ["CostModel", "MemoryModel", "Prediction", "Unit", "cache_dir", "grid_widths", "memory_model", "nchwc_block",
           "widths_of"]
