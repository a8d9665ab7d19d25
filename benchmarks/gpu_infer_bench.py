"""GPU benchmark: a whole course MLP's forward for inference (eval, torch.inference_mode()), FusedMLP
(one op, mlp_forward: up to 64 rows one kernel, else the layer GEMMs) against the plain
nn.Linear/nn.ReLU model on cuBLAS.

    python benchmarks/gpu_infer_bench.py [--reps 9] [--batch-ms 10] [--json out.json]

Cases: 784-128-64-10 and 784-256-10 at batch 1, 8, 64 (the largest one-kernel batch), 65 and 1024,
float32 (TF32 off) and bfloat16. Each case first checks FusedMLP's output against a float64 truth
(no further from it than 4x the plain model's own error, fastmlp.bench.verify.check_output); a case
that fails is printed FAILED, gets no ratio, and the script exits 1. Times: median over --reps
batches of calls sized to about --batch-ms, CUDA events around each batch, so host overhead counts,
as it does when serving. "x" = plain time / FusedMLP time (> 1: fastmlp faster).
Exit status: 0 when every case passed its check, 1 when one failed, 2 without a CUDA GPU.
"""

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import fastmlp_with_cuda_kernels, ms_per_call  # noqa: E402  (a sibling script)

MODELS = {"784-128-64-10": (784, 128, 64, 10), "784-256-10": (784, 256, 10)}
BATCHES = (1, 8, 64, 65, 1024)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ms_per_call(fn, reps, batch_ms):
    with torch.inference_mode():
        return ms_per_call(fn, reps, batch_ms)


def bench_case(name, batch, dtype, reps, batch_ms):
    import fastmlp
    from fastmlp.bench.verify import check_output

    torch.manual_seed(batch)
    sizes = MODELS[name]
    plain = fastmlp.plain_mlp(sizes).cuda().to(dtype).eval()
    fused = fastmlp.FusedMLP(sizes, device="cuda", dtype=dtype).eval()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(batch, sizes[0], device="cuda", dtype=dtype)
    with torch.inference_mode():
        reference, ours = plain(x), fused(x)
        truth = copy.deepcopy(plain).double()(x.double())
    row = {"model": name, "batch": batch, "dtype": str(dtype).replace("torch.", "")}
    row["problem"] = check_output(ours.float().cpu(), reference.float().cpu(), truth.cpu())
    if not row["problem"]:
        row["torch_ms"] = _ms_per_call(lambda: plain(x), reps, batch_ms)
        row["fastmlp_ms"] = _ms_per_call(lambda: fused(x), reps, batch_ms)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--batch-ms", type=float, default=10.0)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    fastmlp = fastmlp_with_cuda_kernels("gpu_infer_bench")
    if fastmlp is None:
        return 2
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  fastmlp {fastmlp.backend_info()}")
    rows = [bench_case(m, b, d, args.reps, args.batch_ms) for d in DTYPES.values() for m in MODELS for b in BATCHES]
    print("\nmedian us per forward (x = plain model's time / FusedMLP's; > 1: fastmlp faster)")
    print(f"{'model':>14} {'dtype':>9} {'batch':>6} | {'torch':>9} {'fastmlp':>9} {'x':>6}")
    for r in rows:
        head = f"{r['model']:>14} {r['dtype']:>9} {r['batch']:>6} |"
        if r["problem"]:
            print(f"{head} FAILED: {r['problem']}")
        else:
            ratio = r["torch_ms"] / r["fastmlp_ms"]
            print(f"{head} {1e3 * r['torch_ms']:9.2f} {1e3 * r['fastmlp_ms']:9.2f} {ratio:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r["problem"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
