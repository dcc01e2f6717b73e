"""Acceptance benchmark of issue 7: `chita-edge run` killed in the middle of fine-tuning and started again
finishes with the same manifest and files as an uninterrupted run, and does not redo finished stages.

Real processes, one after the other, in the same output directory (WORK/run, renamed after each variant, so that
paths recorded inside the files are equal):

- A: ``chita-edge run PIPELINE --out WORK/run``, uninterrupted -> WORK/A;
- B: the same, SIGKILLed (process group) once the first profile's fine-tuning has saved an epoch and is in its
  next one, then the same command again to the end -> WORK/B;
- C (``--sigint``): the same with SIGINT (the fine-tuning saves its state at the current step) -> WORK/C.

Compared with A: the manifest, except each stage's ``seconds`` and the check stages' ``outputs`` (result.json and
junit.xml hold this run's latency measurements); the bytes of every checkpoint and exported file; in the resumed
run's runs.jsonl line, every stage that was finished when the process died is ``skipped`` (and its files' mtimes
are unchanged), the fine-tuning that was killed is ``resumed``. Prints one Markdown table per variant; exit 1 when
the property fails, 2 without ../shared.

    OMP_NUM_THREADS=1 python benchmarks/pipeline_resume.py --work /some/dir [--sigint]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHITA_EDGE_SHARED", ROOT.parent / "shared"))
EXAMPLE = ROOT / "examples" / "pipeline-resnet20.yaml"
NEEDS = ("checkpoints/resnet20_cifar10.pt", "data/cifar10.npz")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pipeline_file(work: Path) -> Path:
    """The example itself when its ../shared paths resolve to SHARED, else a copy pointing at SHARED."""
    if (EXAMPLE.parent / "../../shared").resolve() == SHARED.resolve():
        return EXAMPLE
    lines = []
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("weights:"):
            line = f"weights: {SHARED / NEEDS[0]}"
        elif line.startswith("data:"):
            line = f"data: npz:{SHARED / NEEDS[1]}"
        lines.append(line)
    copy = work / EXAMPLE.name
    copy.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return copy


def command(pipe: Path, out: Path) -> list[str]:
    exe = Path(sys.executable).with_name("chita-edge")
    head = [str(exe)] if exe.exists() else [sys.executable, "-c", "from chita_edge.cli import main; main()"]
    return [*head, "run", str(pipe), "--out", str(out)]


def start(cmd: list[str], logfile: Path) -> subprocess.Popen:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(k, "1")
    f = open(logfile, "w", encoding="utf-8")  # noqa: SIM115 - closed when the process ends (wait())
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
    p._log = f  # type: ignore[attr-defined]
    return p


def wait(p: subprocess.Popen) -> int:
    rc = p.wait()
    p._log.close()  # type: ignore[attr-defined]
    return rc


def manifest(out: Path) -> dict[str, Any]:
    path = out / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"stages": {}}


def last_run(out: Path) -> dict[str, Any]:
    return json.loads((out / "runs.jsonl").read_text(encoding="utf-8").splitlines()[-1])


def comparable(m: dict[str, Any]) -> dict[str, Any]:
    """The manifest less what legitimately depends on the run: each stage's seconds, the checks' measurements."""
    m = json.loads(json.dumps(m))
    for name, rec in m["stages"].items():
        rec.pop("seconds", None)
        if "/check-" in name:
            rec.pop("outputs", None)
    return m


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [f"{path or '.'}: {str(a)[:80]} != {str(b)[:80]}"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artefacts(out: Path, m: dict[str, Any]) -> dict[str, str]:
    """sha256 of the bytes of every checkpoint and exported file of the finished stages."""
    return {rel: sha256(out / rel) for rec in m["stages"].values() for rel in rec["outputs"]
            if rel.endswith((".pt", ".onnx", ".tflite"))}


def interrupted_run(tag: str, sig: signal.Signals, pipe: Path, work: Path, run_dir: Path, profile: str,
                    delay: float, timeout: float) -> dict[str, Any]:
    """Start, interrupt with ``sig`` during ``profile``'s fine-tuning (``delay`` s into the epoch after the first
    saved one), record what was finished, start again to the end."""
    state = run_dir / profile / "finetune" / "finetuned.pt.state"
    log(f"{tag}: run until {state.relative_to(run_dir)} appears, then {sig.name} after {delay:.0f} s")
    t0 = time.perf_counter()
    p = start(command(pipe, run_dir), work / f"{tag}-1.log")
    while not state.exists():
        if p.poll() is not None:
            raise SystemExit(f"{tag}: the run ended (exit {p.returncode}) before fine-tuning saved a state; "
                             f"see {work / f'{tag}-1.log'}")
        if time.perf_counter() - t0 > timeout:
            os.killpg(p.pid, signal.SIGKILL)
            raise SystemExit(f"{tag}: no fine-tuning state after {timeout:.0f} s")
        time.sleep(0.2)
    time.sleep(delay)
    os.killpg(p.pid, sig)
    rc1 = wait(p)
    killed_at = time.perf_counter() - t0
    m1 = manifest(run_dir)
    finished = sorted(m1["stages"])
    ft_stage = f"{profile}/finetune"
    mid = state.exists() and ft_stage not in m1["stages"]
    mtimes = {rel: (run_dir / rel).stat().st_mtime_ns for rec in m1["stages"].values() for rel in rec["outputs"]}
    log(f"{tag}: {sig.name} after {killed_at:.0f} s, exit {rc1}; finished: {', '.join(finished)}; "
        f"fine-tuning {'in progress (state file kept)' if mid else 'NOT in progress'}")
    t1 = time.perf_counter()
    rc2 = wait(start(command(pipe, run_dir), work / f"{tag}-2.log"))
    log(f"{tag}: started again: exit {rc2} after {time.perf_counter() - t1:.0f} s")
    moved = work / tag
    run_dir.rename(moved)
    return {"tag": tag, "signal": sig.name, "rc_killed": rc1, "rc": rc2, "finished": finished, "mid": mid,
            "killed_stage": ft_stage, "mtimes": mtimes, "out": moved, "killed_after_s": killed_at,
            "resume_s": time.perf_counter() - t1}


def judge(a: dict[str, Any], v: dict[str, Any]) -> tuple[list[list[str]], list[str]]:
    """The table rows and the list of broken promises of variant ``v`` against run A."""
    ma, mb = manifest(a["out"]), manifest(v["out"])
    rows, fails = [], []
    if not v["mid"]:
        fails.append(f"the {v['signal']} did not land during {v['killed_stage']}")
    if v["rc"] != a["rc"]:
        fails.append(f"exit code {v['rc']} after resuming, {a['rc']} uninterrupted")
    diff = differences(comparable(ma), comparable(mb))
    fails += [f"manifest differs: {d}" for d in diff[:10]]
    events = {e["stage"]: e for e in last_run(v["out"])["stages"] if e["status"] != "running"}
    ha, hb = artefacts(a["out"], ma), artefacts(v["out"], mb)
    for name, rec in ma["stages"].items():
        ev = events.get(name, {})
        status = ev.get("status", "absent")
        if status == "resumed":
            r = ev["resumed_from"]
            status = f"resumed at epoch {r['epoch'] + 1} step {r['step']}"
        if name in v["finished"]:
            before = "done"
            if ev.get("status") != "skipped":
                fails.append(f"{name}: finished before the {v['signal']}, but {status} when started again")
            touched = [rel for rel in mb["stages"][name]["outputs"]
                       if (v["out"] / rel).stat().st_mtime_ns != v["mtimes"].get(rel)]
            if touched:
                fails.append(f"{name}: {', '.join(touched)} rewritten when started again")
        elif name == v["killed_stage"]:
            before = "interrupted (state kept)"
            if ev.get("status") != "resumed":
                fails.append(f"{name}: killed in progress, but {status} (not resumed) when started again")
        else:
            before = "not started"
        if "/check-" in name:
            same = "n/a (measurements)"
        else:
            outs = list(rec["outputs"])
            eq = all(rec["outputs"][o] == mb["stages"].get(name, {}).get("outputs", {}).get(o) for o in outs)
            eq = eq and all(ha[o] == hb.get(o) for o in outs if o in ha)
            same = "yes" if eq else "NO"
            if not eq:
                fails.append(f"{name}: artefact differs")
        rows.append([name, f"{rec['seconds']:.1f}", before, status, same])
    return rows, fails


def table(rows: list[list[str]], tag: str, sig: str) -> None:
    cols = ["stage", "run A s", f"run {tag} ({sig})", f"run {tag} started again", "artefact hash equal"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a new temporary one); "
                                                           "keeps the runs A, B, C and their logs")
    ap.add_argument("--sigint", action="store_true", help="also the SIGINT variant (C)")
    ap.add_argument("--delay", type=float, default=10.0, help="seconds into the second epoch before the signal")
    ap.add_argument("--timeout", type=float, default=3600.0, help="give up waiting for fine-tuning after this")
    ap.add_argument("--pipeline", type=Path, default=None, help="another pipeline file (default: the ResNet20 "
                                                               "example, on ../shared)")
    args = ap.parse_args()
    missing = [r for r in NEEDS if not (SHARED / r).is_file()]
    if missing and args.pipeline is None:
        log(f"needs ../shared (the reference ResNet20 checkpoint and CIFAR-10) at {SHARED}: missing "
            f"{', '.join(missing)}")
        return 2
    work = (args.work or Path(tempfile.mkdtemp(prefix="chita-edge-resume-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for old in ("run", "A", "B", "C"):
        shutil.rmtree(work / old, ignore_errors=True)
    pipe = args.pipeline.resolve() if args.pipeline else pipeline_file(work)
    run_dir = work / "run"
    from chita_edge.devices.profiles import load_profile
    from chita_edge.workflows.pipeline_spec import (
        load_pipeline,  # the profile ids, as the run names their folders
    )

    profile = load_profile(load_pipeline(pipe).profiles[0]).id
    cmd = command(pipe, run_dir)
    log(f"A: {' '.join(cmd)} (uninterrupted)")
    t0 = time.perf_counter()
    rc = wait(start(cmd, work / "A.log"))
    run_dir.rename(work / "A")
    a = {"rc": rc, "out": work / "A", "seconds": time.perf_counter() - t0}
    log(f"A: exit {rc} after {a['seconds']:.0f} s")
    if rc not in (0, 1):
        log(f"A failed (exit {rc}); see {work / 'A.log'}")
        return 3
    variants = [("B", signal.SIGKILL)] + ([("C", signal.SIGINT)] if args.sigint else [])
    ok = True
    print(f"`{' '.join(cmd)}`, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1 (set)')}; "
          f"run A: exit {rc}, {a['seconds']:.0f} s\n")
    for tag, sig in variants:
        v = interrupted_run(tag, sig, pipe, work, run_dir, profile, args.delay, args.timeout)
        rows, fails = judge(a, v)
        print(f"### {tag}: {sig.name} {v['killed_after_s']:.0f} s in (exit {v['rc_killed']}), started again: exit "
              f"{v['rc']}, {v['resume_s']:.0f} s\n")
        table(rows, tag, sig.name)
        print("\nmanifest compared without: stages.*.seconds, stages.*/check-*.outputs (latency measurements)")
        print(f"result: {'PASS' if not fails else 'FAIL'}" + "".join(f"\n- {f}" for f in fails) + "\n", flush=True)
        ok = ok and not fails
    log(f"runs kept in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
