"""fastmlp's CPU layer GEMMs against the vendor GEMMs, in GFLOP/s, at the layer shapes.

    python benchmarks/gemm_vs_vendor.py [--shapes 64x784x256,8192x784x256] [--rounds 25] [--isa avx512]
                                        [--json PATH]

For each layer (batch x in -> out) and each of its three GEMMs, times in one process, interleaved,
medians of --rounds rounds:
  fastmlp  the hand-written kernel (FASTMLP_GEMM=fastmlp: never the vendor GEMM), through the op a
           layer calls: forward = linear_relu_fwd (GEMM + bias + ReLU + mask), dX / dW =
           linear_relu_bwd asked for that gradient only (so it includes the dReLU pass over gy);
  MKL      ATen's GEMM, what eager PyTorch runs: relu(addmm) forward, mm for dX and dW;
  oneDNN   oneDNN's matmul through torch.ops.mkldnn._linear_pointwise (bias + ReLU fused in the
           forward), given operands laid out the way it likes best (copies made before timing);
           absent where this torch build lacks the op.
On AMD CPUs MKL takes its AVX2 path even where the CPU has AVX-512; oneDNN picks its kernels by the
CPU's features, so its column is the AVX-512 vendor level there (what MKL reaches on Intel).
Every result is checked against a float64 truth before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

DEFAULT_SHAPES = "64x784x256,64x784x128,64x128x64,64x256x10,1024x784x256,8192x784x256,8192x784x128,8192x128x64"


def onednn_linear():
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None:
        return None
    try:
        op(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4), "relu", [], "")
    except Exception:  # noqa: BLE001 - a build without oneDNN, or another schema
        return None
    return lambda a, w, b, post: op(a, w, b, post, [], "")


def check(name, got, truth, k):
    # float32 sums of k products: error bound ~ k * eps * sum |terms|, loosely
    tol = 1e-5 * k ** 0.5 * truth.abs().max().item() + 1e-6
    err = (got.double() - truth).abs().max().item()
    if err > 10 * tol:
        raise SystemExit(f"{name}: max error {err:.3g} against the float64 truth (tolerance {10 * tol:.3g})")


def time_medians(fns: dict, rounds: int) -> dict:
    """Median seconds per call of each function: fastmlp bench's interleaved rounds (chunks sized for
    about 2 ms of the first function, the variants' order rotating every round, no GC)."""
    from fastmlp.bench.timing import calibrate, interleave, summarize

    def sampler(f):
        def run(n):
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                f()
                times.append(time.perf_counter() - t0)
            return times
        return run

    samplers = {name: sampler(f) for name, f in fns.items()}
    n = calibrate(next(iter(samplers.values())), 2e-3)
    return {name: summarize(r)["median_s"] for name, r in interleave(samplers, n, rounds).items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="batch x in x out, comma-separated")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--isa", default="auto", help="fastmlp.set_cpu_isa")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
        if any(len(s) != 3 or min(s) < 1 for s in shapes):
            raise ValueError
    except ValueError:
        ap.error(f"--shapes: expected comma-separated BATCHxINxOUT of positive integers, got {args.shapes!r}")
    import fastmlp  # here, not at import: tests load this module before choosing fastmlp's settings

    if args.threads:
        torch.set_num_threads(args.threads)
    fastmlp.set_cpu_isa(args.isa)
    fastmlp.set_gemm("fastmlp")
    ops = torch.ops.fastmlp
    dnn = onednn_linear()
    info = fastmlp.backend_info()
    from fastmlp.bench.machine import cpu_flags, cpu_model

    cpu, isas = cpu_model(), cpu_flags()
    print(f"CPU: {cpu} ({' '.join(isas)}), {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"fastmlp ISA {info['cpu_isa']}; oneDNN column: {'yes' if dnn else 'absent'}")
    print("GFLOP/s (medians of interleaved rounds); ratio = fastmlp / best vendor\n")
    print("| layer | GEMM | fastmlp | MKL (ATen) | oneDNN | fastmlp / best vendor |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    torch.manual_seed(0)
    for m, k, n in shapes:
        shape = f"{m}x{k}x{n}"
        x, w, b = torch.randn(m, k), torch.randn(n, k) / k ** 0.5, torch.randn(n) * 0.1
        gy = torch.randn(m, n)
        y, mask = ops.linear_relu_fwd(x, w, b)
        xd, wd, bd, gyd = x.double(), w.double(), b.double(), gy.double()
        zd = torch.addmm(bd, xd, wd.t())
        dzd = gyd * (y > 0)  # the op's own ReLU decisions (a pre-activation within rounding of 0 may flip)
        check(f"{shape} forward", y, zd.clamp_min(0), k)
        dx, _, _ = ops.linear_relu_bwd(gy, x, w, mask, [True, False, False])
        _, dw, _ = ops.linear_relu_bwd(gy, x, w, mask, [False, True, False])
        check(f"{shape} dX", dx, dzd @ wd, n)
        check(f"{shape} dW", dw, dzd.t() @ xd, m)
        dz = gy * (y > 0)
        wt, dzt, xt = w.t().contiguous(), dz.t().contiguous(), x.t().contiguous()
        check(f"{shape} MKL forward", torch.relu(torch.addmm(b, x, w.t())), zd.clamp_min(0), k)
        gemms = {
            "forward": ({"fastmlp": lambda: ops.linear_relu_fwd(x, w, b),
                         "mkl": lambda: torch.relu(torch.addmm(b, x, w.t()))},
                        (lambda: dnn(x, w, b, "relu")) if dnn else None, zd.clamp_min(0), k),
            "dX": ({"fastmlp": lambda: ops.linear_relu_bwd(gy, x, w, mask, [True, False, False]),
                    "mkl": lambda: torch.mm(dz, w)},
                   (lambda: dnn(dz, wt, None, "none")) if dnn else None, dzd @ wd, n),
            "dW": ({"fastmlp": lambda: ops.linear_relu_bwd(gy, x, w, mask, [False, True, False]),
                    "mkl": lambda: torch.mm(dz.t(), x)},
                   (lambda: dnn(dzt, xt, None, "none")) if dnn else None, dzd.t() @ xd, m),
        }
        flop = 2 * m * k * n
        for gemm, (fns, dnn_fn, truth, depth) in gemms.items():
            if dnn_fn is not None:
                check(f"{shape} oneDNN {gemm}", dnn_fn(), truth, depth)
                fns = dict(fns, onednn=dnn_fn)
            t = time_medians(fns, args.rounds)
            g = {name: flop / s / 1e9 for name, s in t.items()}
            best = max(v for name, v in g.items() if name != "fastmlp")
            dnn_txt = f"{g['onednn']:.0f}" if "onednn" in g else "-"
            print(f"| {m}x{k}->{n} | {gemm} | {g['fastmlp']:.0f} | {g['mkl']:.0f} | {dnn_txt} | "
                  f"**{g['fastmlp'] / best:.2f}x** |", flush=True)
            rows.append({"shape": shape, "gemm": gemm, "gflops": g, "us": {n_: s * 1e6 for n_, s in t.items()}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "flags": isas, "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "isa": info["cpu_isa"], "machine": platform.platform(), "rows": rows}, f, indent=1)
        print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
