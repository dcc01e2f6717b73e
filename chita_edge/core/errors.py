"""The one error hierarchy of chita-edge.

Library code raises these; only the CLI maps them to exit codes (``exit_code``):
0 ok, 1 budget or accuracy gate failed, 2 bad input or usage, 3 runtime failure, 130 interrupted.
Messages are one line and say what to do next. ``check_finite`` and ``check_seed`` are the checks every
config's ``validate`` shares.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

SEED_LIMIT = 2**32  # seeds are integers in [0, 2**32): every random generator of the project takes them


class ChitaError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 3


class BadInput(ChitaError):
    """The user gave something unusable: a file, a field, a value, a combination of flags."""

    exit_code = 2


class MissingExtra(BadInput):
    """An optional dependency group is not installed."""

    def __init__(self, extra: str, what: str):
        super().__init__(f"{what} needs the '{extra}' extra: pip install 'chita-edge[{extra}]'")


class GateFailed(ChitaError):
    """A budget or accuracy gate did not hold."""

    exit_code = 1


class RuntimeFailure(ChitaError):
    """Something failed while running: a runtime, a parity check, the solver."""

    exit_code = 3


class Interrupted(ChitaError):
    """The job was interrupted (SIGINT/SIGTERM); its state was saved for resuming."""

    exit_code = 130


def check_finite(config: object, flags: Mapping[str, str] | None = None) -> None:
    """BadInput for the first float field of the dataclass ``config`` (or float in a tuple field) that is NaN or
    infinite, named by its flag in ``flags`` (field name -> flag) or else by the field's name."""
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise BadInput(f"{(flags or {}).get(f.name, f.name)} {v}: expected a finite number")


def check_seed(seed: object, name: str = "--seed") -> None:
    """BadInput unless ``seed`` is an integer in [0, 2**32)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise BadInput(f"{name} {seed}: expected an integer in 0..{SEED_LIMIT - 1}")
