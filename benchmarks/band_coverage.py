"""Coverage of the device estimates' error band: the share of held-out anchors that fall inside their band.

    python benchmarks/band_coverage.py                    # the cached host calibration (onnxruntime, 1 thread)
    python benchmarks/band_coverage.py --runtime litert   # the LiteRT one (tflite extra)

For every calibration anchor of the bundled profiles (28 with the full host calibration), nested so that the anchor
plays no part in its own band:

1. the anchor is removed from the pool;
2. its profile's band is computed from what is left, by the rule the estimates use
   (``chita_edge.devices.calibration.error_band``: the leave-one-out errors of the profile's own remaining anchors
   when there are ``MIN_OWN_ERRORS`` of them, else those of the whole pool);
3. the anchor is predicted by a fit without it (``leave_one_out``) and counts as covered when its published
   figure lies within ``[estimate × low, estimate × high]``.

Also printed, for comparison: the "served" coverage, with the band each profile's estimates carry today (every
anchor in the pool, the scored one included: optimistic, since the band was measured on it).
"""

from __future__ import annotations

import argparse
import math
import statistics

from chita_edge.devices.calibration import (
    anchors_for,
    error_band,
    fit_profile,
    host_calibration,
    leave_one_out,
)
from chita_edge.devices.profiles import load_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "litert"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    host = host_calibration(args.runtime, args.threads)
    profs = load_all()
    by_id = {p.id: p for p in profs}
    loo = {(r["profile"], r["row"], r["model"]): r for r in leave_one_out(profs, host)}
    served = {p.id: fit_profile(p, host).band for p in profs if fit_profile(p, host) is not None}
    rows, nested_in, served_in, scored = [], 0, 0, 0
    by_basis: dict[str, list[bool]] = {}
    for p in profs:
        for a in anchors_for(p, host.runtime, host.references):
            r = loo[(a.profile, a.row, a.model)]
            if r["error"] is None:
                continue
            band = error_band(by_id[a.profile], host, exclude=a)
            if band.half_width is None:
                continue
            err = abs(math.log1p(r["error"]))
            inside = err <= band.half_width + 1e-12
            sb = served[a.profile]
            s_inside = sb.half_width is not None and err <= sb.half_width + 1e-12
            scored += 1
            nested_in += inside
            served_in += s_inside
            by_basis.setdefault(band.basis, []).append(inside)
            rows.append([a.profile, f"{a.row}:{a.model}", f"{100 * r['error']:+.0f} %", band.basis,
                         f"{100 * (band.low - 1):+.0f}/{100 * (band.high - 1):+.0f} %", "yes" if inside else "NO"])
    widths = [max(len(str(x)) for x in col) for col in zip(*rows, strict=True)]
    header = ["profile", "anchor", "LOO error", "band basis", "band (anchor held out)", "inside"]
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)))
    print()
    print(f"host calibration: {host.runtime} {host.runtime_version}, {host.threads} thread(s), {host.resolution} px, "
          f"references {', '.join(host.references)} ({host.path})")
    print(f"nested coverage (the anchor plays no part in its band): {nested_in}/{scored} = "
          f"{100 * nested_in / scored:.0f} %")
    for basis, v in sorted(by_basis.items()):
        print(f"  band from the {basis} errors: {sum(v)}/{len(v)} = {100 * sum(v) / len(v):.0f} %")
    print(f"served coverage (today's bands, the anchor included in them): {served_in}/{scored} = "
          f"{100 * served_in / scored:.0f} %")
    hw = [b.high - 1 for b in served.values() if b.high is not None]
    print(f"served bands: upper edge +{100 * min(hw):.0f} % to +{100 * max(hw):.0f} % "
          f"(median +{100 * statistics.median(hw):.0f} %)")


if __name__ == "__main__":
    main()
