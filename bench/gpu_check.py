"""One GPU check that fits a 15-minute lease: build, tests, sanitizers, benchmarks, probes.

  python3 -m bench.gpu_check                 # on an H100/H200, from the repository root: <= 540 s
  python3 -m bench.gpu_check --dry-run       # anywhere: every stage's command, GPU parts skipped (limits x3)

Stages run in order, each under its own time budget; a step that overruns is killed (its whole
process group) and logged as `timeout`, and a stage that no longer fits the total is skipped and
logged. Every skip is logged with its reason.

  build    100 s  just-in-time build for sm_90 (ATTNFUSED_BUILD=jit, MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0)
  tests    150 s  a curated CUDA subset (-m "cuda and not slow"): every op and option in both layouts and
                  fp32/fp16/bf16 through the multi-pass path, in fp16 through the on-chip path, the
                  ops through the new kernels (ATTNFUSED_CUDA_KERNELS=next: those they cover), the tiling and odd
                  shapes, ties under both rules, bit-identity, opcheck, torch.compile, graph capture,
                  streams, drop-in
  sanitize  60 s  compute-sanitizer memcheck, racecheck, synccheck on one slice (op x option x dtype),
                  a different slice per commit and day (--slice N to force one)
  bench    150 s  CUDA per-kernel profile (fp16, 56x56 and 7x7; then SE and CBAM on the new kernels), the host's
                  work per call (bench.host_work: launches, copies, allocations, syncs; SE and CBAM on
                  cuda and cuda/next), then
                  python -m bench at the ResNet-50 stages, batch 128 fwd+train (one block with eager,
                  compile, cuda; SE and CBAM on the new kernels; the other two blocks with eager, cuda)
                  and batch 1 and 8 fwd (eager, cuda); one dtype per run, fp16 and bf16 in turn
                  (--dtype), the block with compile in turn among CBAM-FC, SE, ECA
  probes    20 s  L2 re-read rate of 8-64 MB chunks; cudaOccupancyMaxActiveClusters for clusters of 8 and
                  16 CTAs holding one sample (bench/gpu_probes.cu, built with nvcc)
  static    15 s  python -m bench.static on the library just built, against this run's profile
  (margin 45 s)

Logs, CSVs and summary.csv go to $GPU_CHECK_DIR (default /tmp/attnfused_gpu_check); with $OUT set (the
device tool's folder, which returns at most 8 files) they are packed into $OUT/gpu_check.tgz, beside
$OUT/gpu_check_summary.csv. The last lines printed are one short table.
Set ATTNFUSED_COMMIT=<commit> when the tree's .git is stale; the results and the rotation use it.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_S = 540
# stage budgets in seconds; the rest of TOTAL_S is margin
BUDGETS = {"build": 100, "tests": 150, "sanitize": 60, "bench": 150, "probes": 20, "static": 15}
STAGES = list(BUDGETS)
SKIP_NO_GPU = "skipped: no GPU"

TEST_FILES = ["tests/test_cuda_backend.py", "tests/test_drop_in.py"]
# every op and option in fp32/fp16/bf16 and both layouts through the multi-pass path, in fp16 through
# the on-chip path (the ops that have one), every op through the new kernels (all options,
# dtypes, layouts and tiling shapes: the ops they cover), the tiling shapes through the multi-pass
# path, and everything else marked cuda (bit-identity, opcheck, compile, graph capture, streams,
# empty batch, drop-in models; the channel op's ties through the new kernels)
TEST_K = ("not float64 and (not parity_tiling or multipass or next) "
          "and (not parity_all_options or multipass or next "
          "or (float16 and not bfloat16 and not spatial)) and (not channel_ties or next)")
TEST_M = "cuda and not slow"

# sanitizer slices: op x option class x dtype (-k terms of the parity tests' ids)
SAN_OPS = ["channel and mlp", "channel and conv", "spatial", "cbam and mlp", "cbam and conv"]
# option classes: the channel pools; the spatial maps for the ops that have them
SAN_OPTIONS = {"channel": ["avg and not max", "max and not avg", "avg+max", "mix"],
               "spatial": ["max_mean", "mean_max", "mix"], "cbam": ["max_mean", "mean_max", "mix"]}
SAN_DTYPES = ["float32", "float16 and not bfloat16", "bfloat16"]
SAN_TOOLS = ["memcheck", "racecheck", "synccheck"]

BENCH_SHAPES = "resnet50"
BENCH_BLOCKS = ["cbam_fc", "se", "eca"]
DTYPES = ["fp16", "bf16"]


def sanitizer_slices() -> list[str]:
    out = []
    for op in SAN_OPS:
        for opt in SAN_OPTIONS[op.split()[0]]:
            for dt in SAN_DTYPES:
                out.append(f"parity_all_options and ({op}) and ({opt}) and ({dt})")
    return out


def run_key(commit: str, day: str) -> int:
    """A number that changes with the commit and the day: picks the sanitizer slice and the dtype."""
    return int(hashlib.sha256(f"{commit}/{day}".encode()).hexdigest()[:12], 16)


def pick_rotation(commit: str, day: str, slice_arg: int | None = None, dtype_arg: str | None = None):
    slices = sanitizer_slices()
    key = run_key(commit, day)
    i = (key % len(slices)) if slice_arg is None else slice_arg % len(slices)
    dtype = dtype_arg or DTYPES[(key // len(slices)) % len(DTYPES)]
    block = BENCH_BLOCKS[(key // (len(slices) * len(DTYPES))) % len(BENCH_BLOCKS)]
    return i, slices[i], dtype, block


@dataclass
class Step:
    name: str
    cmd: list[str] | str  # a str runs through bash
    gpu: bool = True  # needs a GPU: skipped (or its dry form run) without one
    dry: list[str] | str | None = None  # what runs instead without a GPU
    timeout: float | None = None  # this step's own limit (else what is left of the stage)
    env: dict = field(default_factory=dict)
    summary: object = None  # callable(log text) -> short string


@dataclass
class Result:
    stage: str
    step: str
    status: str  # ok, fail, timeout, skipped, dry
    rc: int | None
    seconds: float
    budget: float
    summary: str


def _last_match(pattern: str, text: str, default: str = "") -> str:
    found = re.findall(pattern, text, flags=re.M)
    return found[-1].strip() if found else default


def pytest_summary(text: str) -> str:
    line = _last_match(r"^=+ (.*(?:passed|failed|error|skipped|deselected|no tests ran).*) =+$", text)
    if not line:
        line = _last_match(r"^(\d+(?:/\d+)? tests? collected.*|\d+ .*(?:passed|failed|selected).*)$", text)
    return line[:90]


def sanitizer_summary(text: str) -> str:
    summ = _last_match(r"ERROR SUMMARY: (.*)$", text) or _last_match(r"RACECHECK SUMMARY: (.*)$", text)
    return (f"{summ}; " if summ else "") + pytest_summary(text)


def bench_summary(text: str) -> str:
    return _last_match(r"^(\d+ rows in .*)$", text)[:90] or tail_summary(text)


def static_summary(text: str) -> str:
    return _last_match(r"^(today's kernels: .*|bench.static: skipped.*)$", text)[:90]


def tail_summary(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith(("$ ", "# limit"))]
    return lines[-1][:90] if lines else ""


def build_summary(text: str) -> str:
    m = re.search(r'"cuda_archs": \[([^\]]*)\]', text)
    cuda = re.search(r'"cuda": (true|false)', text)
    return f"cuda={cuda.group(1) if cuda else '?'} archs=[{m.group(1).strip() if m else ''}]" if cuda else tail_summary(text)


class Runner:
    def __init__(self, logdir: Path, gpu: bool, total_s: float = TOTAL_S, echo=print, scale: float = 1.0):
        self.logdir = logdir
        self.scale = scale  # every limit times this (a dry run on a slow machine)
        self.gpu = gpu
        self.t0 = time.monotonic()
        self.total_s = total_s
        self.results: list[Result] = []
        self.echo = echo

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.t0)

    def stage(self, name: str, budget: float, steps: list[Step], env: dict):
        start = time.monotonic()
        budget *= self.scale
        self.echo(f"== {name} (budget {budget:.0f} s, {self.left():.0f} s left in all; "
                  f"{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S} UTC)")
        for step in steps:
            stage_left = budget - (time.monotonic() - start)
            limit = min(stage_left, self.left(), (step.timeout or stage_left) * self.scale)
            if limit < 1:
                self._record(name, step.name, "skipped", None, 0.0, budget,
                             f"no time left (stage {stage_left:.0f} s, total {self.left():.0f} s)")
                continue
            cmd = step.cmd
            status_ok = "ok"
            if step.gpu and not self.gpu:
                if step.dry is None:
                    self._record(name, step.name, "skipped", None, 0.0, budget, SKIP_NO_GPU)
                    continue
                self.echo(f"  {step.name}: {SKIP_NO_GPU}; dry form instead")
                cmd, status_ok = step.dry, "dry"
            self._run(name, step, cmd, limit, budget, env, status_ok)

    def _run(self, stage, step, cmd, limit, budget, env, status_ok):
        log = self.logdir / f"{stage}_{step.name}.log"
        shown = cmd if isinstance(cmd, str) else shlex.join(cmd)
        full_env = {**os.environ, **env, **step.env}
        t = time.monotonic()
        with open(log, "w") as f:
            f.write(f"$ {shown}\n# limit {limit:.0f} s\n")
            f.flush()
            # a process group of its own: a timeout kills the step's children too (pytest workers,
            # compute-sanitizer's target, nvcc)
            proc = subprocess.Popen(cmd, shell=isinstance(cmd, str), executable="/bin/bash" if isinstance(cmd, str) else None,
                                    stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = proc.returncode
        secs = time.monotonic() - t
        text = log.read_text(errors="replace")
        summ = (step.summary or tail_summary)(text)
        if timed_out:
            with open(log, "a") as f:
                f.write(f"\n# killed after {secs:.0f} s: over its limit of {limit:.0f} s\n")
            self._record(stage, step.name, "timeout", rc, secs, budget, f"killed at {limit:.0f} s; {summ}")
        else:
            self._record(stage, step.name, status_ok if rc == 0 else "fail", rc, secs, budget, summ)

    def _record(self, stage, step, status, rc, secs, budget, summary):
        r = Result(stage, step, status, rc, round(secs, 1), budget, summary)
        self.results.append(r)
        self.echo(f"  {step}: {status}" + (f" (rc {rc})" if rc not in (None, 0) else "") +
                  f", {secs:.0f} s: {summary}")

    def write(self, extra: dict):
        path = self.logdir / "summary.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["stage", "step", "status", "rc", "seconds", "stage_budget", "summary"])
            for r in self.results:
                w.writerow([r.stage, r.step, r.status, r.rc, r.seconds, r.budget, r.summary])
        with open(self.logdir / "run.txt", "w") as f:
            for k, v in extra.items():
                f.write(f"{k}: {v}\n")
        return path

    def table(self) -> str:
        lines = [f"{'stage':9s} {'step':18s} {'status':8s} {'s':>5s}  summary"]
        for r in self.results:
            lines.append(f"{r.stage:9s} {r.step:18s} {r.status:8s} {r.seconds:5.0f}  {r.summary[:80]}")
        return "\n".join(lines)


def _kill_group(proc: subprocess.Popen):
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _commit() -> str:
    c = os.environ.get("ATTNFUSED_COMMIT", "").strip()
    if c:
        return c
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _gpu_present(py: str) -> bool:
    try:
        out = subprocess.run([py, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                             text=True, timeout=120, cwd=ROOT)
        return out.stdout.strip().endswith("True")
    except (OSError, subprocess.SubprocessError):
        return False


def build_steps(py: str, logdir: Path, slice_expr: str, dtype: str, block: str,
                xdist: list[str]) -> dict[str, list[Step]]:
    pyt = [py, "-m", "pytest", *TEST_FILES, "-p", "no:cacheprovider", "-m", TEST_M]
    # inputs past 2**31 elements (64-bit indexing, blocked sums): the CUDA and Triton tests marked slow
    large = [py, "-m", "pytest", "tests/test_cuda_backend.py", "tests/triton/test_sums.py", "-p", "no:cacheprovider",
             "-rf", "--tb=short", "-q", "-k", "past_2_31"]
    probe_bin = logdir / "gpu_probes"
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    build_probe = [nvcc, "-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "bench/gpu_probes.cu",
                   "-o", str(probe_bin)]
    san = []
    for tool in SAN_TOOLS:
        # no caching allocator: an access past a tensor but inside a cached block would go unseen
        cmd = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "9", "--print-limit", "20",
               *pyt, "-q", "-x", "-k", slice_expr]
        san.append(Step(tool, cmd, dry=[*pyt, "--collect-only", "-q", "-k", slice_expr],
                        env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, summary=sanitizer_summary, timeout=20))
    bench = [py, "-m", "bench", "--shapes", BENCH_SHAPES, "--layouts", "cl,nchw", "--dtypes", dtype,
             "--out", str(logdir), "--no-progress", "--no-plots"]
    # torch.compile costs seconds per graph: one block per run with it, the other two without
    rest = ",".join(b for b in BENCH_BLOCKS if b != block)
    b128 = [*bench, "--blocks", block, "--batch", "128", "--modes", "fwd,train", "--providers", "eager,compile,cuda",
            "--rep-ms", "40", "--name", f"bench_b128_{block}_{dtype}"]
    b128_rest = [*bench, "--blocks", rest, "--batch", "128", "--modes", "fwd,train", "--providers", "eager,cuda",
                 "--rep-ms", "40", "--name", f"bench_b128_rest_{dtype}"]
    bsmall = [*bench, "--blocks", ",".join(BENCH_BLOCKS), "--batch", "1,8", "--modes", "fwd", "--providers",
              "eager,cuda", "--rep-ms", "25", "--name", f"bench_b1_8_{dtype}"]
    # the new kernels ($ATTNFUSED_CUDA_KERNELS=next): SE (the channel op) and CBAM, forward and training step
    nxt = {"ATTNFUSED_CUDA_KERNELS": "next"}
    b128_next = [*bench, "--blocks", "se,cbam_fc", "--batch", "128", "--modes", "fwd,train", "--providers", "cuda",
                 "--rep-ms", "40", "--name", f"bench_b128_next_{dtype}"]
    return {
        "build": [Step("jit_build", [py, "-c", "import attnfused, json; i = attnfused.build_info(); "
                                           "print(json.dumps(i, indent=1, default=str)); assert i['cuda'], i"],
                       dry=[py, "-c", "from attnfused.backends import extension as e; "
                                      "print('cuda sources:', len(e.cuda_sources()), '| why not:', e.cuda_why_not(),"
                                      " '| archs:', e.cuda_arch_list(jit=True))"],
                       summary=build_summary)],
        "tests": [Step("large_index", large, dry=[*large, "--collect-only"], timeout=40,
                       summary=pytest_summary),
                  Step("cuda_subset", [*pyt, "-q", "-rf", "--tb=short", *xdist, "-k", TEST_K],
                       dry=[*pyt, "--collect-only", "-q", "-k", TEST_K], summary=pytest_summary)],
        "sanitize": san,
        "bench": [
            Step("profile", [py, "-m", "bench.profile_kernels", "--blocks", "cbam_fc,se", "--backends", "cuda",
                             "--dtype", "fp16", "--calls", "3"], timeout=25),
            Step("profile_next", [py, "-m", "bench.profile_kernels", "--blocks", "se,cbam_fc", "--backends", "cuda",
                                  "--dtype", "fp16", "--calls", "3"], timeout=20, env=nxt),
            Step("host_work", [py, "-m", "bench.host_work", "--blocks", "se,cbam_fc", "--backends", "cuda,cuda/next"],
                 timeout=12,
                 dry=[py, "-m", "bench.host_work", "--device", "cpu", "--blocks", "se", "--backends", "cpu"]),
            Step("b128_" + block, b128, dry=[*b128, "--device", "cpu", "--list"], timeout=55, summary=bench_summary),
            Step("b128_next", b128_next, dry=[*b128_next, "--device", "cpu", "--list"], timeout=25, env=nxt,
                 summary=bench_summary),
            Step("b128_rest", b128_rest, dry=[*b128_rest, "--device", "cpu", "--list"], timeout=25,
                 summary=bench_summary),
            Step("b1_8", bsmall, dry=[*bsmall, "--device", "cpu", "--list"], summary=bench_summary),
        ],
        "probes": [
            # the build needs no GPU: it runs in the dry run too
            Step("probe_build", build_probe, gpu=False, timeout=15,
                 summary=lambda t: tail_summary(t) or "built bench/gpu_probes.cu"),
            Step("probe_run", [str(probe_bin)], timeout=12),
        ],
        # against this run's per-kernel profile when the bench stage made one
        "static": [Step("bench_static", f"m={shlex.quote(str(logdir / 'bench_profile.log'))}; "
                                        f"{shlex.quote(py)} -m bench.static $([ -s \"$m\" ] && echo --measured \"$m\")",
                        gpu=False, summary=static_summary)],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="skip every GPU part (run the dry form of each step)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    ap.add_argument("--slice", type=int, default=None, help="sanitizer slice index (default: by commit and day)")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="bench dtype (default: by commit and day)")
    ap.add_argument("--total-s", type=float, default=TOTAL_S, help="the whole check's limit")
    ap.add_argument("--time-scale", type=float, default=None,
                    help="multiply every limit (default 1; 3 with --dry-run, which runs on slower machines)")
    ap.add_argument("--budget", action="append", default=[], metavar="STAGE=S", help="override a stage budget")
    a = ap.parse_args(argv)

    budgets = dict(BUDGETS)
    for b in a.budget:
        k, _, v = b.partition("=")
        if k not in budgets:
            raise SystemExit(f"--budget: stage must be one of {STAGES}, got {k!r}")
        budgets[k] = float(v)
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"--stages: unknown {bad}; choose from {STAGES}")

    logdir = Path(os.environ.get("GPU_CHECK_DIR") or "/tmp/attnfused_gpu_check")
    logdir.mkdir(parents=True, exist_ok=True)
    for old in [*logdir.glob("*.log"), *logdir.glob("bench_*.*"), logdir / "summary.csv", logdir / "run.txt"]:
        old.unlink(missing_ok=True)  # an earlier run's files would be packed with this run's
    py = sys.executable
    commit = _commit()
    day = datetime.date.today().isoformat()
    idx, slice_expr, dtype, block = pick_rotation(commit, day, a.slice, a.dtype)
    gpu = not a.dry_run and _gpu_present(py)
    xdist_args = []
    for mod, args in (("xdist", ["-n", "12"]), ("pytest_timeout", ["--timeout", "90"])):
        try:  # pytest-xdist and pytest-timeout where installed (the device image has both)
            __import__(mod)
            xdist_args += args
        except ImportError:
            pass
    # one JIT build, in a cache of this run's own, shared by every later stage
    env = {"ATTNFUSED_BUILD": "jit", "MAX_JOBS": os.environ.get("MAX_JOBS", "16"), "TORCH_CUDA_ARCH_LIST": "9.0",
           "ATTNFUSED_CACHE_DIR": str(Path(os.environ.get("ATTNFUSED_CACHE_DIR", "/tmp/attnfused_gpu_check_jit"))),
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    info = {"commit": commit, "day": day, "gpu": gpu, "dry_run": a.dry_run, "logdir": str(logdir),
            "sanitizer_slice": f"{idx}/{len(sanitizer_slices())}: {slice_expr}", "bench_dtype": dtype, "bench_block_with_compile": block,
            "kernels": os.environ.get("ATTNFUSED_CUDA_KERNELS", "(default)"), "stages": stages, "budgets": budgets, "time_scale": a.time_scale or (3.0 if a.dry_run else 1.0)}
    for k, v in info.items():
        print(f"[gpu_check] {k}: {v}")
    if not gpu:
        print(f"[gpu_check] {SKIP_NO_GPU}: GPU steps run their dry form or are skipped")

    scale = a.time_scale or (3.0 if a.dry_run else 1.0)
    runner = Runner(logdir, gpu, a.total_s * scale, scale=scale)
    steps = build_steps(py, logdir, slice_expr, dtype, block, xdist_args)
    for s in STAGES:
        if s not in stages:
            runner._record(s, "-", "skipped", None, 0.0, budgets[s], "not asked for (--stages)")
            continue
        runner.stage(s, budgets[s], steps[s], env)
    info["wall_s"] = round(time.monotonic() - runner.t0, 1)
    path = runner.write(info)
    out = os.environ.get("OUT")
    if out and Path(out).is_dir():  # two files back: the device tool returns few
        shutil.copy(path, Path(out) / "gpu_check_summary.csv")
        subprocess.run(["tar", "czf", str(Path(out) / "gpu_check.tgz"), "--exclude", "gpu_probes", "-C", str(logdir),
                        "."], check=False)
    print(f"\nlogs and CSV in {logdir} (summary: {path.name}); wall {info['wall_s']} s of {a.total_s * scale:.0f}")
    print(runner.table())
    failed = [r for r in runner.results if r.status in ("fail", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
