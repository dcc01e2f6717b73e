"""Importing this module registers every command on ``chita_edge.cli.app.app`` (one module per topic)."""

from chita_edge.cli import prune_cmd  # noqa: F401
from chita_edge.cli import finetune_cmd  # noqa: F401
from chita_edge.cli import profiles_cmd  # noqa: F401
from chita_edge.cli import bench_cmd  # noqa: F401
from chita_edge.cli import export_cmd  # noqa: F401
from chita_edge.cli import run_cmd  # noqa: F401
