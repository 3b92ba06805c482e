"""Output of a run: the stdout table, the CSV, the plots, the device folder's README, and
the markdown table of the project README (`python -m bench.report CSV --markdown`)."""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from .harness import COLUMNS


def _fmt(v, digits: int = 4) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.0f}" if abs(v) >= 10 ** digits else f"{v:.{digits}g}"  # no 1.91e+03
    return str(v)


# ----------------------------------------------------------------------------- stdout table

_TABLE = [("block", "block"), ("shape", "shape"), ("dtype", "dtype"), ("layout", "layout"), ("mode", "mode"),
          ("provider", "provider"), ("median_ms", "ms"), ("host_ms", "host ms"), ("copy_ms", "copy ms"), ("speedup_eager", "x eager"),
          ("speedup_compile", "x compile"), ("copy_frac", "copy frac"), ("saved_x", "saved/x"),
          ("status", "status"), ("note", "")]


def table(rows: list[dict]) -> str:
    cells = [[h for _, h in _TABLE]] + [[_fmt(r.get(k), 3 if k.startswith(("speedup", "copy_f", "saved"))
                                                else 4) for k, _ in _TABLE] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_TABLE))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


# ----------------------------------------------------------------------------- CSV

def write_csv(rows: list[dict], meta: dict, path: Path, columns: list[str] = COLUMNS) -> None:
    """`meta` then each row, under `columns` (the microbenchmark's by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v, 6) for k, v in {**meta, **r}.items()})


def read_csv(path: Path) -> list[dict]:
    def num(v):
        try:
            return float(v)
        except ValueError:
            return v
    with open(path, newline="") as f:
        return [{k: (num(v) if v != "" else None) if k not in ("commit", "shape", "torch", "triton") else v
                 for k, v in r.items()} for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------- plots

def _grid(rows, value: str, skip: tuple[str, ...], title: str, ylabel: str, path: Path) -> Path | None:
    """Grouped bars: one panel per (block) x (mode, layout), shapes on x, one bar per provider."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get(value) not in (None, "") and r["provider"] not in skip]
    if not rows:
        return None
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    cols = list(dict.fromkeys((r["mode"], r["layout"]) for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(len(blocks), len(cols), figsize=(3.2 + 3.0 * len(cols), 0.6 + 2.4 * len(blocks)),
                             squeeze=False, sharey="row")
    width = 0.8 / len(provs)
    for i, b in enumerate(blocks):
        for j, (m, lay) in enumerate(cols):
            ax = axes[i][j]
            sub = [r for r in rows if r["block"] == b and (r["mode"], r["layout"]) == (m, lay)]
            shapes = list(dict.fromkeys(r["shape"] for r in sub))
            for k, p in enumerate(provs):
                val = {r["shape"]: r[value] for r in sub if r["provider"] == p}
                ax.bar([s + (k - (len(provs) - 1) / 2) * width for s in range(len(shapes))],
                       [val.get(s, 0) or 0 for s in shapes], width, label=p, color=f"C{k}")
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xticks(range(len(shapes)), [s.split("x", 1)[1] for s in shapes], rotation=30, fontsize=7)
            ax.set_title(f"{b} {m} {lay}" + (f" (N={shapes[0].split('x')[0]})" if shapes else ""), fontsize=9)
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    return save_figure(fig, axes, title, path)


def save_figure(fig, axes, title: str, path: Path) -> Path:
    """The legend in the first panel, the title, written to `path` at 90 dpi, closed."""
    import matplotlib.pyplot as plt

    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


NO_PLOTS = ("[bench] no plots: matplotlib is not installed; `pip install matplotlib` (or the `bench` extra) "
            "and run again to get them")


def plots(rows: list[dict], meta: dict, stem: Path) -> list[Path]:
    """`<stem>_speedup_<dtype>.png` (over eager; 1 = eager) and `<stem>_copyfrac_<dtype>.png`
    (copy time / block time; 1 = as fast as a copy), one pair per dtype and batch. Without
    matplotlib: none, and one line on stderr that says how to get them (the table and CSV stand)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(NO_PLOTS, file=sys.stderr)
        return []
    out = []
    groups = defaultdict(list)
    for r in rows:
        groups[(r["dtype"], r["shape"].split("x")[0])].append(r)
    for (dt, n), sub in groups.items():
        tag = f"{dt}_n{n}"
        where = f"{meta['device']}, {dt}, batch {n}, torch {meta['torch']}, commit {meta['commit']}"
        out.append(_grid(sub, "speedup_eager", ("eager",), f"speed-up over eager PyTorch ({where})",
                         "x eager", stem.with_name(f"{stem.name}_speedup_{tag}.png")))
        out.append(_grid(sub, "copy_frac", (), f"fraction of copy speed, copy_ms / ms ({where})",
                         "copy / block", stem.with_name(f"{stem.name}_copyfrac_{tag}.png")))
    return [p for p in out if p is not None]


# ----------------------------------------------------------------------------- README of a device folder
# A device folder holds the current run of each kind, one `<stem>.csv`/`<stem>.json` (and plots) per
# stem; a new run under the same stem replaces the files (git keeps the old ones) and its summary
# (commit, date, command, note) moves to HISTORY, so the README lists every run ever made there.

HISTORY = "history.jsonl"
_SUMMARY = ("device", "device_long", "torch", "triton", "commit", "date", "command", "note", "wall_s")


def write_run_meta(meta: dict, extra: dict, stem: Path) -> None:
    stem.with_name(stem.name + ".json").write_text(json.dumps({**meta, **extra}, indent=1) + "\n")


def retire_run(stem: Path) -> bool:
    """Append the summary of the run in `<stem>.json` to the folder's HISTORY; False if none."""
    path = stem.with_name(stem.name + ".json")
    if not path.exists():
        return False
    old = json.loads(path.read_text())
    entry = {"stem": stem.name} | {k: old[k] for k in _SUMMARY if old.get(k) not in (None, "")}
    with open(stem.parent / HISTORY, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return True


def save_run(rows: list[dict], meta: dict, stem: Path, columns: list[str], facts: dict) -> None:
    """A run's files: `<stem>.csv` (under `columns`), `<stem>.json` (meta and the run's facts), and
    the README of the folder listing every run (written last: it links the plots already there).
    The run it replaces, if any, keeps its summary in the folder's HISTORY."""
    retire_run(stem)
    write_csv(rows, meta, stem.with_suffix(".csv"), columns)
    write_run_meta(meta, facts, stem)
    write_device_readme(stem.parent)


def _run_files(folder: Path, stem: str) -> list[Path]:
    """The files of run `stem`: its CSV, JSON and plots (not those of a stem it prefixes: b128, b128_s34)."""
    return sorted(p for p in folder.iterdir() if p.name in (f"{stem}.csv", f"{stem}.json")
                  or re.fullmatch(re.escape(stem) + r"_(speedup|copyfrac)_[^_]+_n\d+\.png", p.name))


def retire(stem: Path) -> list[Path]:
    """Retire run `stem` by hand (a later run of another name replaced it): its summary goes to
    HISTORY, its files are deleted (git keeps them), the README is rewritten. Returns the files."""
    if not retire_run(stem):
        raise SystemExit(f"--retire: expected a run's CSV with its JSON beside it; no {stem.name}.json in {stem.parent}")
    files = _run_files(stem.parent, stem.name)
    for f in files:
        f.unlink()
    write_device_readme(stem.parent)
    return files


def _earlier_runs(folder: Path) -> list[dict]:
    path = folder / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_device_readme(folder: Path) -> Path:
    """README.md listing every run in the folder (from the `<stem>.json` files the runs leave), then
    the earlier runs whose files later runs replaced (from HISTORY), each with its commit."""
    runs = [json.loads(p.read_text()) | {"stem": p.stem} for p in sorted(folder.glob("*.json"))]
    earlier = _earlier_runs(folder)
    name = (runs or earlier or [{}])[0].get("device", folder.name)
    lines = [f"# Benchmark results: {name}", "",
             "Written by `python -m bench` / `python -m bench.e2e` / `python -m bench.traffic`; do not edit by "
             "hand." + (" The history of these runs and what they showed: [NOTES.md](NOTES.md)."
                        if (folder / "NOTES.md").exists() else ""), ""]
    for r in runs:
        lines += [f"## {r['stem']}", "",
                  f"- device: {r.get('device_long', r['device'])}",
                  f"- torch {r['torch']}, triton {r['triton']}, python {r.get('python', '?')}, "
                  f"threads {r.get('threads', '?')}, OMP_WAIT_POLICY {r.get('omp_wait_policy')}, "
                  f"load average at the end {r.get('load_avg_end', '?')}",
                  f"- commit {r['commit']}, date {r['date']}, wall time {r.get('wall_s', '?')} s",
                  f"- command: `{r.get('command', '?')}`"]
        if r.get("note"):
            lines.append(f"- note: {r['note']}")
        if r.get("skipped"):
            lines.append("- providers not run here: " + "; ".join(f"{k} ({v})" for k, v in r["skipped"].items()))
        files = [p.name for p in _run_files(folder, r["stem"]) if p.suffix != ".json"]
        lines += ["- files: " + ", ".join(f"[{f}]({f})" for f in files), ""]
        lines += [f"![{f}]({f})" for f in files if f.endswith(".png") and "speedup" in f] + [""]
    if earlier:
        lines += ["## Earlier runs", "",
                  "Replaced by the runs above; their files are in the git history of this folder "
                  "(`git log --stat -- <this folder>`).", ""]
        lines += [f"- `{e['stem']}`: commit {e.get('commit', '?')}, {e.get('date', '?')}, torch {e.get('torch', '?')}: "
                  f"`{e.get('command', '?')}`" + (f"; {e['note']}" if e.get("note") else "") for e in earlier]
        lines.append("")
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- markdown for the project README

def markdown(rows: list[dict]) -> str:
    """One line per (block, shape, dtype, layout, mode): copy time, each provider's time and
    speed-up over eager (WRONG/ERROR where it failed the parity check or did not run)."""
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    keys = list(dict.fromkeys((r["block"], r["shape"], r["dtype"], r["layout"], r["mode"]) for r in rows))
    by = {(r["block"], r["shape"], r["dtype"], r["layout"], r["mode"], r["provider"]): r for r in rows}
    head = ["block", "shape", "dtype", "layout", "mode", "copy ms"] + [f"{p} ms (x eager)" for p in provs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        cells = list(k)
        first = next(by[k + (p,)] for p in provs if k + (p,) in by)
        cells.append(_fmt(first.get("copy_ms"), 3))
        for p in provs:
            r = by.get(k + (p,))
            if r is None:
                cells.append("")
            elif r.get("status") != "ok":
                cells.append(str(r.get("status")))
            elif p == "eager":
                cells.append(_fmt(r["median_ms"], 3))
            else:
                cells.append(f"{_fmt(r['median_ms'], 3)} ({_fmt(r.get('speedup_eager'), 2)}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict], provider: str) -> str:
    """Compact README table: one line per (block, shape), one column per (mode, layout, dtype),
    each cell `provider`'s time and its speed-ups over eager and over torch.compile."""
    cols = list(dict.fromkeys((r["mode"], r["layout"], r["dtype"]) for r in rows))
    keys = list(dict.fromkeys((r["block"], r["shape"]) for r in rows))
    by = {(r["block"], r["shape"], r["mode"], r["layout"], r["dtype"]): r for r in rows if r["provider"] == provider}
    multi = len({c[2] for c in cols}) > 1
    head = ["block", "shape"] + [f"{m} {lay}" + (f" {dt}" if multi else "") for m, lay, dt in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        cells = list(k)
        for c in cols:
            r = by.get(k + c)
            if r is None:
                cells.append("")
            elif r.get("status") != "ok":
                cells.append(str(r.get("status")))
            else:
                sp = [f"{_fmt(r.get(s), 2)}x" for s in ("speedup_eager", "speedup_compile") if r.get(s)]
                cells.append(f"{_fmt(r['median_ms'], 3)} ms ({' / '.join(sp)})" if sp else _fmt(r["median_ms"], 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    ap.add_argument("csv", type=Path)
    ap.add_argument("--markdown", action="store_true", help="print the README table of the CSV")
    ap.add_argument("--table", action="store_true", help="print the stdout table of the CSV")
    ap.add_argument("--summary", metavar="PROVIDER",
                    help="print the compact README table of PROVIDER (time, x eager / x compile)")
    ap.add_argument("--retire", action="store_true",
                    help="move the run of CSV to its folder's history: summary kept, files deleted, README rewritten")
    a = ap.parse_args(argv)
    if a.retire:
        for f in retire(a.csv.with_suffix("")):
            print(f"removed {f}")
        return
    rows = read_csv(a.csv)
    if a.summary:
        print(summary(rows, a.summary))
    else:
        print(table(rows) if a.table else markdown(rows))


if __name__ == "__main__":
    main()
