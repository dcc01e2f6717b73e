"""Everything Rich: the consoles, progress bars and JSON printing of the CLI (the only module importing rich)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def print_json(obj: Any) -> None:
    """Exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def error(msg: str) -> None:
    """One line: the message is printed literally (no Rich markup in file names), newlines escaped."""
    from rich.markup import escape

    one_line = msg.replace("\r", "\\r").replace("\n", "\\n")
    err.print(f"[bold red]error:[/] {escape(one_line)}", soft_wrap=True, markup=True)


def info(msg: str) -> None:
    err.print(msg, soft_wrap=True)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    out.print(t)


@contextlib.contextmanager
def progress() -> Iterator[Callable[[str, int, int], None]]:
    """A callback ``(stage, done, total)`` that drives one Rich bar per stage; silent when not interactive."""
    if not interactive():
        yield lambda stage, done, total: None
        return
    bars: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err, transient=False) as p:
        def cb(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = p.add_task(stage, total=total)
            p.update(bars[stage], completed=done, total=total)
        yield cb
