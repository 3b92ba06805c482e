"""python -m bench.static: a performance check of the CUDA kernels that needs no GPU.

Reads the resource usage and the sm_90 SASS of the CUDA extension already built
(`cuobjdump -res-usage` and `cuobjdump -sass` on attnfused/_C*.so, or the just-in-time build when
$ATTNFUSED_BUILD=jit), and prints for each kernel the benchmarks use (fp16 by default):
registers, spills, shared memory, blocks per SM, bytes in flight per SM, and from the SASS of its
hot loop: load widths, narrow loads, local-memory traffic, branches; then for each pass and
ResNet-50 stage shape (batch 128, both layouts): vector width, grid and waves (the host's tiling
plan, mirrored below from csrc/cuda/launch.cuh), instructions per 512 bytes read, a predicted time
and the time measured on an H100 where one was profiled, and flags.

Model (H100 SXM): a pass moves its bytes at the copy rate (2.9 TB/s) at best; its reads are
bounded by Little's law (bytes in flight per SM x 132 SMs / ~1 us of latency) and by issue
(~90 warp-instructions per 512 bytes read keep pace with the copy rate at 1.75 GHz). The
predicted time is the largest of the three, times the last wave's shortfall. Per-sample math run
by the last block of each sample (the "fin" column) is not timed: it is flagged instead.

Hot loop: the innermost backward-branch loop holding the most loads of the streamed tensors
(16-byte loads, or element-wide ones where VEC = 1). Instructions are counted along the longest
path through the loop (paths that exclude each other count once), with an enclosing loop's work
(a row's reductions, spill reloads) spread over the hot loop's trips per row.

Flags: spill (local memory in the hot loop or its row), narrow (element-wide loads of the streamed
tensors, or more narrow side loads than one per element and one), blocks (< 4 per SM), inflight
(< 22 KB per SM), issue (> 90 instructions per 512 B), vec1 (VEC = 1 where a sample, being
contiguous, could be read as flat 16-byte vectors), fin (per-sample math in a streaming pass).
A new-path kernel with no vector width among its template arguments is small math (bound "small":
the gate, MLP or conv kernels), not timed by the model and flagged only for spills. A tile loop
(stream loads of its own, inner loops over the tile in shared memory) is the hot loop where no
innermost loop streams.
Today's kernels are "old": their flags are printed and the exit status is 0. Kernels whose
demangled name matches --new (default: the namespace attnfused::cuda::next) are the new path:
a flag on one of them exits 1.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .sass import Flow, Hot, Ins, Res, analyze, parse_res_usage, parse_sass

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- H100 and the model
SMS, REGS_SM, SMEM_SM, THREADS_SM, BLOCKS_SM = 132, 65536, 233472, 2048, 32
CLK, BW, LATENCY = 1.755e9, 2.9e12, 1.0e-6
ISSUE_BUDGET = 90  # warp-instructions per 512 B read that keep pace with BW (about 55% issue)
INFLIGHT_NEED = BW / SMS * LATENCY  # bytes per SM in flight for BW at LATENCY: ~22 KB
MIN_BLOCKS = 4
THREADS = 256  # kThreads in kernels.cuh: every kernel runs 256-thread blocks
NEW_PATH = r"attnfused::cuda::next::"
SHAPES = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]  # bench/shapes.py "resnet50"
BATCH = 128
MEASURED = ROOT / "bench" / "results" / "NVIDIA-H100-80GB-HBM3" / "profile_b128_ca52261.txt"
DTYPE_NAMES = {"fp16": ("c10::Half", 2), "bf16": ("c10::BFloat16", 2), "fp32": ("float", 4)}

# What the plan mirror assumes of the C++ source; tests/test_static.py checks each still holds.
SOURCE_FACTS = {
    "csrc/cuda/kernels.cuh": [r"constexpr int kThreads = 256;", r"if \(B % kMax != 0\) return 1;"],
    "csrc/cuda/launch.cuh": [
        r"while \(TX < 32 && TX < vecs_b\) TX \*= 2;",
        r"const int64_t target = int64_t\(num_sms\(\)\) \* 16;",
        r"ceil_div\(target, std::max<int64_t>\(1, blocks\)\), ceil_div\(vecs_b, TX \* 4\)",
        r"if \(blocks > 4 \* target\)",
        r"std::min<int64_t>\(8, blocks / \(2 \* target\)\)",
        r"int64_t most = ceil_div\(p.A, TY \* 4\);",
        r"ceil_div\(nvec, kThreads\), int64_t\(num_sms\(\)\) \* 32",
        r"dir = \(\(over == Over::SPACE\) != p.cl\) \? ROW : COL;",
        r"const bool small = numel \+ int64_t\(num_sms\(\)\) \* 32 \* kThreads \* VMAX <= INT32_MAX;",
    ],
    "csrc/cuda/onchip.cuh": [r"4 \* x.size\(0\) >= 3 \* per_sm \* prop->multiProcessorCount",
                             r"sharedMemPerMultiprocessor\) / \(bytes \+ 1024\)"],
    "csrc/cuda/next_plan.h": [
        r"constexpr int kLoads = 4;",
        r"while \(N \* ncy \* chunks < int64_t\(sms\) \* 16 && cdiv\(hvecs, TX \* chunks \* 2\) >= 4 \* kLoads\) chunks \*= 2;",
        r"while \(R < 16 \* kLoads && N \* nbc \* cdiv\(HW, int64_t\(TY\) \* R \* 2\) >= int64_t\(sms\) \* 16\) R \*= 2;",
        r"constexpr int kPoolBlocks = 4;",
        r"while \(\(g \* HW\) % vec != 0\) g \*= 2;",
        r"R = static_cast<int>\(cdiv\(cdiv\(rows, rounds \* slots\), g\) \* g\);",
        r"while \(P < 32 && int64_t\(R\) \* P \* 2 <= kThreads && P < HW\) P \*= 2;",
        r"grid = tiles < slots \? tiles : slots;",
    ],
    "csrc/cuda/next_pool.cuh": [r"return J == Job::SUM \? kLoads : 2;"],
    "csrc/cuda/next_last.cuh": [r"return P == Last::DX_ST \? 2 : kLoads;"],
    "csrc/cuda/next_channel.cu": [  # covers(): which shapes run the new kernels, and with which pool
        r"const bool fits = cl \? C % V == 0",
        r": HW % V == 0 \|\| \(over == Over::SPACE && HW >= V && TilePlan::covers\(HW, static_cast<int>\(V\)\)\);",
        r"if \(is_channels_last\(x\) == space\) \{",
        r"\} else if \(HW % V != 0\) \{  // rows of no whole number of vectors: tiles",
        r"const bool small = numel \+ grid \* kThreads \* V <= INT32_MAX;",
    ],
}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------- occupancy, plans
def blocks_per_sm(regs: int, shared: int, threads: int = THREADS) -> int:
    warps = cdiv(threads, 32)
    per_warp = cdiv(max(regs, 1) * 32, 256) * 256  # registers are allocated per warp in 256s
    return max(0, min(REGS_SM // (per_warp * warps), SMEM_SM // max(shared, 1), THREADS_SM // threads, BLOCKS_SM))


def pick_vec(B: int, elem: int) -> int:
    return 16 // elem if B % (16 // elem) == 0 else 1


def plan_reduce(N: int, A: int, B: int, direction: str, vec: int, sms: int = SMS) -> dict:
    """ReducePass::plan (launch.cuh): TX lanes x VEC along b, 256 / TX rows; KA rows, KB vectors per thread."""
    vecs_b = cdiv(B, vec)
    TX = 1
    while TX < 32 and TX < vecs_b:
        TX *= 2
    TY = THREADS // TX
    target = sms * 16
    if direction == "ROW":
        KA, nay = 1, cdiv(A, TY)
        blocks = N * nay
        nbx = 1
        if blocks < target:
            nbx = max(1, min(cdiv(target, max(1, blocks)), cdiv(vecs_b, TX * 4)))
        KB = cdiv(vecs_b, TX * nbx)
        nbx = cdiv(vecs_b, TX * KB)
        if blocks > 4 * target:
            KA = min(8, blocks // (2 * target))
            nay = cdiv(A, TY * KA)
    else:
        KB, nbx = 1, cdiv(vecs_b, TX)
        want = cdiv(target, max(1, N * nbx))
        most = cdiv(A, TY * 4)
        nay = max(1, min(want, most))
        KA = cdiv(A, TY * nay)
        nay = cdiv(A, TY * KA)
    return dict(TX=TX, TY=TY, KA=KA, KB=KB, nbx=nbx, nay=nay, grid=N * nbx * nay)


KLOADS = 4  # kLoads in next_plan.h
COLUMNS_LOADS_ST = 2  # columns_loads<Last::DX_ST>() in next_last.cuh


def pow2_lanes(vecs: int) -> int:
    TX = 1
    while TX < 32 and TX < vecs:
        TX *= 2
    return TX


def plan_next_rows(N: int, C: int, HW: int, vec: int, sms: int = SMS) -> dict:
    """RowPlan (next_plan.h): TX lanes along a row's vectors, rows split in `chunks` pieces."""
    hv = HW // vec
    TX = pow2_lanes(hv)
    ncy, chunks = cdiv(C, THREADS // TX), 1
    while N * ncy * chunks < sms * 16 and cdiv(hv, TX * chunks * 2) >= 4 * KLOADS:
        chunks *= 2
    per = cdiv(hv, chunks)
    chunks = cdiv(hv, per)
    return dict(TX=TX, KB=cdiv(per, TX), grid=N * ncy * chunks)


def plan_next_columns(N: int, C: int, HW: int, vec: int, sms: int = SMS) -> dict:
    """ColumnPlan (next_plan.h): a thread sums R rows of its vector of channels (no shuffles)."""
    cv = cdiv(C, vec)
    TX = pow2_lanes(cv)
    TY, nbc, R = THREADS // TX, cdiv(cv, TX), KLOADS
    while R < 16 * KLOADS and N * nbc * cdiv(HW, TY * R * 2) >= sms * 16:
        R *= 2
    return dict(TX=1, KB=R, grid=N * nbc * cdiv(HW, TY * R))


KPOOL_BLOCKS = 4  # kPoolBlocks in next_plan.h


def plan_next_tiles(N: int, C: int, HW: int, vec: int, sms: int = SMS) -> dict | None:
    """TilePlan (next_plan.h): tiles of R whole NCHW rows through shared memory, P threads per row
    summing L elements each; tiles round-robin over sms x kPoolBlocks blocks. None: not covered."""
    g = 1
    while (g * HW) % vec:
        g *= 2
    cap = THREADS * KLOADS * vec
    if g * HW > cap:
        return None
    rows, slots = N * C, sms * KPOOL_BLOCKS
    most = min(cap // HW // g * g, THREADS)
    rounds = cdiv(cdiv(rows, most), slots)
    R = cdiv(cdiv(rows, rounds * slots), g) * g
    P = 1
    while P < 32 and R * P * 2 <= THREADS and P < HW:
        P *= 2
    tiles = cdiv(rows, R)
    return dict(R=R, P=P, L=cdiv(HW, P), tiles=tiles, grid=min(tiles, slots), TX=P, KB=1)


def plan_apply(numel: int, vec: int, sms: int = SMS) -> dict:
    return dict(grid=max(1, min(cdiv(numel // vec, THREADS), sms * 32)), KB=1, TX=32)


def onchip_used(C: int, H: int, W: int, N: int, elem: int, sms: int = SMS, optin: int = 232448) -> bool:
    """onchip_plan (onchip.cuh), $ATTNFUSED_CUDA_ONCHIP unset."""
    b = cdiv(C * H * W * elem, 16) * 16
    if N == 0 or b > optin:
        return False
    per_sm = max(1, SMEM_SM // (b + 1024))
    return 4 * N >= 3 * per_sm * sms


@dataclass
class PassUse:
    label: str
    kernel: str  # demangled-name prefix
    kind: str  # reduce, apply, onchip, rows, columns, tiles (the new path's pools)
    direction: str = ""
    reads: int = 1  # tensors of x's size read
    writes: int = 0
    over_channels: bool = False  # a pool over channels (the new path's pools with C and H*W swapped)
    trip_vectors: int = 0  # 16-byte vectors of each streamed tensor a hot-loop trip reads (0: from the SASS)
    lanes_per_vector: int = 1  # lanes sharing a vector of columns (each reading 1 / lanes of its rows)


def passes(op: str, C: int, H: int, W: int, cl: bool, T: str, elem: int, N: int = BATCH) -> list[PassUse]:
    """The kernels the host launches for the op (cbam or se) on this shape, forward then backward."""
    A, B = (H * W, C) if cl else (C, H * W)
    v = pick_vec(B, elem)
    ns = "attnfused::cuda::"
    red = f"void {ns}_reduce_kernel<{T}, {v}, ({ns}Pass)"
    small = N * C * H * W + SMS * 32 * THREADS * (16 // elem) <= 2 ** 31 - 1  # launch_apply (launch.cuh)
    idx = "unsigned int" if small else "long"

    def app(label, flags):
        return PassUse(label, f"void {ns}_apply_kernel<{T}, {v}, {idx}, {flags}>", "apply", reads=1, writes=1)

    def over(space: bool):  # launch.cuh: rows run along b = hw in NCHW
        return "ROW" if space != cl else "COL"

    def d(x):
        return {"ROW": 1, "COL": 2, "BOTH": 3}[x]

    out = []
    cbam = op == "cbam"
    if onchip_used(C, H, W, N, elem):
        out.append(PassUse("fwd chip CBAM" if cbam else "fwd chip SE", f"void {ns}_onchip_forward_kernel<{T}, {v}, {str(cbam).lower()}>",
                           "onchip", reads=1, writes=1))
    else:
        s = over(True)
        out.append(PassUse("fwd chan POOL", f"{red}0, {d(s)}, {ns}ChannelForwardFin<float>", "reduce", s))
        if cbam:
            c = over(False)
            out.append(PassUse("fwd spat POOL", f"{red}0, {d(c)}, {ns}SpatialForwardFin<float>", "reduce", c))
        out.append(app("fwd apply", "true, false, false"))
    if cbam:
        out.append(PassUse("bwd DOT both", f"{red}1, 3, {ns}SpatialBackwardFin<float>", "reduce", "BOTH", reads=2))
        s = over(True)
        out.append(PassUse("bwd MASK", f"{red}2, {d(s)}, {ns}CbamChannelBackwardFin<float>", "reduce", s))
        out.append(app("bwd dx CBAM", "true, true, true"))
    else:
        s = over(True)
        out.append(PassUse("bwd DOT SE", f"{red}1, {d(s)}, {ns}ChannelBackwardFin<float>", "reduce", s, reads=2))
        out.append(app("bwd dx SE", "true, false, true"))
    return out


def next_passes(op: str, C: int, H: int, W: int, cl: bool, T: str, elem: int, N: int = BATCH) -> list[PassUse]:
    """The new path's kernels ($ATTNFUSED_CUDA_KERNELS=next) for the op on this shape: the channel
    attention forward (se: pool avg only) and backward under both tie rules ("split": a pool with a
    max), where next_channel.cu covers it; for cbam, in channels_last the forward (the channel
    pool, the pool of x * s over channels: the rows kernel with C and H*W swapped, each channel
    weighted; the last pass y = x * s * t) and the CBAM and spatial attention backwards; in NCHW
    the same where H*W is a whole number of vectors. The forwards' last pass also with the tail's
    residual (+res: one more stream read)."""
    v, HW = 16 // elem, H * W
    ns = "attnfused::cuda::next::"
    small = N * C * H * W + SMS * 32 * THREADS * v <= 2 ** 31 - 1  # scale (next_channel.cu)
    idx = "unsigned int" if small else "long"
    last = f"void {ns}_scale<{T}, {v}, {idx}, ({ns}ScaleRows){0 if cl else 1}, ({ns}Last)"
    # Job: SUM 0, SUM_MAX 1, DOT 2, DOT_COUNT 3, SCALED_MAX 4, SCALED_DOT 5, DOT_POS 6 (next_pool.cuh);
    # Last: SCALE 0, DX 1, DX_SPLIT 2, SCALE_T 3, SCALE_ST 4, DX_T 5, DX_ST 6, then ADD (the forward's
    # tail with a residual) (next_last.cuh)
    if op == "cbam" and not cl:  # where H*W is a whole number of vectors (cbam_forward, cbam_backward)
        if HW % v:
            return []
        cols = f"void {ns}_scale_columns<{T}, {v}, ({ns}Last)"
        rows_last = f"void {ns}_scale<{T}, {v}, {idx}, ({ns}ScaleRows)2, ({ns}Last)"
        # the forward: the weighted max down columns (in 2-byte types two lanes per vector, each
        # keeping half its positions: next_pool.cuh); its last pass reads t as whole vectors of a
        # row's positions (ROWS)
        halves = elem == 2
        spool = PassUse("next fwd spool", f"void {ns}_pool_column_halves<{T}, {v}, true>" if halves else
                        f"void {ns}_pool_columns<{T}, {v}, ({ns}Job)4>", "columns", over_channels=True,
                        lanes_per_vector=2 if halves else 1)
        # the backward's last passes: a thread holds its positions' terms down R channels,
        # columns_loads() vectors of dy a trip (next_last.cuh); the dot with position terms: _pool_across
        return [PassUse("next fwd cpool", f"void {ns}_pool_rows<{T}, {v}, ({ns}Job)1>", "rows"),
                spool,
                PassUse("next fwd stscale", f"{rows_last}4, false>", "apply", reads=1, writes=1),
                PassUse("next fwd stscale+res", f"{rows_last}4, true>", "apply", reads=2, writes=1),
                PassUse("next bwd sdot", f"void {ns}_pool_columns<{T}, {v}, ({ns}Job)5>", "columns", reads=2,
                        over_channels=True),
                PassUse("next bwd cdot", f"void {ns}_pool_across<{T}, {v}>", "columns", reads=2, over_channels=True),
                PassUse("next bwd dxST", f"{cols}6>", "columns", reads=1, writes=1, over_channels=True,
                        trip_vectors=COLUMNS_LOADS_ST),
                PassUse("next sa dx", f"{cols}5>", "columns", reads=1, writes=1, over_channels=True,
                        trip_vectors=KLOADS)]
    if op == "cbam":  # channels_last, C a whole number of vectors (cbam_forward, cbam_backward)
        if C % v:
            return []
        return [PassUse("next fwd cpool", f"void {ns}_pool_columns<{T}, {v}, ({ns}Job)1>", "columns"),
                PassUse("next fwd spool", f"void {ns}_pool_rows<{T}, {v}, ({ns}Job)4>", "rows", over_channels=True),
                PassUse("next fwd stscale", f"{last}4, false>", "apply", reads=1, writes=1),
                PassUse("next fwd stscale+res", f"{last}4, true>", "apply", reads=2, writes=1),
                PassUse("next bwd sdot", f"void {ns}_pool_rows<{T}, {v}, ({ns}Job)5>", "rows", reads=2,
                        over_channels=True),
                PassUse("next bwd cdot", f"void {ns}_pool_columns<{T}, {v}, ({ns}Job)6>", "columns", reads=2),
                PassUse("next bwd dxST", f"{last}6, false>", "apply", reads=1, writes=1),
                # spatial attention's backward (spatial_backward): the pool over channels of dy * x
                # (as spatial_scale's, DOT) and this last pass
                PassUse("next sa dx", f"{last}5, false>", "apply", reads=1, writes=1)]
    if op != "se":
        return []
    if cl:
        pool = "columns" if C % v == 0 else None
    else:
        pool = "rows" if HW % v == 0 else ("tiles" if HW >= v and plan_next_tiles(N, C, HW, v) else None)
    if pool is None:
        return []
    red = f"void {ns}_pool_{pool}<{T}, {v}, ({ns}Job)"
    return [PassUse("next fwd pool", f"{red}0>", pool),
            PassUse("next fwd scale", f"{last}0, false>", "apply", reads=1, writes=1),
            PassUse("next fwd scale+res", f"{last}0, true>", "apply", reads=2, writes=1),
            PassUse("next bwd dot", f"{red}2>", pool, reads=2),
            PassUse("next bwd dx", f"{last}1, false>", "apply", reads=1, writes=1),
            PassUse("next bwd dotT", f"{red}3>", pool, reads=2),  # tie rule "split" (a pool with a max)
            PassUse("next bwd dxT", f"{last}2, false>", "apply", reads=2, writes=1)]


# ---------------------------------------------------------------------------- measured times
def read_measured(path: Path) -> dict:
    """{(kernel name as profiled, truncated), 'NxCxHxW', 'cl'|'nchw'): us} of the cuda rows of a
    `python -m bench.profile_kernels` output."""
    out = {}
    if not path.is_file():
        return out
    key = None
    for line in path.read_text().splitlines():
        m = re.match(r"== \S+ (\S+) \S+ (\d+x\d+x\d+x\d+) (cl|nchw):", line)
        if m:
            key = (m.group(2), m.group(3)) if m.group(1) == "cuda" else None
            continue
        m = re.match(r"\s+([\d.]+) us\s+\d+%\s+x(\d+)\s+(.*)$", line)
        if m and key:
            out.setdefault((m.group(3).strip(), *key), float(m.group(1)) / int(m.group(2)))
    return out


def measured_for(meas: dict, name: str, shape: str, lay: str):
    """The profiled time of kernel `name` (demangled): template arguments equal, or a prefix where
    the profile cut the name short."""
    head = name.split(">(")[0]
    for (pname, s, l), us in meas.items():
        if s == shape and l == lay and (head == pname.split(">(")[0] if ">(" in pname else head.startswith(pname)):
            return us
    return None


# ---------------------------------------------------------------------------- tools and library
def find_tool(name: str) -> str | None:
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name), shutil.which(name)]
    try:  # Triton's wheel carries cuobjdump and nvdisasm (found without importing it)
        import importlib.util

        spec = importlib.util.find_spec("triton")
        for d in (spec.submodule_search_locations or []) if spec else []:
            cands.append(os.path.join(d, "backends", "nvidia", "bin", name))
    except (ImportError, ValueError):
        pass
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def find_library() -> str | None:
    jit = os.environ.get("ATTNFUSED_BUILD", "").strip().lower() == "jit"
    aot = sorted(glob.glob(str(ROOT / "attnfused" / "_C*.so")))
    cache = os.environ.get("ATTNFUSED_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "attnfused")
    jits = sorted(glob.glob(os.path.join(cache, "**", "attnfused_C_jit*.so"), recursive=True), key=os.path.getmtime)
    order = (jits[::-1] + aot) if jit else (aot + jits[::-1])
    return order[0] if order else None


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def read_library(lib: str, cuobjdump: str, want) -> tuple[dict, dict, dict]:
    """(res usage, SASS, demangled names) of the sm_90 functions whose demangled name `want` accepts.
    Each function's SASS is read once, from the first sm_90 cubin holding it (a template used by
    several source files is in each of their cubins), with -fun: the whole library's takes minutes."""
    import tempfile

    def run(*args, cwd=None):
        return subprocess.run([cuobjdump, *args], capture_output=True, text=True, check=True, cwd=cwd).stdout

    try:
        listing = run("-lelf", lib)
    except subprocess.CalledProcessError:  # no device code at all (a CPU-only build)
        return {}, {}, {}
    cubins = re.findall(r"ELF file\s+\d+:\s+(\S+\.sm_90a?\.cubin)", listing)
    res, sass, where = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if cubins:
            run("-xelf", "all", os.path.abspath(lib), cwd=tmp)
            files = [os.path.join(tmp, c) for c in cubins]
        else:  # a cubin itself, or a library cuobjdump lists no ELF files of
            files = [lib]
        for f in files:
            for name, r in parse_res_usage(run("-res-usage", f) if f != lib else run("-res-usage", "-arch", "sm_90", f)).items():
                if name not in res:
                    res[name] = r
                    where[name] = f
        names = demangle(sorted(res))
        for f in files:
            keep = sorted(n for n in res if where[n] == f and want(names[n]))
            if keep:
                sass.update(parse_sass(run("-sass", "-fun", ",".join(keep), f) if f != lib
                                       else run("-sass", "-arch", "sm_90", "-fun", ",".join(keep), f)))
    return res, sass, names


# ---------------------------------------------------------------------------- the report
FIN_TAIL = 400  # instructions after the sample ticket: more is per-sample math, not a partials' sum
FIN_SIZE = 2500  # instructions in a kernel without a ticket (the on-chip forward runs the MLP inside)


@dataclass
class Kernel:
    name: str  # demangled
    res: Res
    hot: Hot
    flow: Flow
    blocks: int
    inflight: int  # bytes per SM
    new: bool
    vec: int


def kernel_flags(k: Kernel, blocks: int | None = None, inflight: float | None = None) -> list[str]:
    f = []
    h = k.hot
    blocks = k.blocks if blocks is None else blocks
    inflight = k.inflight if inflight is None else inflight
    if h.local or k.res.local:
        f.append("spill")
    # element-wide loads of the streamed tensors, or more side loads than one per element and one
    if h.loop and (h.stream_width < 16 or h.narrow_loads > k.vec * h.stream_loads + 1):
        f.append("narrow")
    if blocks < MIN_BLOCKS:
        f.append("blocks")
    if h.loop and inflight < INFLIGHT_NEED:
        f.append("inflight")
    if h.tail > FIN_TAIL or (not h.tail and h.size > FIN_SIZE):
        f.append("fin")
    return f


def make_kernel(name: str, res: Res, ins: list[Ins], elem: int, vec: int | None, new_re: str) -> Kernel:
    flow = Flow(ins)
    new = bool(re.search(new_re, name))
    # a new-path kernel without a vector width among its template arguments is small math: its
    # loops read the pooled vectors and weights (acc_t), never a streamed tensor, in any dtype
    small = new and vec is None
    vec = vec or 1
    hot = analyze(ins, 16 if vec > 1 or small else elem, flow=flow)
    b = blocks_per_sm(res.regs, res.shared)
    return Kernel(name, res, hot, flow, b, inflight_bytes(b, hot), new, vec)


def inflight_bytes(blocks: int, hot: Hot) -> int:
    """Resident warps x the stream loads a warp has in flight before it uses one (32 lanes each)."""
    return blocks * (THREADS // 32) * 32 * hot.stream_width * max(1, hot.first_use)


def shape_row(k: Kernel, use: PassUse, shape, cl: bool, elem: int, meas_us):
    C, H, W = shape
    A, B = (H * W, C) if cl else (C, H * W)
    numel = BATCH * C * H * W
    vec, hot = k.vec, k.hot
    blocks, inflight = k.blocks, k.inflight
    K, L = (H * W, C) if use.over_channels else (C, H * W)  # outputs per sample, summed length
    if use.kind == "reduce":
        plan = plan_reduce(BATCH, A, B, "COL" if use.direction == "BOTH" else use.direction, vec)
    elif use.kind == "rows":
        plan = plan_next_rows(BATCH, K, L, vec)
    elif use.kind == "columns":  # (with lanes per vector: a plan over parts of vectors)
        plan = plan_next_columns(BATCH, K, L, vec // use.lanes_per_vector)
    elif use.kind == "tiles":
        plan = plan_next_tiles(BATCH, C, H * W, vec)
        blocks = min(blocks, KPOOL_BLOCKS)  # the grid holds kPoolBlocks blocks per SM
        inflight = inflight_bytes(blocks, hot)
    elif use.kind == "apply":
        plan = plan_apply(numel, vec)
    else:  # on chip: one block per sample, the sample in dynamic shared memory
        plan = dict(grid=BATCH, KB=1, TX=32)
        blocks = min(blocks, SMEM_SM // (k.res.shared + cdiv(C * H * W * elem, 16) * 16))
        inflight = inflight_bytes(blocks, hot)
    ipb = None
    if hot.loop:
        # bytes a thread reads per hot-loop trip and per row; a row's own work spread over its trips.
        # An apply trip reads one vector of each streamed tensor (its other loads are per-channel
        # values); elsewhere every load of the stream width is the streamed tensors'.
        # A trip_vectors pass also loads per-channel values of the stream's width in the loop.
        trip = use.trip_vectors or (1 if use.kind == "apply" else 0)
        per_trip = max(1, trip * vec * elem * use.reads if trip else hot.stream_loads * hot.stream_width)
        row_bytes = (plan["KB"] * vec * elem * use.reads // use.lanes_per_vector
                     if use.kind in ("reduce", "rows", "columns") else per_trip)
        trips = max(1.0, row_bytes / per_trip)
        shfl = math.log2(plan["TX"]) if plan["TX"] > 1 else 1.0
        h2 = analyze(k.flow.ins, hot.stream_width, row_trips=trips, shfl_trips=shfl, flow=k.flow)
        ipb = (h2.instr * trips + h2.row_instr) * 16 / (trips * per_trip)
        if use.kind == "tiles":
            # per tile, every warp loads and stores; the warps holding rows also sum them (the
            # inner loop, 4 elements a trip): warp-instructions over the tile's R x HW elements
            def path(inner):
                return analyze(k.flow.ins, hot.stream_width, shfl_trips=shfl, flow=k.flow, inner_trips=inner).instr
            base = path(0.0)
            summing = path(plan["L"] // 4) - base
            busy = cdiv(plan["R"] * plan["P"], 32)
            ipb = (THREADS // 32 * base + busy * summing) * 512 / (plan["R"] * H * W * elem * use.reads)
    read_b, write_b = numel * elem * use.reads, numel * elem * use.writes
    # issue keeps pace with the copy rate up to ISSUE_BUDGET instructions per 512 B moved
    budget = ISSUE_BUDGET * (read_b + write_b) / read_b
    # the last wave's shortfall (tiles: rounds of tiles over the grid's blocks)
    waves = plan["tiles"] / plan["grid"] if use.kind == "tiles" else plan["grid"] / max(1, blocks * SMS)
    t_bw = (read_b + write_b) / BW
    t_flight = read_b / (SMS * inflight / LATENCY) if inflight else 0.0
    t_issue = t_bw * (ipb or 0) / budget
    wave_factor = math.ceil(waves) / waves if waves > 0 else 1.0
    pred = max(t_bw, t_flight, t_issue) * wave_factor * 1e6
    bound = max((t_bw, "copy"), (t_flight, "flight"), (t_issue, "issue"))[1]
    flags = kernel_flags(k, blocks, inflight)
    if ipb is not None and ipb > budget:
        flags.append("issue")
    if vec == 1 and (C * H * W * elem) % 16 == 0:
        flags.append("vec1")
    return dict(label=use.label, shape=f"{C}x{H}x{W}", lay="cl" if cl else "nchw", vec=vec, grid=plan["grid"],
                waves=waves, blocks=blocks, ipb=ipb, budget=budget, copy=t_bw * 1e6, pred=pred, bound=bound,
                meas=meas_us, flags=flags, new=k.new)


def short_name(demangled: str) -> str:
    s = demangled.split(">(")[0] + ">"
    for a, b in (("void ", ""), ("attnfused::cuda::", ""), ("<float>", ""), ("(Pass)", "P"), ("unsigned int", "u32"),
                 ("_reduce_kernel", "reduce"), ("_apply_kernel", "apply"), ("_onchip_forward_kernel", "onchip"),
                 ("c10::Half", "half"), ("c10::BFloat16", "bf16"), ("true", "1"), ("false", "0"), (" ", "")):
        s = s.replace(a, b)
    return s


def report(kernels: dict, rows: list[dict], out=print):
    out("Kernels (per thread and hot-loop trip, along the loop's longest path; blk = blocks per SM by "
        "registers and static shared memory)")
    out(f"{'kernel':44s} {'reg':>3s} {'stk':>3s} {'smemKB':>6s} {'blk':>3s} {'flightKB':>8s} {'ld16':>4s} "
        f"{'ldS':>3s} {'ldN':>3s} {'LDL':>3s} {'BSSY':>4s} {'BRA':>3s} {'instr':>5s} {'row':>4s} {'tail':>5s}")
    for name, k in sorted(kernels.items(), key=lambda kv: short_name(kv[0])):
        h = k.hot
        out(f"{short_name(name)[:44]:44s} {k.res.regs:3d} {k.res.stack:3d} {k.res.shared / 1024:6.1f} {k.blocks:3d} "
            f"{k.inflight / 1024:8.1f} {h.wide_loads:4d} {h.stream_loads:3d} {h.narrow_loads:3d} {h.local:3d} "
            f"{h.bssy:4d} {h.bra:3d} {h.instr:5.0f} {h.row_instr:4.0f} {h.tail:5d}")
    out("  ld16: 16-byte loads; ldS: loads of the streamed tensors; ldN: narrower side loads; row: the enclosing "
        "loop's own work per row (shuffle loops x log2 TX); tail: instructions after the sample ticket")
    out("")
    out(f"Passes at batch {BATCH} (pred = max(copy at {BW / 1e12:.1f} TB/s, reads at {INFLIGHT_NEED / 1024:.0f} KB "
        f"in flight per SM / {LATENCY * 1e6:.0f} us, issue at {ISSUE_BUDGET} instr per 512 B moved) x last-wave "
        f"shortfall; meas = H100 profile)")
    out(f"{'pass':13s} {'shape':10s} {'lay':4s} {'V':>1s} {'blk':>3s} {'grid':>5s} {'waves':>5s} {'i/512B':>10s} "
        f"{'copy':>6s} {'pred':>6s} {'bound':6s} {'meas':>6s}  flags")
    for r in rows:
        ipb = f"{r['ipb']:4.0f}/{r['budget']:<4.0f}" if r["ipb"] is not None else f"{'-':>10s}"
        meas = f"{r['meas']:6.1f}" if r["meas"] is not None else f"{'':6s}"
        out(f"{r['label']:13s} {r['shape']:10s} {r['lay']:4s} {r['vec']:1d} {r['blocks']:3d} {r['grid']:5d} "
            f"{r['waves']:5.1f} {ipb:>10s} {r['copy']:6.1f} {r['pred']:6.1f} {r['bound']:6s} {meas}  "
            f"{','.join(r['flags']) or 'ok'}{' (new path)' if r['new'] else ''}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="static performance check of the CUDA kernels (no GPU)")
    ap.add_argument("--lib", default=None, help="the extension library (default: the built attnfused/_C*.so)")
    ap.add_argument("--dtype", default="fp16", choices=list(DTYPE_NAMES))
    ap.add_argument("--new", default=NEW_PATH, help="regex on demangled kernel names: the new path (flags fail)")
    ap.add_argument("--measured", type=Path, default=MEASURED, help="a bench.profile_kernels output to compare")
    ap.add_argument("--ops", default="cbam,se", help="comma list of cbam, se (se stands for ECA too)")
    a = ap.parse_args(argv)
    lib = a.lib or find_library()
    cuobjdump = find_tool("cuobjdump")
    if not lib or not cuobjdump:
        print(f"bench.static: skipped: {'no built CUDA library' if not lib else 'cuobjdump not found'}")
        return 0
    T, elem = DTYPE_NAMES[a.dtype]
    uses = {}  # (label, shape, cl) -> PassUse, in table order
    for shape in SHAPES:
        for cl in (True, False):
            for op in a.ops.split(","):
                for u in passes(op, *shape, cl, T, elem) + next_passes(op, *shape, cl, T, elem):
                    uses.setdefault((u.label, shape, cl), u)
    prefixes = {u.kernel for u in uses.values()}
    res, sass, names = read_library(lib, cuobjdump,
                                    lambda d: d.startswith(tuple(prefixes)) or bool(re.search(a.new, d)))
    if not sass:
        print(f"bench.static: skipped: no sm_90 CUDA kernels in {lib}")
        return 0
    shown = os.path.relpath(lib, ROOT) if lib.startswith(str(ROOT)) else os.path.basename(lib)
    print(f"bench.static: {shown} (sm_90), {a.dtype}; H100 model: {SMS} SMs, {BW / 1e12:.1f} TB/s copy, "
          f"{INFLIGHT_NEED / 1024:.0f} KB per SM in flight needed at {LATENCY * 1e6:.0f} us\n")
    kernels = {}
    for mangled, ins in sass.items():
        d = names.get(mangled, mangled)
        m = re.search(r"<[^,<>]+, (\d+)", d)
        kernels[d] = make_kernel(d, res[mangled], ins, elem, int(m.group(1)) if m else None, a.new)
    meas = read_measured(a.measured)
    rows = []
    for (label, shape, cl), u in uses.items():
        k = next((k for d, k in sorted(kernels.items()) if d.startswith(u.kernel)), None)
        if k is not None:
            lay = "cl" if cl else "nchw"
            rows.append(shape_row(k, u, shape, cl, elem, measured_for(meas, k.name, f"{BATCH}x" + "x".join(map(str, shape)), lay)))
    for d, k in sorted(kernels.items()):  # new-path kernels the plan mirror does not know: kernel flags only
        if k.new and not d.startswith(tuple(prefixes)):
            # no loop over a streamed tensor: a small-math kernel (per-sample MLP, conv, gate), not
            # timed by this model; only spills flag it
            streams = bool(k.hot.loop)
            flags = kernel_flags(k) if streams else (["spill"] if k.hot.local or k.res.local else [])
            rows.append(dict(label=short_name(d)[:13], shape="-", lay="-", vec=k.vec, blocks=k.blocks, grid=0,
                             waves=0.0, ipb=None, budget=0, copy=0.0, pred=0.0, bound="-" if streams else "small",
                             meas=None, flags=flags, new=True))
    report(kernels, rows)
    flagged_new = [r for r in rows if r["new"] and r["flags"]]
    old = [r for r in rows if not r["new"]]
    print(f"\ntoday's kernels: {sum(1 for r in old if r['flags'])} of {len(old)} rows flagged (printed, not failed); "
          f"new path ({a.new}): {len(rows) - len(old)} rows, {len(flagged_new)} flagged")
    stale = source_drift()
    if stale:
        print("bench.static: warning: the launch-plan mirror may be out of date; not found in the C++ source:\n  "
              + "\n  ".join(stale))
    return 1 if flagged_new else 0


def source_drift(root: Path = ROOT) -> list[str]:
    """SOURCE_FACTS no longer found in the source (the mirror above must follow such a change)."""
    out = []
    for rel, pats in SOURCE_FACTS.items():
        p = root / rel
        text = p.read_text() if p.is_file() else ""
        out += [f"{rel}: {pat}" for pat in pats if not re.search(pat, text)]
    return out


if __name__ == "__main__":
    sys.exit(main())
