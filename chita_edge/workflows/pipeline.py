"""``chita-edge run pipeline.yaml``: one file from model to CI verdict, with hash-keyed stages that resume.

Stages, per target profile: ``prune`` -> ``finetune`` (optional) -> ``export`` (one per format) -> ``check``
(benchmark the file, estimate it on every profile of the run, gate it on its own profile's budgets), plus a
``baseline`` export of the dense model for the comparison. Every stage writes its artefact into its own folder
of the output directory and a record into ``manifest.json``: a key (sha256 of its inputs' hashes, its settings
and the chita-edge version), the inputs and outputs with their hashes, the settings, the seconds it took.

A stage whose key and outputs are unchanged is skipped; a stage with the same key as one already done for
another profile copies that one's outputs (``reused_from``). The manifest is written atomically after every
stage, so a run that crashed or was killed starts again where it stopped; fine-tuning resumes from its last
epoch (its state file lives in the stage folder). The run ends with one comparative report (every file
estimated on every profile, an accuracy-vs-latency Pareto chart per device) and the verdict: ``GateFailed``
(exit 1) names every broken budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chita_edge.core.errors import BadInput, GateFailed
from chita_edge.core.io import atomic_write_text, sha256_file
from chita_edge.devices.bench import BenchConfig, benchmark
from chita_edge.devices.profiles import load_profile
from chita_edge.workflows.jobs import (
    CheckJob,
    ExportJob,
    FinetuneJob,
    PruneJob,
    prune_settings,
    run_check,
    run_export,
    run_finetune,
    run_prune,
)

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
Event = Callable[[dict[str, Any]], None]
MANIFEST_FORMAT = "chita-edge/pipeline-manifest-v1"
INVOCATION_KEYS = ("resumed_from",)  # keys of a stage's result that describe one invocation: logged, not recorded


# ------------------------------------------------------------------------------------------------- schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PruneSpec(_Strict):
    """Pruning settings; a field left out takes the one default of ``chita_edge.pruning.defaults`` (the same as
    ``chita-edge prune`` and the Python API), and the manifest records where each value came from."""

    method: Literal["chita", "chita++", "bso", "magnitude", "magnitude-uniform", "chita-fisher", "l1-uniform",
                    "norm-global"] | None = None
    structure: Literal["unstructured", "block", "channel"] = Field(
        default="unstructured", description="unstructured or block (1x4, to a sparsity); channel: to the "
                                            "profile's budgets (structured, measured)")
    sparsity: float | dict[str, float] | None = Field(
        default=None, description="one fraction for every profile, or {profile: fraction}")
    stages: int | None = Field(default=None, ge=1, le=1000)
    search_stages: int | None = Field(default=None, ge=1, le=100)
    grads: int | None = Field(default=None, ge=1, le=1_000_000)
    fisher_batch: int | None = Field(default=None, ge=1, le=4096)
    l2: float | None = Field(default=None, gt=0)
    dtype: Literal["float32", "float64"] | None = None
    first_order: bool | None = None
    refit: bool | None = None
    block_size: int | None = Field(default=None, ge=0)
    width_multiple: int | None = Field(default=None, ge=1, le=256)
    depth: bool | None = None
    seed: int | None = None

    def settings(self, sparsity: float | None) -> dict[str, Any]:
        """The settings this file gives (the fields it sets), by their shared names."""
        given = {k: getattr(self, k) for k in self.model_fields_set if k not in ("grads", "sparsity")}
        if "grads" in self.model_fields_set:
            given["n_grads"] = self.grads
        return {**given, "sparsity": sparsity}

    @field_validator("sparsity")
    @classmethod
    def _fractions(cls, v: float | dict[str, float] | None) -> float | dict[str, float] | None:
        for s in ([v] if isinstance(v, (int, float)) else list((v or {}).values())):
            if not 0.0 <= s < 1.0:
                raise ValueError(f"expected fractions in [0, 1) (got {s})")
        return v

    @model_validator(mode="after")
    def _needs_sparsity(self) -> PruneSpec:
        if self.structure != "channel" and self.sparsity is None:
            raise ValueError(f"structure {self.structure} needs 'sparsity' (a fraction, or one per profile)")
        return self


class FinetuneSpec(_Strict):
    epochs: int = Field(default=2, ge=1, le=10_000)
    lr: float = Field(default=0.01, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=128, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    weight_decay: float = Field(default=0.0, ge=0)
    augment: bool | None = None
    bn_batches: int = Field(default=100, ge=0)
    distill: bool = False
    seed: int = 0


class ExportSpec(_Strict):
    formats: list[Literal["onnx", "tflite"]] = Field(default_factory=lambda: ["onnx"], min_length=1)
    layout: Literal["dense", "compact", "sparse", "auto"] = "dense"
    quantize: Literal["none", "fp16", "int8"] = "none"
    parity_samples: int = Field(default=500, ge=1)

    @field_validator("formats")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("expected each format once")
        return v


class CheckSpec(_Strict):
    accuracy_min: float | None = Field(default=None, ge=0, le=100, description="top-1 % floor on the test set")
    latency_ms: float | None = Field(default=None, gt=0, description="overrides every profile's latency budget")
    percentile: Literal["p50", "p90", "p99"] | None = None
    memory_mb: float | None = Field(default=None, gt=0)
    file_mb: float | None = Field(default=None, gt=0)
    runs: int = Field(default=50, ge=1, le=100_000)
    warmup: int = Field(default=10, ge=0)
    estimate_formats: list[Literal["onnx", "tflite"]] = Field(
        default_factory=lambda: ["onnx", "tflite"],
        description="formats whose files get device estimates (the LiteRT host calibration takes minutes on a fresh "
                    "machine); files of other formats are gated on this host's measurement, said so")
    baseline: bool = Field(default=True, description="also export and benchmark the dense model (the report's "
                                                     "reference point)")


class PipelineSpec(_Strict):
    name: str = Field(default="pipeline", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str = Field(min_length=1, description="zoo:NAME, path/to/file.py:factory or a .pt2 program")
    weights: str | None = Field(default=None, description="dense weights (state dict or chita-edge checkpoint)")
    data: str = Field(min_length=1, description="npz:PATH or digits")
    profiles: list[str] = Field(min_length=1, description="profile ids or YAML paths, one target each")
    prune: PruneSpec
    finetune: FinetuneSpec | None = None
    export: ExportSpec = Field(default_factory=ExportSpec)
    checks: CheckSpec = Field(default_factory=CheckSpec)
    out: str | None = Field(default=None, description="output directory (default: NAME.out beside the file)")

    @model_validator(mode="after")
    def _per_profile(self) -> PipelineSpec:
        if len(set(self.profiles)) != len(self.profiles):
            raise ValueError("expected each profile once in 'profiles'")
        if isinstance(self.prune.sparsity, dict):
            missing = [p for p in self.profiles if p not in self.prune.sparsity]
            extra = [p for p in self.prune.sparsity if p not in self.profiles]
            if missing or extra:
                raise ValueError(f"prune.sparsity: expected one entry per profile ({', '.join(self.profiles)}); "
                                 f"missing {missing}, unknown {extra}")
        return self

    def sparsity_for(self, profile: str) -> float | None:
        s = self.prune.sparsity
        return s.get(profile) if isinstance(s, dict) else s


def _resolve(base: Path, p: str) -> str:
    return p if os.path.isabs(p) else str((base / p).resolve())


def resolve_paths(spec: PipelineSpec, base: Path) -> PipelineSpec:
    """Relative paths in the file are relative to the file's directory. (``model_copy`` keeps which fields the
    file set: a prune setting it leaves out is resolved from the shared defaults and recorded as such.)"""
    up: dict[str, Any] = {}
    if spec.weights:
        up["weights"] = _resolve(base, spec.weights)
    if spec.data.startswith("npz:"):
        up["data"] = "npz:" + _resolve(base, spec.data[4:])
    m = spec.model
    if m.endswith(".pt2"):
        up["model"] = _resolve(base, m)
    elif ".py:" in m:
        path, _, fn = m.rpartition(":")
        up["model"] = f"{_resolve(base, path)}:{fn}"
    up["profiles"] = [_resolve(base, p) if p.endswith((".yaml", ".yml")) or "/" in p else p for p in spec.profiles]
    if isinstance(spec.prune.sparsity, dict):
        up["prune"] = spec.prune.model_copy(update={"sparsity": {
            _resolve(base, k) if k.endswith((".yaml", ".yml")) or "/" in k else k: v
            for k, v in spec.prune.sparsity.items()}})
    up["out"] = _resolve(base, spec.out) if spec.out else str(base / f"{spec.name}.out")
    return spec.model_copy(update=up)


def load_pipeline(path: str | os.PathLike) -> PipelineSpec:
    """Read and validate pipeline.yaml; a problem is one BadInput 'FILE:LINE: field F: expected ...'."""
    import yaml  # the one yaml.safe_load of the pipeline; the line lookup reuses the profiles' helpers

    from chita_edge.core.io import require_file
    from chita_edge.devices.profiles import _expected, _key_node, _node_at

    p = require_file(path, "pipeline file")
    try:
        text = p.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{p}: cannot read the pipeline file ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise BadInput(f"{p}{f':{mark.line + 1}' if mark else ''}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{p}:1: expected a mapping of pipeline fields (name, model, weights, data, profiles, prune, "
                       f"finetune, export, checks, out), got {type(data).__name__}")
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith(("function-", "float", "dict["))))
        owner = _owner(loc[:-1]) if err["type"] == "extra_forbidden" else None
        if err["type"] == "extra_forbidden":
            node = _key_node(root, loc) or _node_at(root, loc[:-1])[0]
        elif err["type"] == "missing":
            node = _node_at(root, loc[:-1])[0]
        else:
            node = _node_at(root, loc)[0]
        line = node.start_mark.line + 1 if node is not None else 1
        field = ".".join(str(x) for x in loc) or "(pipeline)"
        more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        raise BadInput(f"{p}:{line}: field '{field}': {_expected(err, owner)}{more}") from None
    return resolve_paths(spec, p.resolve().parent)


def _owner(loc: tuple[Any, ...]) -> type[BaseModel]:
    cls: type[BaseModel] = PipelineSpec
    for part in loc:
        f = cls.model_fields.get(str(part)) if not isinstance(part, int) else None
        if f is None:
            continue
        nxt = next((a for a in getattr(f.annotation, "__args__", (f.annotation,))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            break
        cls = nxt
    return cls


# ------------------------------------------------------------------------------------------------- hashing
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("chita-edge", "torch", "numpy", "onnx", "onnxruntime", "litert-torch", "ai-edge-litert"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class _Hashes:
    """sha256 of files, cached by (path, size, mtime) within one run. A checkpoint (``.pt``) is hashed by its
    tensors (names, dtypes, shapes, bytes): torch.save's bytes depend on the temporary file's name and the
    metadata carries timings, so equal weights get equal hashes and stages downstream stay skippable."""

    def __init__(self) -> None:
        self._c: dict[tuple[str, int, int], str] = {}

    def __call__(self, path: str | os.PathLike) -> str:
        st = os.stat(path)
        k = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        if k not in self._c:
            self._c[k] = _tensor_digest(path) if str(path).endswith(".pt") else sha256_file(path)
        return self._c[k]


def _tensor_digest(path: str | os.PathLike) -> str:
    from chita_edge.core.checkpoint import read_weights

    sd, _ = read_weights(path)
    h = hashlib.sha256(b"chita-edge/tensors-v1")
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return "tensors:" + h.hexdigest()


def data_identity(spec: str, hashes: _Hashes) -> dict[str, str]:
    if spec.startswith("npz:"):
        from chita_edge.core.io import require_file

        return {"data": spec, "sha256": hashes(require_file(spec[4:], "data file"))}
    return {"data": spec}


# ----------------------------------------------------------------------------------------------- the runner
@dataclass
class StageRunner:
    """Runs named stages in ``out``, keyed by the hash of their inputs and settings; keeps ``manifest.json``."""

    out: Path
    header: dict[str, Any]
    on_event: Event | None = None
    force: bool = False
    hashes: _Hashes = field(default_factory=_Hashes)
    manifest: dict[str, Any] = field(default_factory=dict)
    log_rows: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise BadInput(f"{self.out}: the output directory is a file")
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "manifest.json"
        old: dict[str, Any] = {}
        if path.is_file():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                log.warning("%s: unreadable; every stage runs again", path)
            if old.get("format") != MANIFEST_FORMAT:
                old = {}
        self.manifest = {"format": MANIFEST_FORMAT, **self.header, "versions": versions(),
                         "stages": dict(old.get("stages") or {}), "verdict": None}

    @property
    def path(self) -> Path:
        return self.out / "manifest.json"

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.manifest, indent=2, sort_keys=False, default=str) + "\n")

    def _emit(self, row: dict[str, Any]) -> None:
        self.log_rows.append(row)
        if self.on_event:
            self.on_event(row)

    def _valid(self, rec: dict[str, Any] | None, key: str) -> bool:
        if not rec or rec.get("key") != key or rec.get("status") != "done":
            return False
        for rel, sha in (rec.get("outputs") or {}).items():
            p = self.out / rel
            if not p.is_file() or self.hashes(p) != sha:
                return False
        return True

    def stage(self, name: str, *, inputs: dict[str, Any], settings: dict[str, Any], outputs: list[str],
              fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn(stage_dir)`` unless a record with the same key and intact outputs exists. ``outputs`` are
        file names in the stage folder ``out/NAME``; ``fn`` returns the stage's JSON-able result."""
        from chita_edge import __version__

        key = _digest({"stage": name.rsplit("/", 1)[-1], "inputs": inputs, "settings": settings,
                       "outputs": outputs, "chita_edge": __version__})
        stages = self.manifest["stages"]
        rec = stages.get(name)
        if not self.force and self._valid(rec, key):
            self._emit({"stage": name, "status": "skipped", "reason": "inputs and settings unchanged"})
            return rec  # type: ignore[return-value]
        sdir = self.out / name
        sdir.mkdir(parents=True, exist_ok=True)
        donor = next((k for k, r in stages.items() if k != name and not self.force and self._valid(r, key)), None)
        t0 = time.perf_counter()
        if donor is not None:
            for rel in stages[donor]["outputs"]:
                shutil.copy2(self.out / rel, sdir / Path(rel).name)
            result, how = dict(stages[donor]["result"]), "reused"
        else:
            stages.pop(name, None)
            self.save()
            self._emit({"stage": name, "status": "running"})
            result, how = dict(fn(sdir)), "ran"
        # what this invocation did (resumed a fine-tuning) goes to runs.jsonl, not to the manifest: a run that was
        # killed and started again ends with the same manifest as one that was not
        done_how = {k: result.pop(k) for k in INVOCATION_KEYS if k in result}
        if done_how.get("resumed_from"):
            how = "resumed"
        outs = {}
        for o in outputs:
            p = sdir / o
            if not p.is_file():
                raise RuntimeError(f"stage {name} did not write {o}")
            outs[str(p.relative_to(self.out))] = self.hashes(p)
        secs = time.perf_counter() - t0
        rec = {"key": key, "status": "done", "inputs": inputs, "settings": settings, "outputs": outs,
               "result": result, "seconds": round(secs, 3)}
        if donor is not None:
            rec["reused_from"] = donor
        stages[name] = rec
        self.save()
        self._emit({"stage": name, "status": how, "seconds": secs, **({"from": donor} if donor else {}),
                    **{k: v for k, v in done_how.items() if v is not None}})
        return rec

    def file(self, rec: dict[str, Any], suffix: str) -> Path:
        rel = next(r for r in rec["outputs"] if r.endswith(suffix))
        return self.out / rel


