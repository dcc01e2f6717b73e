"""The pipeline's stage runner: named stages keyed by the sha256 of their inputs, settings and the chita-edge
version, recorded in ``manifest.json`` (written atomically after every stage), skipped when key and outputs are
unchanged, copied from another stage with the same key."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from chita_edge._version import __version__
from chita_edge.core.checkpoint import read_weights, tensors_sha256
from chita_edge.core.errors import BadInput
from chita_edge.core.io import atomic_write_text, require_file, sha256_file

Event = Callable[[dict[str, Any]], None]
MANIFEST_FORMAT = "chita-edge/pipeline-manifest-v1"
INVOCATION_KEYS = ("resumed_from",)  # keys of a stage's result that describe one invocation: logged, not recorded
OWN_FILES = ("manifest.json", "runs.jsonl", "report")  # what a pipeline writes at the top of its folder


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
    return "tensors:" + tensors_sha256(read_weights(path)[0])


def _check_shape(path: Path, manifest: dict[str, Any]) -> None:
    """BadInput unless the manifest's stages are {name: record} with the record fields the runner reads."""
    stages = manifest.get("stages", {})
    problem = None if isinstance(stages, dict) else f"'stages': expected a mapping, got {type(stages).__name__}"
    for name, rec in (stages.items() if problem is None else ()):
        if not isinstance(rec, dict):
            problem = f"stage {name!r}: expected a record (a mapping), got {type(rec).__name__}"
        elif not isinstance(rec.get("outputs", {}), dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in rec.get("outputs", {}).items()):
            problem = f"stage {name!r}: 'outputs' must map file names to hashes"
        elif not isinstance(rec.get("result", {}), dict):
            problem = f"stage {name!r}: 'result' must be a mapping"
        if problem:
            break
    if problem:
        raise BadInput(f"{path}: not a valid chita-edge pipeline manifest ({problem}); it is left as it is: repair "
                       "or remove it, or choose an empty or new output directory (--out)")


def data_identity(spec: str, hashes: Hashes) -> dict[str, str]:
    if spec.startswith("npz:"):
        return {"data": spec, "sha256": hashes(require_file(spec[4:], "data file"))}
    return {"data": spec}


@dataclass
class StageRunner:
    """Runs named stages in ``out``, keyed by the hash of their inputs and settings; keeps ``manifest.json``.

    ``own``: the top-level folders this pipeline's stages write (besides those its manifest records). An existing
    ``out`` holding anything else -- a ``manifest.json`` that is not a pipeline manifest, a file of the user's --
    is refused before anything is written there."""

    out: Path
    header: dict[str, Any]
    on_event: Event | None = None
    force: bool = False
    hashes: Hashes = field(default_factory=Hashes)
    manifest: dict[str, Any] = field(default_factory=dict)
    log_rows: list[dict[str, Any]] = field(default_factory=list)
    own: tuple[str, ...] = ()
    created: list[Path] = field(default_factory=list)  # folders this run made, deepest first (see ``discard``)
    had_manifest: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise BadInput(f"{self.out}: the output directory is a file")
        old = self._previous_manifest()
        self.had_manifest = self.path.exists()
        self.manifest = {"format": MANIFEST_FORMAT, **self.header, "versions": versions(),
                         "stages": dict(old.get("stages") or {}), "verdict": None}

    def _previous_manifest(self) -> dict[str, Any]:
        """The manifest of an earlier run in ``out`` ({} for a new or empty folder); BadInput when ``out`` holds
        anything that is not this pipeline's."""
        if not self.out.is_dir():
            return {}
        path = self.out / "manifest.json"
        old: Any = {}
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                old = None
            if not isinstance(old, dict) or old.get("format") != MANIFEST_FORMAT:
                raise BadInput(f"{path}: not a chita-edge pipeline manifest (expected format {MANIFEST_FORMAT}); "
                               "it is left as it is: choose an empty or new output directory (--out)")
            _check_shape(path, old)
        stages = old.get("stages") if isinstance(old.get("stages"), dict) else {}
        own = {*OWN_FILES, *self.own, *(str(k).split("/", 1)[0] for k in stages)}
        foreign = sorted(e.name for e in self.out.iterdir()
                         if e.name not in own and not (e.name.startswith(".") and e.name.endswith(".part")))
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise BadInput(f"{self.out}: the output directory holds {foreign[0]!r}{more}, not written by this "
                           "pipeline; choose an empty or new output directory (--out), nothing there is overwritten")
        return old

    @property
    def path(self) -> Path:
        return self.out / "manifest.json"

    def _mkdir(self, d: Path) -> None:
        """``mkdir -p d``, remembering the folders it creates."""
        self.created += [p for p in (d, *d.parents) if not p.exists()]
        d.mkdir(parents=True, exist_ok=True)

    def discard(self) -> None:
        """After a failure before any stage finished: remove what this run created (the manifest, the empty stage
        folders, the output folder), so that a bad input leaves nothing behind. Folders holding files stay."""
        if any(isinstance(r, dict) and r.get("status") == "done" for r in self.manifest["stages"].values()):
            return
        if not self.had_manifest:
            self.path.unlink(missing_ok=True)
        for d in self.created:
            try:
                d.rmdir()
            except OSError:
                pass

    def save(self) -> None:
        self._mkdir(self.out)
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
        self._mkdir(sdir)
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
            try:
                result, how = dict(fn(sdir)), "ran"
            except BaseException:
                self.discard()
                raise
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
