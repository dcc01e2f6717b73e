"""Issue 22, "every bad input exits 2": inputs that used to end in ``internal error`` (exit 3), a late failure or
an unhelpful message. Each case runs the real CLI (``run_cli``; a subprocess where torch's own logging must be
seen) and checks the exit code, the one ``error:`` line and what is left on disk.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from chita_edge.exporters import ExportConfig
from conftest import CliResult, model_file, run_cli, tiny_board, tiny_mlp

from chita_edge.budget.config import BudgetConfig
from chita_edge.core.errors import BadInput
from chita_edge.pruning.blocks import BlockConfig
from chita_edge.pruning.channels import StructuredConfig
from chita_edge.pruning.prune import PruneConfig
from chita_edge.training.finetune import FinetuneConfig
from chita_edge.workflows import pipeline_spec
from chita_edge.workflows.sweep import SweepConfig

LONG = "a" * 300  # one path component over the 255-byte limit of the usual file systems
MAGNITUDE = ["--sparsity", "0.5", "--method", "magnitude"]

MODELS = model_file(tiny_mlp, mlp="tiny_mlp(16)") + textwrap.dedent("""

    import os, signal

    class _Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            y = self.fc(x.flatten(1))
            return y, y

    def pair():
        return _Pair()

    class _Raises(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            raise ValueError("forward failed on purpose\\nsecond line")

    def raises():
        return _Raises()

    def broken():
        raise RuntimeError("factory failed on purpose")

    class _CtrlC(nn.Module):
        '''Presses Ctrl-C once, at the first training step, but only while a handler other than Python's
        default one is installed (fine-tuning's), so that a missing handler fails the test, not the test run.'''
        sent = False

        def __init__(self):
            super().__init__()
            self.net = tiny_mlp(16)

        def forward(self, x):
            if (self.training and torch.is_grad_enabled() and not _CtrlC.sent
                    and signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
                _CtrlC.sent = True
                os.kill(os.getpid(), signal.SIGINT)
            return self.net(x)

    def ctrlc():
        return _CtrlC()
""")



@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("exit2")
    (d / "m.py").write_text(MODELS)
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x_train=rng.random((40, 1, 8, 8), dtype=np.float32), y_train=rng.integers(0, 10, 40),
             x_test=rng.random((20, 1, 8, 8), dtype=np.float32), y_test=rng.integers(0, 10, 20))
    f = {"dir": d, "model": d / "m.py", "data": d / "data.npz", "ckpt": d / "ck.pt", "onnx": d / "m.onnx"}
    r = run_cli("prune", f"{f['model']}:mlp", "--data", f"npz:{f['data']}", *MAGNITUDE, "--out", f["ckpt"])
    assert r.code == 0, r.stderr
    r = run_cli("export", f["ckpt"], "--out", f["onnx"], "--parity-samples", "5")
    assert r.code == 0, r.stderr
    (d / "board.yaml").write_text(tiny_board(1000))
    return f


def one_error(r: CliResult, code: int, *needles: str, absent: tuple[str, ...] = ()) -> str:
    """Exit ``code`` with exactly one ``error:`` line holding every needle (and none of ``absent``)."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.code == code, f"exit {r.code}, expected {code}; stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got:\n{r.stderr}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    for n in absent:
        assert n not in lines[0], f"{n!r} in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------------------ internal errors that were bad input
@pytest.mark.parametrize("flag", ["--out", "--out-dir", "--data", "--weights"])
def test_a_path_component_over_255_characters_exits_2(ws, tmp_path, flag):
    args = {"--out": ["--out", tmp_path / f"{LONG}.pt"],
            "--out-dir": ["--out", tmp_path / LONG / "p.pt"],
            "--data": ["--data", f"npz:{tmp_path / LONG}.npz", "--out", tmp_path / "p.pt"],
            "--weights": ["--weights", tmp_path / f"{LONG}.pt", "--out", tmp_path / "p.pt"]}[flag]
    if "--data" not in args:
        args += ["--data", f"npz:{ws['data']}"]
    r = run_cli("prune", f"{ws['model']}:mlp", *MAGNITUDE, *args)
    one_error(r, 2, "too long", LONG)
    assert list(tmp_path.iterdir()) == []


def test_export_and_finetune_refuse_a_too_long_out_name(ws, tmp_path):
    one_error(run_cli("export", ws["ckpt"], "--out", tmp_path / f"{LONG}.onnx"), 2, "--out", "too long")
    one_error(run_cli("finetune", ws["ckpt"], "--data", f"npz:{ws['data']}", "--out", tmp_path / f"{LONG}.pt"),
              2, "--out", "too long")


def _pipeline(tmp: Path, ws: dict[str, Path], **over: str) -> Path:
    body = {"name": "t", "model": f"{ws['model']}:mlp", "data": f"npz:{ws['data']}",
            "profiles": f"[{ws['dir'] / 'board.yaml'}]", "prune": "{method: magnitude, sparsity: 0.5}",
            "export": "{formats: [onnx], parity_samples: 5}", "checks": "{runs: 3, warmup: 1, baseline: false}",
            "out": "out"}
    body.update(over)
    p = tmp / "pipe.yaml"
    p.write_text("".join(f"{k}: {v}\n" for k, v in body.items() if v is not None))
    return p


def test_pipeline_weights_naming_a_missing_file(ws, tmp_path):
    p = _pipeline(tmp_path, ws, weights="missing.pt")
    one_error(run_cli("run", p), 2, "pipe.yaml:", "field 'weights'", "missing.pt", "not found")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stages", ['{"tiny-board/prune": 5}', '"abc"', '[["a", "b"]]',
                                    '{"board/prune": {"key": "k", "status": "done", "outputs": [1]}}',
                                    '{"board/prune": {"result": 3}}'])
