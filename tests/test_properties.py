"""Property-based tests (hypothesis): the profile and pipeline schemas under fuzzing, export round trips of
arbitrary pruned weights, and masks under fine-tuning.

Schema fuzz: ~50 examples per schema by default; ``CHITA_EDGE_FUZZ=1`` runs 1000 per schema (the CI fuzz job).
Whatever the document, the loader either accepts it (and then the result obeys the schema's bounds and
round-trips) or raises BadInput with one line that names the file -- never another exception.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chita_edge.core.errors import BadInput
from chita_edge.devices.profiles import (
    MAX_FILE_MB,
    MAX_LATENCY_MS,
    MAX_MEMORY_MB,
    Profile,
    _bundled_text,
    bundled_ids,
    dump_yaml,
    parse_profile,
)

FUZZ = os.environ.get("CHITA_EDGE_FUZZ") == "1"
SCHEMA_EXAMPLES = 1000 if FUZZ else 50
fuzz = settings(max_examples=SCHEMA_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

BASE = [yaml.safe_load(_bundled_text(pid)[0]) for pid in bundled_ids()]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["p50", "p90", "p99", "p95", "fp32", "cpu", "sbc", "phone", "high", "R27", "-1", "1e9", ""]),
)
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), c, max_size=3)), max_leaves=6)


def _paths(obj, prefix=()):
    """Every (path) to a value inside a nested dict/list document."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_profiles(draw):
    """A bundled profile with 1-3 mutations: a value replaced (wrong type, negative, absurd, NaN ...), a field
    deleted, or an unknown field added."""
    import copy

    doc = copy.deepcopy(draw(st.sampled_from(BASE)))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(values)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(values)
    return doc


def _check_outcome(text: str, where: str) -> Profile | None:
    try:
        prof = parse_profile(text, where)
    except BadInput as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(where), msg
        return None
    b = prof.budgets
    if b.latency_ms is not None:
        assert 0 < b.latency_ms.value <= MAX_LATENCY_MS
    for v, hi in ((b.peak_memory_mb, MAX_MEMORY_MB), (b.model_file_mb, MAX_FILE_MB)):
        assert v is None or (0 < v <= hi and math.isfinite(v))
    assert prof.threads <= sum(c.cores for c in prof.clusters)
    assert parse_profile(dump_yaml(prof), "round-trip.yaml") == prof
    return prof


@fuzz
@given(mutated_profiles())
def test_profile_schema_fuzz_mutations(doc):
    _check_outcome(yaml.safe_dump(doc, allow_unicode=True), "fuzz.yaml")


@fuzz
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                 values.map(lambda v: yaml.safe_dump(v))))
def test_profile_schema_fuzz_arbitrary_text(text):
    _check_outcome(text, "junk.yaml")


def test_profile_fuzz_rejects_what_it_should():
    """The fuzz is not vacuous: the bounds it checks are enforced (each of these is rejected)."""
    base = BASE[0]
    for path, bad in [(("budgets", "peak_memory_mb"), -1), (("budgets", "model_file_mb"), float("nan")),
                      (("budgets", "latency_ms", "value"), 1e12), (("threads",), "four"), (("zzz",), 1)]:
        import copy

        doc = copy.deepcopy(base)
        parent = doc
        for part in path[:-1]:
            parent = parent.setdefault(part, {})
        parent[path[-1]] = bad
        with pytest.raises(BadInput):
            parse_profile(yaml.safe_dump(doc), "x.yaml")


# ------------------------------------------------------------------------------------------ pipeline schema
def _pipeline_parser():
    import tempfile

    from chita_edge.workflows import pipeline_spec as mod

    def parse(text: str, where: str):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / where
            path.write_text(text)
            return mod.load_pipeline(path)

    return parse


@fuzz
@given(values)
def test_pipeline_schema_fuzz(doc):
    parse = _pipeline_parser()
    try:
        parse(yaml.safe_dump(doc), "pipe.yaml")
    except BadInput as e:
        assert "\n" not in str(e) and "pipe.yaml" in str(e)


# --------------------------------------------------------------------------------- export round trip
@settings(max_examples=20 if FUZZ else 2, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1), sparsity=st.floats(0.0, 0.99), layout=st.sampled_from(["dense", "sparse"]))
def test_pruned_weights_survive_onnx_export(tmp_path_factory, seed, sparsity, layout):
    """Any pruned weights -> ONNX export -> read back: every initializer equals its PyTorch weight, zeros included."""
    from chita_edge.exporters import ExportConfig, export_model
    from chita_edge.exporters import onnx_format as F

    torch.manual_seed(seed)
    m = tiny_mlp(12, inputs=16, classes=5, seed=None).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (m[1], m[3]):
            lin.weight.mul_(torch.rand(lin.weight.shape, generator=g) >= sparsity)
    out = tmp_path_factory.mktemp("rt") / "m.onnx"
    x = torch.rand(8, 1, 4, 4, generator=g)
    export_model(m, ExportConfig(format="onnx", layout=layout), example_input=x[:1], out=out, parity_inputs=x,
                 parity_source="random")
    ws, _ = F.weights(F.load(out))
    named = dict(m.named_parameters())
    found = 0
    for w in ws:
        ref = named[w.param].detach().numpy() if w.param in named else None
        if ref is None:
            continue
        got = w.values if w.values.shape == ref.shape else w.values.T
        np.testing.assert_array_equal(got, ref)
        found += 1
    assert found == 2, [w.name for w in ws]


# ----------------------------------------------------------------------------------- masks and fine-tuning
@settings(max_examples=15 if FUZZ else 4, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1), density=st.floats(0.0, 1.0), optimizer=st.sampled_from(["sgd", "adam"]),
       weight_decay=st.sampled_from([0.0, 1e-2]))
def test_any_mask_survives_finetuning(seed, density, optimizer, weight_decay):
    from chita_edge.core.data import Dataset
    from chita_edge.training.finetune import FinetuneConfig, finetune

    g = torch.Generator().manual_seed(seed)
    m = tiny_mlp(12, inputs=16, classes=5, seed=None)
    masks = {}
    with torch.no_grad():
        for name in ("1.weight", "3.weight"):
            p = dict(m.named_parameters())[name]
            masks[name] = torch.rand(p.shape, generator=g) < density
            p.mul_(masks[name])
    x = torch.rand(64, 1, 4, 4, generator=g)
    y = torch.randint(0, 5, (64,), generator=g)
    ds = Dataset("rand", x, y, x[:16], y[:16])
    finetune(m, ds, FinetuneConfig(epochs=1, lr=0.1, batch_size=16, optimizer=optimizer, weight_decay=weight_decay,
                                   bn_batches=0, eval_each_epoch=False, seed=seed % 1000), masks=masks)
    named = dict(m.named_parameters())
    for name, mask in masks.items():
        assert bool((named[name][~mask] == 0).all()), f"{name}: a pruned weight became non-zero"
        assert torch.isfinite(named[name]).all()


def test_fuzz_budget_is_documented():
    """The CI fuzz job sets CHITA_EDGE_FUZZ=1 (1000 examples per schema); docs/reliability.md says how."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
    assert doc.exists() and "CHITA_EDGE_FUZZ=1" in doc.read_text()
