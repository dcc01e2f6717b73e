"""The pipeline's stage runner: named stages keyed by the sha256 of their inputs, settings and the chita-edge
version, recorded in ``manifest.json`` (written atomically after every stage), skipped when key and outputs are
unchanged, copied from another stage with the same key."""

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
from typing import Any

import torch

from chita_edge._version import __version__
from chita_edge.core.checkpoint import read_weights
from chita_edge.core.errors import BadInput
from chita_edge.core.io import atomic_write_text, require_file, sha256_file

log = logging.getLogger(__name__)
Event = Callable[[dict[str, Any]], None]
MANIFEST_FORMAT = "chita-edge/pipeline-manifest-v1"
INVOCATION_KEYS = ("resumed_from",)  # keys of a stage's result that describe one invocation: logged, not recorded


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("chita-edge", "torch", "numpy", "onnx", "onnxruntime", "litert-torch", "ai-edge-litert"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Hashes:
    """sha256 of files, cached by (path, size, mtime) within one run. A checkpoint (``.pt``) is hashed by its
    tensors (names, dtypes, shapes, bytes): torch.save's bytes depend on the temporary file's name and the
    metadata carries timings, so equal weights get equal hashes and stages downstream stay skippable."""

    def __init__(self) -> None:
        self._c: dict[tuple[str, int, int], str] = {}

    def __call__(self, path: str | os.PathLike) -> str:
        st = os.stat(path)
        k = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        if k not in self._c:
            self._c[k] = _tensordigest(path) if str(path).endswith(".pt") else sha256_file(path)
        return self._c[k]


def _tensordigest(path: str | os.PathLike) -> str:
    sd, _ = read_weights(path)
    h = hashlib.sha256(b"chita-edge/tensors-v1")
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "tensors:" + h.hexdigest()


def data_identity(spec: str, hashes: Hashes) -> dict[str, str]:
    if spec.startswith("npz:"):
        return {"data": spec, "sha256": hashes(require_file(spec[4:], "data file"))}
    return {"data": spec}


@dataclass
class StageRunner:
    """Runs named stages in ``out``, keyed by the hash of their inputs and settings; keeps ``manifest.json``."""

    out: Path
    header: dict[str, Any]
    on_event: Event | None = None
    force: bool = False
    hashes: Hashes = field(default_factory=Hashes)
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
        key = digest({"stage": name.rsplit("/", 1)[-1], "inputs": inputs, "settings": settings,
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



__all__ = ["MANIFEST_FORMAT", "StageRunner", "data_identity", "digest", "versions"]
