"""``chita-edge check``: compare a benchmark with a profile's budgets (and an accuracy floor) for CI.

One check per budget: latency at the budget's percentile (measured on the device, estimated for it, or measured
on this host, in that order, and always said which), peak memory, file size, and optionally top-1 accuracy.
Outputs: a JSON-able report, JUnit XML (one test case per budget) and a Markdown summary for
``$GITHUB_STEP_SUMMARY``. ``raise_if_failed`` raises GateFailed (exit 1) naming every broken budget.

Verdicts (``judge``): *pass* when the upper edge of the estimate's error band is within the budget, *fail* when
its lower edge is over it, *uncertain* when the budget lies inside the band. A measurement (on the device with
``--remote``; memory, file size, accuracy) has no band: its value decides. A device latency budget is never
passed by a host timing: without a device estimate or a device measurement the check is *uncertain* and says
how to verify it. *uncertain* counts as a failure (exit 1, JUnit failure of type ``BudgetUncertain``) unless
``uncertain="pass"`` (``--uncertain pass``): then it exits 0, is reported as JUnit *skipped* and the summary
flags it, so an unverified number never passes silently.
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
from chita_edge.devices.bench import BenchConfig, benchmark, latency_evidence
from chita_edge.devices.profiles import Budgets, Profile, load_profile, with_budgets

Progress = Callable[[str, int, int], None]


UNCERTAIN_POLICIES = ("fail", "pass")
MAX_REPEATS = 99  # check --repeats: benchmark processes of one check
HOW_TO_VERIFY = ("calibrate the profile (calibration rows for its device), add the file's format to the pipeline's "
                 "checks.estimate_formats, or measure on the device with --remote")


def judge(value: float, limit: float, low: float | None = None, high: float | None = None,
          comparison: str = "<=") -> str:
    """pass / fail / uncertain: the band ``[low, high]`` (the value itself when there is none) against the limit."""
    lo = value if low is None else low
    hi = value if high is None else high
    if comparison == ">=":
        return "pass" if lo >= limit else "fail" if hi < limit else "uncertain"
    return "pass" if hi <= limit else "fail" if lo > limit else "uncertain"


def counts_as_passed(verdict: str, uncertain: str = "fail") -> bool:
    return verdict == "pass" or (verdict == "uncertain" and uncertain == "pass")


@dataclass(frozen=True)
class Check:
    name: str  # latency_ms.p90, peak_memory_mb, model_file_mb, accuracy
    limit: float
    value: float
    unit: str
    comparison: str  # "<=" or ">="
    provenance: str
    passed: bool  # counts as passed (an uncertain verdict only with --uncertain pass)
    verdict: str = ""  # pass / fail / uncertain ("": from passed)
    low: float | None = None  # the estimate's error band at this percentile
    high: float | None = None
    note: str | None = None  # why the verdict is uncertain and how to settle it
    confidence: str | None = None  # the profile's stated confidence, for an estimate

    def __post_init__(self) -> None:
        if not self.verdict:
            object.__setattr__(self, "verdict", "pass" if self.passed else "fail")

    @property
    def band(self) -> str:
        return "" if self.low is None or self.high is None else \
            f" (band {self.low:.4g}–{self.high:.4g} {self.unit})"

    @property
    def message(self) -> str:
        prov = self.provenance + (f"; profile confidence: {self.confidence}" if self.confidence else "")
        head = f"{self.name} {self.value:.4g} {self.unit}{self.band}"
        if self.verdict == "uncertain":
            counted = "accepted (--uncertain pass)" if self.passed else "counted as a failure (--uncertain fail)"
            return f"{head} vs {self.limit:.4g} {self.unit}: uncertain, {self.note} ({prov}); {counted}"
        rel = "within" if self.verdict == "pass" else "breaks"
        op = self.comparison if self.verdict == "pass" else (">" if self.comparison == "<=" else "<")
        return f"{head} {op} {self.limit:.4g} {self.unit}: {rel} budget ({prov})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message}


def latency_check(result: dict[str, Any], profile_id: str, limit: float, pct: str,
                  uncertain: str = "fail") -> Check:
    """The latency budget's check: a device measurement decides alone, an estimate by its band, a host timing
    never passes (uncertain: it cannot be verified on this host)."""
    ev = latency_evidence(result, profile_id)
    v = float(ev["latency_ms"][pct])
    lo = hi = None
    note = None
    if ev["source"] == "measured-device":
        verdict = judge(v, limit)
    elif ev["source"] == "estimated-device" and ev["band"] and pct in ev["band"]:
        lo, hi = (float(x) for x in ev["band"][pct])
        verdict = judge(v, limit, lo, hi)
        note = ("the budget lies inside the estimate's error band; measure on the device with --remote to settle "
                "it, or prune further until the band's upper edge is within the budget")
    elif ev["source"] == "estimated-device":
        verdict = "uncertain"
        note = f"the estimate has no error band (no held-out calibration anchor); {HOW_TO_VERIFY}"
    else:
        verdict = "uncertain"
        note = (f"cannot be verified on this host: a host timing cannot pass a device budget ({ev['reason']}); "
                f"to verify: {HOW_TO_VERIFY}")
    return Check(f"latency_ms.{pct}", limit, v, "ms", "<=", ev["provenance"], counts_as_passed(verdict, uncertain),
                 verdict, lo, hi, note if verdict == "uncertain" else None, ev.get("confidence"))


def evaluate(result: dict[str, Any], profile: Profile, budgets: Budgets, *,
             accuracy_min: float | None = None, uncertain: str = "fail") -> list[Check]:
    """The checks of ``result`` against ``budgets`` (and ``accuracy_min``), in a fixed order."""
    checks: list[Check] = []
    if budgets.latency_ms is not None:
        checks.append(latency_check(result, profile.id, budgets.latency_ms.value, budgets.latency_ms.percentile,
                                    uncertain))
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


def pruned_verdicts(result: dict[str, Any], uncertain: str = "fail") -> list[dict[str, Any]]:
    """``check``'s rule applied to a budget-pruned result (``prune --profile``): per budget of ``result["checks"]``
    its verdict on the figure ``check`` gates on, with no slack: the latency at the budget's percentile is the
    device estimate judged by its error band (``result["measured"]["latency_band"]``), a device measurement by
    itself, a host timing never passes; memory and file size by their measurement. ``source`` says which: an
    unmeasured budget keeps the search's prediction (``predicted``)."""
    meas = result.get("measured") or {}
    prov = str(meas.get("latency_provenance") or "")
    band = meas.get("latency_band") or {}
    out = []
    for c in result["checks"]:
        m, limit, lat = c["measured"], float(c["limit"]), str(c["budget"]).startswith("latency_ms")
        lo = hi = note = None
        if m is None:
            verdict, source = ("pass" if c["met"] else "fail"), "predicted"
        elif lat and prov == "measured-host":
            verdict, source = "uncertain", "measured (host)"
            note = f"cannot be verified on this host: a host timing cannot pass a device budget; to verify: {HOW_TO_VERIFY}"
        elif lat and prov.startswith("estimated-device") and band.get("low") is not None:
            lo, hi, source = m * band["low"], m * band["high"], "estimated (device)"
            verdict = judge(m, limit, lo, hi)
            note = "the budget lies inside the estimate's error band"
        elif lat and prov.startswith("estimated-device"):
            verdict, source, note = "uncertain", "estimated (device)", "the estimate has no error band"
        else:
            source = {"measured-device": "measured (device)"}.get(prov, "measured") if lat else \
                "file size" if c["budget"] == "file_mb" else "measured (host)"
            verdict = judge(m, limit)
        out.append({**c, "value": c["predicted"] if m is None else m, "source": source, "verdict": verdict,
                    "low": lo, "high": hi, "note": note if verdict == "uncertain" else None,
                    "band_high": band.get("high") if lat else None, "passed": counts_as_passed(verdict, uncertain)})
    return out


