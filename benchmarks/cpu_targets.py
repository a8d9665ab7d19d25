"""Issues 11 and 12's CPU speed targets, read from `fastmlp bench --json` results.

    python benchmarks/cpu_targets.py RESULTS.json [MORE.json ...] [--markdown OUT.md]

Prints one row per target: the cases it needs that the files hold, the worst same-run ratio among them
(fastmlp against the named PyTorch variant, as the benchmark measured and checked it) and whether the
target is met. A target is "not measured" when a case it needs is missing or failed (its variant wrong
or in error), and "not the target machine" when the files come from a CPU the issue does not set it for
(the bf16 targets want AMX-BF16). Files from several runs can be given together: a case in more than one
file counts with its worst ratio, so a target is met only if every run met it. benchmarks/cpu_check.sh
makes the runs and calls this; it reads nothing else and times nothing itself.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from typing import NamedTuple

LAYER_BATCHES = (1, 64, 1024, 8192)
LAYER_WIDTHS = ((784, 256), (256, 10), (784, 128), (128, 64), (64, 10))
PASSES = ("fwd", "bwd", "fwdbwd")
BF16_SHAPES = ("64x784x256", "64x784x128", "512x784x256")


class Target(NamedTuple):
    issue: int
    text: str
    cases: tuple[str, ...]  # every case id the target needs
    against: str  # the PyTorch variant of the ratio: "torch" (eager float32) or "autocast"
    at_least: float
    needs_flag: str | None = None  # a CPU flag the issue sets the target for


def _layer_ids(batches=LAYER_BATCHES, passes=PASSES) -> tuple[str, ...]:
    return tuple(f"layer/{b}x{i}x{o}/{p}" for b in batches for i, o in LAYER_WIDTHS for p in passes)


TARGETS = (
    Target(12, "every layer case (fwd, bwd, fwd+bwd; batch 1, 64, 1024, 8192) >= 1.0x eager PyTorch",
           _layer_ids(), "torch", 1.0),
    Target(12, "layer fwd+bwd at every batch-64 shape >= 1.1x eager PyTorch",
           _layer_ids((64,), ("fwdbwd",)), "torch", 1.1),
    Target(12, "MNIST epoch (fastmlp train) >= 3.5x --backend torch", ("trainer/mnist",), "torch", 3.5),
    Target(12, "Fashion-MNIST epoch >= 3.0x --backend torch", ("trainer/fashion-mnist",), "torch", 3.0),
    Target(11, "bf16 layer fwd+bwd under autocast >= 4x PyTorch float32 eager",
           tuple(f"bf16/{s}/fwdbwd" for s in BF16_SHAPES), "torch", 4.0, "amx_bf16"),
    Target(11, "bf16 layer fwd+bwd under autocast >= 3x PyTorch autocast",
           tuple(f"bf16/{s}/fwdbwd" for s in BF16_SHAPES), "autocast", 3.0, "amx_bf16"),
    Target(11, "MNIST epoch --precision bf16 >= 8x --backend torch (float32)",
           ("trainer-bf16/mnist",), "torch", 8.0, "amx_bf16"),
    Target(11, "Fashion-MNIST epoch --precision bf16 >= 6x --backend torch (float32)",
           ("trainer-bf16/fashion-mnist",), "torch", 6.0, "amx_bf16"),
)


def load(paths) -> tuple[dict, list[dict]]:
    """(ratios, machines): ratios[case id][variant] = the worst ratio of fastmlp against that variant
    over the files (None where a file had the case but no valid ratio); one machine entry per file."""
    ratios: dict[str, dict[str, float | None]] = {}
    machines = []
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        if not str(run.get("schema", "")).startswith("fastmlp-bench/"):
            raise ValueError(f"{path}: not a `fastmlp bench --json` file (schema {run.get('schema')!r})")
        machine = dict(run.get("machine") or {})
        machine["file"] = str(path)
        machine["command"] = run.get("command", "")
        machines.append(machine)
        for case in run.get("results", []):
            per = ratios.setdefault(case["id"], {})
            for variant, ratio in (case.get("speedup") or {}).items():
                if variant in per and per[variant] is None:
                    continue  # a failed measurement in any file stays failed
                valid = isinstance(ratio, (int, float)) and ratio > 0
                per[variant] = min(ratio, per.get(variant, ratio)) if valid else None
    return ratios, machines


def evaluate(target: Target, ratios: dict, flags: set[str]) -> dict:
    """The target's row: result is 'met', 'missed', 'not measured' or 'not the target machine'."""
    have = [c for c in target.cases if c in ratios]
    missing = [c for c in target.cases if c not in ratios]
    failed = [c for c in have if ratios[c].get(target.against) is None]
    measured = {c: ratios[c][target.against] for c in have if c not in failed}
    row = {"issue": target.issue, "target": target.text, "against": target.against,
           "at_least": target.at_least, "cases": len(target.cases), "measured": len(measured),
           "worst": None, "worst_case": None, "below": []}
    if measured:
        worst_case = min(measured, key=measured.get)
        row["worst"], row["worst_case"] = measured[worst_case], worst_case
        row["below"] = sorted((c for c, r in measured.items() if r < target.at_least), key=measured.get)
    if target.needs_flag and target.needs_flag not in flags:
        row["result"] = "not the target machine"
        row["why"] = f"the CPU lacks {target.needs_flag}"
    elif missing or failed:
        row["result"] = "not measured"
        row["why"] = "; ".join(filter(None, [
            f"{len(missing)} case(s) not in the files, e.g. {missing[0]}" if missing else "",
            f"no valid ratio for {', '.join(failed[:3])}" if failed else ""]))
    else:
        row["result"] = "met" if not row["below"] else "missed"
        row["why"] = "" if not row["below"] else f"{len(row['below'])} case(s) below, worst first: " + \
            ", ".join(f"{c} {measured[c]:.2f}x" for c in row["below"][:4])
    return row