def test_a_manifest_of_the_wrong_shape(ws, tmp_path, stages):
    out = tmp_path / "out"
    out.mkdir()
    text = f'{{"format": "chita-edge/pipeline-manifest-v1", "stages": {stages}}}'
    (out / "manifest.json").write_text(text)
    one_error(run_cli("run", _pipeline(tmp_path, ws)), 2, "manifest.json", "not a valid chita-edge pipeline manifest")
    assert (out / "manifest.json").read_text() == text and sorted(p.name for p in out.iterdir()) == ["manifest.json"]


@pytest.mark.parametrize("cmd", ["bench", "check"])
def test_a_zero_byte_onnx_file(ws, tmp_path, cmd):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    extra = ["--profile", str(ws["dir"] / "board.yaml")] if cmd == "check" else []
    one_error(run_cli(cmd, empty, *extra, "--runs", "2", "--warmup", "0"), 2, "empty.onnx", "empty file")
    trunc = tmp_path / "trunc.onnx"  # pinned: a truncated file already exits 2
    trunc.write_bytes(ws["onnx"].read_bytes()[:200])
    one_error(run_cli(cmd, trunc, *extra, "--runs", "2", "--warmup", "0"), 2, "trunc.onnx")


@pytest.mark.parametrize("argv,needle", [
    (["--l2", "inf"], "--l2 inf"),  # was: 52 s of CHITA++ before "the solver produced non-finite weights", exit 3
    (["--l2", "nan"], "--l2 nan"),
    (["--block-size", "-1"], "--block-size -1"),  # was: accepted and ignored
    (["--structure", "block", "--l2", "inf"], "--l2 inf"),
    (["--gradual", "--epochs", "1", "--lr", "inf"], "--lr inf"),
])
def test_prune_refuses_non_finite_and_negative_settings_up_front(ws, tmp_path, argv, needle, monkeypatch):
    def never(*a, **k):
        raise AssertionError("gradients were collected for settings that should have been refused")

    monkeypatch.setattr("chita_edge.pruning.gradients.collect_gradients", never)
    monkeypatch.setattr("chita_edge.pruning.distributed.collect_gradients", never)
    monkeypatch.setattr("chita_edge.pruning.channels.collect_gradients", never)
    r = run_cli("prune", f"{ws['model']}:mlp", "--data", f"npz:{ws['data']}", "--sparsity", "0.5", *argv,
                "--out", tmp_path / "p.pt")
    one_error(r, 2, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make,needle", [
    (lambda: PruneConfig(sparsity=0.5, l2=math.inf), "--l2 inf"),
    (lambda: PruneConfig(sparsity=0.5, refit_damp=math.nan), "refit_damp nan"),
    (lambda: PruneConfig(sparsity=0.5, block_size=-1), "--block-size -1"),
    (lambda: PruneConfig(sparsity=0.5, seed=2**40), "--seed"),
    (lambda: FinetuneConfig(lr=0.01, temperature=math.inf), "--temperature inf"),
    (lambda: FinetuneConfig(weight_decay=-0.1), "--weight-decay -0.1"),
    (lambda: FinetuneConfig(momentum=math.nan), "momentum nan"),
    (lambda: StructuredConfig(l2=math.inf), "--l2 inf"),
    (lambda: BlockConfig(sparsity=0.5, l2=math.inf), "--l2 inf"),
    (lambda: BudgetConfig(damp=math.inf), "damp inf"),
    (lambda: BudgetConfig(seed=-1), "--seed -1"),
    (lambda: ExportConfig(format="onnx", atol=math.inf), "atol inf"),
    (lambda: ExportConfig(format="onnx", min_agreement=1.5), "--min-agreement 1.5"),
    (lambda: SweepConfig(sparsities=(0.5,), seed=2**32), "--seed"),
])
def test_every_config_refuses_non_finite_floats_naming_the_setting(make, needle):
    with pytest.raises(BadInput, match=needle.replace("+", r"\+")):
        make().validate()


