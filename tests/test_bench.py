"""Smoke tests of the benchmark harness (bench/) on tiny shapes: the parity check passes
correct providers and reports a wrong one without timing it; the CSV header is exact."""
from __future__ import annotations

import csv
import json
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from attnfused.accuracy import GRAD_TOLERANCE, TOLERANCE
from attnfused.backends import extension
from bench import harness, report
from bench.__main__ import main as bench_main
from bench.providers import PROVIDERS, Provider
from bench.timing import Timer

HEADER = "device,torch,triton,commit,date,block,shape,dtype,layout,mode,provider,median_ms,copy_ms".split(",")
FAST = Timer(torch.device("cpu"), reps=2, sample_s=0.0, warmup_s=0.0)


class _Counted(nn.Module):
    """Wraps a module, counts calls, optionally scales the output (a wrong kernel)."""

    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        self.inner, self.scale, self.calls = inner, scale, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x) * self.scale


def _provider(name: str, scale: float, built: list) -> Provider:
    def build(block, channels, ref):
        m = _Counted(PROVIDERS["eager"].build(block, channels, ref), scale)
        built.append(m)
        return m
    return Provider(name, build, lambda device, dtype: None)


@pytest.mark.parametrize("mode", harness.MODES)
@pytest.mark.parametrize("layout", list(harness.LAYOUTS))
def test_parity_passes_and_wrong_is_not_timed(mode, layout):
    built: list = []
    providers = {"eager": PROVIDERS["eager"], "reference": PROVIDERS["reference"],
                 "good": _provider("good", 1.0, built), "bad": _provider("bad", 1.0 + 1e-3, built)}
    case = harness.Case("cbam_fc", (2, 32, 6, 5), "fp32", layout, mode)
    rows = {r["provider"]: r for r in harness.run_case(case, providers, FAST, "cpu", seed=1)}
    for name in ("eager", "reference", "good"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["rel_err"] <= r["tol"], r
        # the bound is the float32 target, or twice PyTorch's own float32 error where larger (docs/contract.md §4),
        # which only gradients reach here: far below the wrong provider's 1e-3 either way
        assert r["tol"] <= (TOLERANCE[torch.float32] if mode == "fwd" else GRAD_TOLERANCE[torch.float32]), r
        assert r["median_ms"] > 0 and r["copy_ms"] > 0
        assert (r.get("saved_bytes") or 0) > 0 or mode == "fwd"
    assert rows["good"]["speedup_eager"] > 0
    bad = rows["bad"]
    assert bad["status"] == "WRONG" and "not timed" in bad["note"]
    assert bad.get("median_ms") is None and bad["rel_err"] > bad["tol"]
    good_mod, bad_mod = built
    assert bad_mod.calls == 1  # the parity call only
    assert good_mod.calls > 1


def test_failing_provider_is_an_error_row():
    def build(block, channels, ref):
        raise RuntimeError("no kernel here")
    providers = {"eager": PROVIDERS["eager"], "broken": Provider("broken", build, lambda d, t: None)}
    rows = harness.run_case(harness.Case("se", (1, 16, 4, 4), "fp32", "nchw", "fwd"), providers, FAST, "cpu")
    broken = next(r for r in rows if r["provider"] == "broken")
    assert broken["status"] == "ERROR" and "no kernel here" in broken["note"] and broken.get("median_ms") is None


def test_unavailable_provider_says_why():
    assert harness.unavailable("eager", "cpu", torch.float32) is None
    assert "unknown provider" in harness.unavailable("nope", "cpu", torch.float32)
    assert harness.unavailable("compile-max", "cpu", torch.float32)  # GPU only
    if not torch.cuda.is_available():
        assert harness.unavailable("cuda", "cpu", torch.float32)


def test_cli_writes_exact_csv_header_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = bench_main(["--blocks", "se,spatial", "--shapes", "tiny", "--batch", "2", "--modes", "fwd,bwd",
                     "--layouts", "nchw,cl", "--providers", "eager,reference", "--reps", "2", "--sample-s", "0",
                     "--out", str(tmp_path), "--name", "t", "--no-progress"])
    assert rc == 0
    with open(tmp_path / "t.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:len(HEADER)] == HEADER
    assert header == harness.COLUMNS
    rows = report.read_csv(tmp_path / "t.csv")
    assert len(rows) == 2 * 2 * 2 * 2 and all(r["status"] == "ok" for r in rows)
    assert {r["device"] for r in rows} == {rows[0]["device"]} and rows[0]["torch"] == torch.__version__
    assert (tmp_path / "README.md").exists() and list(tmp_path.glob("t_speedup_*.png"))
    out = capsys.readouterr().out
    assert "provider" in out and "reference" in out
    assert report.markdown(rows).count("\n") == 2 * 2 * 2 + 1


def test_cli_rejects_unknown_names():
    with pytest.raises(SystemExit):
        bench_main(["--blocks", "nope", "--no-progress"])
    with pytest.raises(SystemExit):
        bench_main(["--shapes", "12x", "--no-progress"])


def test_device_readme_lists_each_run_with_its_own_files(tmp_path):
    """A stem that prefixes another (b128, b128_s34) gets only its own CSV and plots."""
    meta = {"device": "dev", "torch": "t", "triton": "tr", "commit": "c", "date": "d"}
    for stem, note in (("b128", "cut off"), ("b128_s34", None)):
        (tmp_path / f"{stem}.json").write_text(json.dumps(dict(meta, note=note)))
        (tmp_path / f"{stem}.csv").write_text("x\n")
        (tmp_path / f"{stem}_speedup_fp16_n128.png").write_bytes(b"")
    text = report.write_device_readme(tmp_path).read_text()
    first, second = text.split("## b128_s34")
    assert "b128_s34" not in first and "- note: cut off" in first and "[b128.csv](b128.csv)" in first
    assert "[b128_s34.csv](b128_s34.csv)" in second and "note" not in second


@pytest.mark.cuda
def test_profile_kernels_prints_every_case(capsys):
    from bench import profile_kernels

    profile_kernels.main(["--blocks", "cbam_fc", "--backends", "cuda", "--shapes", "2x32x8x8", "--layouts",
                          "cl", "--calls", "2", "--top", "3"])
    out = capsys.readouterr().out
    for mode in ("fwd", "train"):
        line = next(l for l in out.splitlines() if l.startswith(f"== cbam_fc cuda {mode} 2x32x8x8 cl"))
        assert float(line.split(": ")[1].split()[0]) > 0


@pytest.mark.skipif(extension.unavailable_reason("cpu") is not None, reason="the probe is a C++ extension op")
def _host_work_rows(out: str) -> dict:
    rows = {}
    for line in out.splitlines()[2:]:
        block, backend, mode, *cols = line.split(None, 7)
        rows[block, backend, mode] = cols
    return rows


def test_host_work_counts_the_ops_each_call_dispatches(capsys):
    """On CPU: each row counts the ATen ops of one call. The fused backend issues a handful (its C++ op
    and its allocations), the reference backend's plain ops many more, and training more than inference."""
    from bench import host_work

    host_work.main(["--device", "cpu", "--blocks", "se,cbam_fc", "--backends", "cpu,reference"])
    rows = _host_work_rows(capsys.readouterr().out)
    assert len(rows) == 2 * 2 * 2
    aten = {k: int(v[2]) for k, v in rows.items()}
    for block in ("se", "cbam_fc"):
        assert 0 < aten[block, "cpu", "fwd"] < aten[block, "cpu", "train"]
        for mode in ("fwd", "train"):
            assert 3 * aten[block, "cpu", mode] <= aten[block, "reference", mode], (block, mode, aten)


@pytest.mark.cuda
def test_host_work_on_the_gpu(capsys):
    from bench import host_work

    host_work.main(["--blocks", "cbam_fc", "--backends", "cuda", "--shape", "2x32x8x8"])
    rows = _host_work_rows(capsys.readouterr().out)
    for mode in ("fwd", "train"):
        kernels, copies, aten, allocs, sync = rows["cbam_fc", "cuda", mode]
        assert int(kernels) > 0 and int(allocs) > 0 and sync == "none", rows


def test_traffic_bench_writes_its_table(tmp_path, capsys):
    from bench.traffic import ITEMS, main as traffic_main

    assert traffic_main(["--shapes", "2x32x6x5", "--layouts", "nchw,cl", "--reps", "2", "--sample-s", "0",
                         "--out", str(tmp_path), "--name", "t"]) == 0
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["layout"], r["item"]) for r in rows] == [(lo, i) for lo in ("nchw", "cl") for i in ITEMS]
    assert all(float(r["median_ms"]) > 0 and float(r["copies"]) > 0 for r in rows)
    assert "eager fwd / 5" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())["command"].startswith("python -m bench.traffic")


