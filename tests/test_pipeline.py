"""chita-edge run: the schema, hash-keyed skipping, resuming after a crash, the verdict and its exit code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_board

from chita_edge.core.errors import BadInput
from chita_edge.workflows import pipeline, pipeline_spec

DEMO = Path(__file__).resolve().parents[1] / "chita_edge" / "workflows" / "demo.py"

def write(tmp: Path, lat: float = 1000, **over: str) -> Path:
    # uncalibrated (measured here, fast); its latency budget cannot be verified on this host (uncertain), which these
    # runs accept with checks.uncertain: pass
    (tmp / "tiny-board.yaml").write_text(tiny_board(lat))
    w = tmp.parent / "w.pt"  # shared by the runs of one test: the same weights (the key holds their path)
    if not w.exists():
        from chita_edge.workflows.demo import DigitsCNN

        torch.manual_seed(0)
        torch.save(DigitsCNN().state_dict(), w)
    body = {
        "name": "t",
        "model": f"{DEMO}:digits_cnn",
        "weights": "../w.pt",
        "data": "digits",
        "profiles": "[./tiny-board.yaml]",
        "prune": "{method: magnitude, sparsity: 0.5}",
        "finetune": "{epochs: 1, lr: 0.01, batch_size: 256, bn_batches: 2}",
        "export": "{formats: [onnx], parity_samples: 50}",
        "checks": "{runs: 5, warmup: 1, baseline: false, accuracy_min: 1, uncertain: pass}",
        "out": "out",
    }
    body.update(over)
    p = tmp / "pipe.yaml"
    p.write_text("".join(f"{k}: {v}\n" for k, v in body.items() if v is not None))
    return p


def stage_records(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    return {k: {f: v[f] for f in ("key", "inputs", "settings", "outputs")} for k, v in m["stages"].items()}


def test_schema_errors_name_file_line_and_field(tmp_path, cli):
    p = write(tmp_path, colour="blue")
    r = cli("run", p)
    assert r.code == 2 and f"{p}:11: field 'colour': unknown field" in r.stderr
    p = write(tmp_path, prune="{method: magnitude}")
    r = cli("run", p)
    assert r.code == 2 and "field 'prune'" in r.stderr and "needs 'sparsity'" in r.stderr
    p = write(tmp_path, prune="{method: magnitude, sparsity: 1.5}")
    with pytest.raises(BadInput, match=r"pipe.yaml:6: field 'prune.sparsity'"):
        pipeline_spec.load_pipeline(p)
    p = write(tmp_path, export="{formats: [onnx, pdf]}")
    with pytest.raises(BadInput, match=r"field 'export.formats.1'"):
        pipeline_spec.load_pipeline(p)
    p = write(tmp_path)
    p.write_text(p.read_text() + "out: elsewhere\n")  # PyYAML alone would keep the last one silently
    r = cli("run", p)
    assert r.code == 2 and f"{p}:11: " in r.stderr and "key 'out' given twice (first at line 10)" in r.stderr


def test_relative_paths_resolve_against_the_file(tmp_path):
    spec = pipeline_spec.load_pipeline(write(tmp_path))
    assert spec.out == str(tmp_path / "out") and spec.profiles == [str(tmp_path / "tiny-board.yaml")]


def test_run_skips_unchanged_stages_and_reruns_changed_ones(tmp_path, cli):
    p = write(tmp_path)
    r = cli("run", p, "--json")
    assert r.code == 0, r.stderr
    s = r.json()
    out = tmp_path / "out"
    assert s["passed"] and [x["stage"] for x in s["stages"] if x["status"] == "ran"] == [
        "tiny-board/prune", "tiny-board/finetune", "tiny-board/export-onnx", "tiny-board/check-onnx"]
    for rel in ("tiny-board/prune/pruned.pt", "tiny-board/finetune/finetuned.pt", "tiny-board/export-onnx/tiny-board.onnx",
                "tiny-board/check-onnx/junit.xml", "report/index.html", "report/report.html"):
        assert (out / rel).is_file(), rel
    m = json.loads((out / "manifest.json").read_text())
    assert m["verdict"]["passed"] and m["versions"]["torch"] and m["stages"]["tiny-board/prune"]["seconds"] > 0
    first = stage_records(out)

    r = cli("run", p, "--json")  # nothing changed: every stage skipped, same manifest
    assert r.code == 0 and {x["status"] for x in r.json()["stages"]} == {"skipped"}
    assert stage_records(out) == first

    p = write(tmp_path, finetune="{epochs: 2, lr: 0.01, batch_size: 256, bn_batches: 2}")
    st = {x["stage"]: x["status"] for x in cli("run", p, "--json").json()["stages"] if x["status"] != "running"}
    assert st["tiny-board/prune"] == "skipped" and st["tiny-board/finetune"] == "ran"

    # an output edited by hand is not trusted: that stage runs again
    (out / "tiny-board/check-onnx/result.json").write_text("{}")
    st = {x["stage"]: x["status"] for x in cli("run", p, "--json").json()["stages"] if x["status"] != "running"}
    assert st["tiny-board/check-onnx"] == "ran" and st["tiny-board/export-onnx"] == "skipped"


def test_killed_mid_finetuning_resumes_to_the_same_manifest_and_files(tmp_path, monkeypatch, cli):
    """Issue 7: a run killed after fine-tuning's first epoch, then one that crashes in the export, then one
    that finishes, in the same place: each resumes where the last stopped, skips what was done, and the end is
    the uninterrupted run's manifest and files, bit for bit."""
    from chita_edge.training import finetune

    p = write(tmp_path, finetune="{epochs: 2, lr: 0.01, batch_size: 256, bn_batches: 2}")
    out = tmp_path / "out"
    assert cli("run", p).code == 0
    out.rename(tmp_path / "ref")  # the same output path for both runs: paths recorded in files are equal
    real_save, real_export = finetune.save_state, pipeline._export_stage

    def killed(path, state):  # the power goes right after the first epoch's training state is on disk
        real_save(path, state)
        raise RuntimeError("power cut")

    def boom(*a, **k):
        raise RuntimeError("power cut")

    monkeypatch.setattr(finetune, "save_state", killed)
    assert cli("run", p).code == 3
    assert (out / "tiny-board/finetune/finetuned.pt.state").is_file()
    assert "tiny-board/finetune" not in json.loads((out / "manifest.json").read_text())["stages"]
    pruned_mtime = (out / "tiny-board/prune/pruned.pt").stat().st_mtime_ns
    monkeypatch.setattr(finetune, "save_state", real_save)
    monkeypatch.setattr(pipeline, "_export_stage", boom)
    r = cli("run", p)
    assert r.code == 3 and "tiny-board/finetune: resumed at epoch 2 step 0" in r.stderr, r.stderr
    assert "tiny-board/prune: skipped" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert "tiny-board/finetune" in m["stages"] and "resumed_from" not in m["stages"]["tiny-board/finetune"]["result"]
    assert not (out / "tiny-board/finetune/finetuned.pt.state").exists()
    monkeypatch.setattr(pipeline, "_export_stage", real_export)
    r = cli("run", p, "--json")
    assert r.code == 0, r.stderr
    st = {x["stage"]: x["status"] for x in r.json()["stages"] if x["status"] != "running"}
    assert st["tiny-board/prune"] == st["tiny-board/finetune"] == "skipped" and st["tiny-board/export-onnx"] == "ran"
    assert (out / "tiny-board/prune/pruned.pt").stat().st_mtime_ns == pruned_mtime
    a = json.loads((tmp_path / "ref/manifest.json").read_text())
    b = json.loads((out / "manifest.json").read_text())
    for doc in (a, b):  # run-dependent: each stage's seconds, and the check's measurements
        for name, rec in doc["stages"].items():
            rec.pop("seconds")
            if "/check-" in name:
                rec.pop("outputs")
    assert a == b
    for rel in ("tiny-board/finetune/finetuned.pt", "tiny-board/export-onnx/tiny-board.onnx"):
        assert (tmp_path / "ref" / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_broken_budget_exits_1_naming_it(tmp_path, cli):
    # the default checks.uncertain: fail: the host-timed latency of the uncalibrated board fails as unverifiable
    r = cli("run", write(tmp_path, checks="{runs: 5, warmup: 1, baseline: false, accuracy_min: 1, file_mb: 0.00001}"))
    assert r.code == 1 and "model_file_mb" in r.stderr and "breaks budget" in r.stderr
    assert "latency_ms.p90" in r.stderr and "cannot be verified on this host" in r.stderr
    junit = (tmp_path / "out/tiny-board/check-onnx/junit.xml").read_text()
    assert "<failure" in junit
    assert json.loads((tmp_path / "out/manifest.json").read_text())["verdict"]["passed"] is False


def test_same_settings_for_two_profiles_reuse_the_work(tmp_path, cli):
    (tmp_path / "other.yaml").write_text(tiny_board(1000, board_id="other-board"))
    p = write(tmp_path, profiles="[./tiny-board.yaml, ./other.yaml]", finetune=None)
    r = cli("run", p, "--json")
    assert r.code == 0, r.stderr
    st = {x["stage"]: x for x in r.json()["stages"] if x["status"] != "running"}
    assert st["other/prune"]["status"] == "reused" and st["other/prune"]["from"] == "tiny-board/prune"
    assert st["other-board/check-onnx"]["status"] == "ran"


def test_a_model_file_gets_the_same_module_name_in_every_process():
    """The model file's module name is written into exported ONNX graphs: with Python's randomised hash() two
    processes exported different bytes from the same weights, so a pipeline started again redid its checks."""
    import os
    import subprocess
    import sys

    code = f"from chita_edge.models.loading import _from_file; print(type(_from_file('{DEMO}:digits_cnn')).__module__)"
    names = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert len(names) == 1 and next(iter(names)).startswith("chita_edge_user_"), names


def test_the_run_verdict_shows_each_checks_band_and_margin():
    from chita_edge.cli.run_cmd import _check_cell

    est = {"name": "latency_ms.p90", "value": 0.374, "low": 0.25, "high": 0.57, "comparison": "<=", "limit": 50,
           "unit": "ms", "passed": True, "verdict": "pass"}
    assert _check_cell(est) == "latency_ms.p90 0.374 [0.25-0.57] <= 50 ms (upper edge 1 % of budget)"
    assert "UNCERTAIN" in _check_cell({**est, "value": 40, "low": 30, "high": 60, "passed": False,
                                       "verdict": "uncertain"})
    assert _check_cell({"name": "accuracy", "value": 98.6, "comparison": ">=", "limit": 85, "unit": "%",
                        "passed": True}).endswith("(+13.6 %)")


def test_finetune_warmup_epochs_and_head_ridge_reach_the_config(tmp_path, monkeypatch, cli):
    seen = {}

    def stop(job, **kw):  # the stage's FinetuneConfig, then stop before training
        seen["cfg"] = job.config
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(pipeline.jobs, "run_finetune", stop)
    p = write(tmp_path, finetune="{epochs: 2, lr: 0.01, warmup_epochs: 0.5, head_ridge: 0.2}")
    r = cli("run", p)
    assert r.code == 3 and "stopped by the test" in r.stderr
    assert seen["cfg"].warmup_epochs == 0.5 and seen["cfg"].head_ridge == 0.2
    for bad, needle in (("{epochs: 1, warmup_epochs: 2}", "warmup_epochs 2.0: expected at most epochs (1)"),
                        ("{head_ridge: -1}", "field 'finetune.head_ridge'"),
                        ("{warmup_epochs: .nan}", "field 'finetune.warmup_epochs'")):
        with pytest.raises(BadInput, match=re.escape(needle)):
            pipeline_spec.load_pipeline(write(tmp_path, finetune=bad))
