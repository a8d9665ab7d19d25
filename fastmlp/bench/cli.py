"""`fastmlp bench`: argument parsing, the run, its JSON and its exit status.

Exit status: 0 when every case ran and every variant passed its check; 1 when a case failed, a
variant computed something other than PyTorch (reported FAILED with what differed), or, with
--fail-on-regression, --compare flagged a case; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

import torch

from .cases import QUICK_CASES, all_case_ids, select_cases
from .compare import compare
from .inference import INFER_VARIANTS
from .layers import BF16_LAYER_VARIANTS, LAYER_VARIANTS
from .machine import machine_info, measure_peak
from .report import fmt_time, format_gemm_choices, format_machine, format_notes, format_tables, wrong_variants
from .runner import Runner, Settings
from .timing import TIMERS
from .training import STEP_VARIANTS, TRAINER_VARIANTS
from .variants import configure_dynamo, error_text

SCHEMA = "fastmlp-bench/2"  # 2: per-variant checks ("wrong" status), "ours", trainer cases, no targets


def _parser(prog):
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark fastmlp's fused kernels against eager PyTorch and torch.compile "
        "(same process, same inputs, interleaved rounds, medians).",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the quick subset (default): " + ", ".join(QUICK_CASES))
    mode.add_argument("--full", action="store_true", help="every case (layer fwd/bwd/fwdbwd at every shape, step, epoch)")
    p.add_argument("--cases", action="append", metavar="PATTERNS",
                   help="comma-separated case-id globs or substrings (see --list); overrides --quick/--full")
    p.add_argument("--list", action="store_true", help="print the case ids and exit")
    p.add_argument("--show", metavar="JSON", help="print the tables of a saved run (--json output) and exit; "
                   "with --compare, compare it instead of a new run")
    p.add_argument("--json", metavar="PATH", help="write the results to PATH")
    p.add_argument("--compare", metavar="OLD_JSON", help="compare with an earlier --json output and flag regressions")
    p.add_argument("--threshold", type=float, default=0.10, help="relative change flagged by --compare (default 0.10)")
    p.add_argument("--criteria", choices=("both", "ratio", "median"), default="both",
                   help="what --compare flags: a speed-up ratio that dropped, a fastmlp median that grew, or "
                   "both (default)")
    p.add_argument("--fail-on-regression", action="store_true", help="exit with status 1 when --compare flags a case")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(N) (default: torch's default)")
    p.add_argument("--timer", choices=sorted(TIMERS), default="wall",
                   help="wall: elapsed time (default); cpu: this process's CPU time, with --threads 1 a steadier "
                   "measure on a machine shared with other work")
    p.add_argument("--repeat", type=int, help="timed interleaved rounds per case (default 30 quick, 60 full; "
                   "epoch cases use a sixth of it, at least 3)")
    p.add_argument("--chunk-ms", type=float, default=2.0, help="target duration of one timed chunk (default 2 ms)")
    p.add_argument("--epoch-steps", type=int, help="time this many steps per epoch and extrapolate to 938")
    p.add_argument("--epoch-budget", type=float, help="seconds an epoch case may take before it is extrapolated from "
                   "fewer steps (default 45 quick, 150 full; 0: never)")
    p.add_argument("--variants", help="comma-separated subset of variants (fastmlp,torch,compile,autocast,...)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--no-peak", action="store_true", help="skip the peak GEMM measurement")
    p.add_argument("--data", metavar="ROOT", help="trainer cases: the root holding MNIST/raw and FashionMNIST/raw "
                   "(default: fastmlp.data's search, $FASTMLP_DATA then ./data; a random stand-in when not found)")
    return p


def main(argv=None, prog="fastmlp bench") -> int:
    args = _parser(prog).parse_args(argv)
    if args.list:
        quick = set(select_cases(QUICK_CASES))
        for cid in all_case_ids():
            print(cid + ("   [quick]" if cid in quick else ""))
        return 0
    if args.show:
        with open(args.show) as f:
            doc = json.load(f)
        print(show(doc))
        if args.compare:
            with open(args.compare) as f:
                regressions, report = compare(json.load(f), doc, args.threshold, args.criteria)
            print()
            print(report)
            return 1 if regressions and args.fail_on_regression else 0
        return 0
    threads_before = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args, argv, prog)
    finally:
        torch.set_num_threads(threads_before)


def _selection(args):
    """(mode, case-id patterns) from --cases / --full / --quick (the default)."""
    if args.cases:
        return "cases", [p for group in args.cases for p in group.split(",")]
    if args.full:
        return "full", None
    return "quick", QUICK_CASES


def _settings(args, mode) -> Settings:
    variants = None
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.no_compile:
        every = dict.fromkeys([*LAYER_VARIANTS, *BF16_LAYER_VARIANTS, *STEP_VARIANTS, *INFER_VARIANTS,
                               *(v for registry in TRAINER_VARIANTS.values() for v in registry)])
        variants = [v for v in (variants or every) if v != "compile"]
    rounds = args.repeat or (60 if mode == "full" else 30)
    return Settings(
        rounds=rounds,
        chunk_s=args.chunk_ms / 1e3,
        epoch_rounds=max(min(3, rounds), rounds // 6),
        epoch_steps=args.epoch_steps,
        epoch_budget_s=args.epoch_budget if args.epoch_budget is not None else (150.0 if mode == "full" else 45.0),
        variants=variants,
        timer=args.timer,
        data_root=args.data,
    )


def settings_record(settings: Settings, elapsed: float) -> dict:
    """The "settings" entry of the JSON document."""
    return {"rounds": settings.rounds, "epoch_rounds": settings.epoch_rounds, "chunk_s": settings.chunk_s,
            "epoch_steps": settings.epoch_steps, "epoch_budget_s": settings.epoch_budget_s,
            "variants": settings.variants, "timer": settings.timer, "data_root": settings.data_root,
            "threads": torch.get_num_threads(), "elapsed_s": elapsed}


def run_case(runner: Runner, cid: str) -> dict:
    """Runs one case, printing a line (and a FAILED line per wrong variant); a case that raises is
    recorded with its error, so that one broken case does not lose the others."""
    t0 = time.perf_counter()
    try:
        r = runner.run(cid)
    except Exception as e:  # noqa: BLE001
        print(f"  {cid}: FAILED {error_text(e)}", flush=True)
        return {"id": cid, "kind": cid.split("/")[0], "variants": {}, "speedup": {}, "error": error_text(e)}
    cells = [f"{v} {fmt_time(d['median_s'])}" if d["status"] == "ok" else f"{v} {d['status'].upper()}"
             for v, d in r["variants"].items()]
    sp = ", ".join(f"{v} x{x:.2f}" for v, x in r["speedup_vs_torch"].items() if v in r["ours"])
    print(f"  {cid}: {'; '.join(cells)}  {sp + ' vs torch' if sp else ''}  ({time.perf_counter() - t0:.1f} s)",
          flush=True)
    for v, d in r["variants"].items():
        if d["status"] == "wrong":
            print(f"  FAILED {cid}: {v} does not compute what PyTorch computes: {d['error']}", flush=True)
    return r


def _run(args, argv, prog) -> int:
    configure_dynamo()
    mode, patterns = _selection(args)
    case_ids = select_cases(patterns)
    if not case_ids:
        print(f"no case matches {patterns}; see --list", file=sys.stderr)
        return 2
    settings = _settings(args, mode)
    if args.timer == "cpu" and torch.get_num_threads() != 1:
        print("warning: --timer cpu sums the CPU time of all threads; use it with --threads 1", file=sys.stderr)
    old = None
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)

    t_start = time.perf_counter()
    machine = machine_info()
    print(f"fastmlp bench ({mode}: {len(case_ids)} cases, {settings.rounds} interleaved rounds per case, "
          f"epoch {settings.epoch_rounds} rounds, {settings.timer} timer)", flush=True)
    peak = None if args.no_peak else measure_peak()
    print(format_machine(machine, peak), flush=True)
    if (machine.get("other_cpu_load") or 0) > 0.2:
        print("warning: other processes are using the CPU; timings will be noisy (fewer --threads helps)", flush=True)
    runner = Runner(settings)
    results = [run_case(runner, cid) for cid in case_ids]
    runner.release()

    good = [r for r in results if "error" not in r]
    elapsed = time.perf_counter() - t_start
    gemm = _gemm_record()
    print("\n" + format_tables(good, peak) + "\n\n" + format_gemm_choices(gemm) + "\n\n"
          + format_notes(good, elapsed, machine))
    doc = {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([prog, *(argv if argv is not None else sys.argv[1:])]), "mode": mode,
           "machine": machine, "peak": peak, "settings": settings_record(settings, elapsed), "results": results,
           "gemm": gemm}
    if args.json:
        write_json(args.json, doc)
        print(f"results written to {args.json}")
    status = 1 if any("error" in r for r in results) or wrong_variants(results) else 0
    if old is not None:
        regressions, report = compare(old, doc, args.threshold, args.criteria)
        print("\n" + report)
        if regressions and args.fail_on_regression:
            status = 1
    return status


def _gemm_record():
    """The CPU layer GEMM mode and the shapes "auto" timed, after the cases ran (None without the extension)."""
    import fastmlp

    if fastmlp.backend("cpu") != "compiled":
        return None
    return {"mode": fastmlp.backend_info()["gemm"], "choices": fastmlp.gemm_choices()}


def show(doc) -> str:
    """The printed report of a saved run."""
    good = [r for r in doc.get("results", []) if "error" not in r]
    parts = [f"command: {doc.get('command')}  ({doc.get('created')})",
             format_machine(doc["machine"], doc.get("peak")), "",
             format_tables(good, doc.get("peak"), doc["machine"].get("threads")), "",
             format_gemm_choices(doc.get("gemm")), "",
             format_notes(good, doc.get("settings", {}).get("elapsed_s"), doc["machine"])]
    parts += [f"FAILED {r['id']}: {r['error']}" for r in doc.get("results", []) if "error" in r]
    return "\n".join(parts)


def write_json(path, doc):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")