def test_demo_out_naming_an_existing_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine\n")
    one_error(run_cli("demo", "--out", f), 2, "--out", "afile", "is a file")
    one_error(run_cli("demo", "--out", f / "sub"), 2, "--out")
    assert f.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_model_that_returns_a_tuple(ws, tmp_path):
    r = run_cli("prune", f"{ws['model']}:pair", "--data", f"npz:{ws['data']}", *MAGNITUDE, "--out", tmp_path / "p.pt")
    one_error(r, 2, "m.py:pair", "returns a tuple", "logits")


def test_a_seed_out_of_range(ws, tmp_path):
    big = str(10**23)
    base = ["--data", f"npz:{ws['data']}", "--out", tmp_path / "x.pt"]
    one_error(run_cli("prune", f"{ws['model']}:mlp", *MAGNITUDE, "--seed", big, *base), 2, f"--seed {big}")
    one_error(run_cli("finetune", ws["ckpt"], "--epochs", "1", "--seed", big, *base), 2, f"--seed {big}")
    r = run_cli("prune", f"{ws['model']}:mlp", *MAGNITUDE, "--seed", "1e23", *base)  # pinned: a usage error
    assert r.code == 2 and "--seed" in r.stderr and "internal error" not in r.stderr, r.stderr
    for seed, field in ((big, "prune.seed"), ("1.0e+23", "prune.seed"), ("-1", "prune.seed")):
        p = _pipeline(tmp_path, ws, prune=f"{{method: magnitude, sparsity: 0.5, seed: {seed}}}")
        one_error(run_cli("run", p), 2, f"field '{field}'")
    p = _pipeline(tmp_path, ws, finetune=f"{{epochs: 1, seed: {big}}}")
    one_error(run_cli("run", p), 2, "field 'finetune.seed'")
    assert list(tmp_path.iterdir()) == [tmp_path / "pipe.yaml"]


def test_ctrl_c_during_finetune_exits_130_and_saves_the_state(ws, tmp_path):
    ck = tmp_path / "ctrlc.pt"
    r = run_cli("prune", f"{ws['model']}:ctrlc", "--data", f"npz:{ws['data']}", *MAGNITUDE, "--out", ck)
    assert r.code == 0, r.stderr
    out = tmp_path / "ft.pt"
    r = run_cli("finetune", ck, "--data", f"npz:{ws['data']}", "--epochs", "2", "--batch-size", "8",
                "--bn-batches", "0", "--out", out)
    one_error(r, 130, "interrupted", "--resume")
    assert not out.exists() and (tmp_path / "ft.pt.state").exists()


# -------------------------------------------------------------------------------------------------------- messages
def _cli_subprocess(cwd: Path, *args: object) -> subprocess.CompletedProcess:
    """The CLI in its own process: torch's log handlers write to the real stderr, which run_cli does not see."""
    code = "import sys; from chita_edge.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_a_bad_pt2_file_is_one_line_without_torch_logging(ws, tmp_path):
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"\x00\x01 not a program" * 20)
    renamed = tmp_path / "renamed.pt2"
    renamed.write_bytes(ws["ckpt"].read_bytes())
    for path, needle in ((garbage, "not a loadable torch.export program"), (renamed, "--weights")):
        r = _cli_subprocess(tmp_path, "eval", path, "--data", f"npz:{ws['data']}")
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith("error: ") and path.name in lines[0] and needle in lines[0], lines[0]
        assert "warnings above" not in lines[0], lines[0]


HTML_404 = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


@pytest.mark.parametrize("content", [HTML_404, bytes(np.random.default_rng(1).integers(0, 256, 3000, np.uint8))],
                         ids=["html-404", "random-bytes"])
def test_a_download_gone_wrong_is_not_a_checkpoint_or_npz(ws, tmp_path, content):
    pt, npz, npy = tmp_path / "w.pt", tmp_path / "d.npz", tmp_path / "c.npy"
    for p in (pt, npz, npy):
        p.write_bytes(content)
    r = run_cli("prune", f"{ws['model']}:mlp", "--weights", pt, "--data", f"npz:{ws['data']}", *MAGNITUDE,
                "--out", tmp_path / "p.pt")
    one_error(r, 2, "w.pt", "not a PyTorch checkpoint", absent=("pickled",))
    if content == HTML_404:
        assert "HTML" in r.stderr
    r = run_cli("prune", f"{ws['model']}:mlp", "--data", f"npz:{npz}", *MAGNITUDE, "--out", tmp_path / "p.pt")
    one_error(r, 2, "d.npz", "not a readable .npz file (not a zip archive", absent=("allow_pickle", "unsafely"))
    r = run_cli("export", ws["ckpt"], "--quantize", "int8", "--calibration-data", npy, "--out", tmp_path / "q.onnx")
    one_error(r, 2, "c.npy", "not a .npy array", absent=("allow_pickle", "unsafely"))


