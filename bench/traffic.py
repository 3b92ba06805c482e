"""python -m bench.traffic: the fused CPU blocks against the memory traffic of their own passes.

docs/contract.md §6 counts bytes: a CBAM forward built from three passes over `x` moves 3R+1W, a copy 1R+1W.
On CPU the fused ops take the samples in groups and run every pass over a group while its bytes
may still be in cache, so R is not one fixed cost. This times, interleaved in one run (CPU only,
float32):

- `copy`: a same-size copy (the benchmark's floor);
- compute-free probes (`bench/traffic_probe.cpp`, built just in time on first use by `probe_op()`,
  never part of the installed library): the same sweeps over `x` and `dy`
  with the same grouping, parallel layout and stores as the fused ops, and no arithmetic.
  `fwd 3R+1W` is the CBAM forward as built (pool over space, pool over channels, scale);
  `fwd 2R+1W` a forward that pools over channels inside the scaling pass; `bwd 5R+1W` the
  CBAM backward as built (two dot passes over dy and x, then dx); `bwd 4R+1W` one whose second
  dot pass reads x alone;
- the fused CBAM-FC block (`cpu` backend): forward, and backward through autograd;
- eager PyTorch's forward, and a fifth of it (the forward target of 5x eager).

Each time is also given in copies (time / copy time). A fused op near its probe runs at the speed
of its memory traffic on this machine: only fewer passes make it faster.

  python -m bench.traffic                                   # CBAM-FC, ResNet-50 stages, batch 32, channels_last
  python -m bench.traffic --batch 8,32 --layouts cl,nchw --reps 20
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch

from . import env, report
from .blocks import make
from .shapes import PRESETS, parse_shapes
from .timing import Timer

# the probes: item -> passes (see the op); ITEMS: every timed item, in the order reported
PROBES = {"fwd 3R+1W": "r,r,w", "fwd 2R+1W": "r,w", "bwd 5R+1W": "d,d,p", "bwd 4R+1W": "d,r,p"}
ITEMS = ["copy", "fwd 3R+1W", "fwd 2R+1W", "fused fwd", "eager fwd", "bwd 5R+1W", "bwd 4R+1W", "fused bwd"]
COLUMNS = ["device", "torch", "commit", "date", "block", "shape", "layout", "dtype", "item", "passes",
           "median_ms", "min_ms", "copy_ms", "copies", "threads"]
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


PROBE_SOURCE = Path(__file__).resolve().parent / "traffic_probe.cpp"
PROBE_NAME = "attnfused_traffic_probe"


def probe_op():
    """`torch.ops.attnfused_bench.traffic_probe(x, dy, passes) -> (out, sums)`, compiled from
    traffic_probe.cpp on first use, with the extension's CPU flags and headers, into the
    extension's cache folder (one folder per source, flags and torch, like the extension's)."""
    if not hasattr(torch.ops.attnfused_bench, "traffic_probe"):
        import hashlib

        from attnfused.backends import extension as ext
        from torch.utils.cpp_extension import load

        flags = ext.build_flags(False, "jit", None)
        h = hashlib.sha256(PROBE_SOURCE.read_bytes())
        for p in sorted(ext.headers(with_cuda=False)):
            h.update(Path(p).read_bytes())
        h.update(repr((flags, torch.__version__, sys.version_info[:2])).encode())
        build_dir = ext.cache_dir() / f"traffic_probe-{h.hexdigest()[:16]}"
        build_dir.mkdir(parents=True, exist_ok=True)
        load(PROBE_NAME, [str(PROBE_SOURCE)], extra_cflags=flags["cxx"], extra_ldflags=flags["ldflags"],
             extra_include_paths=flags["include_dirs"], build_directory=str(build_dir), is_python_module=False,
             verbose=False)
    return torch.ops.attnfused_bench.traffic_probe


def probe(passes: str, x: torch.Tensor, dy: torch.Tensor):
    op = probe_op()
    return lambda: op(x, dy, passes)


def check_probe(x: torch.Tensor, dy: torch.Tensor) -> None:
    """The probe copies what its writing pass reads and sums every read: check both once."""
    for passes, src, reads in (("r,r,w", x, [x, x, x]), ("d,d,p", dy, [dy, x, dy, x, dy])):
        out, sums = probe_op()(x, dy, passes)
        want = sum(t.double().sum(dim=(1, 2, 3)) for t in reads)
        if not torch.equal(out, src) or not torch.allclose(sums, want, rtol=1e-4, atol=1e-2 * x[0].numel() ** 0.5):
            raise RuntimeError(f"traffic_probe({passes!r}) did not copy or sum its input")


def case_fns(shape, layout: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).contiguous(memory_format=LAYOUTS[layout])
    dy = torch.randn(shape, generator=g).contiguous(memory_format=LAYOUTS[layout])
    check_probe(x, dy)
    eager = make("cbam_fc", shape[1])
    fused = make("cbam_fc", shape[1], backend="cpu")
    fused.load_state_dict(copy.deepcopy(eager.state_dict()))
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = fused(xg)
    wrt = [xg, *fused.parameters()]
    dst = torch.empty_like(x)

    def no_grad(f):
        def run():
            with torch.no_grad():
                return f(x)
        return run

    fns = {"copy": lambda: dst.copy_(x)}
    fns |= {item: probe(passes, x, dy) for item, passes in PROBES.items()}
    fns |= {"fused fwd": no_grad(fused), "eager fwd": no_grad(eager),
            "fused bwd": lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)}
    return fns


def wide_table(rows: list[dict]) -> str:
    """One line per (shape, layout): each item's ms and, in brackets, copies."""
    by = {(r["shape"], r["layout"], r["item"]): r for r in rows}
    head = ["shape", "layout"] + ITEMS + ["eager fwd / 5"]
    lines = [head]
    for shape, layout in dict.fromkeys((r["shape"], r["layout"]) for r in rows):
        cells = [shape, layout]
        for item in ITEMS:
            r = by[(shape, layout, item)]
            cells.append(f"{r['median_ms']:.3g} ({r['copies']:.2f})")
        eager = by[(shape, layout, "eager fwd")]
        cells.append(f"{eager['median_ms'] / 5:.3g} ({eager['copies'] / 5:.2f})")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench.traffic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="resnet50",
                    help=f"comma list of presets {sorted(PRESETS)} or CxHxW / NxCxHxW (default resnet50)")
    ap.add_argument("--batch", default="32", help="comma list of batch sizes (default 32)")
    ap.add_argument("--layouts", default="cl", help="comma list of nchw,cl (default cl)")
    ap.add_argument("--reps", type=int, default=10, help="samples per median (default 10)")
    ap.add_argument("--sample-s", type=float, default=0.02, help="least seconds per sample (default 0.02)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<device>/)")
    ap.add_argument("--name", default=None, help="file stem (default traffic_n<batch>)")
    a = ap.parse_args(argv)
    layouts = [s.strip() for s in a.layouts.split(",") if s.strip()]
    if not layouts or any(lo not in LAYOUTS for lo in layouts):
        raise SystemExit(f"--layouts: choose from {list(LAYOUTS)}, got {a.layouts!r}")
    shapes = parse_shapes(a.shapes.split(","), [int(b) for b in a.batch.split(",")])

    probe_op()  # compiled here on first use, before anything is timed
    env.prepare_cpu()
    dev = torch.device("cpu")
    meta = env.meta("cpu")
    out = Path(a.out) if a.out else env.RESULTS / meta["device"]
    stem = out / (a.name or "traffic_n" + "_".join(dict.fromkeys(str(s[0]) for s in shapes)))
    timer = Timer(dev, reps=a.reps, sample_s=a.sample_s)
    rows = []
    t0 = time.perf_counter()
    for shape in shapes:
        for layout in layouts:
            times = timer.time_all(case_fns(shape, layout, a.seed))
            copy_ms = times["copy"]["median"]
            for item in ITEMS:
                t = times[item]
                rows.append({"block": "cbam_fc", "shape": "x".join(map(str, shape)), "layout": layout,
                             "dtype": "fp32", "item": item, "passes": PROBES.get(item, ""),
                             "median_ms": t["median"], "min_ms": t["min"], "copy_ms": copy_ms,
                             "copies": t["median"] / copy_ms, "threads": torch.get_num_threads()})
    wall = time.perf_counter() - t0
    print(wide_table(rows))
    report.save_run(rows, meta, stem, COLUMNS, env.run_facts(dev, "python -m bench.traffic " + shlex.join(argv), wall))
    print(f"\n{len(rows)} rows in {wall:.0f} s -> {stem.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
