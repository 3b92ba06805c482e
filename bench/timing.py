"""Timers (docs/contract.md §6): medians, after warm-up, with the compile/first-call cost excluded.

GPU: CUDA events through `triton.testing.do_bench` (median, L2 flushed before every call);
the warm-L2 figure (no flush) is taken apart with CUDA events around each call.
CPU: wall-clock medians of samples that each run the function enough times to last
`sample_s`, interleaved across the providers of a case; the caches are not flushed (the
large shapes do not fit them anyway). The minimum is kept too: on a shared machine it is
the figure least disturbed by other processes.

Host time to issue one call (GPU only, `host_ms`): n calls queued behind a `torch.cuda._sleep`
that keeps the GPU busy longer than the host takes to issue them, timed on the host and divided
by n. The GPU cannot make the host wait (no kernel of the calls has started), so the figure is
the host's own work: Python, dispatch, allocations, launches. `host_ms(...)` holds the arithmetic
and takes the GPU side as an object (`CudaQueue`; the tests pass a fake one and a fake clock).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Timer:
    device: torch.device
    reps: int = 10          # CPU samples / the floor of CUDA-event samples
    sample_s: float = 0.02  # CPU: minimum duration of one sample
    warmup_s: float = 0.05  # CPU: warm-up time after the first calls
    rep_ms: int = 100       # GPU: do_bench's measuring time
    warmup_calls: int = 2   # CPU: least calls after the first, before sampling
    warm_l2: bool = True    # GPU: also take the warm-L2 figure
    host_calls: int = 10    # GPU: calls queued behind one sleep (their launches must fit the launch queue)
    host_reps: int = 5      # GPU: samples of host time per median
    # CPU: the clock of the samples; time.thread_time (this thread's CPU time) leaves out the time the
    # OS gives other processes, for single-threaded work only
    clock: Callable[[], float] = time.perf_counter
    _cpu_warm: bool = field(default=False, repr=False)

    def time_all(self, fns: dict[str, Callable[[], object]]) -> dict[str, dict[str, float | None]]:
        """{name: {"median": ms, "min": ms, "warm": warm-L2 median ms (GPU) or None}}.

        On CPU the functions' samples are interleaved round-robin, so that load from other
        processes on a shared machine falls on every provider (and the copy) alike."""
        if self.device.type == "cuda":
            out = {}
            for k, f in fns.items():
                median, low = _cuda_cold(f, self.rep_ms)
                out[k] = {"median": median, "min": low,
                          "warm": _cuda_warm(f, self.reps, self.rep_ms) if self.warm_l2 else None}
            return out
        if not self._cpu_warm:  # the run's first case: its first samples run cold (thread pool, heap
            self._cpu_warm = True  # growth, clocks) and came out up to 2x slow; sample it twice
            _cpu(fns, self.reps, self.sample_s, self.warmup_s, self.warmup_calls, self.clock)
        return _cpu(fns, self.reps, self.sample_s, self.warmup_s, self.warmup_calls, self.clock)

    def host_all(self, fns: dict[str, Callable[[], object]]) -> dict[str, float | None]:
        """{name: host ms to issue one call} on a GPU (None where no sleep covered the calls); {} on CPU."""
        if self.device.type != "cuda":
            return {}
        queue = CudaQueue(self.device)
        return {k: host_ms(f, queue, self.host_calls, self.host_reps) for k, f in fns.items()}


class CudaQueue:
    """The GPU side of `host_ms`: keep the device busy, ask whether it still is, wait for it."""

    _cycles_per_ms: dict[torch.device, float] = {}  # per device, for the whole run

    def __init__(self, device: torch.device):
        self.device = device
        self._after_sleep = None

    def cycles_per_ms(self) -> float:
        if self.device not in self._cycles_per_ms:  # the sleep counts GPU clock cycles: calibrate once
            cycles = 10_000_000
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(cycles // 10)  # clocks up
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            self._cycles_per_ms[self.device] = cycles / max(start.elapsed_time(end), 1e-3)
        return self._cycles_per_ms[self.device]

    def sleep(self, ms: float) -> None:
        torch.cuda._sleep(max(1, int(ms * self.cycles_per_ms())))
        self._after_sleep = torch.cuda.Event()
        self._after_sleep.record()

    def busy(self) -> bool:
        """The sleep is still running (so none of the calls queued after it has started)."""
        return not self._after_sleep.query()

    def wait(self) -> None:
        torch.cuda.synchronize(self.device)


def host_ms(fn: Callable[[], object], queue, n: int = 10, reps: int = 5, first_sleep_ms: float = 5.0,
            max_misses: int = 8, clock: Callable[[], float] = time.perf_counter) -> float | None:
    """Median over `reps` samples of the host ms per call, each sample `n` calls issued while the GPU
    sleeps. A sample whose calls outlast the sleep is dropped and the next sleep lasts twice as long
    as those calls took; after `max_misses` such samples the figure is None (the launch queue was
    full: fewer calls `n` would fit)."""
    sleep_ms, samples, misses = first_sleep_ms, [], 0
    while len(samples) < reps:
        queue.wait()
        queue.sleep(sleep_ms)
        t0 = clock()
        for _ in range(n):
            fn()
        issue_ms = 1e3 * (clock() - t0)
        covered = queue.busy()
        queue.wait()
        if covered:
            samples.append(issue_ms / n)
        else:
            misses += 1
            if misses > max_misses:
                return None
        sleep_ms = max(sleep_ms, 2 * issue_ms)
    return statistics.median(samples)


def _cpu(fns, reps: int, sample_s: float, warmup_s: float, warmup_calls: int, clock=time.perf_counter):
    inner = {}
    for k, fn in fns.items():
        fn()
        t0, n = clock(), 0
        while n < max(1, warmup_calls) or clock() - t0 < warmup_s:
            fn()
            n += 1
        inner[k] = max(1, round(sample_s / ((clock() - t0) / n)))
    samples = {k: [] for k in fns}
    order = list(fns)
    for r in range(reps):
        for k in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
            fn, n = fns[k], inner[k]
            t = clock()
            for _ in range(n):
                fn()
            samples[k].append((clock() - t) / n)
    return {k: {"median": 1e3 * statistics.median(v), "min": 1e3 * min(v), "warm": None}
            for k, v in samples.items()}


def _cuda_cold(fn, rep_ms: int) -> tuple[float, float]:
    """(median, min) in ms, L2 flushed before every call."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _cuda_events(fn, max(10, rep_ms // 2), flush=True)
    median, low = do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.0])
    return float(median), float(low)


def _cuda_warm(fn, reps: int, rep_ms: int) -> float:
    # as many calls as fit in rep_ms (like do_bench), at least `reps`
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    n = max(reps, min(1000, int(rep_ms / max(start.elapsed_time(end) / 5, 1e-3))))
    return _cuda_events(fn, n, flush=False)[0]


_FLUSH: torch.Tensor | None = None


def _cuda_events(fn, n: int, flush: bool) -> tuple[float, float]:
    """(median, min) ms over n calls, each between its own pair of CUDA events."""
    global _FLUSH
    if flush and _FLUSH is None:
        _FLUSH = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")  # > any L2 today
    for _ in range(3):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        if flush:
            _FLUSH.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return statistics.median(times), min(times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
