"""Comparing a run with an earlier one (--compare): regressions of fastmlp's medians and ratios."""

from __future__ import annotations

from .cases import BASELINES
from .report import fmt_time, fmt_x, is_ours, markdown


def compare(old: dict, new: dict, threshold: float = 0.10, criteria: str = "both") -> tuple[list[dict], str]:
    """Cases whose fastmlp median grew by more than `threshold` or whose speed-up against a baseline
    dropped by more than `threshold` (relative). criteria "ratio" or "median" checks only that one
    (on a shared machine absolute medians drift between runs far more than same-run ratios do).
    Returns (regressions, printable report)."""
    check_median = criteria in ("both", "median")
    check_ratio = criteria in ("both", "ratio")
    old_by_id = {r["id"]: r for r in old.get("results", [])}
    rows, regressions = [], []
    for r in new.get("results", []):
        o = old_by_id.get(r["id"])
        if o is None:
            continue
        flags = []
        fm_new = r["variants"].get("fastmlp", {})
        fm_old = o["variants"].get("fastmlp", {})
        t_change = None
        for v in [v for v in r["variants"] if is_ours(r, v)]:
            vn, vo = r["variants"][v], o["variants"].get(v, {})
            if vn.get("status") == "ok" and vo.get("status") == "ok":
                change = vn["median_s"] / vo["median_s"] - 1
                if v == "fastmlp":
                    t_change = change
                if check_median and change > threshold:
                    flags.append(f"{v} median +{100 * change:.0f}%")
            if v != "fastmlp":  # its speed-up against eager torch
                sn, so = r.get("speedup_vs_torch", {}).get(v), o.get("speedup_vs_torch", {}).get(v)
                if check_ratio and sn is not None and so and sn / so < 1 - threshold:
                    flags.append(f"{v} x vs torch {so:.2f}->{sn:.2f}")
        for base in BASELINES:
            sn, so = r["speedup"].get(base), o.get("speedup", {}).get(base)
            if check_ratio and sn is not None and so is not None and so > 0 and sn / so < 1 - threshold:
                flags.append(f"x vs {base} {so:.2f}->{sn:.2f}")
        row = [
            r["id"],
            fmt_time(fm_old.get("median_s")) if fm_old.get("status") == "ok" else "n/a",
            fmt_time(fm_new.get("median_s")) if fm_new.get("status") == "ok" else "n/a",
            "n/a" if t_change is None else f"{100 * t_change:+.0f}%",
        ]
        for base in BASELINES:
            so, sn = o.get("speedup", {}).get(base), r["speedup"].get(base)
            row.append(f"{fmt_x(so)} -> {fmt_x(sn)}")
        row.append("REGRESSION: " + "; ".join(flags) if flags else "ok")
        rows.append(row)
        if flags:
            regressions.append({"id": r["id"], "flags": flags})
    headers = ["case", "fastmlp before", "fastmlp now", "change"] + [f"x vs {b}" for b in BASELINES] + ["verdict"]
    what = {"both": "median or speed-up", "ratio": "speed-up", "median": "median"}[criteria]
    report = [f"### Compared with {old.get('created', 'an earlier run')} (flagged: {what} worse by more than "
              f"{100 * threshold:.0f}%)", ""]
    if rows:
        report.append(markdown(headers, rows))
    else:
        report.append("(no case in common)")
    # The same CPU model name can hide another kernel family (the ISA fastmlp ran).
    facts = lambda m: {"cpu": m.get("cpu"), "cpu_isa": m.get("backend", {}).get("cpu_isa"),  # noqa: E731
                       "cores": m.get("cores"), "threads": m.get("threads"), "torch": m.get("torch")}
    of, nf = facts(old.get("machine", {})), facts(new.get("machine", {}))
    diffs = [k for k in of if of[k] != nf[k]]
    if diffs:
        report.append("\nwarning: the runs differ in " + ", ".join(f"{k} ({of[k]} vs {nf[k]})" for k in diffs))
    report.append(f"\n{len(regressions)} regression(s)")
    return regressions, "\n".join(report)
