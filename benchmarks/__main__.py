"""python -m benchmarks [options]: the benchmark runner (same as `fastmlp bench`, see --help)."""

import sys

from fastmlp.bench import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m benchmarks"))
