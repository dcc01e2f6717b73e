"""--device and several processes (torch.distributed under torchrun): split, gather, launch, same result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import model_file, run_cli, tiny_mlp
from typer.main import get_command

from chita_edge.cli.app import app
from chita_edge.cli.prune_cmd import _argv_without
from chita_edge.core.checkpoint import read_weights
from chita_edge.core.errors import BadInput
from chita_edge.models.zoo import default_prunable
from chita_edge.pruning.distributed import launch, resolve_device, row_range, solve_split
from chita_edge.pruning.gradients import collect_gradients
from chita_edge.pruning.layers import find_prunable


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dist")
    (d / "m.py").write_text(model_file(tiny_mlp, mlp="tiny_mlp(24)"))
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x_train=rng.random((300, 1, 8, 8), dtype=np.float32), y_train=rng.integers(0, 10, 300),
             x_test=rng.random((50, 1, 8, 8), dtype=np.float32), y_test=rng.integers(0, 10, 50))
    return {"dir": d, "model": d / "m.py", "data": d / "data.npz"}


def _prune_args(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["prune", f"{ws['model']}:mlp", "--data", f"npz:{ws['data']}", "--sparsity", "0.8", "--method", "chita",
            "--grads", "37", "--out", str(out), *extra]


def test_row_ranges_cover_the_rows_once():
    for n in (1, 2, 7, 64, 1000):
        for size in (1, 2, 3, 8):
            got = [i for r in range(size) for i in row_range(n, r, size)]
            assert got == list(range(n)), (n, size)


def test_row_shards_of_G_are_the_rows_of_the_full_G():
    model = tiny_mlp(16)
    params = find_prunable(model, default_prunable)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(200, 1, 8, 8, generator=g), torch.randint(0, 10, (200,), generator=g)
    kw = {"n": 23, "m": 2, "seed": 3, "chunk_samples": 10}
    full = collect_gradients(model, params, x, y, **kw)
    shards = [collect_gradients(model, params, x, y, rows=row_range(23, r, 3), **kw) for r in range(3)]
    assert [len(s) for s in shards] == [8, 8, 7]
    torch.testing.assert_close(torch.cat(shards), full, rtol=1e-6, atol=0)
    assert collect_gradients(model, params, x, y, rows=range(23, 23), **kw).shape == (0, full.shape[1])
    with pytest.raises(BadInput, match="rows"):
        collect_gradients(model, params, x, y, rows=range(20, 30), **kw)


def test_solve_split_in_one_process_solves_every_block():
    like = torch.arange(10.0)
    blocks = [slice(0, 4), slice(4, 8), slice(8, 10)]
    out = solve_split(blocks, lambda b: None if b.start == 4 else like[b] * 2, like)
    assert out.tolist() == [0, 2, 4, 6, 0, 0, 0, 0, 16, 18]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_device_cuda_without_gpu_is_one_clear_line(ws, tmp_path):
    with pytest.raises(BadInput, match="--device cuda"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    for dev, needle in (("cuda", "--device cuda"), ("tpu", "--device 'tpu'")):
        r = run_cli(*_prune_args(ws, tmp_path / "p.pt", "--device", dev))
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.code == 2 and len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "p.pt").exists()


def test_device_choice_with_gpus_one_per_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_device("auto") == torch.device("cuda", 0) == resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on a host with one GPU: nccl cannot share it
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(BadInput, match="2 processes on this host but 1 GPU"):
        resolve_device("cuda")


def test_workers_refused_where_they_cannot_run(ws, tmp_path, monkeypatch):
    r = run_cli(*_prune_args(ws, tmp_path / "p.pt", "--workers", "0"))
    assert r.code == 2 and "--workers 0" in r.stderr, r.stderr
    monkeypatch.setenv("WORLD_SIZE", "2")  # as inside a torchrun job
    with pytest.raises(BadInput, match="already one of torchrun's"):
        launch("chita_edge.cli", ["--help"], 2)
    r = run_cli(*_prune_args(ws, tmp_path / "p.pt", "--structure", "block"))
    assert r.code == 2 and "several processes" in r.stderr, r.stderr
    assert not (tmp_path / "p.pt").exists()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="needs torch.distributed with the gloo backend (CPU processes)")
def test_two_processes_give_the_single_process_result(ws, tmp_path):
    """torchrun with 2 CPU processes (gloo), block mode: G's rows and the block solves are split and gathered."""
    args = ("--block-size", "100", "--device", "cpu", "--json")
    one = run_cli(*_prune_args(ws, tmp_path / "one.pt", *args))
    assert one.code == 0, one.stderr
    two = run_cli(*_prune_args(ws, tmp_path / "two.pt", *args), "--workers", "2")
    assert two.code == 0, two.stderr
    w1, meta1 = read_weights(tmp_path / "one.pt")
    w2, meta2 = read_weights(tmp_path / "two.pt")
    assert meta1["sparsity"] == meta2["sparsity"] and meta1["sparsity"] > 0.7
    for name, t in w1.items():
        assert torch.equal(t == 0, w2[name] == 0), f"{name}: the masks differ"
        torch.testing.assert_close(w2[name], t, rtol=1e-6, atol=1e-12, msg=name)
    # a rank's own failure is the launcher's exit code (torchrun itself exits 1)
    bad = run_cli(*_prune_args(ws, tmp_path / "bad.pt", "--l2", "-1"), "--workers", "2")
    assert bad.code == 2


def test_workers_relaunch_gets_the_same_arguments_less_workers():
    argv = ["m.py:mlp", "--data", "npz:d.npz", "--out", "p.pt", "--sparsity", "0.95", "--no-refit", "--first-order",
            "--workers", "2", "--json", "--grads", "37", "--device", "cpu"]
    group = get_command(app)
    cmd = group.get_command(None, "prune")
    ctx = cmd.make_context("prune", list(argv), parent=group.make_context("chita-edge", ["prune"]))
    got = _argv_without(ctx, "workers")
    assert got[0] == "prune" and "--workers" not in got
    back = cmd.make_context("prune", got[1:], parent=group.make_context("chita-edge", ["prune"]))
    assert {k: v for k, v in back.params.items() if k != "workers"} == \
        {k: v for k, v in ctx.params.items() if k != "workers"}