_PROBE = Path(__file__).resolve().parent.parent / "bench" / "cpu_probe.c"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("gcc") is None,
                    reason="bench/cpu_probe.c is x86-64 (AVX2, FMA) and is built with gcc")
def test_cpu_probe_builds_and_reports(tmp_path):
    """The machine probe that bench/results/cpu-AMD-EPYC-2c/NOTES.md quotes compiles with its own
    header's command, prints a positive rate per thread for each test, and refuses bad arguments."""
    exe = tmp_path / "cpu_probe"
    header_cmd = next(line[2:].split() for line in _PROBE.read_text().splitlines() if line.startswith("//   gcc "))
    paths = {"bench/cpu_probe.c": str(_PROBE), "/tmp/cpu_probe": str(exe)}
    subprocess.run([paths.get(tok, tok) for tok in header_cmd] + ["-Wall", "-Werror"], check=True)
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or "avx2" not in cpuinfo.read_text():
        pytest.skip("no AVX2 here to run it (or no /proc/cpuinfo to tell)")
    for args, unit in [(["2", "fma"], "FMA lanes per ns"), (["1", "read", "0"], "GB/s read"),
                       (["1", "ntwrite"], "GB/s written"), (["1", "scale", "256"], "GB/s written"),
                       (["1", "pool", "1024", "8"], "GB/s read")]:
        out = subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout.splitlines()
        assert len(out) == int(args[0]), out
        for line in out:
            test, rate, got_unit = line.split(" ", 2)
            assert test == args[1] and got_unit == unit and float(rate) > 0, line
    bad_args = (["1"], ["0", "fma"], ["1", "nothing"], ["1", "scale", "3"], ["1", "pool", "1000", "8"],
                ["1", "pool", "1024"])
    for bad in bad_args:
        r = subprocess.run([str(exe), *bad], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr, (bad, r)


def test_cli_without_matplotlib_or_tqdm_writes_table_and_csv(tmp_path, capsys, monkeypatch):
    """Without matplotlib (and tqdm) the run still writes its table, CSV, JSON and README, and says
    in one line how to get the plots, instead of raising at the end."""
    import sys

    for mod in ("matplotlib", "matplotlib.pyplot", "tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, mod, None)  # a None entry makes `import mod` raise ImportError
    rc = bench_main(["--blocks", "se", "--shapes", "tiny", "--batch", "2", "--modes", "fwd", "--layouts", "nchw",
                     "--providers", "eager,reference", "--reps", "2", "--sample-s", "0",
                     "--out", str(tmp_path), "--name", "t"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "provider" in out and "reference" in out  # the table
    assert [line for line in err.splitlines() if "no plots" in line] == [report.NO_PLOTS]
    assert "pip install matplotlib" in report.NO_PLOTS
    rows = report.read_csv(tmp_path / "t.csv")
    assert [r["provider"] for r in rows] == ["eager", "reference"] and all(r["status"] == "ok" for r in rows)
    assert (tmp_path / "t.json").exists() and "[t.csv](t.csv)" in (tmp_path / "README.md").read_text()
    assert not list(tmp_path.glob("*.png"))


def _run(folder: Path, stem: str, commit: str) -> None:
    meta = {"device": "dev", "torch": "t", "triton": "tr", "commit": commit, "date": f"date-{commit}"}
    report.save_run([{"block": "se", "provider": "eager"}], meta, folder / stem, harness.COLUMNS,
                     {"command": f"python -m bench --name {stem}"})
    (folder / f"{stem}_speedup_fp32_n8.png").write_bytes(b"")


def test_replaced_and_retired_runs_keep_their_summary_with_their_commit(tmp_path):
    """A new run under a stem replaces its files and moves the old run's summary to the history; a
    run retired by hand loses its files (not those of a stem it prefixes) and keeps its summary."""
    _run(tmp_path, "b128", "c1")
    _run(tmp_path, "b128_old", "c0")
    _run(tmp_path, "b128", "c2")
    readme = (tmp_path / "README.md").read_text()
    current, earlier = readme.split("## Earlier runs")
    assert "commit c2" in current and "commit c1" not in current
    assert "`b128`: commit c1, date-c1" in earlier and "python -m bench --name b128" in earlier

    removed = report.retire(tmp_path / "b128_old")
    assert sorted(p.name for p in removed) == ["b128_old.csv", "b128_old.json", "b128_old_speedup_fp32_n8.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "b128.csv", "b128.json", "b128_speedup_fp32_n8.png", report.HISTORY]
    earlier = (tmp_path / "README.md").read_text().split("## Earlier runs")[1]
    assert "`b128_old`: commit c0" in earlier and "`b128`: commit c1" in earlier
    with pytest.raises(SystemExit, match="no b128_old.json"):
        report.retire(tmp_path / "b128_old")
