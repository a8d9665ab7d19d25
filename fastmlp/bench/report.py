"""Printed reports: markdown tables of a run, notes on its conditions, the machine."""

from __future__ import annotations

import os

import torch

from .cases import BASELINES


def fmt_time(seconds):
    if seconds is None:
        return "n/a"
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_x(v):
    return "n/a" if v is None else f"{v:.2f}x"


def is_ours(result: dict, variant: str) -> bool:
    """Whether `variant` is fastmlp's own in `result` (older JSON without "ours": by its name)."""
    ours = result.get("ours")
    return variant in ours if ours is not None else variant == "fastmlp" or variant.startswith("fastmlp-")


def _variant_names(results):
    names = []
    for r in results:
        for v in r["variants"]:
            if v not in names:
                names.append(v)
    order = {"fastmlp": 0, "torch": 2, "compile": 3, "autocast": 3}

    def ours(v):
        return any(is_ours(r, v) for r in results)

    return sorted(names, key=lambda v: (order.get(v, 1 if ours(v) else 4), names.index(v)))


def markdown(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


TITLES = {
    "layer": "Layers: FusedLinearReLU vs nn.Linear+nn.ReLU",
    "bf16": "Layers under torch.autocast(bfloat16): FusedLinearReLU vs nn.Linear+nn.ReLU in float32 and under autocast",
    "train": "Training on random data (batch 64, SGD momentum 0.9)",
    "trainer": "Trainer epochs (`fastmlp train`'s own loop, default recipe), fused vs --backend torch",
    "trainer-bf16": "Trainer epochs with --precision bf16 (fastmlp), vs --backend torch in float32 and with "
                    "--precision bf16 (autocast)",
    "infer": "Inference (eval, torch.inference_mode()): FusedMLP vs the plain model",
}


def _group(r):
    if r["kind"] == "trainer" and r.get("precision") == "bf16":
        return "trainer-bf16"
    return r["kind"] if r["kind"] in ("layer", "bf16", "trainer", "infer") else "train"


def format_tables(results, peak=None, threads=None) -> str:
    """Markdown tables: layers, training, trainer epochs. Every variant of fastmlp's own gets its
    ratio against eager torch (and fastmlp's plain variant against torch.compile); the % peak column
    uses the peak at `threads` (default: torch's current number of threads)."""
    parts = []
    peak_gf = None
    if peak and "all_threads" in peak:
        th = threads or torch.get_num_threads()
        peak_gf = peak["single_thread"]["gflops"] if th == 1 else peak["all_threads"]["gflops"]
    for group in TITLES:
        rows_in = [r for r in results if _group(r) == group]
        if not rows_in:
            continue
        names = _variant_names(rows_in)
        with_flops = any(r.get("flops") for r in rows_in)
        headers = ["case", *(f"{v} median" for v in names)]
        if with_flops:
            headers += [f"{v} GFLOP/s" for v in names]
            if peak_gf:
                headers.append("fastmlp % peak")
        ours = [v for v in names if any(is_ours(r, v) for r in rows_in)]
        headers += [f"{v} x vs torch" for v in ours]
        others = [b for b in BASELINES if b != "torch" and b in names and "fastmlp" in names]
        headers += [f"fastmlp x vs {b}" for b in others]
        if group in ("layer", "bf16"):
            headers.append("mask flips")
        rows = []
        for r in rows_in:
            label = r["id"] + (f" (extrapolated from {r['timed_steps']} steps)" if r.get("extrapolated") else "")
            if r.get("data") and r["data"] != "real":
                label += " (random data)"
            vs = r["variants"]
            ok = lambda v: vs.get(v, {}).get("status") == "ok"  # noqa: E731
            row = [label, *(fmt_time(vs[v]["median_s"]) if ok(v) else vs.get(v, {}).get("status", "n/a") for v in names)]
            if with_flops:
                row += [f"{vs[v]['gflops']:.1f}" if ok(v) and vs[v].get("gflops") else "n/a" for v in names]
                if peak_gf:
                    row.append(f"{100 * vs['fastmlp']['gflops'] / peak_gf:.0f}%" if ok("fastmlp") else "n/a")
            row += [fmt_x(r.get("speedup_vs_torch", {}).get(v)) for v in ours]
            row += [fmt_x(r["speedup"].get(b)) for b in others]
            if group in ("layer", "bf16"):
                checks = r.get("checks", {})
                row.append(", ".join(f"{v} {c['mask_flips']}" for v, c in checks.items() if c.get("mask_flips")) or "0")
            rows.append(row)
        parts.append(f"### {TITLES[group]}\n\n" + markdown(headers, rows))
        na = [(r["id"], v, d) for r in rows_in for v, d in r["variants"].items() if d.get("status") == "n/a"]
        if na:  # (wrong variants are listed by format_notes)
            parts.append("\n".join(f"n/a: {cid} {v}: {d['error']}" for cid, v, d in na))
    return "\n\n".join(parts)


def wrong_variants(results) -> list[tuple[str, str, str]]:
    """(case, variant, what differed) for every variant that failed its check."""
    return [(r["id"], v, d["error"]) for r in results for v, d in r.get("variants", {}).items()
            if d.get("status") == "wrong"]


def format_notes(results, elapsed=None, machine=None) -> str:
    lines = []
    if elapsed is not None:
        lines.append(f"{len(results)} cases in {elapsed:.0f} s.")
    lines.append("Medians of per-iteration times over interleaved rounds; ratio = torch median / variant median. "
                 "Every variant was checked against PyTorch before timing (layers: output and gradients within "
                 "float32 error bounds of a float64 truth; training: losses and updates against the eager step).")
    ext = [r for r in results if r.get("extrapolated")]
    if ext:
        lines.append("Extrapolated epochs: " + ", ".join(f"{r['id']} timed {r['timed_steps']} of {r['epoch_steps']} steps"
                                                        for r in ext) + ".")
    flips = sum(c.get("mask_flips", 0) for r in results for c in (r.get("checks") or {}).values())
    if flips:
        lines.append(f"Mask flips: {flips} outputs whose pre-activation is within float32 rounding of 0 landed on the "
                     "other side of the ReLU than in the float64 truth (allowed, counted apart from errors).")
    for cid, v, err in wrong_variants(results):
        lines.append(f"FAILED: {cid}: {v} does not compute what PyTorch computes: {err}")
    loads = [(r["other_load"], r["id"]) for r in results if r.get("other_load") is not None]
    if loads:
        mean = sum(v for v, _ in loads) / len(loads)
        worst = max(loads)
        lines.append(f"Other processes used {mean:.2f} cores on average while timing (most: {worst[0]:.2f} in {worst[1]}).")
        threads = (machine or {}).get("threads") or torch.get_num_threads()
        cores = (machine or {}).get("cores") or os.cpu_count() or threads
        spare = max(0, cores - threads)  # cores torch leaves idle
        if worst[0] > spare + 0.2:
            lines.append(f"WARNING: the machine was not idle ({threads} torch threads on {cores} cores, other load up "
                         f"to {worst[0]:.2f} cores); these timings are unreliable: a descheduled thread stalls every "
                         "parallel region. Rerun on a quiet machine (or with fewer --threads).")
        elif mean > 0.2:
            lines.append(f"Note: other processes ran on the {spare} core(s) torch left idle; expect some noise.")
    return "\n".join(lines)


def format_gemm_choices(gemm) -> str:
    """Which GEMM served the CPU layer ops (fastmlp.set_gemm): the mode, and every shape "auto"
    timed both ways with the winner."""
    if not gemm:
        return ""
    lines = [f"CPU layer GEMM: {gemm['mode']}"]
    if gemm["mode"] == "auto":
        if not gemm["choices"]:
            lines[0] += " (no GEMM large enough to time against ATen's; the hand-written kernels served all)"
        else:
            lines[0] += " (GEMMs of >= 2^23 flop at batch >= 256 timed once both ways, the faster kept):"
            rows = [[c["kind"], f"{c['rows']}x{c['inner']}->{c['cols']}", c["dtype"], str(c["threads"]),
                     fmt_time(c["fastmlp_us"] * 1e-6), fmt_time(c["vendor_us"] * 1e-6),
                     "ATen (vendor)" if c["gemm"] == "vendor" else "fastmlp"] for c in gemm["choices"]]
            lines += ["", markdown(["GEMM", "C = rows x inner -> cols", "dtype", "threads", "fastmlp",
                                    "ATen + fastmlp epilogue", "serves"], rows)]
    return "\n".join(lines)


def format_machine(machine, peak=None) -> str:
    be = machine.get("backend", {})
    flags = machine.get("cpu_flags")
    lines = [
        f"CPU: {machine['cpu']} ({machine['cores']} cores available, torch threads {machine['threads']})"
        + (f"; flags: {' '.join(flags)}" if flags else ""),
        f"torch {machine['torch']}, Python {machine['python']}, {machine['platform']}",
        f"fastmlp {machine['fastmlp']}: cpu backend {be.get('cpu')}, ISA {be.get('cpu_isa', 'n/a')}"
        + (f" ({be['fallback_reason']})" if be.get("fallback_reason") else ""),
    ]
    if machine.get("loadavg") is not None:
        busy = machine.get("other_cpu_load")
        lines.append(f"load average at start: {' '.join(str(v) for v in machine['loadavg'])}"
                     + ("" if busy is None else f"; other processes were using {busy:.2f} cores"))
    if peak:
        lines.append(
            f"peak ({peak['gemm']}): single thread {peak['single_thread']['gflops']:.1f} GFLOP/s, "
            f"{peak['all_threads']['threads']} threads {peak['all_threads']['gflops']:.1f} GFLOP/s"
        )
    return "\n".join(lines)
