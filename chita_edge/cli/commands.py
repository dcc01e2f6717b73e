"""Importing this module registers every command on ``chita_edge.cli.app.app`` (one module per topic)."""

from chita_edge.cli import (
    bench_cmd,  # noqa: F401
    export_cmd,  # noqa: F401
    finetune_cmd,  # noqa: F401
    profiles_cmd,  # noqa: F401
    prune_cmd,  # noqa: F401
    run_cmd,  # noqa: F401
)
