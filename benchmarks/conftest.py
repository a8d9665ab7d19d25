"""pytest-benchmark plumbing for the fastmlp benchmarks (run with `pytest benchmarks/`; plain `pytest`
runs only tests/).

Each case (a layer shape and pass, or a model's training step or epoch) is measured once, all
variants interleaved in the same process on the same inputs (fastmlp.bench); every variant's test
then hands its interleaved samples to pytest-benchmark, so pytest-benchmark's table (grouped by case)
and its --benchmark-json/--benchmark-compare show the same numbers as the runner. A summary table
with speed-ups is printed at the end; --fastmlp-json writes it in the runner's format (usable with
`fastmlp bench --compare`).
"""

import datetime as _dt
import time

import pytest
import torch

from fastmlp import bench


def pytest_addoption(parser):
    g = parser.getgroup("fastmlp benchmarks")
    g.addoption("--fastmlp-repeat", type=int, default=60, help="interleaved timed rounds per case (default 60)")
    g.addoption("--fastmlp-epoch-rounds", type=int, default=7, help="timed rounds of the epoch cases (default 7)")
    g.addoption("--fastmlp-chunk-ms", type=float, default=2.0, help="target duration of one timed chunk")
    g.addoption("--fastmlp-epoch-steps", type=int, default=None,
                help="time this many steps per epoch and extrapolate to 938 (default: whole epochs)")
    g.addoption("--fastmlp-epoch-budget", type=float, default=150.0,
                help="seconds an epoch case may take before it is extrapolated from fewer steps (0: never)")
    g.addoption("--fastmlp-threads", type=int, default=None, help="torch.set_num_threads(N)")
    g.addoption("--fastmlp-timer", choices=sorted(bench.TIMERS), default="wall",
                help="wall (default) or cpu: process CPU time, steadier on a shared machine with --fastmlp-threads 1")
    g.addoption("--fastmlp-no-compile", action="store_true", help="skip the torch.compile variants")
    g.addoption("--fastmlp-no-peak", action="store_true", help="skip the peak GEMM measurement")
    g.addoption("--fastmlp-data", default=None, metavar="ROOT",
                help="trainer cases: the datasets' root (MNIST/raw, FashionMNIST/raw); default: fastmlp.data's search")
    g.addoption("--fastmlp-json", default=None, metavar="PATH", help="write the results in `fastmlp bench --json` format")


class BenchSession:
    """Measures each case once (lazily, in test order) and keeps the results."""

    def __init__(self, config):
        opt = config.getoption
        if opt("--fastmlp-threads"):
            torch.set_num_threads(opt("--fastmlp-threads"))
        variants = None
        if opt("--fastmlp-no-compile"):
            every = dict.fromkeys([*bench.LAYER_VARIANTS, *bench.STEP_VARIANTS, *bench.INFER_VARIANTS])
            variants = [v for v in every if v != "compile"]
        self.settings = bench.Settings(
            rounds=opt("--fastmlp-repeat"),
            chunk_s=opt("--fastmlp-chunk-ms") / 1e3,
            epoch_rounds=opt("--fastmlp-epoch-rounds"),
            epoch_steps=opt("--fastmlp-epoch-steps"),
            epoch_budget_s=opt("--fastmlp-epoch-budget") or None,
            variants=variants,
            timer=opt("--fastmlp-timer"),
            data_root=opt("--fastmlp-data"),
        )
        self.runner = bench.Runner(self.settings)
        self.results = {}
        self.machine = None
        self.peak = None
        self.want_peak = not opt("--fastmlp-no-peak")
        self.t0 = time.perf_counter()

    def start(self):
        if self.machine is None:
            self.machine = bench.machine_info()
            if self.want_peak:
                self.peak = bench.measure_peak()

    def get(self, case_id):
        self.start()
        if case_id not in self.results:
            try:
                self.results[case_id] = self.runner.run(case_id)
            except Exception as e:  # noqa: BLE001 - reported on every test of the case
                self.results[case_id] = {"id": case_id, "kind": case_id.split("/")[0], "variants": {},
                                         "speedup": {}, "error": bench.error_text(e)}
        return self.results[case_id]

    def record(self, benchmark, case_id, variant):
        r = self.get(case_id)
        if "error" in r:
            pytest.fail(f"{case_id}: {r['error']}")
        v = r["variants"].get(variant)
        if v is None:
            pytest.skip(f"{variant} not run")
        if v["status"] == "wrong":
            pytest.fail(f"{case_id} {variant} does not compute what PyTorch computes: {v['error']}")
        if v["status"] != "ok":
            pytest.skip(f"{case_id} {variant}: n/a ({v['error']})")
        benchmark.group = case_id
        benchmark.extra_info.update(
            case=case_id,
            variant=variant,
            median_us=round(v["median_us"], 3),
            gflops=None if v["gflops"] is None else round(v["gflops"], 3),
            flops=r["flops"],
            speedup_vs_torch=r["speedup"].get("torch"),
            speedup_vs_compile=r["speedup"].get("compile"),
            interleaved_with=sorted(k for k, d in r["variants"].items() if d["status"] == "ok"),
        )
        if r.get("extrapolated"):
            benchmark.extra_info["extrapolated_from_steps"] = r["timed_steps"]
        if benchmark.disabled:
            return
        feed(benchmark, v["samples_s"], v["iterations"])


def feed(benchmark, per_iter_samples, iterations):
    """Gives pytest-benchmark externally measured (interleaved) samples: chunk durations of
    `iterations` calls each. Uses pytest-benchmark's internals (checked with 4.x/5.x); where they are
    missing, falls back to timing nothing and keeping the samples in extra_info only."""
    make_stats = getattr(benchmark, "_make_stats", None)
    if make_stats is None or getattr(benchmark, "_mode", None):
        benchmark.extra_info["samples_s"] = per_iter_samples
        benchmark.pedantic(lambda: None, rounds=1)
        return
    benchmark._mode = "interleaved samples (fastmlp.bench)"
    stats = make_stats(iterations)
    for t in per_iter_samples:
        stats.update(t * iterations)


@pytest.fixture(scope="session")
def fastmlp_bench(request):
    return request.config._fastmlp_bench


def pytest_configure(config):
    config._fastmlp_bench = BenchSession(config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    sess = getattr(config, "_fastmlp_bench", None)
    if sess is None or not sess.results:
        return
    sess.runner.release()
    results = [r for r in sess.results.values() if "error" not in r]
    tr = terminalreporter
    tr.section("fastmlp: interleaved medians and speed-ups")
    tr.write_line(bench.format_machine(sess.machine, sess.peak))
    tr.write_line("")
    tr.write_line(bench.format_tables(results, sess.peak))
    for r in sess.results.values():
        if "error" in r:
            tr.write_line(f"FAILED {r['id']}: {r['error']}")
    elapsed = time.perf_counter() - sess.t0
    tr.write_line("")
    tr.write_line(bench.format_notes(results, elapsed, sess.machine))
    path = config.getoption("--fastmlp-json")
    if path:
        doc = {
            "schema": bench.SCHEMA,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["pytest", *config.invocation_params.args]),
            "mode": "pytest",
            "machine": sess.machine,
            "peak": sess.peak,
            "settings": bench.settings_record(sess.settings, elapsed),
            "results": list(sess.results.values()),
        }
        bench.write_json(path, doc)
        tr.write_line(f"results written to {path}")
