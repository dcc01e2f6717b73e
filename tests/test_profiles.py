"""Device profiles: the bundled set, the schema's error messages (file, line, field, expected), the CLI."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest
import tomllib
from conftest import SHARED, run_cli

from chita_edge.core.errors import BadInput
from chita_edge.devices.calibration import ANCHOR_KIND, anchors_for
from chita_edge.devices.profiles import (
    bundled_ids,
    dump_yaml,
    load_all,
    load_profile,
    parse_profile,
    with_budgets,
)

REQUIRED = {"phone-flagship-sd8g2", "phone-upper-2019-sd855", "phone-mid-sd670", "phone-low-a53",
            "watch-a55-dual", "watch-a53-quad", "sbc-rpi4", "sbc-rpi5"}

GOOD = """\
id: my-board
name: My board
form_factor: sbc
soc: Test SoC
clusters:
  - {cores: 4, core: Cortex-A72, max_ghz: 1.5}
threads: 4
runtimes:
  onnxruntime: {threads: 4}
budgets:
  latency_ms: {value: 50, percentile: p90}
  peak_memory_mb: 100
  model_file_mb: 10
"""


def test_bundled_profiles_cover_the_issue_and_validate():
    profs = load_all()
    assert REQUIRED <= set(bundled_ids())
    assert len(profs) >= 8
    for p in profs:
        assert p.form_factor in ("phone", "watch", "sbc", "mcu")
        assert p.width_multiple in (1, 2, 4, 8, 16)
        assert p.budgets.latency_ms is not None and p.budgets.peak_memory_mb and p.budgets.model_file_mb
        assert p.calibration is not None and p.calibration.rows
        assert all(re.fullmatch(r"R\d\d", r.row) for r in p.calibration.rows)


def test_every_profile_fits_cpu_fp32_rows_only_with_a_depthwise_and_mostly_a_dense_anchor():
    for p in load_all():
        anchors = anchors_for(p, "onnxruntime")
        assert anchors, p.id
        rows = {(r.row, r.model, r.threads) for r in p.calibration.rows
                if r.delegate == "cpu" and r.precision == "fp32" and r.runtime == p.calibration.runtime}
        for a in anchors:
            assert (a.row, a.model, a.threads) in rows  # never an NPU/GPU/int8 row or another runtime's
            assert a.threads == p.device_threads("onnxruntime")
        kinds = {ANCHOR_KIND[a.model] for a in anchors}
        assert "depthwise-heavy" in kinds, p.id
        if p.id != "phone-mid-sd670":  # devices.md publishes no dense figure for the Pixel 3a
            assert "dense" in kinds, p.id


def test_npu_rows_are_kept_but_never_anchors():
    p = load_profile("phone-flagship-sd8g2")
    assert any(r.delegate == "npu" for r in p.calibration.rows)
    assert {a.row for a in anchors_for(p, "onnxruntime")} == {"R27"}


def test_proxy_rows_are_clock_scaled_to_the_profile_clock():
    p = load_profile("watch-a55-dual")
    a = next(a for a in anchors_for(p, "onnxruntime") if a.model == "mobilenet_v1")
    assert a.published_ms == 70.63
    assert a.target_ms == pytest.approx(70.63 * 1.8 / 1.18)


@pytest.mark.shared
def test_calibration_rows_are_copied_from_devices_md(shared_dir):
    doc = (shared_dir / "docs" / "devices.md").read_text(encoding="utf-8")
    lines = {m.group(1): line for line in doc.splitlines() if (m := re.match(r"\|\s*(R\d\d)\s*\|", line))}
    for p in load_all():
        for r in p.calibration.rows:
            assert r.row in lines, (p.id, r.row)
            numbers = {float(x) for x in re.findall(r"\d+(?:\.\d+)?", lines[r.row])}
            assert r.latency_ms in numbers, (p.id, r.row, r.model, r.latency_ms)


# ----------------------------------------------------------------------------------- SOURCES.md (in-repo record)
def _md_table(text: str, heading: str) -> list[dict[str, str]]:
    """The first markdown table under ``## heading`` as one dict per line, keyed by the header cells."""
    lines = text.split(f"\n## {heading}\n", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[start:end]]
    head, body = rows[0], rows[2:]
    assert all(len(r) == len(head) for r in body), heading
    return [dict(zip(head, r, strict=True)) for r in body]


def _sources_md() -> str:
    return (resources.files("chita_edge.device_profiles") / "SOURCES.md").read_text(encoding="utf-8")