# -------------------------------------------------------------------------------------------- the stages
def _prune_stage(spec: PipelineSpec, profile: str, runner: StageRunner, progress: Progress | None) -> dict[str, Any]:
    """The same prune job as ``chita-edge prune`` with these settings (``chita_edge.workflows.jobs.run_prune``)."""
    pr = spec.prune
    w = {"weights": spec.weights, "sha256": runner.hashes(spec.weights)} if spec.weights else None
    inputs: dict[str, Any] = {"model": spec.model, "weights": w, "data": data_identity(spec.data, runner.hashes)}
    channel = pr.structure == "channel"
    prof = load_profile(profile) if channel else None
    resolved = prune_settings(pipeline=pr.settings(spec.sparsity_for(profile)), profile=prof)
    settings: dict[str, Any] = {"resolved": resolved.record()}
    budgets: dict[str, Any] = {}
    if prof is not None:
        inputs["profile"] = prof.model_dump(exclude_none=True)
        budgets = {k: v for k, v in (("latency_ms", spec.checks.latency_ms), ("percentile", spec.checks.percentile),
                                     ("memory_mb", spec.checks.memory_mb), ("file_mb", spec.checks.file_mb))
                   if v is not None}
        settings["budget_overrides"] = budgets

    def run(d: Path) -> dict[str, Any]:
        job = PruneJob(model=spec.model, weights=spec.weights, data=spec.data, out=d / "pruned.pt",
                       settings=resolved, profile=prof, budgets=budgets)
        r = run_prune(job, progress=progress).to_dict()
        keys = {"channel": ("method", "accuracy", "dense_accuracy", "params_before", "params_after", "passed"),
                "block": ("sparsity", "accuracy", "dense_accuracy")}.get(pr.structure,
                                                                      ("method", "sparsity", "accuracy",
                                                                       "dense_accuracy"))
        return {k: r.get(k) for k in keys}

    return runner.stage(f"{_slug(profile)}/prune", inputs=inputs, settings=settings, outputs=["pruned.pt"], fn=run)


