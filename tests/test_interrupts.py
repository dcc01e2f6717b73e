"""SIGINT / SIGTERM in the middle of gradient collection, solving, fine-tuning and export.

Each test runs the real CLI in a subprocess. A tiny driver wraps the phase's library function so that it first
drops a marker file and then keeps doing the real work (the real function, in a loop): the signal is sent once the
marker exists, i.e. while that phase is running. Afterwards: the process exits with a clean one-line message
(no traceback), the file that was at --out before is byte-for-byte intact, and no temporary ``*.part`` file is
left. Fine-tuning also leaves its resumable state, and ``--resume`` finishes the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import model_file, tiny_mlp

PREVIOUS = b"previous output, must survive\n"

MODEL = model_file(tiny_mlp) + textwrap.dedent("""

    import os, time
    import torch
    from torch import nn

    class Slow(nn.Module):
        '''Marks the first training step and slows training down when CHITA_TEST_SLOW is set.'''
        def __init__(self):
            super().__init__()
            self.net = tiny_mlp(seed=None)

        def forward(self, x):
            if self.training and torch.is_grad_enabled() and os.environ.get("CHITA_TEST_SLOW"):
                open(os.environ["CHITA_TEST_MARKER"], "a").close()
                time.sleep(0.2)
            return self.net(x)

    def mlp():
        torch.manual_seed(0)
        return Slow()
""")

# Wrap ``module.attr`` (a function or method) so that it marks the phase and then runs the real thing forever.
DRIVER = textwrap.dedent("""
    import importlib, os, sys
    mod_name, attr = os.environ["CHITA_TEST_PATCH"].rsplit(":", 1)
    owner = importlib.import_module(mod_name)
    for part in attr.split(".")[:-1]:
        owner = getattr(owner, part)
    name = attr.split(".")[-1]
    real = getattr(owner, name)

    def looping(*a, **k):
        open(os.environ["CHITA_TEST_MARKER"], "a").close()
        while True:
            real(*a, **k)

    setattr(owner, name, looping)
    from chita_edge.cli import main
    main(sys.argv[1:])
