"""Paired A/B timing of the CPU many-step op in float32 and in bf16 arithmetic (bf16=True), for machines
whose speed drifts within minutes: the two variants alternate every half epoch in one process, and the
median of the paired ratios is reported.

    python benchmarks/step_ab.py [--model mnist|fashion] [--pairs 12]

An epoch is 60000 random samples in chunks of 32 batches of 64 (as the trainer calls the op), SGD with
momentum 0.9; the ratio is bf16 time / float32 time.
"""

import argparse
import statistics
import time

import torch

import fastmlp  # noqa: F401  (registers the ops)

SIZES = {"mnist": [784, 128, 64, 10], "fashion": [784, 256, 10]}
SAMPLES, CHUNK, BATCH = 60000, 32 * 64, 64


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=SIZES, default="mnist")
    ap.add_argument("--pairs", type=int, default=12, help="pairs of half epochs per half (default 12)")
    args = ap.parse_args()
    sizes = SIZES[args.model]
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, i, generator=gen) / i**0.5 for i, o in zip(sizes[:-1], sizes[1:])]
    bs = [torch.zeros(o) for o in sizes[1:]]
    bufs = ([torch.zeros_like(w) for w in ws], [torch.zeros_like(b) for b in bs])
    x = torch.randn(SAMPLES, sizes[0], generator=gen) * 0.5
    y = torch.randint(0, sizes[-1], (SAMPLES,), generator=gen)
    half = SAMPLES // 2

    def run(part, bf16):
        start = time.perf_counter()
        for c in range(part * half, (part + 1) * half, CHUNK):
            rows = min(CHUNK, (part + 1) * half - c)
            lrs = [0.01] * -(-rows // BATCH)
            torch.ops.fastmlp.mlp_sgd_steps(x[c:c + rows], y[c:c + rows], BATCH, ws, bs, *bufs, lrs, 0.9, 0.0,
                                            bf16=bf16)
        return time.perf_counter() - start

    run(0, False), run(0, True)  # warm-up
    f32, b16, ratios = [], [], []
    for _ in range(args.pairs):
        for part in range(2):
            a, b = run(part, False), run(part, True)
            f32.append(a), b16.append(b), ratios.append(b / a)
    q = statistics.quantiles(ratios, n=4)
    print(f"{args.model}: float32 {2e3 * statistics.median(f32):.1f} ms/epoch, bf16 {2e3 * statistics.median(b16):.1f} "
          f"ms/epoch; paired bf16/float32 median {statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f}, "
          f"{len(ratios)} pairs; {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
