"""fastmlp's benchmark suite: `pytest benchmarks/` (pytest-benchmark) or `python -m benchmarks`
(the quick runner, same as `fastmlp bench`). The measuring code lives in fastmlp/bench/."""
