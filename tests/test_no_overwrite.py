"""Issue 22: never overwrite what the user gave, never report success without the result.

An output that resolves to an input of the same command is refused (exit 2, one line naming the flag and the
input, nothing written); outputs keep the umask or the replaced file's mode; a model file that calls sys.exit,
a corrupted or non-finite checkpoint, a profile with booleans for numbers or a key given twice, and float data
far outside a normalised range are reported instead of passing silently.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, model_file, run_cli, tiny_board, tiny_mlp

from chita_edge.core.checkpoint import FORMAT, read_weights, save_checkpoint
from chita_edge.core.data import load_data
from chita_edge.core.errors import BadInput
from chita_edge.core.io import atomic_write_text, refuse_overwrite
from chita_edge.devices.profiles import load_profile

BOARD = (ROOT / "device_profiles" / "sbc-rpi4.yaml").read_text(encoding="utf-8")


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A model file (tiny.py:mlp, 8x8 digits), its dense weights w.pt and a small data set d.npz."""
    (tmp_path / "tiny.py").write_text(TINY)
    torch.save(tiny_mlp().state_dict(), tmp_path / "w.pt")
    g = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=g.integers(0, 255, (40, 8, 8), dtype=np.uint8),
             y_train=g.integers(0, 10, 40), x_test=g.integers(0, 255, (20, 8, 8), dtype=np.uint8),
             y_test=g.integers(0, 10, 20))
    return tmp_path


def _prune(ws: Path, out: Path | str, *extra: str, model: str = "mlp"):
    return run_cli("prune", f"{ws / 'tiny.py'}:{model}", "--weights", ws / "w.pt", "--data", f"npz:{ws / 'd.npz'}",
                   "--sparsity", "0.5", "--method", "magnitude", "--out", out, *extra)


