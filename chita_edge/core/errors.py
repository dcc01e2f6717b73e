"""The one error hierarchy of chita-edge.

Library code raises these; only the CLI maps them to exit codes (``exit_code``):
0 ok, 1 budget or accuracy gate failed, 2 bad input or usage, 3 runtime failure.
Messages are one line and say what to do next.
"""

from __future__ import annotations


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

    exit_code = 3
