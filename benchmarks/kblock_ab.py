"""Two K blocks of the CPU GEMMs against each other on this machine, paired in one process:

    python benchmarks/kblock_ab.py [--blocks 128 400] [--rounds 12] [--json PATH]

Each round times every case under block A and under block B back to back (which goes first
alternates), and each ratio is B's time over A's within a round, so a machine whose speed drifts
within minutes cancels out (processes started minutes apart on the pool's VMs differ by up to 2x).
Cases: a batch-64 layer forward + backward at 784 -> 256 and 784 -> 128 and an 8192-row forward at
784 -> 256 (the autograd layer ops, FASTMLP_GEMM=fastmlp), and half an epoch of each trainer model's
whole step (mlp_sgd_steps on random data, batch 64, chunks of 32 batches as the trainer makes them).
The block changes no bit of any result (checked here first, and by tests/test_k_block.py); only
speed is compared. A block that wins everywhere here belongs in avx512_float_k_block
(csrc/cpu/dispatch.cpp) for this kind of CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import fastmlp
from fastmlp import _ops

LAYERS = [("fwdbwd", 64, 784, 256), ("fwdbwd", 64, 784, 128), ("fwd", 8192, 784, 256)]
MODELS = {"mnist": [784, 128, 64, 10], "fashion": [784, 256, 10]}
EPOCH_ROWS = 30000  # half an epoch


def cases():
    """name -> (run, result): `run` runs the case once; `result` returns what it computes (checked to be
    the same bits under both blocks before anything is timed)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for pass_, m, k, n in LAYERS:
        layer = fastmlp.FusedLinearReLU(k, n)
        x = torch.randn(m, k, generator=gen).requires_grad_(pass_ == "fwdbwd")
        gy = torch.randn(m, n, generator=gen)
        params = [x, *layer.parameters()]

        def result(layer=layer, x=x, gy=gy, params=params, backward=pass_ == "fwdbwd"):
            y = layer(x)
            return [y.detach(), *torch.autograd.grad(y, params, gy)] if backward else [y.detach()]

        out[f"layer/{m}x{k}x{n}/{pass_}"] = (result, result)
    for name, sizes in MODELS.items():
        ws = [torch.randn(o, i, generator=gen) / i**0.5 for i, o in zip(sizes[:-1], sizes[1:])]
        bs = [torch.zeros(o) for o in sizes[1:]]
        bufs = ([torch.zeros_like(w) for w in ws], [torch.zeros_like(b) for b in bs])
        x = torch.randn(EPOCH_ROWS, sizes[0], generator=gen) * 0.5
        y = torch.randint(0, sizes[-1], (EPOCH_ROWS,), generator=gen)

        def steps(ws, bs, bufs, x=x, y=y, rows=EPOCH_ROWS):
            for c in range(0, rows, 2048):
                n = min(2048, rows - c)
                torch.ops.fastmlp.mlp_sgd_steps(x[c:c + n], y[c:c + n], 64, ws, bs, *bufs, [0.01] * -(-n // 64),
                                                0.9, 0.0)

        def result(ws=ws, bs=bs, bufs=bufs, steps=steps):  # one chunk from copies of the same start
            ws2, bs2 = [w.clone() for w in ws], [b.clone() for b in bs]
            bufs2 = tuple([t.clone() for t in ts] for ts in bufs)
            steps(ws2, bs2, bufs2, rows=2048)
            return ws2 + bs2 + bufs2[0] + bufs2[1]

        out[f"half-epoch/{name}"] = (lambda ws=ws, bs=bs, bufs=bufs, steps=steps: steps(ws, bs, bufs), result)
    return out


def timed(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, nargs=2, default=[128, 400], metavar=("A", "B"))
    ap.add_argument("--rounds", type=int, default=12, help="paired rounds (default 12)")
    ap.add_argument("--json", help="write the ratios and times here")
    args = ap.parse_args(argv)
    if _ops._C is None:
        raise SystemExit("kblock_ab: fastmlp's compiled kernels are not importable")
    a, b = args.blocks
    runs = cases()
    times = {name: {a: [], b: []} for name in runs}
    gemm_mode = fastmlp.backend_info()["gemm"]
    fastmlp.set_gemm("fastmlp")
    try:
        for block in (a, b):
            _ops._C.set_cpu_k_block(block)  # refuses a block that is not a multiple of 16 from 16 to 1024
        for name, (_, result) in runs.items():
            got = {}
            for block in (a, b):
                _ops._C.set_cpu_k_block(block)
                got[block] = result()
            if not all(torch.equal(x, y) for x, y in zip(got[a], got[b])):
                raise SystemExit(f"kblock_ab: {name} computes different bits with K blocks {a} and {b}")
        # Calls per timing: about 0.1 s of work (one call for the half epochs).
        reps = {name: max(1, int(0.1 / timed(fn, 2))) for name, (fn, _) in runs.items()}
        for r in range(args.rounds):
            for name, (fn, _) in runs.items():
                for block in ((a, b) if r % 2 == 0 else (b, a)):
                    _ops._C.set_cpu_k_block(block)
                    times[name][block].append(timed(fn, reps[name]))
    finally:
        _ops._C.set_cpu_k_block(0)
        fastmlp.set_gemm(gemm_mode)
    info = fastmlp.backend_info()
    print(f"K block {b} vs {a} ({info['cpu_isa']} kernels, {torch.get_num_threads()} threads, {args.rounds} "
          f"paired rounds; ratio = time with {b} / time with {a}, median and quartiles of the rounds; this CPU's "
          f"own block: {info['cpu_k_block']})")
    print(f"| case | K block {a} | K block {b} | ratio | quartiles |\n| --- | --- | --- | --- | --- |")
    result = {"blocks": [a, b], "isa": info["cpu_isa"], "cpu_k_block": info["cpu_k_block"], "cases": {}}
    for name, t in times.items():
        ratios = [y / x for x, y in zip(t[a], t[b])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        ta, tb = statistics.median(t[a]), statistics.median(t[b])
        result["cases"][name] = {"a_s": ta, "b_s": tb, "ratio": statistics.median(ratios), "q1": q[0], "q3": q[2]}
        print(f"| {name} | {ta * 1e3:.3f} ms | {tb * 1e3:.3f} ms | {statistics.median(ratios):.3f} | "
              f"{q[0]:.3f}-{q[2]:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
