"""The machine a benchmark ran on: CPU model, other load, peak GEMM speed."""

from __future__ import annotations

import math
import os
import platform
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction-set flags that decide which kernels run (fastmlp's and MKL's).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """ISA_FLAGS present in /proc/cpuinfo ([] where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [fl for fl in ISA_FLAGS if fl in have]
    except OSError:
        pass
    return []


class LoadMonitor:
    """Cores' worth of CPU used by everything but this process (other processes, and the hypervisor's
    steal time) between start() and stop(): all CPUs' busy time from /proc/stat minus this process's
    own CPU time. None where /proc/stat is unavailable.

    With torch's default of one thread per core, any such load makes timings swing wildly (OpenMP
    regions wait for a descheduled thread), so the runner records it for every case."""

    def __init__(self):
        self._s = None

    @staticmethod
    def _sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(vals[:8]) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system

    def start(self):
        try:
            self._s = self._sample()
        except (OSError, ValueError, IndexError, AttributeError):
            self._s = None
        return self

    def stop(self) -> float | None:
        if self._s is None:
            return None
        try:
            w1, b1, o1 = self._sample()
        except (OSError, ValueError, IndexError, AttributeError):
            return None
        w0, b0, o0 = self._s
        if w1 - w0 <= 0:
            return None
        return round(max(0.0, ((b1 - b0) - (o1 - o0)) / (w1 - w0)), 2)


def other_cpu_load(seconds: float = 0.3) -> float | None:
    """Cores' worth of CPU used by other processes over `seconds` (see LoadMonitor)."""
    mon = LoadMonitor().start()
    time.sleep(seconds)
    return mon.stop()


def machine_info() -> dict:
    import fastmlp

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fastmlp": getattr(fastmlp, "__version__", "?"),
        "backend": fastmlp.backend_info(),
        "loadavg": load,
        "other_cpu_load": other_cpu_load(),
    }
    return info


def measure_peak(n: int = 2048, seconds: float = 1.0) -> dict:
    """GFLOP/s of a large float32 torch.mm (n x n x n), single-thread and all threads: a ceiling for
    the GFLOP/s columns. Best of repeated runs (peak, not median)."""
    threads_before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    c = torch.empty(n, n)
    flops = 2.0 * n * n * n
    out = {"gemm": f"{n}x{n}x{n} float32 torch.mm", "flops": flops}
    try:
        for label, threads in (("single_thread", 1), ("all_threads", cores)):
            torch.set_num_threads(threads)
            torch.mm(a, b, out=c)  # warm-up
            best = math.inf
            t_end = time.perf_counter() + seconds
            reps = 0
            while reps < 3 or time.perf_counter() < t_end:
                t0 = time.perf_counter()
                torch.mm(a, b, out=c)
                best = min(best, time.perf_counter() - t0)
                reps += 1
            out[label] = {"threads": threads, "gflops": flops / best / 1e9, "best_ms": best * 1e3, "reps": reps}
    finally:
        torch.set_num_threads(threads_before)
    return out
