"""GPU benchmark: fastmlp's fused Linear+ReLU CUDA kernels against F.linear + relu on cuBLAS.

    python benchmarks/gpu_bench.py [--reps 15] [--json out.json]

Times forward and forward+backward (grads of input, weight and bias) of one layer with CUDA events,
reporting the median over --reps timed batches (each batch runs enough iterations to take about
--batch-ms milliseconds). The hand-written kernels are enabled with FASTMLP_CUDA_KERNELS=1 before
fastmlp is imported. TF32 is off for float32 in both (torch's default), so float32 compares the
exact-FP32 CUDA-core path with cuBLAS FP32.
"""

import argparse
import json
import os
import statistics
import sys

os.environ["FASTMLP_CUDA_KERNELS"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastmlp  # noqa: E402

CASES = [(64, 784, 256), (8192, 784, 256), (65536, 1024, 1024)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ms_per_iter(fn, reps, batch_ms):
    fn()
    torch.cuda.synchronize()
    # Size the batch so that one timed batch takes about batch_ms.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    end.synchronize()
    per = max(start.elapsed_time(end) / 3, 1e-3)
    iters = max(1, min(1000, int(batch_ms / per)))
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def _bench_case(m, k, n, dtype, reps, batch_ms):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    w = (torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) / k**0.5).requires_grad_()
    b = torch.randn(n, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    gy = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)

    def fused():
        return fastmlp.functional.linear_relu(x, w, b)

    def plain():
        return torch.relu(F.linear(x, w, b))

    def fwd(f):
        def run():
            with torch.no_grad():
                f()

        return run

    def fwd_bwd(f):
        def run():
            x.grad = w.grad = b.grad = None
            f().backward(gy)

        return run

    # Agreement check (not a test: just flags a broken kernel in the table).
    with torch.no_grad():
        y_f, y_p = fused(), plain()
        err = ((y_f.float() - y_p.float()).abs().max() / y_p.float().abs().max().clamp_min(1e-6)).item()

    row = dict(case=f"{m}x{k}->{n}", dtype=str(dtype).split(".")[-1], rel_err=err)
    row["torch_fwd_ms"] = _ms_per_iter(fwd(plain), reps, batch_ms)
    row["fused_fwd_ms"] = _ms_per_iter(fwd(fused), reps, batch_ms)
    row["torch_fwdbwd_ms"] = _ms_per_iter(fwd_bwd(plain), reps, batch_ms)
    row["fused_fwdbwd_ms"] = _ms_per_iter(fwd_bwd(fused), reps, batch_ms)
    flops = 2 * m * k * n
    row["fused_fwd_tflops"] = flops / row["fused_fwd_ms"] / 1e9
    row["fused_fwdbwd_tflops"] = 3 * flops / row["fused_fwdbwd_ms"] / 1e9
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batch-ms", type=float, default=20.0)
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated subset of {','.join(DTYPES)}")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    dtypes = {name: DTYPES[name] for name in args.dtypes.split(",")}

    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU", file=sys.stderr)
        return 2
    if fastmlp.backend("cuda") != "compiled":
        print(f"gpu_bench: the CUDA kernels are not active: {fastmlp.backend_info()}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  fastmlp {fastmlp.backend_info()}"
          f"  FASTMLP_CUDA_SPLITK={os.environ.get('FASTMLP_CUDA_SPLITK', '0')}")

    rows = []
    for dname, dtype in dtypes.items():
        for m, k, n in CASES:
            rows.append(_bench_case(m, k, n, dtype, args.reps, args.batch_ms))
            torch.cuda.empty_cache()

    hdr = (
        f"{'case':>18} {'dtype':>8} | {'fwd torch':>9} {'fwd fused':>9} {'x':>5} | "
        f"{'f+b torch':>9} {'f+b fused':>9} {'x':>5} | {'TFLOP/s f+b':>11} | {'rel err':>8}"
    )
    print("\nmedian ms per call (x = torch time / fused time; > 1 means fused is faster)")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['case']:>18} {r['dtype']:>8} | {r['torch_fwd_ms']:9.4f} {r['fused_fwd_ms']:9.4f} "
            f"{r['torch_fwd_ms'] / r['fused_fwd_ms']:5.2f} | {r['torch_fwdbwd_ms']:9.4f} "
            f"{r['fused_fwdbwd_ms']:9.4f} {r['torch_fwdbwd_ms'] / r['fused_fwdbwd_ms']:5.2f} | "
            f"{r['fused_fwdbwd_tflops']:11.1f} | {r['rel_err']:8.1e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
