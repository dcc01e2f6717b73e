"""Write docs/cli.md from the commands' own help, so that the reference cannot drift from the CLI.

    python docs/gen_cli.py            # rewrite docs/cli.md
    python docs/gen_cli.py --check    # exit 1 if docs/cli.md is not what the CLI says (tests/test_docs.py)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import typer

from chita_edge.cli import app

DOC = Path(__file__).with_name("cli.md")
HEAD = ("# Command reference\n\nEvery command takes `--help`; `--json` prints exactly one JSON object on stdout. "
        "Exit codes: 0 ok, 1 a budget or accuracy gate failed, 2 bad input, 3 runtime failure. Generated from the "
        "commands' help by `python docs/gen_cli.py` (tests/test_docs.py fails when it is out of date).\n")
TAIL = ("Details: [pipeline.md](pipeline.md), [devices-and-benchmarking.md](devices-and-benchmarking.md), "
        "[structure.md](structure.md), [finetune.md](finetune.md), [exporters.md](exporters.md).\n")


ORDER = ["prune", "eval", "finetune", "export", "inspect", "bench", "check", "run", "sweep", "demo", "profiles"]


def _commands(group, prefix: str):
    for name, cmd in sorted(group.commands.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99):
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", cmd


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _param(p) -> tuple[str, str]:
    if p.param_type_name == "argument":
        return p.name.upper(), getattr(p, "help", None) or ""
    names = "/".join(p.opts + p.secondary_opts) if p.secondary_opts else ", ".join(p.opts)
    return names, p.help or ""


def render() -> str:
    out = [HEAD]
    for name, cmd in _commands(typer.main.get_command(app), "chita-edge"):
        text = (cmd.help or "").strip()
        desc, _, example = text.partition("Example:")
        out.append(f"## {name}\n\n{_cell(desc)}\n")
        if example.strip():
            out.append(f"```sh\n{' '.join(example.split())}\n```\n")
        rows = [_param(p) for p in cmd.params if p.name != "help"]
        out.append("| argument / option | meaning |\n|---|---|\n"
                   + "".join(f"| `{n}` | {_cell(h)} |\n" for n, h in rows))
    out.append(TAIL)
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    text = render()
    if ap.parse_args().check:
        if DOC.read_text() != text:
            print(f"{DOC} is out of date: run python docs/gen_cli.py", file=sys.stderr)
            return 1
        return 0
    fd, tmp = tempfile.mkstemp(dir=DOC.parent, prefix=".cli.md.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, DOC)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
