"""The machine's measured float32 GEMM peak (a ceiling for the GFLOP/s columns):

    python -m benchmarks.peak [N]      # N x N x N torch.mm, single thread and all threads (default 2048)
"""

import sys

from fastmlp.bench import format_machine, machine_info, measure_peak


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else 2048
    peak = measure_peak(n)
    print(format_machine(machine_info(), peak))
    return 0


if __name__ == "__main__":
    sys.exit(main())
