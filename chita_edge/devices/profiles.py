"""Device profiles: the YAML schema (pydantic), loading, and error messages that point at the YAML line.

A profile names a device class (``phone-flagship-sd8g2``, ``sbc-rpi4`` ...), its CPU, the runtime settings a
deployment would use there, the budgets a model must meet, and the published reference measurements
(``calibration.rows``, each with its row id in ``device_profiles/SOURCES.md``) that the host→device estimate is fitted to.
Anywhere a profile id is accepted, a path to a YAML file is accepted too. This is the only module importing yaml.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from chita_edge.core.errors import BadInput

PERCENTILES = ("p50", "p90", "p99")
# Limits beyond which a budget is certainly a typo (one minute per inference, 64 GiB, 16 GiB of weights).
MAX_LATENCY_MS, MAX_MEMORY_MB, MAX_FILE_MB = 60_000.0, 65_536.0, 16_384.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """Booleans are not numbers: YAML's ``true`` is not taken as 1 for a numeric field. (A string still may
        be: PyYAML reads ``1e3`` as one.)"""
        kinds = set(_flatten_ann(cls.model_fields[info.field_name].annotation)) if info.field_name else set()
        if isinstance(v, bool) and kinds & {int, float} and bool not in kinds:
            raise ValueError("expected a number, not a boolean")
        return v


class Cluster(_Strict):
    cores: int = Field(ge=1, le=256, description="cores in this cluster")
    core: str = Field(min_length=1, description="core type, e.g. Cortex-A76")
    max_ghz: float = Field(gt=0, le=6.0, description="maximum clock in GHz")


class OrtSettings(_Strict):
    threads: int = Field(ge=1, le=256)


class LiteRTSettings(_Strict):
    threads: int = Field(ge=1, le=256)
    xnnpack: bool = True


class Runtimes(_Strict):
    onnxruntime: OrtSettings | None = None
    litert: LiteRTSettings | None = None

    @model_validator(mode="after")
    def _one(self) -> Runtimes:
        if self.onnxruntime is None and self.litert is None:
            raise ValueError("expected at least one of 'onnxruntime' or 'litert'")
        return self


class LatencyBudget(_Strict):
    value: float = Field(gt=0, le=MAX_LATENCY_MS, description="milliseconds per inference")
    percentile: Literal["p50", "p90", "p99"] = "p90"


class Budgets(_Strict):
    latency_ms: LatencyBudget | None = None
    peak_memory_mb: float | None = Field(default=None, gt=0, le=MAX_MEMORY_MB)
    model_file_mb: float | None = Field(default=None, gt=0, le=MAX_FILE_MB)


class CalibrationRow(_Strict):
    row: str = Field(pattern=r"^R\d{2,3}$", description="row id in device_profiles/SOURCES.md, e.g. R27")
    device: str = Field(min_length=1)
    model: str = Field(pattern=r"^[a-z0-9_]+$", description="reference model, e.g. mobilenet_v1")
    input: int = Field(default=224, ge=8, le=4096)
    runtime: str = Field(min_length=1, description="the runtime that was measured, e.g. ncnn, xnnpack, tflite")
    runtime_version: str | None = None
    precision: Literal["fp32", "fp16", "int8", "uint8"]
    threads: int | None = Field(default=None, ge=1, le=256, description="CPU threads (required for CPU rows)")
    delegate: Literal["cpu", "gpu", "npu", "nnapi", "edgetpu"] = "cpu"
    latency_ms: float = Field(gt=0, le=1e6)
    source: str = Field(min_length=1, description="source key in device_profiles/SOURCES.md, e.g. NCNN")
    proxy: bool = False
    clock_ghz: float | None = Field(default=None, gt=0, le=6.0, description="clock of the measured board")
    note: str | None = None

    @model_validator(mode="after")
    def _cpu_threads(self) -> CalibrationRow:
        if self.delegate == "cpu" and self.threads is None:
            raise ValueError("a CPU row needs 'threads' (the thread count of the measurement)")
        return self


class Calibration(_Strict):
    runtime: str = Field(min_length=1, description="the device runtime whose CPU rows are fitted")
    clock_ghz: float | None = Field(default=None, gt=0, le=6.0,
                                    description="target clock: proxy rows with clock_ghz are scaled to it")
    rows: list[CalibrationRow] = Field(min_length=1)


class Profile(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    name: str = Field(min_length=1)
    form_factor: Literal["phone", "watch", "sbc", "mcu"]
    soc: str = Field(min_length=1)
    clusters: list[Cluster] = Field(min_length=1)
    threads: int = Field(ge=1, le=256, description="threads a deployment uses on the device")
    width_multiple: int = Field(default=8, ge=1, le=256, description="channel counts are rounded to this")
    runtimes: Runtimes
    budgets: Budgets
    calibration: Calibration | None = None
    confidence: Literal["high", "medium", "low"] = "medium"
    notes: str | None = None

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int, info: ValidationInfo) -> int:
        cores = sum(c.cores for c in info.data.get("clusters") or [])
        if cores and v > cores:
            raise ValueError(f"expected at most the {cores} cores of the clusters")
        return v

    @field_validator("runtimes")
    @classmethod
    def _runtime_threads(cls, v: Runtimes, info: ValidationInfo) -> Runtimes:
        cores = sum(c.cores for c in info.data.get("clusters") or [])
        for name in ("onnxruntime", "litert"):
            rt = getattr(v, name)
            if cores and rt is not None and rt.threads > cores:
                raise ValueError(f"expected {name}.threads of at most the {cores} cores of the clusters (got {rt.threads})")
        return v

    def device_threads(self, runtime: str) -> int:
        """Threads the profile's deployment uses for ``runtime`` (its own setting, else ``threads``)."""
        rt = getattr(self.runtimes, runtime, None)
        return rt.threads if rt is not None else self.threads

    def xnnpack(self) -> bool:
        return self.runtimes.litert.xnnpack if self.runtimes.litert is not None else True

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "form_factor": self.form_factor, "soc": self.soc,
                "threads": self.threads, "confidence": self.confidence,
                "calibrated": self.calibration is not None}


