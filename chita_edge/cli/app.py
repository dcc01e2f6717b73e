"""The Typer application object shared by the command modules (nothing else lives here)."""

import typer

app = typer.Typer(
    name="chita-edge",
    help="CHITA pruning for edge devices: prune, fine-tune, export, benchmark and gate on device budgets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