def machine_lines(machines: list[dict]) -> list[str]:
    lines = []
    for m in machines:
        backend = m.get("backend") or {}
        lines.append(f"- `{m['file']}`: {m.get('cpu', '?')} ({' '.join(m.get('cpu_flags', [])) or 'flags unknown'}), "
                     f"{m.get('threads', '?')} threads, fastmlp ISA {backend.get('cpu_isa', '?')}, "
                     f"bf16 {backend.get('cpu_bf16', '?')}, GEMM mode {backend.get('gemm', '?')}; "
                     f"`{m['command']}`")
    return lines


def report(rows: list[dict], machines: list[dict]) -> str:
    out = ["Machines:", *machine_lines(machines), "",
           "| issue | target | cases measured | worst ratio (case) | result |",
           "| --- | --- | --- | --- | --- |"]
    for r in rows:
        worst = f"{r['worst']:.2f}x ({r['worst_case']})" if r["worst"] is not None else "-"
        result = f"**{r['result']}**" + (f": {r['why']}" if r["why"] else "")
        out.append(f"| {r['issue']} | {r['target']} | {r['measured']} of {r['cases']} | {worst} | {result} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="`fastmlp bench --json` files (one machine)")
    ap.add_argument("--markdown", help="also write the report here")
    ap.add_argument("--only", default="*", help="glob over the issues to report, e.g. 12 (default: all)")
    args = ap.parse_args(argv)
    try:
        ratios, machines = load(args.results)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        print(f"cpu_targets: {e}", file=sys.stderr)
        return 2
    kinds = {(m.get("cpu"), tuple(m.get("cpu_flags", [])), (m.get("backend") or {}).get("cpu_isa")) for m in machines}
    if len(kinds) > 1:
        print(f"cpu_targets: the files come from different CPUs or fastmlp ISAs ({sorted(kinds, key=str)}); "
              "give the runs of one machine and one ISA", file=sys.stderr)
        return 2
    flags = set(machines[0].get("cpu_flags", [])) if machines else set()
    rows = [evaluate(t, ratios, flags) for t in TARGETS if fnmatch.fnmatch(str(t.issue), args.only)]
    text = report(rows, machines)
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