def _onnx(path: Path) -> Path:
    """tiny_mlp as a real ONNX file (dynamic batch), so that the commands run to the point of writing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny_mlp().eval(), (torch.rand(1, 1, 8, 8),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return path


def _unchanged(*paths: Path):
    before = {p: p.read_bytes() for p in paths}
    return lambda: all(p.read_bytes() == b for p, b in before.items())


def _one_line(stderr: str) -> bool:
    return len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


# ------------------------------------------------------------------------------------ inputs never overwritten
def test_prune_refuses_to_write_over_its_weights(ws):
    same = _unchanged(ws / "w.pt")
    r = _prune(ws, ws / "w.pt")
    assert r.code == 2 and _one_line(r.stderr), r.stderr
    assert "--out" in r.stderr and "--weights" in r.stderr and "w.pt" in r.stderr
    assert same()


def test_prune_refuses_a_hard_link_to_its_weights_and_the_model_file(ws):
    os.link(ws / "w.pt", ws / "alias.pt")  # another name, the same inode
    same = _unchanged(ws / "w.pt", ws / "tiny.py")
    r = _prune(ws, ws / "alias.pt")
    assert r.code == 2 and "--weights" in r.stderr, r.stderr
    r = _prune(ws, ws / "tiny.py")
    assert r.code == 2 and "model file" in r.stderr, r.stderr
    assert same()


def test_prune_and_finetune_refuse_to_write_over_the_data(ws, cli):
    same = _unchanged(ws / "d.npz")
    r = _prune(ws, ws / "d.npz")
    assert r.code == 2 and "--data" in r.stderr and _one_line(r.stderr), r.stderr
    assert same()
    save_checkpoint(ws / "p.pt", tiny_mlp().state_dict(),
                    {"model": f"{ws / 'tiny.py'}:mlp", "input_shape": [1, 8, 8], "data": f"npz:{ws / 'd.npz'}"})
    r = cli("finetune", ws / "p.pt", "--data", f"npz:{ws / 'd.npz'}", "--epochs", "1", "--out", ws / "d.npz")
    assert r.code == 2 and "--out" in r.stderr and "--data" in r.stderr and _one_line(r.stderr), r.stderr
    assert same()
    assert not (ws / "d.npz.state").exists()


def test_check_refuses_junit_over_the_model_or_the_profile(ws, cli):
    model = _onnx(ws / "m.onnx")
    board = ws / "board.yaml"
    board.write_text(tiny_board())
    same = _unchanged(model, board)
    fast = ("--runs", "2", "--warmup", "0")
    r = cli("check", model, "--profile", board, "--junit", model, *fast)
    assert r.code == 2 and "--junit" in r.stderr and "m.onnx" in r.stderr and _one_line(r.stderr), r.stderr
    r = cli("check", model, "--profile", board, "--junit", board, *fast)
    assert r.code == 2 and "--junit" in r.stderr and "--profile" in r.stderr, r.stderr
    assert same()


def test_bench_report_does_not_write_over_its_data(ws, cli):
    """--report DIR writes DIR/report.json: here that is the --data file, which must survive."""
    rep = ws / "rep"
    rep.mkdir()
    (ws / "d.npz").rename(rep / "report.json")
    _onnx(ws / "m.onnx")
    same = _unchanged(rep / "report.json")
    r = cli("bench", ws / "m.onnx", "--runs", "2", "--warmup", "0", "--data", f"npz:{rep / 'report.json'}",
            "--report", rep)
    assert r.code == 2 and "--report" in r.stderr and "--data" in r.stderr, r.stderr
    assert same()


def test_refuse_overwrite_names_the_flag_and_ignores_missing_entries(tmp_path):
    (tmp_path / "a").write_text("x")
    refuse_overwrite([("--out", tmp_path / "b"), ("--export", None)], [("--weights", tmp_path / "a"), ("x", None)])
    with pytest.raises(BadInput, match=r"^--out .*a: is the input --weights .*a; choose another --out"):
        refuse_overwrite([("--out", tmp_path / "x" / ".." / "a")], [("--weights", tmp_path / "a")])
    # a path that does not exist yet still resolves to the same place
    with pytest.raises(BadInput, match="--junit"):
        refuse_overwrite([("--junit", tmp_path / "new.xml")], [("model", tmp_path / "." / "new.xml")])


# ------------------------------------------------------------------------------------ the pipeline's folder
def _pipeline(tmp: Path) -> Path:
    (tmp / "tiny.py").write_text(TINY)
    (tmp / "board.yaml").write_text(tiny_board())
    p = tmp / "pipe.yaml"
    p.write_text(f"name: t\nmodel: {tmp / 'tiny.py'}:mlp\ndata: digits\nprofiles: [./board.yaml]\n"
                 "prune: {method: magnitude, sparsity: 0.5}\nexport: {formats: [onnx], parity_samples: 20}\n"
                 "checks: {runs: 2, warmup: 0, baseline: false}\n")
    return p


def test_run_refuses_an_out_folder_with_a_foreign_manifest(tmp_path, cli):
    p = _pipeline(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"release": "1.2", "files": ["a", "b"]}))
    same = _unchanged(out / "manifest.json")
    r = cli("run", p, "--out", out)
    assert r.code == 2 and "manifest.json" in r.stderr and "not a chita-edge pipeline manifest" in r.stderr, r.stderr
    assert _one_line(r.stderr) and same() and sorted(x.name for x in out.iterdir()) == ["manifest.json"]


def test_run_reuses_its_own_folder(tmp_path, cli):
    """The refusal does not stop a pipeline from running again in the folder of its earlier run, nor from
    finishing a run that stopped after creating a stage folder."""
    p = _pipeline(tmp_path)
    out = tmp_path / "out"
    (out / "tiny-board" / "prune").mkdir(parents=True)  # left by a run killed before its first manifest
    first = cli("run", p, "--out", out, "--json")
    assert first.code in (0, 1), first.stderr  # 1: a budget verdict, not a refusal
    again = cli("run", p, "--out", out, "--json")
    assert again.code == first.code, again.stderr
    assert {s["status"] for s in again.json()["stages"]} == {"skipped"}


def test_run_refuses_an_out_folder_holding_the_users_files(tmp_path, cli):
    p = _pipeline(tmp_path)
    r = cli("run", p, "--out", tmp_path)  # the folder that holds the pipeline file, the model and the profile
    assert r.code == 2 and "not written by this pipeline" in r.stderr and _one_line(r.stderr), r.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["board.yaml", "pipe.yaml", "tiny.py"]


# ------------------------------------------------------------------------------------------- modes kept
def test_outputs_keep_the_umask_or_the_replaced_files_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.txt", "a")
        save_checkpoint(tmp_path / "new.pt", {"w": torch.zeros(2)}, {})
        os.umask(0o027)
        atomic_write_text(tmp_path / "masked.txt", "a")
        (tmp_path / "shared.txt").write_text("old")
        os.chmod(tmp_path / "shared.txt", 0o644)
        atomic_write_text(tmp_path / "shared.txt", "new")
        (tmp_path / "private.txt").write_text("old")
        os.chmod(tmp_path / "private.txt", 0o600)
        atomic_write_text(tmp_path / "private.txt", "new")
    finally:
        os.umask(old)

    def mode(name: str) -> int:
        return stat.S_IMODE(os.stat(tmp_path / name).st_mode)

    assert mode("new.txt") == 0o644 and mode("new.pt") == 0o644 and mode("masked.txt") == 0o640
    assert mode("shared.txt") == 0o644 and mode("private.txt") == 0o600
    assert (tmp_path / "shared.txt").read_text() == "new"


# ---------------------------------------------------------------------------------- sys.exit in user code
def test_a_factory_that_exits_is_bad_input_not_success(ws, cli):
    (ws / "bye.py").write_text("import sys\n\ndef mlp():\n    sys.exit(0)\n")
    r = cli("prune", f"{ws / 'bye.py'}:mlp", "--data", f"npz:{ws / 'd.npz'}", "--sparsity", "0.5",
            "--out", ws / "p.pt")
    assert r.code == 2 and "bye.py" in r.stderr and "sys.exit(0)" in r.stderr and _one_line(r.stderr), r.stderr
    assert not (ws / "p.pt").exists()
    r = cli("eval", f"{ws / 'bye.py'}:mlp", "--data", f"npz:{ws / 'd.npz'}")
    assert r.code == 2 and "bye.py" in r.stderr, r.stderr


def test_a_forward_that_exits_is_bad_input_not_success(ws, cli):
    src = model_file(tiny_mlp) + (
        "\n\nclass Quitter(nn.Module):\n    def forward(self, x):\n        import sys\n        sys.exit(0)\n\n"
        "def quit():\n    return Quitter()\n")
    (ws / "quit.py").write_text(src)
    r = cli("eval", f"{ws / 'quit.py'}:quit", "--data", f"npz:{ws / 'd.npz'}")
    assert r.code == 2 and "quit.py" in r.stderr and "sys.exit" in r.stderr and _one_line(r.stderr), r.stderr


# ------------------------------------------------------------------------------------ checkpoint contents
def _flip(path: Path, tensor: torch.Tensor, n: int = 400) -> None:
    raw = path.read_bytes()
    at = raw.find(tensor.numpy().tobytes())
    assert at >= 0, "the tensor's bytes are stored as they are"
    bad = bytes(b ^ 0x01 for b in raw[at + 100:at + 100 + n])
    path.write_bytes(raw[:at + 100] + bad + raw[at + 100 + n:])


def test_a_checkpoint_with_flipped_tensor_bytes_is_refused(ws, cli):
    m = tiny_mlp()
    ck = ws / "p.pt"
    save_checkpoint(ck, m.state_dict(), {"model": f"{ws / 'tiny.py'}:mlp", "input_shape": [1, 8, 8]})
    read_weights(ck)  # intact: loads
    _flip(ck, m[1].weight.detach())
    r = cli("eval", "ckpt", "--weights", ck, "--data", f"npz:{ws / 'd.npz'}")
    assert r.code == 2 and "checkpoint corrupted" in r.stderr and "p.pt" in r.stderr and _one_line(r.stderr), \
        r.stderr
    # a plain state dict carries no hash: it cannot be checked and still loads
    torch.save(m.state_dict(), ws / "plain.pt")
    _flip(ws / "plain.pt", m[1].weight.detach())
    read_weights(ws / "plain.pt")


def test_a_checkpoint_written_before_the_hash_still_loads(tmp_path):
    sd = tiny_mlp().state_dict()
    torch.save({"chita_edge": {"format": FORMAT, "model": "zoo:mlpnet"}, "state_dict": sd}, tmp_path / "old.pt")
    got, meta = read_weights(tmp_path / "old.pt")
    assert meta is not None and set(got) == set(sd)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_on_load_naming_the_tensor(tmp_path, value):
    sd = tiny_mlp().state_dict()
    sd["3.bias"][2] = value
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(BadInput, match=r"w\.pt: tensor '3\.bias' holds NaN or Inf"):
        read_weights(tmp_path / "w.pt")


# ---------------------------------------------------------------------------------------------- profiles
@pytest.mark.parametrize(("old", "new", "field"), [
    ("model_file_mb: 100", "model_file_mb: true", "budgets.model_file_mb"),
    ("{cores: 4,", "{cores: true,", "clusters.0.cores"),
    ("{cores: 4,", "{cores: 0,", "clusters.0.cores"),
    ("threads: 4\n", "threads: yes\n", "threads"),
])
def test_profile_numbers_are_numbers(tmp_path, old, new, field):
    p = tmp_path / "board.yaml"
    assert old in BOARD
    p.write_text(BOARD.replace(old, new, 1))
    with pytest.raises(BadInput, match=rf"board\.yaml:\d+: field '{field}': expected"):
        load_profile(p)


def test_a_profile_key_given_twice_is_an_error_with_its_line(tmp_path):
    p = tmp_path / "board.yaml"
    p.write_text(BOARD + "threads: 2\n")
    line = len(BOARD.splitlines()) + 1
    with pytest.raises(BadInput, match=rf"board\.yaml:{line}: .*'threads' given twice \(first at line 8\)"):
        load_profile(p)
    p.write_text(BOARD.replace("{onnxruntime: {threads: 4}", "{onnxruntime: {threads: 4, threads: 2}", 1)
                 if "{onnxruntime: {threads: 4}" in BOARD else
                 BOARD.replace("onnxruntime: {threads: 4}", "onnxruntime: {threads: 4, threads: 2}", 1))
    with pytest.raises(BadInput, match=r"board\.yaml:\d+: .*'threads' given twice"):
        load_profile(p)


# ---------------------------------------------------------------------------------------------- data range
def _npz(path: Path, x: np.ndarray) -> str:
    y = np.arange(len(x)) % 10
    np.savez(path, x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    return f"npz:{path}"


def test_float_pixels_in_0_255_are_warned_about(tmp_path, caplog):
    x = np.random.default_rng(0).uniform(0, 255, (20, 1, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="chita_edge.core.data"):
        load_data(_npz(tmp_path / "raw.npz", x))
    assert "raw.npz: x_train" in caplog.text and "0-255" in caplog.text and "uint8" in caplog.text


def test_a_sentinel_value_is_warned_about_and_normal_data_is_not(tmp_path, caplog):
    x = np.random.default_rng(0).uniform(0, 1, (20, 1, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="chita_edge.core.data"):
        load_data(_npz(tmp_path / "ok.npz", x))
        assert caplog.text == ""
        x[3, 0, 2, 2] = -1e6
        load_data(_npz(tmp_path / "odd.npz", x))
    assert "odd.npz: x_train" in caplog.text and "-1e+06" in caplog.text
