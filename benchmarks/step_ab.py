"""Paired A/B timing of the CPU many-step op, for machines whose speed drifts within minutes: the two
variants alternate every half epoch in one process, and the median of the paired ratios is reported.

    python benchmarks/step_ab.py [--model mnist|fashion] [--pairs 12]          # float32 vs bf16=True
    python benchmarks/step_ab.py --isas avx512 avx512-bf16                      # bf16=True, ISA vs ISA

An epoch is 60000 random samples in chunks of 32 batches of 64 (as the trainer calls the op), SGD with
momentum 0.9; the ratio is B's time / A's.
"""

import argparse
import statistics
import time

import torch

import fastmlp

SIZES = {"mnist": [784, 128, 64, 10], "fashion": [784, 256, 10]}
SAMPLES, CHUNK, BATCH = 60000, 32 * 64, 64


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=SIZES, default="mnist")
    ap.add_argument("--pairs", type=int, default=12, help="pairs of half epochs per half (default 12)")
    ap.add_argument("--isas", nargs=2, metavar=("A", "B"), help="compare the bf16 step under two CPU ISAs")
    args = ap.parse_args()
    # variant -> (CPU ISA or None, bf16)
    a, b = ((args.isas[0], True), (args.isas[1], True)) if args.isas else ((None, False), (None, True))
    names = args.isas or ["float32", "bf16"]
    sizes = SIZES[args.model]
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, i, generator=gen) / i**0.5 for i, o in zip(sizes[:-1], sizes[1:])]
    bs = [torch.zeros(o) for o in sizes[1:]]
    bufs = ([torch.zeros_like(w) for w in ws], [torch.zeros_like(b) for b in bs])
    x = torch.randn(SAMPLES, sizes[0], generator=gen) * 0.5
    y = torch.randint(0, sizes[-1], (SAMPLES,), generator=gen)
    half = SAMPLES // 2

    def run(part, variant):
        isa, bf16 = variant
        if isa:
            fastmlp.set_cpu_isa(isa)
        start = time.perf_counter()
        for c in range(part * half, (part + 1) * half, CHUNK):
            rows = min(CHUNK, (part + 1) * half - c)
            lrs = [0.01] * -(-rows // BATCH)
            torch.ops.fastmlp.mlp_sgd_steps(x[c:c + rows], y[c:c + rows], BATCH, ws, bs, *bufs, lrs, 0.9, 0.0,
                                            bf16=bf16)
        return time.perf_counter() - start

    run(0, a), run(0, b)  # warm-up
    ta, tb, ratios = [], [], []
    for _ in range(args.pairs):
        for part in range(2):
            x_a, x_b = run(part, a), run(part, b)
            ta.append(x_a), tb.append(x_b), ratios.append(x_b / x_a)
    q = statistics.quantiles(ratios, n=4)
    print(f"{args.model}: {names[0]} {2e3 * statistics.median(ta):.1f} ms/epoch, {names[1]} "
          f"{2e3 * statistics.median(tb):.1f} ms/epoch; paired {names[1]}/{names[0]} median "
          f"{statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f}, {len(ratios)} pairs; "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
