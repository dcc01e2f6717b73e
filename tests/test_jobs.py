"""The job layer and the one set of defaults: what a flag builds, where each value came from, and the CLI and
pipeline.yaml pruning the same way."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import TINY, model_file, run_cli, tiny_mlp

from chita_edge.core.checkpoint import read_weights
from chita_edge.pruning.blocks import BlockConfig
from chita_edge.pruning.defaults import DEFAULTS
from chita_edge.pruning.prune import PruneConfig
from chita_edge.workflows import jobs
from chita_edge.workflows.settings import resolve


@pytest.fixture
def captured(monkeypatch):
    """Replace the prune job by a recorder: the CLI's job, not its run, is under test."""
    seen: list[jobs.PruneJob] = []

    def fake(job, progress=None, announce=None):
        jobs._check_combination(job)
        seen.append(job)
        return jobs.PruneResult(model=job.model, method=job.settings["method"], structure=job.settings["structure"],
                                out=str(job.out), accuracy=1.0, dense_accuracy=1.0, sparsity=job.settings["sparsity"],
                                passed=True, settings=job.settings.record(),
                                details={"timings": {"total_s": 0.0}, "checks": [], "layers": [], "profile": "p",
                                         "params_before": 1, "params_after": 1})

    monkeypatch.setattr("chita_edge.workflows.jobs.run_prune", fake)
    return seen


def test_resolve_takes_flag_then_pipeline_then_profile_then_default():
    r = resolve(flags={"l2": 0.1, "seed": None}, pipeline={"l2": 0.5, "stages": 8, "seed": 3},
                profile={"stages": 2, "width_multiple": 4})
    assert (r["l2"], r.source("l2")) == (0.1, "flag")
    assert (r["stages"], r.source("stages")) == (8, "pipeline")
    assert (r["seed"], r.source("seed")) == (3, "pipeline")
    assert (r["width_multiple"], r.source("width_multiple")) == (4, "profile")
    assert (r["n_grads"], r.source("n_grads")) == (DEFAULTS["n_grads"], "default")
    assert r.record()["l2"] == {"value": 0.1, "source": "flag"}


def test_every_entry_point_shares_the_defaults():
    """PruneConfig, BlockConfig, BudgetConfig and the CLI/pipeline (via resolve) agree on every shared setting."""
    from chita_edge.budget.config import BudgetConfig
    from chita_edge.pruning.channels import StructuredConfig

    p = PruneConfig(sparsity=0.5)
    b = BlockConfig(sparsity=0.5)
    g = BudgetConfig()
    s = StructuredConfig()
    for name, attr in (("n_grads", "n_grads"), ("fisher_batch", "fisher_batch"), ("l2", "l2"), ("seed", "seed"),
                       ("dtype", "dtype")):
        assert getattr(p, attr) == getattr(b, attr) == getattr(g, attr) == getattr(s, attr) == DEFAULTS[name], name
    assert p.stages == b.stages == DEFAULTS["stages"]
    assert g.stages == DEFAULTS["search_stages"]
    assert p.method == DEFAULTS["method"]
    r = resolve()
    assert jobs.prune_config(dataclasses.replace(r, values={**r.values, "sparsity": 0.5})) == p


def test_prune_flags_build_the_config(captured, tmp_path):
    r = run_cli("prune", "zoo:mlpnet", "--data", "digits", "--out", tmp_path / "p.pt", "--sparsity", "0.9",
                "--l2", "0.1", "--stages", "7", "--json")
    assert r.code == 0, r.stderr
    job = captured[-1]
    assert jobs.prune_config(job.settings) == PruneConfig(sparsity=0.9, l2=0.1, stages=7)
    out = r.json()
    assert out["settings"]["l2"] == {"value": 0.1, "source": "flag"}
    assert out["settings"]["n_grads"] == {"value": DEFAULTS["n_grads"], "source": "default"}


def test_block_keeps_the_stages_given(captured, tmp_path):
    r = run_cli("prune", "zoo:mlpnet", "--data", "digits", "--out", tmp_path / "p.pt", "--sparsity", "0.9",
                "--structure", "block", "--stages", "25")
    assert r.code == 0, r.stderr
    assert jobs.block_config(captured[-1].settings) == BlockConfig(sparsity=0.9, stages=25)


