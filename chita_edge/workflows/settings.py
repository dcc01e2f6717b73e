"""The settings resolver: one value per pruning setting, from flag > pipeline file > device profile > default.

Every entry point gives what the user gave and leaves the rest ``None`` ("not given"); ``resolve`` fills the gaps
from the next source down and remembers, per setting, where its value came from. The prune job records that in
its JSON result and in the checkpoint's metadata, and the pipeline in its manifest::

    >>> r = resolve(flags={"l2": 0.1}, pipeline={"l2": 0.5, "stages": 8})
    >>> r["l2"], r.source("l2"), r["stages"], r.source("stages"), r.source("n_grads")
    (0.1, 'flag', 8, 'pipeline', 'default')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chita_edge.core.errors import BadInput
from chita_edge.pruning.defaults import DEFAULTS

SOURCES = ("flag", "pipeline", "profile", "default")


@dataclass(frozen=True)
class Resolved:
    """The value of every setting and where it came from (one of ``SOURCES``)."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def source(self, name: str) -> str:
        return self.sources[name]

    def record(self) -> dict[str, dict[str, Any]]:
        """JSON-able ``{setting: {"value": v, "source": s}}``."""
        return {k: {"value": self.values[k], "source": self.sources[k]} for k in sorted(self.values)}


def resolve(*, flags: Mapping[str, Any] | None = None, pipeline: Mapping[str, Any] | None = None,
            profile: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] = DEFAULTS) -> Resolved:
    """Each setting's value from the first source that gives it (not ``None``). A name that is not a setting of
    ``defaults`` is a programming error in the caller, not a user's: it raises ``BadInput`` naming it."""
    layers = (("flag", flags or {}), ("pipeline", pipeline or {}), ("profile", profile or {}))
    for where, given in layers:
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise BadInput(f"{where} settings: unknown {', '.join(unknown)}; expected some of "
                           f"{', '.join(sorted(defaults))}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, default in defaults.items():
        values[name], sources[name] = default, "default"
        for where, given in layers:
            if given.get(name) is not None:
                values[name], sources[name] = given[name], where
                break
    return Resolved(values, sources)


__all__ = ["SOURCES", "Resolved", "resolve"]
