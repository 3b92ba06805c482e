"""python -m bench: microbenchmarks of the attention blocks (docs/contract.md §6).

Every provider that can run on the device and dtype is checked against the float64
reference, then timed beside a same-size copy from the same run. Writes a table to stdout
and `<name>.csv`, `<name>.json`, README.md and, with matplotlib installed, `<name>_*.png` into --out.

  python -m bench --quick                       # the main job: < 2 min on 2 CPU cores
  python -m bench --blocks se,cbam_fc --shapes resnet50 --batch 8,32 --modes fwd,train
  python -m bench --shapes 8x256x56x56,odd --dtypes fp16,bf16 --providers eager,compile,cuda,triton
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from . import env, report
from .blocks import BLOCKS
from .harness import DTYPES, LAYOUTS, MODES, Case, host_bound, run_case, unavailable
from .progress import bar
from .providers import PROVIDERS
from .shapes import PRESETS, parse_shapes
from .timing import Timer

# --quick: every provider once on one mid-size shape (torch.compile costs ~15 s per graph on 2 cores)
QUICK = dict(blocks="se,cbam_fc", shapes="small", batch="2", modes="fwd,train", layouts="nchw", dtypes="fp32",
             reps=5, sample_s=0.01)


def _csv_list(s: str, choices, what: str) -> list[str]:
    items = [i.strip() for i in s.split(",") if i.strip()]
    if items == ["all"]:
        if isinstance(choices, dict):  # a provider may stay out of `all` (asked for by name only)
            return [c for c, v in choices.items() if getattr(v, "in_all", True)]
        return list(choices)
    bad = [i for i in items if i not in choices]
    if bad:
        raise SystemExit(f"--{what}: unknown {bad}; choose from {list(choices)} or 'all'")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"small run for CI and a first look: {QUICK}")
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if present)")
    ap.add_argument("--blocks", default=None, help=f"comma list of {list(BLOCKS)} or 'all' (default all)")
    ap.add_argument("--providers", default=None,
                    help=f"comma list of {list(PROVIDERS)} or 'all' (default all but the '+compile' ones; "
                         "each runs only where it can)")
    ap.add_argument("--modes", default=None, help="comma list of fwd,bwd,train (default all)")
    ap.add_argument("--dtypes", default=None, help=f"comma list of {list(DTYPES)} (default fp32)")
    ap.add_argument("--layouts", default=None, help="comma list of nchw,cl (default both)")
    ap.add_argument("--shapes", default=None,
                    help=f"comma list of presets {sorted(PRESETS)} or CxHxW / NxCxHxW (default resnet50)")
    ap.add_argument("--batch", default=None, help="comma list of batch sizes (default 8 on CPU, 32 on GPU)")
    ap.add_argument("--reps", type=int, default=None, help="CPU samples per median (default 10)")
    ap.add_argument("--sample-s", type=float, default=None, help="CPU: least seconds per sample (default 0.02)")
    ap.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench measuring time per figure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<device>/)")
    ap.add_argument("--name", default=None, help="file stem of the outputs (default 'quick' or 'bench')")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--list", action="store_true", help="list providers (and why any cannot run), presets; exit")
    a = ap.parse_args(argv)
    defaults = dict(blocks="all", providers="all", modes="fwd,bwd,train", dtypes="fp32", layouts="nchw,cl",
                    shapes="resnet50", batch=None, reps=10, sample_s=0.02)
    for k, v in (QUICK if a.quick else {}).items():
        defaults[k] = v
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.batch is None:
        a.batch = "32" if a.device.type == "cuda" else "8"
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    dev = a.device
    if dev.type == "cpu":
        env.prepare_cpu()
    blocks = _csv_list(a.blocks, BLOCKS, "blocks")
    providers = _csv_list(a.providers, PROVIDERS, "providers")
    modes = _csv_list(a.modes, MODES, "modes")
    dtypes = _csv_list(a.dtypes, DTYPES, "dtypes")
    layouts = _csv_list(a.layouts, LAYOUTS, "layouts")
    try:
        shapes = parse_shapes([s for s in a.shapes.split(",") if s], [int(b) for b in a.batch.split(",")])
    except ValueError as e:
        raise SystemExit(str(e))

    # which providers run for each dtype, and why the others do not
    runs, skipped = {}, {}
    for dt in dtypes:
        runs[dt] = {}
        for p in providers:
            why = unavailable(p, dev, DTYPES[dt])
            if why is None:
                runs[dt][p] = PROVIDERS[p]
            else:
                skipped[p if len(dtypes) == 1 else f"{p}/{dt}"] = why
    if a.list:
        print(f"device {dev} ({env.device_name(str(dev))}); dtypes {dtypes}")
        for dt in dtypes:
            print(f"  {dt}: runs {list(runs[dt])}")
        for p, why in skipped.items():
            print(f"  not {p}: {why}")
        print("presets: " + "; ".join(f"{k} {v}" for k, v in PRESETS.items()))
        return 0
    for p, why in skipped.items():
        print(f"[bench] skipping provider {p}: {why}", file=sys.stderr)

    meta = env.meta(str(dev))
    out = a.out or env.RESULTS / meta["device"]
    stem = out / (a.name or ("quick" if a.quick else "bench"))
    cases = [Case(b, s, dt, lay, m) for dt in dtypes for s in shapes for b in blocks for lay in layouts
             for m in modes]
    timer = Timer(dev, reps=a.reps, sample_s=a.sample_s, rep_ms=a.rep_ms)
    t0 = time.perf_counter()
    pbar = bar(sum(1 + len(runs[c.dtype]) for c in cases), enabled=not a.no_progress)
    rows: list[dict] = []
    for case in cases:
        def step(what, case=case):
            pbar.set_description(f"{case} {what}")
            pbar.update(1)
        rows += run_case(case, runs[case.dtype], timer, dev, seed=a.seed, on_step=step)
        report.write_csv(rows, meta, stem.with_suffix(".csv"))  # partial results survive an interrupt
    pbar.close()
    wall = time.perf_counter() - t0

    print(report.table(rows))
    for line in host_bound(rows):  # GPU rows whose issue time exceeds their GPU time
        print("host-bound:", line)
    bad = [r for r in rows if r.get("status") != "ok"]
    extra = env.run_facts(dev, "python -m bench " + shlex.join(argv), wall) | {"skipped": skipped}
    pngs = [] if a.no_plots else report.plots(rows, meta, stem)
    report.save_run(rows, meta, stem, report.COLUMNS, extra)
    print(f"\n{len(rows)} rows in {wall:.0f} s ({len(bad)} not ok) -> {stem.with_suffix('.csv')}"
          + (f", {len(pngs)} plots" if pngs else ""))
    return 1 if any(r.get("status") == "WRONG" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