def test_messages_name_the_input(ws, tmp_path):
    data = f"npz:{ws['data']}"
    one_error(run_cli("prune", f"{ws['model']}:mlp", "--data", "npz:", *MAGNITUDE, "--out", tmp_path / "p.pt"),
              2, "npz:", absent=("error: .:",))
    one_error(run_cli("eval", "ckpt", "--data", data), 2, "--weights", absent=("None",))
    one_error(run_cli("export", ws["ckpt"], "--quantize", "fp16", "--min-agreement", "1.5", "--out",
                      tmp_path / "e.onnx"), 2, "--min-agreement 1.5")
    one_error(run_cli("finetune", ws["ckpt"], "--data", data, "--weight-decay", "-0.1", "--out", tmp_path / "f.pt"),
              2, "--weight-decay -0.1")
    r = run_cli("prune", f"{ws['model']}:raises", "--data", data, *MAGNITUDE, "--out", tmp_path / "p.pt")
    one_error(r, 2, "forward raised", "ValueError: forward failed on purpose", absent=("does not fit", "second line"))
    r = run_cli("prune", "zoo:mlpnet", "--data", data, *MAGNITUDE, "--out", tmp_path / "p.pt")  # pinned
    one_error(r, 2, "does not fit the model")
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_file_with_a_string_input_is_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.STRING, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.STRING, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 9
    path = tmp_path / "strings.onnx"
    onnx.save(m, str(path))
    one_error(run_cli("bench", path, "--runs", "2", "--warmup", "0"), 2, "strings.onnx", "tensor(string)")


def test_pipeline_inf_is_refused_when_the_file_is_loaded(ws, tmp_path):
    for over, field in ((dict(finetune="{epochs: 1, lr: .inf}"), "finetune.lr"),
                        (dict(prune="{method: magnitude, sparsity: 0.5, l2: .inf}"), "prune.l2"),
                        (dict(checks="{latency_ms: .nan}"), "checks.latency_ms")):
        with pytest.raises(BadInput, match=rf"pipe.yaml:\d+: field '{field}': expected a finite number"):
            pipeline_spec.load_pipeline(_pipeline(tmp_path, ws, **over))
    with pytest.raises(BadInput, match=r"field 'data': expected npz:PATH"):
        pipeline_spec.load_pipeline(_pipeline(tmp_path, ws, data='"npz:"'))


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "empty-out"])
def test_a_pipeline_failing_in_its_first_stage_leaves_nothing(ws, tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    p = _pipeline(tmp_path, ws, model=f"{ws['model']}:broken")
    one_error(run_cli("run", p), 2, "factory failed on purpose")
    if existing:
        assert list(out.iterdir()) == []
    else:
        assert not out.exists()


def test_a_pipeline_keeps_what_finished_before_a_failure(ws, tmp_path, monkeypatch):
    def fail(*a, **k):
        raise BadInput("export failed on purpose")

    monkeypatch.setattr("chita_edge.workflows.jobs.run_export", fail)
    r = run_cli("run", _pipeline(tmp_path, ws))
    assert r.code == 2 and "error: export failed on purpose" in r.stderr, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["stages"]["board/prune"]["status"] == "done" and (tmp_path / "out/board/prune/pruned.pt").is_file()


@pytest.mark.parametrize("where", ["missing-dir", "under-a-file", "long-name"])
def test_export_checks_out_before_exporting(ws, tmp_path, monkeypatch, where):
    def never(*a, **k):
        raise AssertionError("exported before checking --out")

    monkeypatch.setattr("chita_edge.workflows.export.export_model", never)
    (tmp_path / "afile").write_text("x")
    out = {"missing-dir": tmp_path / "nodir" / "m.onnx", "under-a-file": tmp_path / "afile" / "m.onnx",
           "long-name": tmp_path / f"{LONG}.onnx"}[where]
    one_error(run_cli("export", ws["ckpt"], "--out", out), 2, "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]



def test_check_refuses_a_junit_path_it_cannot_write_before_timing(tmp_path, monkeypatch):
    """--junit into a missing directory fails first (exit 2), not after the benchmark runs."""
    ran = []
    monkeypatch.setattr("chita_edge.workflows.jobs.gate_check", lambda *a, **k: ran.append(1))
    (tmp_path / "m.onnx").write_bytes(b"x")
    r = run_cli("check", tmp_path / "m.onnx", "--profile", "phone-mid-sd670", "--junit",
                tmp_path / "nope" / "budgets.xml")
    assert r.code == 2 and "--junit" in r.stderr and "does not exist" in r.stderr and not ran