def test_a_profile_prunes_to_its_budgets_with_its_width_multiple(captured, tmp_path):
    r = run_cli("prune", "zoo:resnet20", "--data", "digits", "--out", tmp_path / "p.pt", "--profile",
                "phone-mid-sd670", "--search-stages", "2", "--latency-ms", "3")
    assert r.code == 0, r.stderr
    job = captured[-1]
    s = job.settings
    assert (s["structure"], s.source("structure")) == ("channel", "profile")
    assert (s["width_multiple"], s.source("width_multiple")) == (8, "profile")
    cfg = jobs.budget_config(s)
    assert (cfg.method, cfg.stages, cfg.width_multiple, cfg.n_grads) == ("chita-layerwise", 2, 8, DEFAULTS["n_grads"])
    assert job.budgets == {"latency_ms": 3.0}


@pytest.mark.parametrize("extra, words", [
    (["--sparsity", "0.5"], "--sparsity"),
    (["--stages", "9"], "--search-stages"),
    (["--method", "magnitude"], "--method magnitude"),
    (["--structure", "block"], "--structure block"),
])
def test_settings_a_budget_run_would_ignore_are_refused(captured, tmp_path, extra, words):
    r = run_cli("prune", "zoo:resnet20", "--data", "digits", "--out", tmp_path / "p.pt", "--profile",
                "phone-mid-sd670", *extra)
    assert r.code == 2 and words in r.stderr and not captured


def test_block_refuses_what_it_would_ignore(captured, tmp_path):
    r = run_cli("prune", "zoo:mlpnet", "--data", "digits", "--out", tmp_path / "p.pt", "--sparsity", "0.9",
                "--structure", "block", "--no-refit")
    assert r.code == 2 and "--refit: not used by block pruning" in r.stderr and not captured


def test_resume_without_gradual_is_refused(captured, tmp_path):
    r = run_cli("prune", "zoo:mlpnet", "--data", "digits", "--out", tmp_path / "p.pt", "--sparsity", "0.5", "--resume")
    assert r.code == 2 and "--gradual" in r.stderr and not captured


def test_budget_flags_without_a_profile_are_refused(captured, tmp_path):
    r = run_cli("prune", "zoo:mlpnet", "--data", "digits", "--out", tmp_path / "p.pt", "--sparsity", "0.5",
                "--search-stages", "3")
    assert r.code == 2 and "need --profile" in r.stderr


def _weights(path):
    sd, meta = read_weights(path)
    return sd, meta


def test_sparsity_zero_leaves_the_model_unchanged(tmp_path):
    """Nothing to prune: no solve, no re-fit and no BatchNorm re-estimation (which would move accuracy)."""
    (tmp_path / "tiny.py").write_text(TINY)
    torch.manual_seed(0)
    from conftest import tiny_cnn

    m = tiny_cnn()
    with torch.no_grad():  # running statistics far from what the data gives: a re-estimation would show
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.fill_(0.3)
                mod.running_var.fill_(2.0)
    torch.save(m.state_dict(), tmp_path / "w.pt")
    dense = run_cli("eval", f"{tmp_path / 'tiny.py'}:cnn", "--weights", tmp_path / "w.pt", "--data", "digits",
                    "--json").json()["accuracy"]
    for method in ("magnitude", "chita++"):
        out = tmp_path / f"{method}.pt"
        r = run_cli("prune", f"{tmp_path / 'tiny.py'}:cnn", "--weights", tmp_path / "w.pt", "--data", "digits",
                    "--sparsity", "0", "--method", method, "--out", out, "--json")
        assert r.code == 0, r.stderr
        res = r.json()
        assert res["accuracy"] == res["dense_accuracy"] == dense
        assert "nothing to prune" in res["note"]
        sd, _ = _weights(out)
        for k, v in m.state_dict().items():
            assert torch.equal(sd[k], v), (method, k)


def _pipeline_prune(tmp_path, prune_fields: str):
    from chita_edge.workflows import pipeline, pipeline_spec, stages

    (tmp_path / "pipe.yaml").write_text(
        f"name: t\nmodel: ./tiny.py:mlp\nweights: ./w.pt\ndata: digits\nprofiles: [phone-mid-sd670]\n"
        f"prune: {prune_fields}\nout: out\n")
    spec = pipeline_spec.load_pipeline(tmp_path / "pipe.yaml")
    runner = stages.StageRunner(tmp_path / "out", {"name": "t"})
    rec = pipeline._prune_stage(spec, "phone-mid-sd670", runner, None)
    return runner.file(rec, "pruned.pt"), rec


