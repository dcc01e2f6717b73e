"""``pipeline.yaml``: the schema (strict pydantic models) and its loader, whose every problem is one line naming
the file, the line and the field. Prune settings the file leaves out resolve from ``chita_edge.pruning.defaults``
(``PruneSpec.settings``), like ``chita-edge prune``'s flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chita_edge.core.errors import SEED_LIMIT, BadInput
from chita_edge.core.io import require_file
from chita_edge.devices.profiles import _expected, _key_node, _node_at, read_yaml


class _Strict(BaseModel):
    # every float finite: an inf learning rate or ridge is refused when the file is loaded, not stages later
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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
    objective: Literal["auto", "output", "weights"] | None = None
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)

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
    seed: int = Field(default=0, ge=0, lt=SEED_LIMIT)
    warmup_epochs: float = Field(default=0.0, ge=0, description="linear warm-up of the learning rate (epochs, at "
                                                                "most epochs)")
    head_ridge: float | None = Field(default=None, ge=0, description="ridge re-fit of the output Linear first "
                                                                     "(0: off; default: 0.3 after a budget prune)")
    hints: float | None = Field(default=None, ge=0, description="with distill: weight of the feature-map hints "
                                                               "(0: off; default: 30 after a budget prune)")

    @model_validator(mode="after")
    def _warmup_within_epochs(self) -> FinetuneSpec:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs}: expected at most epochs ({self.epochs})")
        return self


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
    uncertain: Literal["fail", "pass"] = Field(default="fail", description="how an uncertain verdict (budget inside the estimate's error band, or a device latency timed only on this host) counts")
    repeats: int = Field(default=1, ge=1, le=99, description="benchmark processes per check; the one with the median "
                                                             "latency is judged, and the prune stage plans for it")
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

    @field_validator("data")
    @classmethod
    def _data_spec(cls, v: str) -> str:
        if v != "digits" and not (v.startswith("npz:") and v[4:].strip()):
            raise ValueError("expected npz:PATH (the path of an .npz file) or digits")
        return v

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
    p = require_file(path, "pipeline file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{p}: cannot read the pipeline file ({e})") from None
    data, root = read_yaml(text, str(p))  # the profiles' YAML reader and line lookup
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
    spec = resolve_paths(spec, p.resolve().parent)
    _check_files(p, root, spec)
    return spec


def _check_files(p: Path, root: Any, spec: PipelineSpec) -> None:
    """The files the pipeline reads exist: a missing one is one line naming the field, before anything runs."""
    for name, path, what in (("weights", spec.weights, "weights file"),
                             ("data", spec.data[4:] if spec.data.startswith("npz:") else None, "data file")):
        if path is None or os.path.isfile(path):
            continue
        node = _node_at(root, (name,))[0]
        line = node.start_mark.line + 1 if node is not None else 1
        problem = "not found" if not os.path.lexists(path) else "is not a regular file"
        raise BadInput(f"{p}:{line}: field '{name}': {path}: {what} {problem}")


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



__all__ = ["CheckSpec", "ExportSpec", "FinetuneSpec", "PipelineSpec", "PruneSpec", "load_pipeline", "resolve_paths"]
