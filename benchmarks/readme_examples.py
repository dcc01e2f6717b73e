"""Run README.md's command blocks as written, the slow ones included: ``python benchmarks/readme_examples.py``.

Every ```` ```sh ```` / ```` ```bash ```` block of the README carries a marker, an HTML comment on the line
before it:

* ``<!-- runnable -->``: run by ``tests/test_readme_examples.py`` in the default suite (seconds);
* ``<!-- runnable: slow -->``: minutes; run only by this script;
* ``... needs FILE FILE`` (after either): files the block expects in its directory, which a reader brings
  (their model, their data) and this runner provides (``FIXTURES``: ``../shared`` data and checkpoints, or a
  file made from another README block);
* ``<!-- not run: REASON -->``: never run; the reason says why and what covers it instead.

The blocks run in README order with ``bash -e -o pipefail`` in one temporary directory laid out like a checkout
beside ``../shared``: ``ROOT/project`` (the working directory: ``.venv`` linked, ``examples/`` copied so that
their outputs stay in the temporary directory) and ``ROOT/shared`` (a link to the real ``../shared``).
Prints one row per block: its README line, marker, exit code and seconds; exits 1 when a block fails.
Options: ``--fast`` (only the blocks of the default suite), ``--keep DIR`` (run in DIR and keep it),
``--match TEXT`` (only the runnable blocks whose text contains TEXT).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MARK = re.compile(r"^<!-- (runnable|not run)(?::\s*(.*?))?\s*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")
# file a block needs -> (from ../shared, or how it is made here)
FIXTURES = {
    "mlpnet.pt": ("shared", "checkpoints/mlpnet_mnist.pt"),
    "mnist.npz": ("shared", "data/mnist.npz"),
    "my_data.npz": ("shared", "data/cifar10.npz"),
    "my_model.py": ("readme", "the ```python block that starts with '# my_model.py'"),
    "my_weights.pt": ("make", "torch.save(my_model.build().state_dict()) (untrained)"),
    "model.onnx": ("make", "chita-edge export mlpnet.pt --model zoo:mlpnet --out model.onnx"),
}
NEEDS_FIRST = {"my_weights.pt": ["my_model.py"], "model.onnx": ["mlpnet.pt"]}


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mark: str | None  # runnable, not run, or None (unmarked)
    slow: bool = False
    needs: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def uses_shared(self) -> bool:
        return "../shared" in self.code or "pipeline-resnet20.yaml" in self.code or any(
            FIXTURES[n][0] == "shared" or any(FIXTURES[m][0] == "shared" for m in NEEDS_FIRST.get(n, []))
            for n in self.needs if n in FIXTURES)


def blocks(text: str) -> list[Block]:
    """Every fenced block of ``text``, with the marker of the line before it (blank lines skipped)."""
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        mk = MARK.match(prev)
        b = Block(line=i + 1, lang=m.group(1), code="\n".join(lines[i + 1:j]), mark=mk.group(1) if mk else None)
        if mk:
            arg = mk.group(2) or ""
            if b.mark == "not run":
                b.reason = arg
            else:
                words = arg.replace(",", " ").split()
                b.slow = "slow" in words
                if "needs" in words:
                    b.needs = words[words.index("needs") + 1:]
        out.append(b)
        i = j + 1
    return out


def command_blocks(text: str) -> list[Block]:
    return [b for b in blocks(text) if b.lang in ("sh", "bash", "shell", "console")]


def layout(root: Path) -> Path:
    """ROOT/project (the working directory) and ROOT/shared; returns ROOT/project."""
    cwd = root / "project"
    cwd.mkdir(parents=True, exist_ok=True)
    if SHARED.is_dir() and not (root / "shared").exists():
        (root / "shared").symlink_to(SHARED)
    if not (cwd / ".venv").exists():
        (cwd / ".venv").symlink_to(REPO / ".venv")
    if not (cwd / "examples").exists():
        shutil.copytree(REPO / "examples", cwd / "examples")
    return cwd


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def provide(name: str, cwd: Path, readme: str) -> None:
    """Put the file ``name`` that a block needs into ``cwd`` (FIXTURES says from where)."""
    if (cwd / name).exists():
        return
    for dep in NEEDS_FIRST.get(name, []):
        provide(dep, cwd, readme)
    kind, what = FIXTURES[name]
    if kind == "shared":
        (cwd / name).symlink_to(SHARED / what)
    elif name == "my_model.py":
        code = next(b.code for b in blocks(readme) if b.lang == "python" and b.code.startswith("# my_model.py"))
        (cwd / name).write_text(code + "\n", encoding="utf-8")
    elif name == "my_weights.pt":
        subprocess.run([sys.executable, "-c", "import torch, my_model; torch.save(my_model.build().state_dict(), "
                        "'my_weights.pt')"], cwd=cwd, check=True, env=_env())
    elif name == "model.onnx":
        subprocess.run(["chita-edge", "export", "mlpnet.pt", "--model", "zoo:mlpnet", "--out", "model.onnx"],
                       cwd=cwd, check=True, env=_env(), capture_output=True)


def run_block(b: Block, cwd: Path, readme: str, timeout: float = 3600) -> tuple[int, float, str]:
    """Run one block as written; returns (exit code, seconds, the output's last 3000 characters)."""
    for n in b.needs:
        provide(n, cwd, readme)
    t0 = time.perf_counter()
    p = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", b.code], cwd=cwd, env=_env(), capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, time.perf_counter() - t0, (p.stdout + p.stderr)[-3000:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="only the blocks of the default suite")
    ap.add_argument("--keep", type=Path, help="run in this directory and keep it")
    ap.add_argument("--match", help="only the runnable blocks whose text contains this")
    a = ap.parse_args()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    root = a.keep or Path(tempfile.mkdtemp(prefix="readme-examples-"))
    cwd = layout(root)
    failed = 0
    print(f"{'line':>5}  {'marker':<16} {'exit':>4} {'seconds':>8}  first command")
    for b in command_blocks(readme):
        first = b.code.strip().splitlines()[0][:70] if b.code.strip() else ""
        if b.mark != "runnable" or (a.fast and b.slow) or (a.match and a.match not in b.code):
            print(f"{b.line:>5}  {(b.mark or 'UNMARKED'):<16} {'-':>4} {'-':>8}  {first}")
            failed += b.mark is None
            continue
        if b.uses_shared and not SHARED.is_dir():
            print(f"{b.line:>5}  {'skipped':<16} {'-':>4} {'-':>8}  {first}  (no ../shared)")
            continue
        rc, secs, tail = run_block(b, cwd, readme)
        print(f"{b.line:>5}  {'runnable: slow' if b.slow else 'runnable':<16} {rc:>4} {secs:>8.1f}  {first}")
        if rc:
            failed += 1
            print(tail, file=sys.stderr)
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
