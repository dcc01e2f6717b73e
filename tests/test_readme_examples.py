"""README.md's examples run as written: every command block is marked (runnable, runnable: slow, not run: why),
and the runnable ones that take seconds run here, in README order, in a temporary directory beside ../shared
(benchmarks/readme_examples.py holds the runner and runs the slow ones too)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_examples", ROOT / "benchmarks" / "readme_examples.py")
rx = importlib.util.module_from_spec(_spec)
sys.modules["readme_examples"] = rx  # its dataclass looks its module up
_spec.loader.exec_module(rx)
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_command_block_is_marked():
    cmds = rx.command_blocks(README)
    assert len(cmds) >= 5
    unmarked = [b.line for b in cmds if b.mark is None]
    assert unmarked == [], f"README.md lines {unmarked}: mark each command block (see benchmarks/readme_examples.py)"
    assert all(b.reason for b in cmds if b.mark == "not run"), "a 'not run' marker says why"
    assert all(n in rx.FIXTURES for b in cmds for n in b.needs), "every needed file has a fixture"
    fast = [b for b in cmds if b.mark == "runnable" and not b.slow]
    assert fast and any(b.slow for b in cmds)
    # the walkthrough and the pipeline example are among the runnable ones (slow), not left out
    runnable = "\n".join(b.code for b in cmds if b.mark == "runnable")
    assert "chita-edge check model.onnx --profile watch-a55-dual" in runnable
    assert "chita-edge run examples/pipeline-resnet20.yaml" in runnable


def test_markers_are_parsed():
    text = ("<!-- runnable: slow, needs mnist.npz mlpnet.pt -->\n```sh\necho a\n```\n\n<!-- not run: CI only -->\n"
            "```yaml\nx: 1\n```\n```bash\necho b\n```\n")
    a, b, c = rx.blocks(text)
    assert (a.mark, a.slow, a.needs, a.code) == ("runnable", True, ["mnist.npz", "mlpnet.pt"], "echo a")
    assert (b.mark, b.reason, b.lang) == ("not run", "CI only", "yaml")
    assert c.mark is None and [x.line for x in rx.command_blocks(text)] == [2, 10]


def test_fast_readme_blocks_run_as_written(tmp_path):
    fast = [b for b in rx.command_blocks(README) if b.mark == "runnable" and not b.slow]
    if any(b.uses_shared for b in fast) and not rx.SHARED.is_dir():
        pytest.skip("needs ../shared (the README's MNIST / CIFAR-10 data and checkpoints stand-ins)")
    cwd = rx.layout(tmp_path)
    for b in fast:
        rc, secs, tail = rx.run_block(b, cwd, README, timeout=300)
        assert rc == 0, f"README.md line {b.line} exited {rc}:\n{b.code}\n---\n{tail}"