""")

PLAIN = "import sys; from chita_edge.cli import main; main(sys.argv[1:])"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("interrupts")
    (d / "slow.py").write_text(MODEL)
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x_train=rng.random((64, 1, 8, 8), dtype=np.float32), y_train=rng.integers(0, 10, 64),
             x_test=rng.random((16, 1, 8, 8), dtype=np.float32), y_test=rng.integers(0, 10, 16))
    ck = d / "pruned.pt"
    r = _cli(d, ["prune", f"{d / 'slow.py'}:mlp", "--data", f"npz:{d / 'data.npz'}", "--sparsity", "0.5",
                 "--method", "magnitude", "--out", ck])
    assert r.returncode == 0, r.stderr
    return {"dir": d, "model": d / "slow.py", "data": d / "data.npz", "ckpt": ck}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHITA_TEST_")}
    # PYTHONFAULTHANDLER: a child that hangs is sent SIGABRT and prints every thread's stack (see _interrupt)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONFAULTHANDLER": "1", **(extra or {})})
    return env


def _cli(cwd: Path, args: list, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PLAIN, *map(str, args)], cwd=cwd, env=_env(env),
                          capture_output=True, text=True, timeout=300)


def _interrupt(cwd: Path, args: list, sig: int, marker: Path, env: dict[str, str],
               driver: bool = True) -> subprocess.CompletedProcess:
    """Start the CLI, wait until the phase has begun (marker), send ``sig``, collect the result."""
    marker.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", DRIVER if driver else PLAIN]
    p = subprocess.Popen([*cmd, *map(str, args)], cwd=cwd, env=_env({**env, "CHITA_TEST_MARKER": str(marker)}),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # a runner started in the background inherits SIGINT ignored; give the child the
                         # default disposition a user's terminal gives it, so Python installs its handler
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.monotonic()
    while not marker.exists():
        if p.poll() is not None:
            out, err = p.communicate()
            pytest.fail(f"the command ended before the phase began (exit {p.returncode}):\n{err}")
        if time.monotonic() - t0 > 120:
            p.kill()
            pytest.fail("the phase never began")
        time.sleep(0.05)
    time.sleep(0.3)  # well inside the phase
    p.send_signal(sig)
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)  # faulthandler dumps the stacks of the hung child
        try:
            out, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        pytest.fail(f"still running 60 s after the signal; its stacks:\n{err[-6000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _assert_clean(r: subprocess.CompletedProcess, out: Path, directory: Path) -> None:
    assert r.returncode in (3, 130), f"exit {r.returncode}:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    assert "interrupted" in r.stderr.lower(), r.stderr
    assert out.read_bytes() == PREVIOUS, "the previous output was changed"
    assert not list(directory.glob("*.part")) and not list(directory.glob(".*.part")), list(directory.iterdir())


PHASES = {
    # phase: (patched function, argv builder)
    "gradients": ("chita_edge.pruning.distributed:collect_gradients",
                  lambda w, out: ["prune", f"{w['model']}:mlp", "--data", f"npz:{w['data']}", "--sparsity", "0.5",
                                  "--method", "chita", "--grads", "16", "--out", out]),
    "solving": ("chita_edge.solvers.chita:chita",
                lambda w, out: ["prune", f"{w['model']}:mlp", "--data", f"npz:{w['data']}", "--sparsity", "0.5",
                                "--method", "chita", "--grads", "16", "--out", out]),
    "export": ("chita_edge.exporters.onnx_format:OnnxSession.run",
               lambda w, out: ["export", w["ckpt"], "--out", out, "--parity-samples", "16"]),
}


@pytest.mark.parametrize("phase,sig", [("gradients", signal.SIGTERM), ("solving", signal.SIGINT),
                                       ("export", signal.SIGTERM)],
                         ids=["gradients-SIGTERM", "solving-SIGINT", "export-SIGTERM"])
def test_interrupt_leaves_previous_output(ws, tmp_path, phase, sig):
    patch, argv = PHASES[phase]
    out = tmp_path / ("model.onnx" if phase == "export" else "pruned.pt")
    out.write_bytes(PREVIOUS)
    r = _interrupt(tmp_path, argv(ws, out), sig, tmp_path / "marker", {"CHITA_TEST_PATCH": patch})
    _assert_clean(r, out, tmp_path)


def test_finetune_interrupt_saves_state_and_resumes(ws, tmp_path, sig=signal.SIGINT):
    out = tmp_path / "ft.pt"
    out.write_bytes(PREVIOUS)
    args = ["finetune", ws["ckpt"], "--data", f"npz:{ws['data']}", "--epochs", "2", "--batch-size", "16",
            "--bn-batches", "0", "--out", out]
    r = _interrupt(tmp_path, args, sig, tmp_path / "marker", {"CHITA_TEST_SLOW": "1"}, driver=False)
    _assert_clean(r, out, tmp_path)
    state = tmp_path / "ft.pt.state"
    assert state.exists(), f"no resumable state after the interrupt: {list(tmp_path.iterdir())}\n{r.stderr}"
    # without --resume the state is not silently discarded
    r2 = _cli(tmp_path, args)
    assert r2.returncode == 2 and "--resume" in r2.stderr and out.read_bytes() == PREVIOUS
    r3 = _cli(tmp_path, [*args, "--resume", "--json"])
    assert r3.returncode == 0, r3.stderr
    assert out.read_bytes() != PREVIOUS and not state.exists()
    import torch

    ck = torch.load(out, weights_only=True)
    src = torch.load(ws["ckpt"], weights_only=True)["state_dict"]
    for k in ("net.1.weight", "net.3.weight"):
        assert bool((ck["state_dict"][k][src[k] == 0] == 0).all()), "the resumed run broke the sparsity pattern"