def _published(text: str) -> dict[tuple[str, str], list[dict]]:
    """SOURCES.md's row table as typed fields, by (row id, model)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in _md_table(text, "Rows"):
        th = r["Threads"]
        out.setdefault((r["Row"], r["Model"]), []).append({
            "device": r["Device"], "input": int(r["Input"]), "runtime": r["Runtime"],
            "runtime_version": r["Version / date"], "precision": r["Precision"],
            "threads": None if th == "—" else int(th.split()[0]), "threads_unstated": th.endswith("[?]"),
            "delegate": r["Delegate"], "latency_ms": float(r["Latency ms"]), "source": r["Src"]})
    return out


FIELDS = ("device", "input", "runtime", "runtime_version", "precision", "threads", "delegate", "latency_ms", "source")


def row_problems(rows, text: str) -> list[str]:
    """Every disagreement between profile rows ``(profile id, CalibrationRow)`` and SOURCES.md, one line each."""
    pub, keys = _published(text), {r["Key"] for r in _md_table(text, "Sources")}
    problems = []
    for pid, r in rows:
        where = f"{pid} {r.row} {r.model}"
        if r.source not in keys:
            problems.append(f"{where}: source {r.source!r} has no entry in SOURCES.md's Sources table")
        cands = pub.get((r.row, r.model))
        if not cands:
            problems.append(f"{where}: no such row and model in SOURCES.md")
            continue
        mine = {f: getattr(r, f) for f in FIELDS}
        best = max(cands, key=lambda c: sum(c[f] == mine[f] for f in FIELDS))
        problems += [f"{where}: {f} {mine[f]!r}, published {best[f]!r}" for f in FIELDS if best[f] != mine[f]]
        if best["threads_unstated"] and "[?]" not in (r.note or ""):
            problems.append(f"{where}: the source does not state the thread count; the row's note must say '[?]'")
    return problems


def _all_rows():
    return [(p.id, r) for p in load_all() for r in p.calibration.rows]


def test_every_calibration_row_matches_sources_md_field_by_field():
    text = _sources_md()
    assert row_problems(_all_rows(), text) == []
    # every source key in the row table has an entry, and every listed row is carried by some profile
    keys = {r["Key"] for r in _md_table(text, "Sources")}
    assert {r["Src"] for r in _md_table(text, "Rows")} <= keys
    used = {(r.row, r.model, r.precision, r.delegate, r.threads, r.latency_ms) for _, r in _all_rows()}
    for (row, model), cands in _published(text).items():
        for c in cands:
            assert (row, model, c["precision"], c["delegate"], c["threads"], c["latency_ms"]) in used, (row, model, c)
    for r in _md_table(text, "Sources"):
        assert re.search(r"https://\S+", r["Publication or benchmark page"]) and r["Table / figure"] and r["Date"]


@pytest.mark.parametrize("change,field", [({"threads": 4}, "threads"), ({"input": 96}, "input"),
                                          ({"runtime": "tflite"}, "runtime"), ({"latency_ms": 88.5}, "latency_ms"),
                                          ({"source": "NOPE"}, "source")])
def test_a_changed_field_in_one_row_fails_the_sources_check(change, field):
    rows = _all_rows()
    i = next(i for i, (pid, r) in enumerate(rows) if pid == "phone-mid-sd670" and r.threads == 1)
    pid, r = rows[i]
    rows[i] = (pid, r.model_copy(update=change))
    problems = row_problems(rows, _sources_md())
    assert problems and all(p.startswith(f"phone-mid-sd670 {r.row} {r.model}") for p in problems), problems
    assert any(field in p for p in problems), problems


def test_a_one_four_thread_swap_fails_the_sources_check():
    rows = _all_rows()
    swapped = []
    for pid, r in rows:  # phone-low-a53: R50 at 4 and at 1 thread, the latencies left where they were
        if pid == "phone-low-a53" and r.threads in (1, 4):
            r = r.model_copy(update={"threads": 5 - r.threads})
        swapped.append((pid, r))
    problems = row_problems(swapped, _sources_md())
    assert len(problems) == 6 and all("threads" in p or "latency_ms" in p for p in problems), problems


def test_unstated_thread_counts_must_be_flagged_in_the_row():
    rows = [(pid, r.model_copy(update={"note": None}) if r.row == "R39" else r) for pid, r in _all_rows()]
    assert any("does not state the thread count" in p for p in row_problems(rows, _sources_md()))


def test_sources_md_ships_as_package_data():
    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.md" in data["chita_edge.device_profiles"] and (root / "device_profiles" / "SOURCES.md").is_file()


def test_user_yaml_path_is_accepted_and_round_trips(tmp_path):
    f = tmp_path / "board.yaml"
    f.write_text(GOOD)
    p = load_profile(str(f))
    assert p.id == "my-board" and p.calibration is None and p.width_multiple == 8
    again = parse_profile(dump_yaml(p), "dump")
    assert again == p


@pytest.mark.parametrize("old,new,line,field,expect", [
    ("  latency_ms: {value: 50, percentile: p90}", "  latency_ms: {value: -5, percentile: p90}", 11,
     "budgets.latency_ms.value", "greater than 0"),
    ("  latency_ms: {value: 50, percentile: p90}", "  latency_ms: {value: 50, percentile: p95}", 11,
     "budgets.latency_ms.percentile", "'p50', 'p90' or 'p99'"),
    ("  peak_memory_mb: 100", "  peak_memory_mb: 1000000000", 12, "budgets.peak_memory_mb", "less than or equal"),
    ("form_factor: sbc", "form_factor: fridge", 3, "form_factor", "'phone', 'watch', 'sbc' or 'mcu'"),
    ("\nthreads: 4\n", "\nthreads: four\n", 7, "threads", "valid integer"),
    ("\nthreads: 4\n", "\nthreads: 4\ncolour: red\n", 8, "colour", "unknown field; expected one of: id, name"),
    ("  onnxruntime: {threads: 4}", "  onnxruntime: {threads: 4, spin: yes}", 9, "runtimes.onnxruntime.spin",
     "expected one of: threads"),
    ("soc: Test SoC\n", "", 1, "soc", "missing"),
    ("\nthreads: 4\n", "\nthreads: 9\n", 7, "threads", "expected at most the 4 cores of the clusters (got 9)"),
    ("  onnxruntime: {threads: 4}", "  onnxruntime: {threads: 6}", 9, "runtimes",
     "expected onnxruntime.threads of at most the 4 cores"),
])
def test_schema_errors_name_file_line_field_and_expectation(tmp_path, old, new, line, field, expect):
    f = tmp_path / "bad.yaml"
    assert old in GOOD
    f.write_text(GOOD.replace(old, new))
    with pytest.raises(BadInput) as e:
        load_profile(str(f))
    msg = str(e.value)
    assert msg.startswith(f"{f}:{line}: field '{field}'"), msg
    assert expect in msg, msg


def test_yaml_syntax_error_has_a_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text(GOOD.replace("threads: 4\n", "threads: [4\n"))
    with pytest.raises(BadInput, match=r"broken\.yaml:\d+: not valid YAML"):
        load_profile(str(f))


def test_not_a_mapping_and_unknown_id(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(BadInput, match=r"list\.yaml:1: expected a mapping"):
        load_profile(str(f))
    with pytest.raises(BadInput, match="unknown id; expected one of .*sbc-rpi4"):
        load_profile("no-such-device")
    with pytest.raises(BadInput, match="profile file not found"):
        load_profile(str(tmp_path / "missing.yaml"))


def test_budget_overrides_are_validated_like_the_yaml():
    p = load_profile("sbc-rpi4")
    b = with_budgets(p, latency_ms=20, percentile="p99", file_mb=3)
    assert b.latency_ms.value == 20 and b.latency_ms.percentile == "p99" and b.model_file_mb == 3
    assert b.peak_memory_mb == p.budgets.peak_memory_mb
    with pytest.raises(BadInput, match="--latency-ms: expected greater than 0"):
        with_budgets(p, latency_ms=-1)
    with pytest.raises(BadInput, match="--memory-mb"):
        with_budgets(p, memory_mb=1e12)
    with pytest.raises(BadInput, match="--percentile"):
        with_budgets(p, percentile="p42")


def test_cli_list_show_validate(tmp_path):
    r = run_cli("profiles", "list", "--json")
    assert r.code == 0
    items = r.json()
    assert isinstance(items, list) and REQUIRED <= {i["id"] for i in items}
    assert all({"id", "name", "form_factor"} <= set(i) for i in items)

    r = run_cli("profiles", "show", "watch-a55-dual", "--json")
    assert r.code == 0 and r.json()["calibration"]["clock_ghz"] == 1.18
    r = run_cli("profiles", "show", "sbc-rpi5")
    assert r.code == 0 and "R44" in r.stdout

    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    r = run_cli("profiles", "validate", str(good))
    assert r.code == 0 and "valid profile 'my-board'" in r.stderr
    r = run_cli("profiles", "show", str(good), "--json")
    assert r.code == 0 and r.json()["id"] == "my-board"

    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("model_file_mb: 10", "model_file_mb: 0"))
    r = run_cli("profiles", "validate", str(bad))
    assert r.code == 2
    assert f"{bad}:13: field 'budgets.model_file_mb': expected greater than 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_shared_dir_constant_is_a_path():
    assert SHARED.name  # the fixture module is importable here (used by the shared test above)
