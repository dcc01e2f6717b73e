"""Shared fixtures: the ../shared data (skip when absent), a CLI runner, single-threaded torch, the tiny test
models (every test builds them from the factories here) and scikit-learn's digits; ``--run-slow``."""

from __future__ import annotations

import inspect
import io
import json
import os
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from chita_edge.models.zoo import ResNet20

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHITA_EDGE_SHARED", ROOT.parent / "shared"))

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (minutes each; skipped by default, see pyproject.toml)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` take minutes and are skipped unless ``--run-slow``: each names, in its docstring,
    the fast tests that check the same behaviour in the default run."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow (minutes): run with pytest --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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


# ------------------------------------------------------------------------------------- tiny models, once
# Each test builds its tiny model from these factories; a test writing a user's model file gets their source
# through model_file(), so that the file stands alone.
def tiny_mlp(hidden: int = 32, *, inputs: int = 64, classes: int = 10, seed: int | None = 0) -> nn.Module:
    """Flatten -> Linear(inputs, hidden) -> ReLU -> Linear(hidden, classes), for 8x8 digits by default.

    ``seed``: ``torch.manual_seed(seed)`` before building; None draws from the current random stream.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def tiny_cnn(dropout: float = 0.0) -> nn.Module:
    """One 3x3 conv (6 channels, no bias) + BatchNorm + ReLU [+ Dropout] + a classifier, for 8x8 digits; seed 0."""
    torch.manual_seed(0)
    drop = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), *drop,
                         nn.Flatten(), nn.Linear(6 * 64, 10))


def small_cnn(*, pool: int = 1, conv_bias: bool = False, seed: int | None = 0) -> nn.Module:
    """Two 3x3 convs (8, 16 channels) with BatchNorm + ReLU, average-pooled to pool x pool, a classifier; 8x8 digits.

    ``seed`` as in :func:`tiny_mlp`.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(16 * pool * pool, 10))



def trained_digits_cnn(ds) -> nn.Module:
    """``small_cnn(pool=2, conv_bias=True)`` trained 60 Adam steps on the digits data ``ds`` (eval mode); seed the
    global RNG first for the same model every time."""
    model = small_cnn(pool=2, conv_bias=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        idx = torch.randint(0, len(ds.x_train), (128,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx]).backward()
        opt.step()
    return model.eval()

def tiny_resnet(widths: tuple[int, int, int] = (8, 16, 16), *, random_bn: bool = False) -> nn.Module:
    """ResNet20 (3x32x32 input) with narrow stages, seed 0, in eval mode.

    ``random_bn``: BatchNorm running statistics and biases drawn at random (generator seed 1) instead of the
    identity, so that folding and re-fitting them is visible.
    """
    torch.manual_seed(0)
    m = ResNet20(widths=widths).eval()
    if random_bn:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                    mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                    mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
    return m


def model_file(*factories: Callable[..., nn.Module], **entries: str) -> str:
    """Source of a user's model file (``path.py:NAME``): the given factories above, copied so that the file
    stands alone, and one zero-argument function per entry ``NAME="expression"`` returning that expression.

    ``model_file(tiny_mlp, mlp="tiny_mlp(16)")`` -> a file whose ``mlp()`` returns ``tiny_mlp(16)``.
    """
    head = ["import torch", "from torch import nn"]
    if tiny_resnet in factories:
        head.append("from chita_edge.models.zoo import ResNet20")
    parts = ["\n".join(head) + "\n"] + [inspect.getsource(f) for f in factories]
    parts += [f"def {name}():\n    return {expr}\n" for name, expr in entries.items()]
    return "\n\n".join(parts)


# The tiny MLP and CNN as a user's model file (MODEL = path/tiny.py:mlp or :cnn) for 8x8 single-channel digits.
TINY = model_file(tiny_mlp, tiny_cnn, mlp="tiny_mlp()", cnn="tiny_cnn()")


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits as a chita-edge Dataset."""
    from chita_edge.core.data import load_digits_dataset

    return load_digits_dataset()


def tiny_board(latency_ms: float | None = None, *, board_id: str = "tiny-board") -> str:
    """An uncalibrated device profile (YAML): a check measures on this host, with no host calibration (fast). Its
    budgets: 5 MB of file, and ``latency_ms`` at p90 when given (which this host cannot verify: uncertain)."""
    budgets = "{model_file_mb: 5}" if latency_ms is None else \
        f"{{latency_ms: {{value: {latency_ms}, percentile: p90}}, model_file_mb: 5}}"
    return (f"id: {board_id}\nname: a test board\nform_factor: sbc\nsoc: test\n"
            "clusters: [{cores: 2, core: Cortex-A55, max_ghz: 1.5}]\nthreads: 1\n"
            f"runtimes: {{onnxruntime: {{threads: 1}}}}\nbudgets: {budgets}\n")
