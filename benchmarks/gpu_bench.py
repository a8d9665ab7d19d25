"""GPU benchmark: fastmlp's fused Linear+ReLU CUDA kernels against F.linear + relu on cuBLAS.

    python benchmarks/gpu_bench.py [--reps 15] [--json out.json]

Times forward and forward+backward (grads of input, weight and bias) of one layer with CUDA events,
reporting the median over --reps timed batches (each batch runs enough iterations to take about
--batch-ms milliseconds). The hand-written kernels are enabled with FASTMLP_CUDA_KERNELS=1 before
fastmlp is imported. TF32 is off for float32 in both (torch's default), so float32 compares the
exact-FP32 CUDA-core path with cuBLAS FP32.

Verification, before timing: the fused forward and backward (output, and the gradients of input,
weight and bias) are checked elementwise against F.linear + relu evaluated in float64 on the same
inputs, within rigorous rounding bounds: an FP32-accumulated sum of n products is within
(n + 2) * eps32 * (the same sum of absolute values) of the exact sum, plus eps(dtype) * |result|
for the one rounding to the output dtype. The gradients are checked against the float64 truth
computed with the fused kernel's own ReLU mask. An output on the other side of the ReLU from the
float64 pre-activation counts as a mask flip when that pre-activation is within its bound of 0
(rounding may put it on either side; not an error), as a real error otherwise. A case with a real
error is printed as FAILED (which quantity, how many elements, the worst one and its bound), is
not timed and gets no ratio, and the script exits with status 1. The JSON rows hold both counts
(errors, mask_flips). Exit status: 0 when every case passed, 1 when one failed, 2 without a CUDA
GPU or without fastmlp's CUDA kernels.
"""

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

