"""Importing this module registers every command on ``chita_edge.cli.app.app`` (one module per topic)."""

from chita_edge.cli import prune_cmd  # noqa: F401