def junit_xml(checks: list[Check], *, file: str, profile: str) -> str:
    """One test case per budget: a failure (``BudgetExceeded``, or ``BudgetUncertain`` for an uncertain verdict
    counted as a failure), or *skipped* for an uncertain verdict accepted with ``--uncertain pass``."""
    skipped = sum(c.passed and c.verdict == "uncertain" for c in checks)
    suite = ET.Element("testsuite", name=f"chita-edge check {os.path.basename(file)} on {profile}",
                       tests=str(len(checks)), failures=str(sum(not c.passed for c in checks)), errors="0",
                       skipped=str(skipped))
    for c in checks:
        tc = ET.SubElement(suite, "testcase", classname=f"chita_edge.budgets.{profile}", name=c.name, time="0")
        if not c.passed:
            f = ET.SubElement(tc, "failure", message=c.message,
                              type="BudgetUncertain" if c.verdict == "uncertain" else "BudgetExceeded")
            f.text = c.message
        elif c.verdict == "uncertain":
            ET.SubElement(tc, "skipped", message=c.message)
        out = ET.SubElement(tc, "system-out")
        out.text = c.message
    root = ET.Element("testsuites", tests=str(len(checks)), failures=str(sum(not c.passed for c in checks)))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def result_word(c: dict[str, Any]) -> str:
    """pass / **FAIL** / **UNCERTAIN** (counted as a failure) / uncertain (accepted)."""
    v = c.get("verdict") or ("pass" if c["passed"] else "fail")
    if v == "uncertain":
        return "⚠️ uncertain (accepted)" if c["passed"] else "**UNCERTAIN**"
    return "pass" if v == "pass" else "**FAIL**"