def _finetune_stage(spec: PipelineSpec, profile: str, pruned: Path, runner: StageRunner,
                    progress: Progress | None) -> dict[str, Any]:
    from chita_edge.training.finetune import FinetuneConfig, state_path_for

    ft = spec.finetune
    assert ft is not None
    settings = ft.model_dump()
    inputs = {"pruned": runner.hashes(pruned), "data": data_identity(spec.data, runner.hashes)}
    name = f"{_slug(profile)}/finetune"

    def run(d: Path) -> dict[str, Any]:
        out = d / "finetuned.pt"
        state = state_path_for(out)
        # the training state of an interrupted run is resumed only if it belongs to these inputs and settings
        key = _digest({"inputs": inputs, "settings": settings})
        key_file = d / "state.key"
        resume = state.exists() and key_file.is_file() and key_file.read_text().strip() == key
        if state.exists() and not resume:
            state.unlink()
        atomic_write_text(key_file, key)
        cfg = FinetuneConfig(epochs=ft.epochs, lr=ft.lr, min_lr=ft.min_lr, batch_size=ft.batch_size,
                             optimizer=ft.optimizer, weight_decay=ft.weight_decay, augment=ft.augment,
                             bn_batches=ft.bn_batches, seed=ft.seed)
        r = run_finetune(FinetuneJob(pruned=pruned, data=spec.data, out=out, config=cfg, distill=ft.distill,
                                     resume=resume), progress=progress)
        key_file.unlink(missing_ok=True)
        return {"initial_accuracy": r.initial_accuracy, "accuracy": r.accuracy, "sparsity": r.sparsity,
                "resumed_from": r.resumed_from}

    return runner.stage(name, inputs=inputs, settings=settings, outputs=["finetuned.pt"], fn=run)