# ----------------------------------------------------------------------------------------------- loading
class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first at line {first}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def bundled_ids() -> list[str]:
    root = resources.files("chita_edge.device_profiles")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _bundled_text(pid: str) -> tuple[str, str]:
    res = resources.files("chita_edge.device_profiles") / f"{pid}.yaml"
    return res.read_text(encoding="utf-8"), f"device_profiles/{pid}.yaml"


def _node_at(root: yaml.Node | None, loc: tuple[Any, ...]) -> tuple[yaml.Node | None, bool]:
    """The YAML node for a pydantic error location; (node, exact) where exact is False if we stopped early."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    nxt = v
                    break
            if nxt is None:
                return node, False
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
        else:
            return node, False
    return node, True


def _key_node(root: yaml.Node | None, loc: tuple[Any, ...]) -> yaml.Node | None:
    parent, exact = _node_at(root, loc[:-1])
    if exact and isinstance(parent, yaml.MappingNode):
        for k, _ in parent.value:
            if isinstance(k, yaml.ScalarNode) and k.value == str(loc[-1]):
                return k
    return None


def _expected(err: dict[str, Any], model_cls: type[BaseModel] | None) -> str:
    t, msg = err["type"], err["msg"]
    if t == "missing":
        return "missing; this field is required"
    if t == "extra_forbidden":
        allowed = ", ".join(model_cls.model_fields) if model_cls is not None else "the documented fields"
        return f"unknown field; expected one of: {allowed}"
    msg = re.sub(r"^Input should be ", "expected ", msg)
    msg = re.sub(r"^Value error, ", "", msg)
    msg = re.sub(r"^String should match pattern ", "expected a string matching ", msg)
    got = err.get("input")
    if t != "missing" and isinstance(got, (str, int, float, bool)):
        msg += f" (got {got!r})"
    return msg


def _model_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class whose fields live at ``loc`` (for listing allowed fields)."""
    cls: Any = Profile
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(cls, "model_fields", {})
        if part not in fields:
            return cls
        ann = fields[part].annotation
        cls = next((a for a in _flatten_ann(ann) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return None
    return cls


def _flatten_ann(ann: Any) -> list[Any]:
    args = getattr(ann, "__args__", None)
    if not args:
        return [ann]
    out: list[Any] = []
    for a in args:
        out += _flatten_ann(a)
    return out


def read_yaml(text: str, where: str) -> tuple[Any, yaml.Node | None]:
    """The data of YAML ``text`` (a SafeLoader that refuses duplicate keys: ``UniqueKeyLoader``) and its node tree, for the line of a field
    (``_node_at``); malformed YAML is one BadInput 'WHERE:LINE: not valid YAML (...)'. The one YAML reader of the
    profiles and of pipeline.yaml."""
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise BadInput(f"{where}{line}: not valid YAML ({problem})") from None
    return data, root


def parse_profile(text: str, where: str) -> Profile:
    """Validate YAML text as a profile; every problem is a BadInput 'FILE:LINE: field F: expected ...'."""
    data, root = read_yaml(text, where)
    if not isinstance(data, dict):
        raise BadInput(f"{where}:1: expected a mapping of profile fields (id, name, form_factor, ...), "
                       f"got {type(data).__name__}")
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            node = _key_node(root, loc) or _node_at(root, loc[:-1])[0]
            owner = _model_for(loc[:-1])
        elif err["type"] == "missing":
            node = _node_at(root, loc[:-1])[0]
            owner = None
        else:
            node = _node_at(root, loc)[0]
            owner = None
        line = node.start_mark.line + 1 if node is not None else 1
        field = ".".join(str(p) for p in loc) or "(profile)"
        more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        msg = f"{where}:{line}: field '{field}': {_expected(err, owner)}{more}"
        raise BadInput(msg.replace("\r", "\\r").replace("\n", "\\n")) from None  # one line, whatever the keys


def _is_path(s: str) -> bool:
    return s.endswith((".yaml", ".yml")) or os.sep in s or "/" in s or Path(s).is_file()


def profile_file(spec: str | os.PathLike | Profile | None) -> str | None:
    """The YAML file a profile spec reads (None for a bundled id, a loaded Profile or None)."""
    return str(spec) if isinstance(spec, (str, os.PathLike)) and _is_path(str(spec)) else None


def load_profile(spec: str | os.PathLike) -> Profile:
    """A bundled profile by id, or a YAML file by path (anything ending in .yaml/.yml or containing a slash)."""
    s = str(spec)
    if _is_path(s):
        p = Path(s)
        if not p.is_file():
            raise BadInput(f"{p}: profile file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"{p}: cannot read the profile ({e})") from None
        return parse_profile(text, str(p))
    ids = bundled_ids()
    if s not in ids:
        raise BadInput(f"profile '{s}': unknown id; expected one of {', '.join(ids)} or a path to a YAML file")
    text, where = _bundled_text(s)
    prof = parse_profile(text, where)
    if prof.id != s:
        raise BadInput(f"{where}: field 'id': expected '{s}' (the file name), got '{prof.id}'")
    return prof


def load_all() -> list[Profile]:
    return [load_profile(pid) for pid in bundled_ids()]


def with_budgets(profile: Profile, *, latency_ms: float | None = None, percentile: str | None = None,
                 memory_mb: float | None = None, file_mb: float | None = None) -> Budgets:
    """The profile's budgets with command-line overrides, validated by the same rules as the YAML."""
    b = profile.budgets.model_dump()
    if latency_ms is not None or percentile is not None:
        cur = b.get("latency_ms") or {}
        if latency_ms is None and not cur:
            raise BadInput(f"--percentile {percentile}: profile {profile.id} has no latency budget; give --latency-ms")
        b["latency_ms"] = {"value": latency_ms if latency_ms is not None else cur["value"],
                           "percentile": percentile or cur.get("percentile", "p90")}
    if memory_mb is not None:
        b["peak_memory_mb"] = memory_mb
    if file_mb is not None:
        b["model_file_mb"] = file_mb
    try:
        return Budgets.model_validate(b)
    except ValidationError as e:
        err = e.errors()[0]
        flag = {"latency_ms": "--latency-ms", "peak_memory_mb": "--memory-mb", "model_file_mb": "--file-mb"}
        loc = tuple(err["loc"])
        name = flag.get(str(loc[0]), str(loc[0]))
        if loc[-1] == "percentile":
            name = "--percentile"
        raise BadInput(f"{name}: {_expected(err, None)}") from None


def dump_yaml(profile: Profile) -> str:
    return yaml.safe_dump(profile.model_dump(exclude_none=True), sort_keys=False, allow_unicode=True)
