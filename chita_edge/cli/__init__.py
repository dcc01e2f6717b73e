"""The ``chita-edge`` command line: thin commands over the library; exceptions become exit codes here only.

Exit codes: 0 ok, 1 budget or accuracy gate failed, 2 bad input or usage, 3 runtime failure.
"""

from __future__ import annotations

import sys

import click

from chita_edge.cli import commands  # noqa: F401  (registers the commands)
from chita_edge.cli.app import app
from chita_edge.errors import ChitaError


def main(argv: list[str] | None = None) -> None:
    from chita_edge.cli import ui

    try:
        rv = app(args=argv, prog_name="chita-edge", standalone_mode=False)
    except ChitaError as e:
        ui.error(str(e))
        sys.exit(e.exit_code)
    except click.exceptions.NoArgsIsHelpError as e:
        ui.info(e.format_message() if hasattr(e, "format_message") else str(e))
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        ui.error("interrupted")
        sys.exit(130)
    except MemoryError:
        ui.error("out of memory; use fewer gradients (--grads) or a smaller model")
        sys.exit(3)
    except Exception as e:  # last line of defence: one line, never a traceback
        ui.error(f"internal error: {type(e).__name__}: {e} (please report it)")
        sys.exit(3)
    sys.exit(rv if isinstance(rv, int) else 0)


__all__ = ["app", "main"]