def _export_stage(name: str, ckpt: Path, fmt: str, filename: str, ex: ExportSpec, runner: StageRunner,
                  progress: Progress | None, model: str | None = None) -> dict[str, Any]:

    settings = {"format": fmt, "layout": ex.layout, "quantize": ex.quantize, "parity_samples": ex.parity_samples,
                "model": model}
    inputs = {"checkpoint": runner.hashes(ckpt)}

    def run(d: Path) -> dict[str, Any]:
        r = run_export(ExportJob(checkpoint=ckpt, out=d / filename, format=fmt, layout=ex.layout,
                                 quantize=ex.quantize, model=model, parity_samples=ex.parity_samples),
                       progress=progress)
        return {"bytes": r.bytes, "parity": r.parity, "notes": r.notes}

    return runner.stage(name, inputs=inputs, settings=settings, outputs=[filename], fn=run)


def _bench_stage(name: str, path: Path, gate_profile: Any | None, profiles: list[Any], spec: PipelineSpec,
                 runner: StageRunner, progress: Progress | None) -> dict[str, Any]:
    """Benchmark ``path`` (estimated on every profile) and, with ``gate_profile``, check its budgets."""
    ck = spec.checks
    inputs = {"file": runner.hashes(path), "data": data_identity(spec.data, runner.hashes),
              "profiles": [p.model_dump(exclude_none=True) for p in profiles]}
    settings = ck.model_dump(exclude={"baseline", "estimate_formats"})
    settings["estimate"] = _fmt_of(path) in ck.estimate_formats
    settings["gate"] = gate_profile.id if gate_profile is not None else None
    outputs = ["result.json"] + (["junit.xml"] if gate_profile is not None else [])

    def run(d: Path) -> dict[str, Any]:
        cfg = BenchConfig(threads=1, warmup=ck.warmup, runs=ck.runs)
        est = profiles if _fmt_of(path) in ck.estimate_formats else []
        if gate_profile is None:  # the baseline: measured and estimated, not gated
            doc: dict[str, Any] = {"file": str(path),
                                   "benchmark": benchmark(path, est, cfg, data=spec.data, progress=progress)}
        else:  # the same check job as ``chita-edge check``
            job = CheckJob(file=path, profile=gate_profile, bench=cfg, latency_ms=ck.latency_ms,
                           percentile=ck.percentile, memory_mb=ck.memory_mb, file_mb=ck.file_mb,
                           accuracy_min=ck.accuracy_min, data=spec.data, junit=d / "junit.xml",
                           estimate_on=tuple(est), step_summary="")
            r = run_check(job, progress=progress)
            doc = {"file": str(path), "benchmark": r.details["benchmark"], "profile": r.profile, "passed": r.passed,
                   "budgets": r.details["budgets"], "checks": r.checks}
        atomic_write_text(d / "result.json", json.dumps(doc, indent=2, default=str))
        return {"passed": doc.get("passed"), "failed": [c["message"] for c in doc.get("checks", []) if not c["passed"]]}

    return runner.stage(name, inputs=inputs, settings=settings, outputs=outputs, fn=run)


