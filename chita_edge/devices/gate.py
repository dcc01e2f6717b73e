"""``chita-edge check``: compare a benchmark with a profile's budgets (and an accuracy floor) for CI.

One check per budget: latency at the budget's percentile (measured on the device, estimated for it, or measured
on this host, in that order, and always said which), peak memory, file size, and optionally top-1 accuracy.
Outputs: a JSON-able report, JUnit XML (one test case per budget) and a Markdown summary for
``$GITHUB_STEP_SUMMARY``. ``raise_if_failed`` raises GateFailed (exit 1) naming every broken budget.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from chita_edge.core.data import load_data
from chita_edge.core.errors import BadInput, GateFailed
from chita_edge.core.io import atomic_write_text
from chita_edge.devices.bench import BenchConfig, benchmark, best_latency
from chita_edge.devices.profiles import Budgets, Profile, load_profile, with_budgets

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Check:
    name: str  # latency_ms.p90, peak_memory_mb, model_file_mb, accuracy
    limit: float
    value: float
    unit: str
    comparison: str  # "<=" or ">="
    provenance: str
    passed: bool

    @property
    def message(self) -> str:
        rel = "within" if self.passed else "breaks"
        op = self.comparison if self.passed else (">" if self.comparison == "<=" else "<")
        return f"{self.name} {self.value:.4g} {self.unit} {op} {self.limit:.4g} {self.unit}: {rel} budget ({self.provenance})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message}


def evaluate(result: dict[str, Any], profile: Profile, budgets: Budgets, *,
             accuracy_min: float | None = None) -> list[Check]:
    """The checks of ``result`` against ``budgets`` (and ``accuracy_min``), in a fixed order."""
    checks: list[Check] = []
    if budgets.latency_ms is not None:
        lat, prov = best_latency(result, profile.id)
        pct = budgets.latency_ms.percentile
        v = float(lat[pct])
        checks.append(Check(f"latency_ms.{pct}", budgets.latency_ms.value, v, "ms", "<=", prov,
                            v <= budgets.latency_ms.value))
    if budgets.peak_memory_mb is not None:
        v = float(result["peak_memory_mb"])
        prov = "measured-device" if result.get("provenance") == "measured-device" else "measured-host"
        checks.append(Check("peak_memory_mb", budgets.peak_memory_mb, v, "MB", "<=", f"{prov}, process RSS delta",
                            v <= budgets.peak_memory_mb))
    if budgets.model_file_mb is not None:
        v = float(result["file_mb"])
        checks.append(Check("model_file_mb", budgets.model_file_mb, v, "MB", "<=", "file size",
                            v <= budgets.model_file_mb))
    if accuracy_min is not None:
        acc = result.get("accuracy")
        if acc is None:
            raise BadInput("--accuracy-min needs --data (the data set to evaluate the file on)")
        v = float(acc["accuracy"])
        checks.append(Check("accuracy", accuracy_min, v, "%", ">=",
                            f"top-1 on {acc['test_examples']} test examples of {acc['data']}", v >= accuracy_min))
    return checks


def junit_xml(checks: list[Check], *, file: str, profile: str) -> str:
    suite = ET.Element("testsuite", name=f"chita-edge check {os.path.basename(file)} on {profile}",
                       tests=str(len(checks)), failures=str(sum(not c.passed for c in checks)), errors="0",
                       skipped="0")
    for c in checks:
        tc = ET.SubElement(suite, "testcase", classname=f"chita_edge.budgets.{profile}", name=c.name, time="0")
        if not c.passed:
            f = ET.SubElement(tc, "failure", message=c.message, type="BudgetExceeded")
            f.text = c.message
        out = ET.SubElement(tc, "system-out")
        out.text = c.message
    root = ET.Element("testsuites", tests=str(len(checks)), failures=str(sum(not c.passed for c in checks)))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def summary_markdown(report: dict[str, Any]) -> str:
    ok = report["passed"]
    lines = [f"### chita-edge check: `{os.path.basename(report['file'])}` on `{report['profile']}` — "
             f"{'✅ all budgets hold' if ok else '❌ budget broken'}", "",
             "| budget | limit | value | result | provenance |", "|---|---|---|---|---|"]
    for c in report["checks"]:
        op = c["comparison"]
        lines.append(f"| {c['name']} | {op} {c['limit']:.4g} {c['unit']} | {c['value']:.4g} {c['unit']} | "
                     f"{'pass' if c['passed'] else '**FAIL**'} | {c['provenance']} |")
    return "\n".join(lines) + "\n\n"


def run_check(path: str | os.PathLike, profile: str | Profile, *, latency_ms: float | None = None,
              percentile: str | None = None, memory_mb: float | None = None, file_mb: float | None = None,
              accuracy_min: float | None = None, data: str | None = None, cfg: BenchConfig | None = None,
              junit: str | os.PathLike | None = None, step_summary: str | os.PathLike | None = None,
              estimate_on: Sequence[Profile] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Benchmark ``path`` for ``profile`` and check every budget; writes JUnit XML and the step summary
    (``step_summary=""``: none). ``estimate_on``: the profiles to estimate the file's latency on (default: the
    gated profile; the pipeline estimates every file on every target).

    Returns the report (``passed`` tells the verdict); call ``raise_if_failed`` to turn a failure into exit 1.
    """
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    budgets = with_budgets(prof, latency_ms=latency_ms, percentile=percentile, memory_mb=memory_mb, file_mb=file_mb)
    if accuracy_min is not None and not data:
        raise BadInput("--accuracy-min needs --data (the data set to evaluate the file on)")
    if accuracy_min is not None and not 0 <= accuracy_min <= 100:
        raise BadInput(f"--accuracy-min {accuracy_min}: expected a percentage in 0..100")
    if (budgets.latency_ms is None and budgets.peak_memory_mb is None and budgets.model_file_mb is None
            and accuracy_min is None):
        raise BadInput(f"profile {prof.id} has no budgets and none was given (--latency-ms, --memory-mb, --file-mb, "
                       "--accuracy-min)")
    if data:

        load_data(data)  # a bad --data fails now, not after the measurement
    result = benchmark(path, [prof] if estimate_on is None else list(estimate_on), cfg, data=data, progress=progress)
    checks = evaluate(result, prof, budgets, accuracy_min=accuracy_min)
    report = {"file": str(path), "profile": prof.id, "passed": all(c.passed for c in checks),
              "budgets": budgets.model_dump(exclude_none=True), "checks": [c.to_dict() for c in checks],
              "benchmark": result}
    if junit:
        atomic_write_text(junit, junit_xml(checks, file=str(path), profile=prof.id))
        report["junit"] = str(junit)
    summary = step_summary if step_summary is not None else os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as f:  # GitHub's protocol: append to the summary file
                f.write(summary_markdown(report))
            report["step_summary"] = str(summary)
        except OSError as e:
            raise BadInput(f"{summary}: cannot append the step summary ({e.strerror})") from None
    return report


def raise_if_failed(report: dict[str, Any]) -> None:
    broken = [c for c in report["checks"] if not c["passed"]]
    if broken:
        raise GateFailed(f"{os.path.basename(report['file'])} on {report['profile']}: "
                         + "; ".join(c["message"] for c in broken))
