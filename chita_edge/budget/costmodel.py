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

Memory: ``chita_edge.budget.memory``'s model of the peak (fitted per host and runtime) applied to
``weight_bytes``, the fp32 weights and (BatchNorm-folded) biases of the units, and ``activation_peak_bytes``, the
largest sum of live unit outputs over the execution order (a tensor lives from its unit to its last consumer),
channels padded to the runtime's NCHWc block.
File size: the weight bytes plus a small per-tensor overhead.

The parts: ``chita_edge.budget.units`` cuts the model into units, ``chita_edge.budget.timing`` exports and
times them (and caches the timings), ``chita_edge.budget.memory`` fits the memory model; this module holds
``CostModel`` (build, predict), its ``Prediction``, the per-unit interpolation tables, ``grid_widths`` and
``widths_of``.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chita_edge.budget import timing
from chita_edge.budget.memory import MemoryModel, MiB, memory_model
from chita_edge.budget.timing import RUNTIME, Progress
from chita_edge.budget.units import (
    DENSE,
    OTHER,
    TracedGraph,
    Unit,
    build_unit,
    scaled_shape,
    split_units,
    trace_graph,
)
from chita_edge.core.errors import BadInput, RuntimeFailure

# module-qualified, so that patching these functions where they are defined reaches the calls below
from chita_edge.devices import bench_child, calibration
from chita_edge.devices.profiles import Profile
from chita_edge.graph.channels import ChannelGroupSpec, channel_groups
from chita_edge.graph.residual import residual_blocks
from chita_edge.graph.trace import is_bn_node, is_conv, is_depthwise

log = logging.getLogger(__name__)

# Grid of widths timed per channel space (fractions of the full width, rounded down to the width multiple).
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
FILE_OVERHEAD_BYTES = 2048  # per weight tensor (names, shapes) + graph, measured ~1-3 KB on ONNX files


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

    def __init__(self, *, graph: TracedGraph, tables: list[_UnitTable], overhead_ms: float, fit: Any, memory: MemoryModel,
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
        g = trace_graph(model, example_input, specs)
        units = split_units(g)
        version = bench_child.runtime_version(RUNTIME)
        path = timing.cache_dir() / f"layer-latency-v2-{RUNTIME}-t{threads}-{timing.fingerprint(version, threads)}.json"
        cache = timing.Cache(path, {"runtime": RUNTIME, "runtime_version": version, "threads": threads})
        if refresh:
            cache.entries = {}
        if cache.overhead_ms is None or cache.node_ms is None or refresh:
            cache.overhead_ms, cache.node_ms, _ = timing.time_overhead(threads)
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
                mod, inputs = build_unit(g, u, {**g.sizes, **widths})
                p = Path(td) / f"u{i}.onnx"
                try:
                    timing.export(mod, inputs, p)
                except Exception as e:
                    raise RuntimeFailure(f"cost model: cannot export layer {u.name} alone "
                                         f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
                ms, nodes = timing.time_file(p, inputs[0].numpy(), threads, runs)
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
            fit = calibration.fit_profile(profile, calibration.host_calibration(RUNTIME, threads, progress=progress))
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

    def _weight_terms(self) -> list[tuple[tuple[tuple[str | None, int], ...], int, str | None, int, int, int, bool,
                                          bool, int]]:
        """(input pieces, groups, out space, outputs per channel of it, fixed out, kernel elements, bias, conv, unit
        index) per Conv/Linear unit head (a grouped conv pruned in whole groups: a channel is a group's outputs). The input is its dim 1 as pieces (``TracedGraph.pieces``: a space with its features per channel,
        or a fixed width), so that a layer fed by a ``torch.cat`` scales with each of the concatenated spaces."""
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
            fi, _ = g.fam.get(src.name, (None, 1))
            fo, ro = g.fam.get(head.name, (None, 1))
            has_bias = mod.bias is not None or any(is_bn_node(g.gm, byname[n]) for n in t.unit.nodes[1:])
            if isinstance(mod, nn.Linear):
                pieces = g.pieces(src.name) if len(g.shapes.get(src.name, ())) == 2 else ((None, mod.in_features),)
                out.append((pieces, 1, fo, ro, mod.out_features, 1, has_bias, False, ti))
            elif is_depthwise(mod) or (mod.groups > 1 and fo is not None and fo == fi):  # channels pass through
                out.append((((None, mod.in_channels // mod.groups),), 1, fo, ro, mod.out_channels,
                            math.prod(mod.kernel_size), has_bias, True, ti))
            else:
                pieces = g.pieces(src.name) or ((None, mod.in_channels),)
                out.append((pieces, mod.groups, fo, ro, mod.out_channels, math.prod(mod.kernel_size), has_bias,
                            True, ti))
        return out

    def weight_bytes(self, widths: Mapping[str, int], *, split: bool = False,
                     dropped: Collection[str] = ()) -> tuple[int, ...]:
        """(bytes, tensors) of the fp32 weights and biases (BatchNorm folded) at ``widths`` without the
        ``dropped`` residual blocks; with ``split``, (Linear bytes, conv bytes, largest conv layer bytes, tensors)."""
        fc = conv = tensors = largest = 0
        live = self._live(dropped)
        for pieces, groups, fo, ro, cout, k, bias, conv_layer, ti in self._weights:
            if not live[ti]:
                continue
            ci = sum(widths.get(f, self.sizes[f]) * r if f is not None else r for f, r in pieces) // groups
            co = widths.get(fo, self.sizes[fo]) * ro if fo is not None else cout
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
            shape = list(scaled_shape(g, n.name, w))
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
    """Current widths of a (compacted) model's channel groups: the output size of each group's first producer, in
    the group's channels (a grouped conv's group: ``repeat`` outputs each)."""
    out = {}
    mods = dict(model.named_modules())
    for s in specs:
        m = mods.get(s.producers[0].module) if s.producers else None
        if m is None:
            continue
        out[s.id] = (m.out_features if isinstance(m, nn.Linear) else m.out_channels) // s.producers[0].repeat
    return out


__all__ = ["FILE_OVERHEAD_BYTES", "GRID", "CostModel", "Prediction", "grid_widths", "widths_of"]
