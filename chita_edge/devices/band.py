"""The out-of-sample error band of a device estimate (leave-one-out over the calibration anchors).

Each anchor of the calibration pool is predicted by a fit without it (``calibration._loo``); the band's
half-width ``w``, in log space, is the ``BAND_QUANTILE`` quantile (numpy's method "higher": an observed value)
of ``|ln(estimate / published)|`` over the profile's own held-out anchors when it has ``MIN_OWN_ERRORS`` or more,
else over every held-out anchor of the pool, widened where needed to the largest of the profile's own held-out
errors (a band is never narrower than an error already seen on its profile). The device latency is then expected
within ``[estimate × e^−w, estimate × e^w]``; with no held-out anchor the band is unknown.

Why 9: the ``BAND_QUANTILE`` quantile (method "higher") of n exchangeable errors is the k-th smallest with
k = ceil(0.9 (n − 1)) + 1, and a new error falls below it with probability k / (n + 1): 9 / 10 for n = 9 and
26 / 29 for the 28 pooled anchors, but 3 / 4 for a profile's own 3. Fewer than 9 own errors cannot support a
90 % band on their own.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_OWN_ERRORS = 9  # a profile's own band needs this many held-out anchors; fewer: the pooled errors
BAND_QUANTILE = 0.9  # of |log error| over the held-out anchors (numpy method "higher": an observed error)


@dataclass(frozen=True)
class Band:
    """Out-of-sample error band of a profile's estimates: the true device latency is expected within
    ``[estimate × low, estimate × high]`` (``low = exp(−w)``, ``high = exp(w)``).

    ``basis``: ``profile`` (the profile's own held-out anchors), ``pooled`` (every held-out anchor of the pool:
    the profile has fewer than ``MIN_OWN_ERRORS``) or ``unknown`` (no held-out anchor at all: no band)."""

    basis: str
    half_width: float | None  # w, in log space
    n_errors: int  # held-out anchors the band rests on
    own_errors: tuple[float, ...] = ()  # the profile's own leave-one-out relative errors (estimate / published - 1)
    widened: bool = False  # pooled, widened to the largest of the profile's own held-out errors

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else float(np.exp(-self.half_width))

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else float(np.exp(self.half_width))

    @property
    def own_rms(self) -> float | None:
        return float(np.sqrt(np.mean(np.square(self.own_errors)))) if self.own_errors else None

    def describe(self) -> str:
        if self.half_width is None or self.low is None or self.high is None:
            return "error band unknown (no held-out anchor to measure it on)"
        where = (f"this profile's {self.n_errors} anchors" if self.basis == "profile" else
                 f"pooled over {self.n_errors} anchors of all profiles"
                 + (f", widened to this profile's own {len(self.own_errors)}" if self.widened else ""))
        return (f"band {100 * (self.low - 1):+.0f}/{100 * (self.high - 1):+.0f} % out-of-sample "
                f"(leave-one-out, {where})")

    def to_dict(self) -> dict[str, Any]:
        return {"basis": self.basis, "low": self.low, "high": self.high, "half_width_log": self.half_width,
                "n_errors": self.n_errors, "own_errors": list(self.own_errors), "own_rms": self.own_rms,
                "widened": self.widened, "quantile": BAND_QUANTILE, "min_own_errors": MIN_OWN_ERRORS,
                "definition": "true latency within [estimate * low, estimate * high]; log half-width = the "
                              f"{BAND_QUANTILE:.0%} quantile (next larger observed) of |ln(estimate / published)| "
                              "over held-out anchors (leave-one-out)"}


def band_half_width(errors: Collection[float]) -> float | None:
    """The band's log half-width from leave-one-out relative errors; None without any."""
    if not errors:
        return None
    return float(np.quantile(np.abs(np.log1p(np.asarray(list(errors), dtype=float))), BAND_QUANTILE,
                             method="higher"))


# Device tails: no anchor publishes a device p90/p99 (the rows are medians or averages), so an estimate's p50 (and
# mean) come from the calibration and its p90/p99 from the p50 with a stated widening, ``TAIL_WIDENING``: an
# allowance for what a phone or watch adds over its median (DVFS, thermal throttling, background load). It is a
# stated assumption, not a measurement. This host's own tail (p90/p50) is not used: it measures this x86 host's
# interference, not the device's, and it moves by 10 % and more between processes on a shared machine, which
# would make the same file pass and fail the same budget.
TAIL_WIDENING = {"p90": 1.2, "p99": 1.5}


def tail_estimates(p50_device: float, host_latency: dict[str, float]) -> tuple[dict[str, float], dict[str, Any]]:
    """Device p90/p99 from the device p50: ``p50 × TAIL_WIDENING[pXX]``; with the record of how (``tails`` in the
    estimate). ``host_latency`` says which percentiles were asked for."""
    keys = [k for k in ("p90", "p99") if k in host_latency]
    return ({k: p50_device * TAIL_WIDENING[k] for k in keys},
            {"method": "device pXX = device p50 x a stated widening (no device tail is published)",
             "widening": {k: TAIL_WIDENING[k] for k in keys}})


# Threads: the host is timed with 1 thread, the anchors are at the device's thread count.

def thread_speedups(profile: Any, threads: int) -> dict[str, float]:
    """Published speed-ups t(1 thread) / t(``threads``) of the profile's own CPU fp32 rows of its calibration
    runtime, where the same device, model and input appear at both thread counts (``R16:mobilenet_v1``: 1.91)."""
    cal = profile.calibration
    if cal is None or threads == 1:
        return {}
    rows = [r for r in cal.rows if r.delegate == "cpu" and r.precision == "fp32" and r.runtime == cal.runtime]
    one = {(r.device, r.model, r.input): r for r in rows if r.threads == 1}
    return {f"{r.row}:{r.model}": one[(r.device, r.model, r.input)].latency_ms / r.latency_ms
            for r in rows if r.threads == threads and (r.device, r.model, r.input) in one}