@pytest.mark.parametrize("flags, fields", [
    ([], "{sparsity: 0.6}"),  # every other setting from the one table of defaults
    (["--method", "chita", "--grads", "200", "--l2", "0.05", "--seed", "3", "--no-refit"],
     "{sparsity: 0.6, method: chita, grads: 200, l2: 0.05, seed: 3, refit: false}"),
])
def test_the_cli_and_pipeline_yaml_write_identical_checkpoints(tmp_path, flags, fields):
    # an 8-wide tiny MLP: the defaults' 25 CHITA++ stages on 1000 gradient rows take seconds, not 20 s
    (tmp_path / "tiny.py").write_text(model_file(tiny_mlp, mlp="tiny_mlp(8)"))
    torch.save(tiny_mlp(8).state_dict(), tmp_path / "w.pt")
    out = tmp_path / "cli.pt"
    r = run_cli("prune", f"{tmp_path / 'tiny.py'}:mlp", "--weights", tmp_path / "w.pt", "--data", "digits",
                "--sparsity", "0.6", "--out", out, "--threads", "1", *flags, "--json")
    assert r.code == 0, r.stderr
    piped, rec = _pipeline_prune(tmp_path, fields)
    a, meta_a = _weights(out)
    b, meta_b = _weights(piped)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    values = {k: v["value"] for k, v in meta_a["settings"].items()}
    assert values == {k: v["value"] for k, v in meta_b["settings"].items()}
    assert values == {k: v["value"] for k, v in rec["settings"]["resolved"].items()}
    sources_a = {k: v["source"] for k, v in meta_a["settings"].items()}
    sources_b = {k: v["source"] for k, v in meta_b["settings"].items()}
    assert sources_a["sparsity"] == "flag" and sources_b["sparsity"] == "pipeline"
    assert sources_a["stages"] == sources_b["stages"] == "default"
    assert json.loads(json.dumps(meta_b["settings"])) == meta_b["settings"]


def _recorder(monkeypatch, name, result):
    seen = []

    def fake(job, progress=None, **kw):
        seen.append(job)
        return result

    monkeypatch.setattr(f"chita_edge.workflows.jobs.{name}", fake)
    return seen


def test_finetune_flags_build_the_job(monkeypatch, tmp_path):
    from chita_edge.training.finetune import FinetuneConfig

    res = jobs.FinetuneResult(out="o.pt", initial_accuracy=1.0, accuracy=2.0, sparsity=0.5, epochs=3,
                              resumed_from=None, details={})
    seen = _recorder(monkeypatch, "run_finetune", res)
    r = run_cli("finetune", tmp_path / "p.pt", "--data", "digits", "--epochs", "3", "--lr", "0.01", "--optimizer",
                "adam", "--distill", "--out", tmp_path / "o.pt", "--json")
    assert r.code == 0, r.stderr
    job = seen[-1]
    assert job.config == FinetuneConfig(epochs=3, lr=0.01, optimizer="adam")
    assert (job.pruned, job.out, job.distill, job.resume) == (tmp_path / "p.pt", tmp_path / "o.pt", True, False)
    assert r.json()["accuracy"] == 2.0


def test_export_flags_build_the_job(monkeypatch, tmp_path):
    res = jobs.ExportResult(out="m.tflite", format="tflite", layout="sparse", quantize="none", bytes=1,
                            parity={}, notes=[], details={})
    seen = _recorder(monkeypatch, "run_export", res)
    r = run_cli("export", tmp_path / "p.pt", "--out", tmp_path / "m.tflite", "--layout", "sparse",
                "--parity-samples", "77", "--json")
    assert r.code == 0, r.stderr
    assert seen[-1] == jobs.ExportJob(checkpoint=tmp_path / "p.pt", out=tmp_path / "m.tflite", layout="sparse",
                                      parity_samples=77)


def test_check_flags_build_the_job_and_a_broken_budget_exits_1(monkeypatch, tmp_path):
    from chita_edge.devices.bench import BenchConfig

    failed = {"message": "latency_ms.p90 9 ms > 3 ms: breaks budget (measured-host)", "passed": False}
    res = jobs.CheckResult(file="m.onnx", profile="phone-mid-sd670", passed=False, checks=[failed], details={})
    seen = _recorder(monkeypatch, "run_check", res)
    r = run_cli("check", tmp_path / "m.onnx", "--profile", "phone-mid-sd670", "--latency-ms", "3", "--runs", "7")
    assert r.code == 1 and "breaks budget" in r.stderr + r.stdout
    job = seen[-1]
    assert (job.file, job.profile.id, job.latency_ms, job.bench) == (
        tmp_path / "m.onnx", "phone-mid-sd670", 3.0, BenchConfig(runs=7))


def test_the_public_api_names_resolve():
    import chita_edge

    for name in chita_edge.__all__:
        assert getattr(chita_edge, name) is not None, name
    assert chita_edge.run_prune is jobs.run_prune and chita_edge.DEFAULTS is DEFAULTS