def _fmt_of(path: Path) -> str:
    return "tflite" if path.suffix == ".tflite" else "onnx"


def _slug(profile: str) -> str:
    """A profile id, or a YAML path's file stem, as a folder name."""
    return Path(profile).stem if profile.endswith((".yaml", ".yml")) else profile


# ----------------------------------------------------------------------------------------------- the run
def run_pipeline(spec: PipelineSpec, *, out: str | os.PathLike | None = None, force: bool = False,
                 progress: Progress | None = None, on_event: Event | None = None,
                 source: str | None = None) -> dict[str, Any]:
    """Run every stage of ``spec`` (paths already resolved); returns the summary with ``passed``. Does not
    raise on a broken budget: call ``raise_if_failed``."""
    from chita_edge.devices.profiles import load_profile

    out_dir = Path(out or spec.out or f"{spec.name}.out").resolve()
    profiles = [load_profile(p) for p in spec.profiles]
    ids = [p.id for p in profiles]
    if len(set(ids)) != len(ids):
        raise BadInput(f"profiles: two entries name the same profile id ({', '.join(ids)})")
    if "tflite" in spec.export.formats:
        from chita_edge.exporters import tflite_format

        tflite_format.stack("TFLite export (export.formats: tflite)")  # a missing extra fails now, not later
    header = {"name": spec.name, "pipeline": {"source": source, "sha256": _digest(spec.model_dump())},
              "spec": spec.model_dump()}
    runner = StageRunner(out_dir, header, on_event=on_event, force=force)
    t0 = time.perf_counter()
    files: list[tuple[str | None, str, Path, str]] = []  # (profile id or None, format, file, stage)
    if spec.checks.baseline:
        dense = _dense_checkpoint(spec, runner)
        for fmt in spec.export.formats:
            rec = _export_stage(f"baseline/export-{fmt}", dense, fmt, f"dense.{_ext(fmt)}",
                                spec.export.model_copy(update={"layout": "dense", "quantize": "none"}), runner,
                                progress, model=spec.model)
            files.append((None, fmt, runner.file(rec, _ext(fmt)), "baseline"))
    for prof, pspec in zip(profiles, spec.profiles, strict=True):
        rec = _prune_stage(spec, pspec, runner, progress)
        ckpt = runner.file(rec, "pruned.pt")
        if spec.finetune is not None:
            rec = _finetune_stage(spec, pspec, ckpt, runner, progress)
            ckpt = runner.file(rec, "finetuned.pt")
        for fmt in spec.export.formats:
            rec = _export_stage(f"{prof.id}/export-{fmt}", ckpt, fmt, f"{prof.id}.{_ext(fmt)}", spec.export,
                                runner, progress)
            files.append((prof.id, fmt, runner.file(rec, _ext(fmt)), prof.id))
    results, checks, verdicts = [], [], []
    for pid, fmt, path, where in files:
        gate = next(p for p in profiles if p.id == pid) if pid else None
        rec = _bench_stage(f"{where}/check-{fmt}", path, gate, profiles, spec, runner, progress)
        doc = json.loads(runner.file(rec, "result.json").read_text(encoding="utf-8"))
        results.append(doc["benchmark"])
        if gate is not None:
            verdicts.append({"profile": pid, "format": fmt, "file": str(path), "passed": doc["passed"],
                             "checks": doc["checks"]})
            checks += [{**c, "name": f"{path.name} on {pid}: {c['name']}"} for c in doc["checks"]]
    report = write_comparative_report(out_dir / "report", results, profiles, checks, verdicts, spec.name)
    passed = all(v["passed"] for v in verdicts)
    _step_summary(verdicts)
    runner.manifest["verdict"] = {"passed": passed, "targets": [
        {k: v[k] for k in ("profile", "format", "passed")} | {"failed": [c["message"] for c in v["checks"]
                                                                           if not c["passed"]]}
        for v in verdicts]}
    runner.manifest["report"] = {k: str(Path(v).relative_to(out_dir)) for k, v in report.items()}
    runner.save()
    with open(out_dir / "runs.jsonl", "a", encoding="utf-8") as f:  # what each invocation did (not the manifest)
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.perf_counter() - t0, 2),
                            "stages": runner.log_rows, "passed": passed}) + "\n")
    return {"name": spec.name, "out": str(out_dir), "manifest": str(runner.path), "passed": passed,
            "verdicts": verdicts, "report": report, "stages": runner.log_rows,
            "seconds": time.perf_counter() - t0}