def band_text(c: dict[str, Any]) -> str:
    """The band with the margin of its upper edge to the budget, or why there is none."""
    if c.get("low") is None or c.get("high") is None:
        return "measured" if str(c["provenance"]).startswith(("measured-device", "file size", "top-1")) else "—"
    return f"{c['low']:.4g}–{c['high']:.4g} {c['unit']} (upper edge {100 * c['high'] / c['limit']:.0f} % of budget)"


def summary_markdown(report: dict[str, Any]) -> str:
    ok = report["passed"]
    unsure = [c for c in report["checks"] if c.get("verdict") == "uncertain"]
    head = ("⚠️ passes with unverified budgets (--uncertain pass)" if ok and unsure else "✅ all budgets hold" if ok
            else "❌ budget broken" if any(c.get("verdict", "fail") == "fail" and not c["passed"]
                                          for c in report["checks"]) else "❌ budget not verified (uncertain)")
    lines = [f"### chita-edge check: `{os.path.basename(report['file'])}` on `{report['profile']}` — {head}", "",
             "| budget | limit | value | result | band | provenance |", "|---|---|---|---|---|---|"]
    for c in report["checks"]:
        op = c["comparison"]
        prov = c["provenance"] + (f"; profile confidence: {c['confidence']}" if c.get("confidence") else "")
        lines.append(f"| {c['name']} | {op} {c['limit']:.4g} {c['unit']} | {c['value']:.4g} {c['unit']} | "
                     f"{result_word(c)} | {band_text(c)} | {prov} |")
    lines += [f"- {c['name']}: {c['note']}" for c in unsure if c.get("note")]
    return "\n".join(lines) + "\n\n"


def median_run(results: Sequence[dict[str, Any]], profile_id: str, pct: str) -> dict[str, Any]:
    """Of several benchmark processes of one file, the one whose latency for ``profile_id`` at ``pct`` (as the
    latency check reads it) is the median -- the upper middle of an even number -- with the accuracy of the first
    (evaluated once) and ``"repeats"``: every process's latency, in order. One process: itself."""
    if len(results) == 1:
        return results[0]
    lat = [float(latency_evidence(r, profile_id)["latency_ms"][pct]) for r in results]
    mid = sorted(range(len(results)), key=lat.__getitem__)[len(results) // 2]
    out = dict(results[mid])
    if results[0].get("accuracy") is not None:
        out["accuracy"] = results[0]["accuracy"]
    out["repeats"] = {"processes": len(results), "percentile": pct, "latency_ms": lat, "judged": mid}
    return out


def run_check(path: str | os.PathLike, profile: str | Profile, *, latency_ms: float | None = None,
              percentile: str | None = None, memory_mb: float | None = None, file_mb: float | None = None,
              accuracy_min: float | None = None, data: str | None = None, cfg: BenchConfig | None = None,
              junit: str | os.PathLike | None = None, step_summary: str | os.PathLike | None = None,
              estimate_on: Sequence[Profile] | None = None, progress: Progress | None = None,
              uncertain: str = "fail", repeats: int = 1) -> dict[str, Any]:
    """Benchmark ``path`` for ``profile`` and check every budget; writes JUnit XML and the step summary
    (``step_summary=""``: none). ``estimate_on``: the profiles to estimate the file's latency on (default: the
    gated profile; the pipeline estimates every file on every target). ``uncertain``: how an uncertain verdict
    counts, ``fail`` (default) or ``pass``. ``repeats``: benchmark processes; the one whose latency at the
    budget's percentile is the median (the upper middle of an even number) is judged (``median_run``).

    Returns the report (``passed`` tells the verdict); call ``raise_if_failed`` to turn a failure into exit 1.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise BadInput(f"--uncertain {uncertain!r}: expected one of {', '.join(UNCERTAIN_POLICIES)}")
    if not 1 <= repeats <= MAX_REPEATS:
        raise BadInput(f"--repeats {repeats}: expected 1..{MAX_REPEATS} (benchmark processes; the median one is "
                       "judged)")
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
    est = [prof] if estimate_on is None else list(estimate_on)
    pct = budgets.latency_ms.percentile if budgets.latency_ms is not None else "p90"
    result = median_run([benchmark(path, est, cfg, data=data if i == 0 else None, progress=progress)
                         for i in range(repeats)], prof.id, pct)
    checks = evaluate(result, prof, budgets, accuracy_min=accuracy_min, uncertain=uncertain)
    report = {"file": str(path), "profile": prof.id, "passed": all(c.passed for c in checks),
              "budgets": budgets.model_dump(exclude_none=True), "checks": [c.to_dict() for c in checks],
              "uncertain": uncertain, "confidence": prof.confidence,
              "verdicts": {v: sum(c.verdict == v for c in checks) for v in ("pass", "fail", "uncertain")},
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
