"""The ``chita-edge`` command line: thin commands over the library; exceptions become exit codes here only.

Exit codes: 0 ok, 1 budget or accuracy gate failed, 2 bad input or usage, 3 runtime failure, 130 interrupted
(Ctrl-C or SIGTERM; a fine-tuning run saves its state first).
"""

from __future__ import annotations

import errno
import signal
import sys
import threading

import click

from chita_edge.cli import (
    commands,  # noqa: F401  (registers the commands)
    ui,
)
from chita_edge.cli.app import app
from chita_edge.core.errors import ChitaError
from chita_edge.pruning.distributed import record_exit

try:  # typer >= 0.2x vendors its own click: its usage errors are not click's classes
    from typer._click import exceptions as _typer_click
except ImportError:  # pragma: no cover - older typer uses click itself
    _typer_click = click.exceptions

_NO_ARGS = (click.exceptions.NoArgsIsHelpError, _typer_click.NoArgsIsHelpError)
_USAGE = (click.ClickException, _typer_click.ClickException)


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: temporary outputs are removed, nothing half-written stays


def main(argv: list[str] | None = None) -> None:
    own = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if own:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        _main(argv)
    except SystemExit as e:  # under `prune --workers`: the launcher forwards the code of the rank that failed
        record_exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
        raise
    finally:
        if own:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _main(argv: list[str] | None) -> None:

    try:
        rv = app(args=argv, prog_name="chita-edge", standalone_mode=False)
    except ChitaError as e:
        ui.error(str(e))
        sys.exit(e.exit_code)
    except _NO_ARGS as e:
        ui.info(e.format_message() if hasattr(e, "format_message") else str(e))
        sys.exit(2)
    except _USAGE as e:
        e.show()
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        ui.error("interrupted")
        sys.exit(130)
    except MemoryError:
        ui.error("out of memory; use fewer gradients (--grads) or a smaller model")
        sys.exit(3)
    except Exception as e:  # last line of defence: one line, never a traceback
        if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:  # a path the user gave (--out, --data, ...)
            ui.error(f"{e.filename}: file name too long (a path component is over the file system's limit, "
                     "usually 255 bytes); choose a shorter name")
            sys.exit(2)
        ui.error(f"internal error: {type(e).__name__}: {e} (please report it)")
        sys.exit(3)
    if rv == 130:  # typer turns KeyboardInterrupt (Ctrl-C, or SIGTERM via main) into exit code 130
        ui.error("interrupted; unfinished outputs were removed, earlier files are untouched")
    sys.exit(rv if isinstance(rv, int) else 0)


__all__ = ["app", "main"]