def _ext(fmt: str) -> str:
    return "onnx" if fmt == "onnx" else "tflite"


def _dense_checkpoint(spec: PipelineSpec, runner: StageRunner) -> Path:
    """The dense model as a chita-edge checkpoint (the baseline's export input)."""
    inputs = {"model": spec.model,
              "weights": {"weights": spec.weights, "sha256": runner.hashes(spec.weights)} if spec.weights else None,
              "data": data_identity(spec.data, runner.hashes)}

    def run(d: Path) -> dict[str, Any]:
        from chita_edge.core.checkpoint import save_checkpoint
        from chita_edge.core.data import load_data
        from chita_edge.core.evaluate import accuracy
        from chita_edge.models.loading import check_fits, load_model

        lm = load_model(spec.model, spec.weights)
        ds = load_data(spec.data)
        check_fits(lm, ds.x_test, spec.data)
        acc = accuracy(lm.module, ds.x_test, ds.y_test)
        meta = {"model": lm.spec, "source_weights": spec.weights,
                "source_sha256": inputs["weights"]["sha256"] if spec.weights else None, "data": spec.data,
                "method": "dense", "sparsity": 0.0, "accuracy": acc,
                "input_shape": list(lm.input_shape or ds.input_shape)}
        save_checkpoint(d / "dense.pt", lm.module.state_dict(), meta)
        return {"accuracy": acc}

    rec = runner.stage("baseline/dense", inputs=inputs, settings={}, outputs=["dense.pt"], fn=run)
    return runner.file(rec, "dense.pt")


