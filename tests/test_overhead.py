"""Host time per call: the GPU-side arithmetic of bench.timing.host_ms on a fake GPU and clock, the
harness's host-bound rows, and bench.overhead's tables (run with a tiny repeat count: not a timing)."""
import re

import pytest
import torch

from bench import harness, overhead
from bench.providers import PROVIDERS
from bench.timing import Timer, host_ms


class FakeGPU:
    """A clock in ms, a host whose calls cost `costs` ms in turn, and a GPU that sleeps when asked.

    `blocking`: the launch queue is full, so each call waits for the sleep to end (host time then
    outlasts every sleep)."""

    def __init__(self, costs, blocking=False):
        self.now, self.costs, self.blocking = 0.0, list(costs), blocking
        self.calls, self.sleeps, self.busy_until = 0, [], 0.0

    def clock(self):
        return self.now / 1e3  # seconds, as time.perf_counter

    def fn(self):
        self.now += self.costs[self.calls % len(self.costs)]
        if self.blocking:
            self.now = max(self.now, self.busy_until + 0.01)
        self.calls += 1

    def sleep(self, ms):
        self.sleeps.append(ms)
        self.busy_until = self.now + ms

    def busy(self):
        return self.now < self.busy_until

    def wait(self):
        self.now = max(self.now, self.busy_until)


def test_host_ms_is_the_host_time_per_queued_call():
    gpu = FakeGPU([0.3])
    assert host_ms(gpu.fn, gpu, n=10, reps=5, first_sleep_ms=5.0, clock=gpu.clock) == pytest.approx(0.3)
    assert gpu.calls == 50 and len(gpu.sleeps) == 5


def test_host_ms_lengthens_a_sleep_the_calls_outlast():
    gpu = FakeGPU([2.0])  # 10 calls take 20 ms: the first 5 ms sleep does not cover them
    assert host_ms(gpu.fn, gpu, n=10, reps=3, first_sleep_ms=5.0, clock=gpu.clock) == pytest.approx(2.0)
    assert gpu.sleeps[0] == 5.0 and gpu.sleeps[1] == pytest.approx(40.0)  # twice the calls' 20 ms
    assert len(gpu.sleeps) == 4 and gpu.calls == 40  # the uncovered sample is dropped


def test_host_ms_median_of_samples():
    gpu = FakeGPU([0.1] * 10 + [0.5] * 10 + [0.2] * 10)  # one sample of n=10 calls per cost
    assert host_ms(gpu.fn, gpu, n=10, reps=3, first_sleep_ms=50.0, clock=gpu.clock) == pytest.approx(0.2)


def test_host_ms_gives_up_when_no_sleep_covers_the_calls():
    gpu = FakeGPU([0.1], blocking=True)
    assert host_ms(gpu.fn, gpu, n=10, reps=3, first_sleep_ms=1.0, max_misses=4, clock=gpu.clock) is None
    assert len(gpu.sleeps) == 5


def test_host_time_is_not_measured_on_cpu():
    assert Timer(torch.device("cpu")).host_all({"f": lambda: None}) == {}
    case = harness.Case("se", (2, 8, 4, 4), "fp32", "nchw", "fwd")
    rows = harness.run_case(case, {"eager": PROVIDERS["eager"]}, Timer(torch.device("cpu"), reps=1, sample_s=0),
                            "cpu")
    assert rows[0]["status"] == "ok" and rows[0]["host_ms"] is None and not rows[0].get("note")
    assert harness.host_bound(rows) == []


class HostTimer(Timer):
    """CPU timings, and the host times a GPU run would give."""

    def __init__(self, host):
        super().__init__(torch.device("cpu"), reps=1, sample_s=0)
        self.host = host

    def host_all(self, fns):
        return {k: self.host[k] for k in fns}


def test_host_bound_rows_are_named():
    case = harness.Case("se", (2, 8, 4, 4), "fp32", "nchw", "train")
    provs = {p: PROVIDERS[p] for p in ("eager", "reference")}
    rows = harness.run_case(case, provs, HostTimer({"eager": 1e-9, "reference": 1e3}), "cpu")
    by = {r["provider"]: r for r in rows}
    assert by["eager"]["host_ms"] == 1e-9 and not by["eager"].get("note")
    assert by["reference"]["host_ms"] == 1e3 and by["reference"]["note"].startswith("host-bound: ")
    lines = harness.host_bound(rows)
    assert len(lines) == 1 and lines[0].startswith("se 2x8x4x4 fp32 nchw train reference: 1e+03 ms to issue")


def test_overhead_prints_every_layer_and_the_floor(tmp_path, capsys):
    from attnfused.backends import extension

    if extension.unavailable_reason("cpu") is not None:
        pytest.skip("the cpu backend is unavailable here")
    out = tmp_path / "overhead.txt"
    assert overhead.main(["--reps", "1", "--sample-s", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    number = r"[+-]?\d+\.\d"
    for name in overhead.BLOCKS.values():
        for mode in ("fwd", "train"):
            layers = rf"\s+{number}" * len(overhead.LAYERS)  # the kernel, the five layers over it, eager
            assert re.search(rf"^{name}\s+{mode}{layers}\s+\d+\.\d\dx$", text, re.M), (name, mode, text)
    assert re.search(rf"^fwd\s+{number}(\s+{number}){{3}}$", text, re.M), text
    assert re.search(rf"^train\s+{number}(\s+{number}){{2}}$", text, re.M), text