# 512-2048 rows bracket the crossover of the vendor-GEMM rule (csrc/cuda/launch.h: 2^28 flop).
CASES = [(64, 784, 256), (512, 784, 256), (1024, 784, 256), (2048, 784, 256), (8192, 784, 256), (65536, 1024, 1024)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EPS32 = torch.finfo(torch.float32).eps


def check_layer(x, w, b, gy, y, gx, gw, gb):
    """Checks a fused Linear+ReLU result y = relu(x @ w.T + b) and the gradients gx, gw, gb of
    sum(y * gy) (any of them None: not checked) against the float64 truth on the same inputs, within
    the rounding bounds of the module docstring. Any device, no CUDA needed. Returns
    {"errors", "mask_flips", "elements", "problems": [one line per quantity with errors]}."""
    dtype = y.dtype
    eps_out = torch.finfo(dtype).eps
    eps_acc = torch.finfo(torch.float64).eps if dtype == torch.float64 else EPS32  # FP32 accumulation
    x64, w64, gy64 = x.detach().double(), w.detach().double(), gy.detach().double()
    m, k = x64.shape
    n = w64.shape[0]
    z = x64 @ w64.T
    zb = (k + 2) * eps_acc * (x64.abs() @ w64.abs().T)
    if b is not None:
        b64 = b.detach().double()
        z = z + b64
        zb = zb + (k + 2) * eps_acc * b64.abs()
    out = dict(errors=0, mask_flips=0, elements=0, problems=[])

    def count(name, got, truth, acc_bound):
        bound = acc_bound + eps_out * (truth.abs() + acc_bound)
        got = got.detach().double()
        out["elements"] += truth.numel()
        if got.shape != truth.shape:
            out["errors"] += max(1, truth.numel())
            out["problems"].append(f"{name}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}")
            return
        err = (got - truth).abs()
        bad = ~(err <= bound)  # NaN is bad
        nbad = int(bad.sum())
        if nbad:
            out["errors"] += nbad
            ratio = torch.where(bad, err / bound.clamp_min(1e-300), torch.zeros_like(err)).nan_to_num(float("inf"))
            i = int(ratio.flatten().argmax())
            out["problems"].append(
                f"{name}: {nbad} of {truth.numel()} elements outside the rounding bound (worst at flat index {i}: "
                f"{got.flatten()[i].item():.6g} vs {truth.flatten()[i].item():.6g}, "
                f"bound {bound.flatten()[i].item():.3g})")

    on = y.detach() > 0  # the fused kernel's mask: its bit is set exactly where the stored output is > 0
    flip = on != (z > 0)
    near = z.abs() <= zb
    out["mask_flips"] = int((flip & near).sum())
    wrong_side = int((flip & ~near).sum())
    if wrong_side:
        out["errors"] += wrong_side
        out["problems"].append(f"relu: {wrong_side} outputs on the wrong side of 0 "
                               "(pre-activation beyond rounding of 0)")
    count("output", y, torch.where(on, z, torch.zeros_like(z)), zb)
    dz = gy64 * on
    if gx is not None:
        count("grad_input", gx, dz @ w64, (n + 2) * eps_acc * (dz.abs() @ w64.abs()))
    if gw is not None:
        count("grad_weight", gw, dz.T @ x64, (m + 2) * eps_acc * (dz.abs().T @ x64.abs()))
    if gb is not None and b is not None:
        count("grad_bias", gb, dz.sum(0), (m + 2) * eps_acc * dz.abs().sum(0))
    return out


def fastmlp_with_cuda_kernels(prog):
    """The fastmlp module serving CUDA tensors with its own kernels, TF32 off; None (after saying why
    on stderr) without a CUDA GPU or without those kernels."""
    if not torch.cuda.is_available():
        print(f"{prog}: no CUDA GPU (torch.cuda.is_available() is False); this benchmark needs one", file=sys.stderr)
        return None
    os.environ["FASTMLP_CUDA_KERNELS"] = "1"  # read by fastmlp when first imported: its CUDA kernels
    import fastmlp

    if fastmlp.backend("cuda") != "compiled":
        print(f"{prog}: the CUDA kernels are not active: {fastmlp.backend_info()}", file=sys.stderr)
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    return fastmlp


def ms_per_call(fn, reps, batch_ms):
    """Median ms per call of fn over `reps` batches of calls sized to about batch_ms each, CUDA events
    around each batch (host overhead counts)."""
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
    import fastmlp

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

    # Verification before timing: the fused forward and backward against F.linear + relu in float64.
    x.grad = w.grad = b.grad = None
    y_f = fused()
    y_f.backward(gy)
    check = check_layer(x, w, b, gy, y_f, x.grad, w.grad, b.grad)
    x.grad = w.grad = b.grad = None
    with torch.no_grad():  # the largest difference from torch's own result, relative to its largest output
        y_p = plain()
        err = ((y_f.float() - y_p.float()).abs().max() / y_p.float().abs().max().clamp_min(1e-6)).item()
    del y_f, y_p
    row = dict(case=f"{m}x{k}->{n}", dtype=str(dtype).split(".")[-1], rel_err=err, errors=check["errors"],
               mask_flips=check["mask_flips"], elements=check["elements"], problems=check["problems"])
    if check["errors"]:
        return row
    row["torch_fwd_ms"] = ms_per_call(fwd(plain), reps, batch_ms)
    row["fused_fwd_ms"] = ms_per_call(fwd(fused), reps, batch_ms)
    row["torch_fwdbwd_ms"] = ms_per_call(fwd_bwd(plain), reps, batch_ms)
    row["fused_fwdbwd_ms"] = ms_per_call(fwd_bwd(fused), reps, batch_ms)
    flops = 2 * m * k * n
    row["fused_fwd_tflops"] = flops / row["fused_fwd_ms"] / 1e9
    row["fused_fwdbwd_tflops"] = 3 * flops / row["fused_fwdbwd_ms"] / 1e9
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batch-ms", type=float, default=20.0)
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated subset of {','.join(DTYPES)}")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    unknown = [name for name in args.dtypes.split(",") if name not in DTYPES]
    if unknown:
        ap.error(f"--dtypes: unknown {','.join(unknown)} (choose from {','.join(DTYPES)})")
    dtypes = {name: DTYPES[name] for name in args.dtypes.split(",")}

    fastmlp = fastmlp_with_cuda_kernels("gpu_bench")
    if fastmlp is None:
        return 2
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  fastmlp {fastmlp.backend_info()}"
          f"  FASTMLP_CUDA_SPLITK={os.environ.get('FASTMLP_CUDA_SPLITK', '0')}")

    rows = []
    for dname, dtype in dtypes.items():
        for m, k, n in CASES:
            rows.append(_bench_case(m, k, n, dtype, args.reps, args.batch_ms))
            torch.cuda.empty_cache()

    hdr = (
        f"{'case':>18} {'dtype':>8} | {'fwd torch':>9} {'fwd fused':>9} {'x':>5} | "
        f"{'f+b torch':>9} {'f+b fused':>9} {'x':>5} | {'TFLOP/s f+b':>11} | {'rel err':>8} | verified"
    )
    print("\nmedian ms per call (x = torch time / fused time; > 1 means fused is faster)")
    print(hdr)
    print("-" * len(hdr))
    failures = []
    for r in rows:
        if r["errors"]:
            why = "; ".join(r["problems"])
            print(f"{r['case']:>18} {r['dtype']:>8} | FAILED: {r['errors']} errors, "
                  f"{r['mask_flips']} mask flips: {why}")
            failures.append(f"FAILED: {r['case']} {r['dtype']}: {r['errors']} of {r['elements']} elements wrong "
                            f"({r['mask_flips']} mask flips apart): {why}")
            continue
        print(
            f"{r['case']:>18} {r['dtype']:>8} | {r['torch_fwd_ms']:9.4f} {r['fused_fwd_ms']:9.4f} "
            f"{r['torch_fwd_ms'] / r['fused_fwd_ms']:5.2f} | {r['torch_fwdbwd_ms']:9.4f} "
            f"{r['fused_fwdbwd_ms']:9.4f} {r['torch_fwdbwd_ms'] / r['fused_fwdbwd_ms']:5.2f} | "
            f"{r['fused_fwdbwd_tflops']:11.1f} | {r['rel_err']:8.1e} | ok, {r['mask_flips']} mask flips"
        )
    for line in failures:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