def _step_summary(verdicts: list[dict[str, Any]]) -> None:
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    from chita_edge.devices.gate import summary_markdown

    try:
        with open(path, "a", encoding="utf-8") as f:  # GitHub's protocol: append
            for v in verdicts:
                f.write(summary_markdown(v))
    except OSError as e:
        raise BadInput(f"{path}: cannot append the step summary ({e.strerror})") from None


def write_comparative_report(out_dir: Path, results: list[dict[str, Any]], profiles: list[Any],
                             checks: list[dict[str, Any]], verdicts: list[dict[str, Any]],
                             title: str) -> dict[str, str]:
    """report.json/.md/.html (chita_edge.devices.report) plus index.html: the verdict per target and one
    accuracy-vs-latency Pareto chart per device, every file estimated on every profile."""
    import html as H

    from chita_edge.devices.report import CSS, pareto_svg, write_report

    paths = write_report(out_dir, results, profiles, checks or None)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>chita-edge: {H.escape(title)}"
             f"</title><style>{CSS}</style></head><body><h1>chita-edge pipeline: {H.escape(title)}</h1>"]
    if verdicts:
        ok = all(v["passed"] for v in verdicts)
        parts.append(f"<p class='{'pass' if ok else 'fail'}'>Verdict: "
                     f"{'every budget holds' if ok else 'a budget is broken'}</p>")
        parts.append("<table><tr><th>target profile</th><th>file</th><th>result</th><th>checks</th></tr>")
        for v in verdicts:
            cls, word = ("pass", "pass") if v["passed"] else ("fail", "FAIL")
            msgs = "<br>".join(H.escape(c["message"]) for c in v["checks"])
            parts.append(f"<tr><td>{H.escape(v['profile'])}</td><td>{H.escape(os.path.basename(v['file']))}</td>"
                         f"<td class='{cls}'>{word}</td><td class='prov'>{msgs}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Accuracy vs latency, per device</h2><p class='prov'>Every file (the dense baseline and the "
                 "model pruned for each target) is estimated on every device; the orange line is the Pareto "
                 "front.</p>")
    for p in profiles:
        # one latency axis per chart: the files estimated for this device (others were measured on this host)
        mine = [r for r in results if (r.get("device_estimates") or {}).get(p.id, {}).get("available")]
        svg = pareto_svg(mine if len(mine) >= 2 else results, p.id)
        if svg:
            parts.append(f"<figure>{svg}</figure>")
    parts.append("<p><a href='report.html'>Full benchmark report</a> (latency distributions, budgets, layers) · "
                 "<a href='report.md'>Markdown</a> · <a href='report.json'>JSON</a></p></body></html>\n")
    index = out_dir / "index.html"
    atomic_write_text(index, "".join(parts))
    return {"index": str(index), **paths}


def raise_if_failed(summary: dict[str, Any]) -> None:
    broken = [f"{os.path.basename(v['file'])} on {v['profile']}: " + "; ".join(
        c["message"] for c in v["checks"] if not c["passed"]) for v in summary["verdicts"] if not v["passed"]]
    if broken:
        raise GateFailed(" | ".join(broken))


__all__ = ["PipelineSpec", "StageRunner", "load_pipeline", "raise_if_failed", "run_pipeline",
           "write_comparative_report"]
