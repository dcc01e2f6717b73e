"""Shared fixtures: the ../shared data (skip when absent), a CLI runner, single-threaded torch."""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHITA_EDGE_SHARED", ROOT.parent / "shared"))

torch.set_num_threads(1)


def shared_path(rel: str) -> Path:
    """Path under ../shared, or skip the test with the reason."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"needs ../shared/{rel} (the project's reference data; absent on this machine)")
    return p


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip("needs ../shared (the project's reference data and checkpoints; absent on this machine)")
    return SHARED


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


def run_cli(*args: str) -> CliResult:
    """Run ``chita-edge ARGS`` in-process through the real entry point (exit-code mapping included)."""
    from chita_edge.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    old_argv = sys.argv
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


# Tiny models as a user's model file (MODEL = path/tiny.py:mlp or :cnn) for 8x8 single-channel digits.
TINY = '''
import torch
from torch import nn

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 64, 10))
'''


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits as a chita-edge Dataset."""
    from chita_edge.core.data import load_digits_dataset

    return load_digits_dataset()
