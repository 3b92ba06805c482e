"""python -m bench.e2e: whole attention networks, as a user runs them, eager and compiled.

Times inference and a training step (forward, cross-entropy, backward, SGD step) of each model
under each provider:
  eager              the original model
  compile            torch.compile of the original model
  fused              the model converted by attnfused.convert (same state_dict)
  fused+compile      the converted model, then torch.compile
  fused(+compile)-untailed  the same, converted with fuse_tail=False (the residual blocks' add and
                     relu as their own ops: what the tail in the attention's pass saves; not by default)
  fused(+compile)-bn-prologue  the same, converted with fuse_norm=True (the eval-mode BatchNorm
                     before the attention read as its prologue: what that saves; not by default)
  compile-ro         torch.compile(mode="reduce-overhead") of the original (CUDA graphs; GPU only)
  fused+compile-ro   the converted model under mode="reduce-overhead" (GPU only)
Models: torchvision's ResNet-50 with SE, ECA or CBAM after every bottleneck's bn3 (on the residual
branch, before the addition, as the papers place it; `--attn`), and timm models (`--model`:
seresnet50, ecaresnet50d, efficientnet_b0, resnet50_cbam = resnet50 with attn_layer="cbam").

Before any timing each provider's output (inference: the logits; training: the logits and every
parameter's gradient) is checked against the original model run in float64. A fused provider must
be within the dtype's tolerance, or twice the error of the original model run the same way (eager,
and compile for fused+compile) where that is larger (docs/contract.md §4); compile of the original must
pass on the logits (its gradients are reported in the note: Inductor's numerics are its own). A
provider that fails is reported WRONG and not timed. The first call (which compiles) is not timed; its
extra cost is reported apart (`*_compile_s`). The providers of a model are timed interleaved, as
medians of `--reps` samples. The fields follow timm's benchmark.py (`infer_samples_per_sec`,
`infer_step_time` in ms, `infer_batch_size`, `infer_img_size`, the same for `train_`,
`param_count` in millions), with `amp` and `channels_last`; `*_vs_eager` and `*_vs_compile` are
throughputs over those of the same model's eager and compile rows, `*_vs_plain` over the plain
ResNet-50 run the same way (fused -> eager, fused+compile -> compile).

  python -m bench.e2e --quick                     # a smoke run: a small ResNet with SE, tiny images
  python -m bench.e2e --attn plain,se,cbam --batch 8 --res 112
  python -m bench.e2e --batch 64 --res 224 --amp bf16 --layout cl     # a GPU, every model
  python -m bench.e2e --model seresnet50 --providers eager,fused

Writes <stem>.csv, <stem>.md (the table), <stem>.json and <stem>_images_s_<amp>_n<batch>.png (with
matplotlib) under bench/results/<device>/.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import env, report
from .e2e_models import DEFAULT_PROVIDERS, PROVIDERS, TIMM, TV_ATTN, Provider, baseline, convert, resnet50  # noqa: F401
from .e2e_models import timm_spec, tv_spec, with_convert_kwargs
from .progress import bar
from .timing import Timer, synchronize

MODES = ("infer", "train")
AMP = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
QUICK = dict(batch=2, res=64, reps=2, attn="se", model="", layers="1,1,1,1")
_PER_MODE = ["samples_per_sec", "step_time", "step_time_min", "batch_size", "img_size", "vs_eager", "vs_compile",
             "vs_plain", "compile_s", "rel_err", "status"]
COLUMNS = (["device", "torch", "triton", "commit", "date", "model", "family", "attn", "provider", "backend", "amp",
            "channels_last", "param_count"] + [f"{m}_{k}" for m in MODES for k in _PER_MODE] + ["threads", "note"])


# ----------------------------------------------------------------------------- one call of a model

def _autocast(x, amp):
    return torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def outputs(fn, module: nn.Module, x, target, mode: str, amp) -> dict[str, torch.Tensor]:
    """What the parity check compares: the logits, and in training every parameter's gradient
    (by name, as the converted model keeps the names; the weights are left unchanged)."""
    if mode == "infer":
        module.eval()
        with torch.no_grad(), _autocast(x, amp):
            return {"logits": fn(x).detach().float().clone()}
    module.train()
    module.zero_grad(set_to_none=True)
    with _autocast(x, amp):
        logits = fn(x)
    F.cross_entropy(logits.float(), target).backward()
    params = dict(module.named_parameters())
    grads = torch.cat([params[n].grad.detach().reshape(-1).double() for n in sorted(params)
                       if params[n].grad is not None])
    module.zero_grad(set_to_none=True)
    return {"logits": logits.detach().float().clone(), "grads": grads}


def step(fn, module: nn.Module, x, target, mode: str, amp, cudagraphs: bool):
    """The timed call: inference without gradients, or a whole training step with SGD."""
    if mode == "infer":
        module.eval()

        def infer():
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad(), _autocast(x, amp):
                return fn(x)
        return infer
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def train():
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with _autocast(x, amp):
            loss = F.cross_entropy(fn(x), target)
        loss.backward()
        opt.step()
    return train


def check(out: dict, eager: dict, ref: dict, dtype: torch.dtype, base: dict | None = None,
          keys: tuple[str, ...] | None = None) -> tuple[float, str]:
    """(the largest relative difference from eager, "ok" or "WRONG ..."): each output of `keys` (default
    all) within the dtype's tolerance of the float64 run, or twice the error of the original model
    run the same way (eager's, and `base`'s: compile's for fused+compile) where that is larger."""
    from attnfused.accuracy import GRAD_TOLERANCE, TOLERANCE, bound, rel_err

    worst, failed = 0.0, []
    for key, ref_t in ref.items():
        worst = max(worst, rel_err(out[key], eager[key]))
        if keys is not None and key not in keys:
            continue
        target = (GRAD_TOLERANCE if key == "grads" else TOLERANCE)[dtype]
        pytorch_err = max(rel_err(o[key], ref_t) for o in (eager, base) if o is not None)
        err, lim = rel_err(out[key], ref_t), bound(target, pytorch_err)
        if not err <= lim:
            failed.append(f"{key} rel err {err:.3g} against float64 > {lim:.3g}")
    return worst, "WRONG: " + "; ".join(failed) if failed else "ok"


# ----------------------------------------------------------------------------- one model, one mode

@dataclass
class Run:
    provider: Provider
    module: nn.Module  # the model whose parameters train (the compiled wrapper's original)
    fn: object  # what is called: the module or its compiled wrapper
    first_s: float = 0.0


def _counter_total(name: str) -> int:
    from torch._dynamo.utils import counters
    return sum(counters[name].values())


def time_model(orig: nn.Module, fused: dict, provs: list[Provider], mode: str, x, target, a,
               timer: Timer) -> dict[str, dict]:
    """{provider: results} of one model in one mode: parity first, then interleaved timing. `fused`:
    the converted model per convert keyword arguments."""
    import torch._dynamo

    torch._dynamo.reset()  # a fresh cache per model and mode: no recompile limit, no stale guards
    dev, amp = x.device, AMP[a.amp]
    dtype = amp or torch.float32
    ref_model = copy.deepcopy(orig).double()
    ref = outputs(ref_model, ref_model, x.double(), target, mode, None)
    del ref_model
    out: dict[str, dict] = {}
    runs: dict[str, Run] = {}
    eager_out, got_by = None, {}
    for p in provs:  # eager first, and compile before fused+compile: each is checked against its baseline
        module = copy.deepcopy(fused[p.convert_kwargs] if p.fused else orig)
        fn = torch.compile(module, mode=p.compile_mode, dynamic=False) if p.compiles else module
        breaks = _counter_total("graph_break") if p.compiles else 0
        try:
            synchronize(dev)
            t0 = time.perf_counter()
            got = outputs(fn, module, x, target, mode, amp)
            synchronize(dev)
            first = time.perf_counter() - t0
        except Exception as e:  # a provider that cannot run here: say so, time the others
            if p.name == "eager":
                raise
            out[p.name] = {"status": f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        got_by[p.name] = got
        if p.name == "eager":
            eager_out = got
        if a.verbose:
            print(f"[bench.e2e]   {mode} {p.name}: first call {first:.1f} s", flush=True)
        note = []
        if p.fused:  # ours: held to what PyTorch does with the original model run the same way
            rel, status = check(got, eager_out, ref, dtype, base=got_by.get(baseline(p)))
        else:  # PyTorch's own (compile): its forward confirms the same model runs; Inductor's
            # gradients have numerics of their own (through train-mode BatchNorm at small batches
            # they came out 5e-3 off float64 where eager's were 5e-5 off), so they are only reported
            rel, status = check(got, eager_out, ref, dtype, keys=("logits",))
            if "grads" in ref and p.name != "eager":
                from attnfused.accuracy import rel_err
                note.append(f"gradients {rel_err(got['grads'], ref['grads']):.2g} off float64, eager's "
                            f"{rel_err(eager_out['grads'], ref['grads']):.2g}")
        if p.compiles and _counter_total("graph_break") > breaks:
            note.append(f"{_counter_total('graph_break') - breaks} graph breaks")
        out[p.name] = {"rel_err": rel, "status": status, "note": note}
        if status == "ok":
            runs[p.name] = Run(p, module, fn, first)
    fns = {k: step(r.fn, r.module, x, target, mode, amp, r.provider.compile_mode == "reduce-overhead")
           for k, r in runs.items()}
    for k, f in fns.items():  # one untimed step each: what the first call cost beyond it was compiling
        synchronize(dev)
        t0 = time.perf_counter()
        f()
        synchronize(dev)
        if runs[k].provider.compiles:
            out[k]["compile_s"] = max(0.0, runs[k].first_s - (time.perf_counter() - t0))
    for k, t in timer.time_all(fns).items():
        out[k].update(step_time=t["median"], step_time_min=t["min"], samples_per_sec=a.batch / t["median"] * 1e3)
    return out


# ----------------------------------------------------------------------------- output

def _ratio(num, den):
    return num / den if num and den else None


def fill_ratios(rows: list[dict]) -> None:
    """`*_vs_eager`, `*_vs_compile` (same model) and `*_vs_plain` (the plain ResNet-50, same way of running)."""
    by = {(r["model"], r["attn"], r["provider"]): r for r in rows}
    for r in rows:
        for m in MODES:
            sps = r.get(f"{m}_samples_per_sec")
            for col, prov in (("vs_eager", "eager"), ("vs_compile", "compile")):
                other = by.get((r["model"], r["attn"], prov), {})
                r[f"{m}_{col}"] = _ratio(sps, other.get(f"{m}_samples_per_sec"))
            if r["family"] == "tv" and r["attn"] != "plain":
                plain = by.get((r["model"], "plain", baseline(PROVIDERS.get(r["provider"], PROVIDERS["eager"]))), {})
                r[f"{m}_vs_plain"] = _ratio(sps, plain.get(f"{m}_samples_per_sec"))


def _cell(r: dict, m: str) -> str:
    sps = r.get(f"{m}_samples_per_sec")
    status = r.get(f"{m}_status") or ""
    if sps is None:
        return status.split(":")[0] if status else ""
    shown = {"eager": ("plain",), "compile": ("eager", "plain")}.get(r["provider"], ("eager", "compile", "plain"))
    vs = [f"{r[f'{m}_vs_{k}']:.2f}x {k}" for k in shown if r.get(f"{m}_vs_{k}") is not None]
    return f"{sps:.1f}" + (f" ({', '.join(vs)})" if vs else "")


def markdown(rows: list[dict], modes: list[str]) -> str:
    """One line per model and provider: images/s per mode with the ratios to eager and compile."""
    head = ["model", "attn", "provider"] + [f"{m} img/s" for m in modes] + [f"{m} compile s" for m in modes] + \
           ["max rel diff to eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rel = [r.get(f"{m}_rel_err") for m in modes if r.get(f"{m}_rel_err") is not None]
        cells = [r["model"], r["attn"], r["provider"]] + [_cell(r, m) for m in modes] + \
                [report._fmt(r.get(f"{m}_compile_s"), 3) for m in modes] + [f"{max(rel):.2g}" if rel else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], modes: list[str], title: str, path: Path) -> Path | None:
    """Grouped bars of images/s: one panel per mode, one group per model, one bar per provider."""
    try:
        import matplotlib
    except ImportError:
        print("[bench.e2e] no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(f"{r['model']} {r['attn']}" if r["family"] == "tv" else r["model"] for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(1.0 + 1.2 * len(models) * len(modes), 3.6), squeeze=False)
    width = 0.8 / len(provs)
    for ax, m in zip(axes[0], modes):
        for k, p in enumerate(provs):
            val = {(f"{r['model']} {r['attn']}" if r["family"] == "tv" else r["model"]): r.get(f"{m}_samples_per_sec")
                   for r in rows if r["provider"] == p}
            ax.bar([i + (k - (len(provs) - 1) / 2) * width for i in range(len(models))],
                   [val.get(name) or 0 for name in models], width, label=p, color=f"C{k}")
        ax.set_xticks(range(len(models)), models, rotation=25, fontsize=7, ha="right")
        ax.set_ylabel(f"{m} images/s", fontsize=8)
        ax.set_title(m, fontsize=9)
    return report.save_figure(fig, axes, title, path)


def _write_table(rows: list[dict], a, stem: Path) -> str:
    """The ratios filled in, the CSV and a bare markdown table of the rows so far; the table."""
    fill_ratios(rows)
    report.write_csv(rows, env.meta(str(a.device)), stem.with_suffix(".csv"), COLUMNS)
    table = markdown(rows, a.modes)
    stem.with_suffix(".md").write_text(table + "\n")
    return table


# ----------------------------------------------------------------------------- command line

def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    ap.add_argument("--device", default=None)
    ap.add_argument("--attn", default=None, help=f"torchvision ResNet-50 variants, a comma list of {list(TV_ATTN)} "
                    "(default all, or none when only --model is given)")
    ap.add_argument("--layers", default=None, help="bottlenecks per stage of the torchvision ResNet "
                    "(default 3,4,6,3: ResNet-50; fewer: a small network of the same structure)")
    ap.add_argument("--model", default=None, help=f"timm models, a comma list (timm: prefix optional) of {list(TIMM)} "
                    "or any timm name (default all of those, or none when only --attn is given)")
    ap.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS),
                    help=f"comma list of {list(PROVIDERS)} (default {DEFAULT_PROVIDERS}); eager is always run (the "
                    "others are checked against it)")
    ap.add_argument("--convert-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra attnfused.convert keyword argument for the fused providers (a Python literal)")
    ap.add_argument("--modes", default="infer,train")
    ap.add_argument("--batch", type=int, default=None, help="default 64 on GPU, 8 on CPU")
    ap.add_argument("--res", type=int, default=None, help="image size (default 224 on GPU, 112 on CPU; a timm model "
                    "alone in the run takes its own)")
    ap.add_argument("--amp", default="none", choices=list(AMP), help="autocast dtype (the weights stay fp32)")
    ap.add_argument("--layout", default="nchw", choices=("nchw", "cl"))
    ap.add_argument("--backend", default="auto", help="backend of the fused blocks")
    ap.add_argument("--reps", type=int, default=None, help="samples per median (default 10)")
    ap.add_argument("--sample-s", type=float, default=None, help="CPU: least seconds per sample (default 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default=None, help="a line for the results folder's README (e.g. the machine's load)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--name", default=None, help="file stem (default e2e or e2e_quick)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="print each provider's first call as it happens")
    a = ap.parse_args(argv)
    a.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = a.device.type == "cuda"
    q = QUICK if a.quick else {}
    if a.attn is None and a.model is None:
        a.attn, a.model = q.get("attn", ",".join(TV_ATTN)), q.get("model", ",".join(TIMM))
    a.attn, a.model = a.attn or "", a.model or ""
    try:
        a.layers = tuple(int(n) for n in (a.layers or q.get("layers") or "3,4,6,3").split(","))
    except ValueError:
        raise SystemExit(f"--layers: expected a comma list of integers, got {a.layers!r}")
    if len(a.layers) != 4 or min(a.layers) < 1:
        raise SystemExit(f"--layers: expected four block counts >= 1, got {a.layers}")
    a.batch = a.batch or q.get("batch") or (64 if gpu else 8)
    a.res_given = a.res is not None or a.quick
    a.res = a.res or q.get("res") or (224 if gpu else 112)
    a.reps = a.reps or q.get("reps") or 10
    a.sample_s = a.sample_s if a.sample_s is not None else 0.0
    a.modes = [m for m in a.modes.split(",") if m]
    if not a.modes or any(m not in MODES for m in a.modes):
        raise SystemExit(f"--modes: choose from {list(MODES)}, got {a.modes}")
    asked = {p for p in a.providers.split(",") if p} | {"eager"}
    bad = sorted(asked - set(PROVIDERS))
    if bad:
        raise SystemExit(f"--providers: choose from {list(PROVIDERS)}, got {bad}")
    names = [p for p in PROVIDERS if p in asked]  # in PROVIDERS' order: each baseline before its fused twin
    extra = {}
    for item in a.convert_arg:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--convert-arg: expected KEY=VALUE, got {item!r}")
        extra[key] = _literal(value)
    a.providers = [with_convert_kwargs(PROVIDERS[p], extra) for p in names]
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    dev = a.device
    if dev.type == "cpu":
        env.prepare_cpu()
    fmt = torch.channels_last if a.layout == "cl" else torch.contiguous_format
    amp = AMP[a.amp]
    import attnfused.backends as B

    backend_used = B.resolve(a.backend, torch.empty(1, 1, 1, 1, device=dev, dtype=amp or torch.float32))
    specs, skipped_models = [tv_spec(s, a.layers) for s in a.attn.split(",") if s], []
    for name in [s for s in a.model.split(",") if s]:
        got = timm_spec(name)
        (skipped_models.append(got) if isinstance(got, str) else specs.append(got))
    for line in skipped_models:
        print(f"[bench.e2e] {line}")
    if len(specs) == 1 and specs[0].default_res and not a.res_given:
        a.res = specs[0].default_res  # a timm model alone: its own image size unless asked
    skipped = {p.name: why for p in a.providers if (why := p.unavailable(dev))}
    provs = [p for p in a.providers if p.name not in skipped]
    for name, why in skipped.items():
        print(f"[bench.e2e] {name} skipped: {why}")

    g = torch.Generator(device=dev).manual_seed(a.seed)
    x = torch.randn(a.batch, 3, a.res, a.res, generator=g, device=dev).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (a.batch,), generator=g, device=dev)
    meta = env.meta(str(dev))
    out = a.out or env.RESULTS / meta["device"]
    stem = out / (a.name or ("e2e_quick" if a.quick else "e2e"))
    # GPU: a training step is ~100 ms, so do_bench needs a long window to take ~10 samples
    timer = Timer(dev, reps=a.reps, sample_s=a.sample_s, warmup_s=0.0, rep_ms=1000, warmup_calls=1, warm_l2=False)
    rows: list[dict] = []
    t0 = time.perf_counter()
    pbar = bar(len(specs) * len(a.modes), enabled=not a.no_progress)
    built = []  # per model: (spec, original, {convert kwargs: converted}, providers run, rows by provider)
    for spec in specs:
        torch.manual_seed(a.seed)
        orig = spec.build().to(dev, memory_format=fmt)
        fused, notes = {}, [spec.note] if spec.note else []
        for kw in dict.fromkeys(p.convert_kwargs for p in provs if p.fused):
            model, how, done = convert(orig, a.backend, dict(kw))
            fused[kw] = model if done else None
            notes.append(how + (f" {dict(kw)}" if kw else ""))
        # a model without attention converts to itself: its fused rows would time the same model again
        run = [p for p in provs if not p.fused or fused[p.convert_kwargs] is not None]
        params = round(sum(p.numel() for p in orig.parameters()) / 1e6, 2)
        by = {}
        for p in run:
            by[p.name] = r = {"model": spec.name, "family": spec.family, "attn": spec.attn, "provider": p.name,
                              "backend": backend_used if p.fused else "", "amp": a.amp,
                              "channels_last": a.layout == "cl", "param_count": params,
                              "threads": torch.get_num_threads(),
                              "note": "; ".join(notes if p.fused else [n for n in notes if not n.startswith("attn")])}
            rows.append(r)
        built.append((spec, orig, fused, run, by))
    cut = None
    try:
        for mode in a.modes:  # every model's inference first: a run cut short keeps whole modes
            for spec, orig, fused, run, by in built:
                pbar.set_description(f"e2e {spec.name} {spec.attn} {mode}")
                for name, res in time_model(orig, fused, run, mode, x, target, a, timer).items():
                    r = by[name]
                    r.update({f"{mode}_batch_size": a.batch, f"{mode}_img_size": a.res})
                    r.update({f"{mode}_{k}": v for k, v in res.items() if k != "note"})
                    r["note"] = "; ".join([r["note"]] * bool(r["note"]) + [f"{mode}: {n}" for n in res.get("note", [])])
                _write_table(rows, a, stem)  # what is done so far survives a run cut short
                pbar.update(1)
    except KeyboardInterrupt:  # stopped by hand: keep what was measured
        cut = f"cut short by hand during {mode} of {spec.name} {spec.attn}; rows without figures did not run"
        print(f"[bench.e2e] {cut}")
    del built
    pbar.close()
    wall = time.perf_counter() - t0

    table = _write_table(rows, a, stem)
    print(table)
    wrong = [f"{r['model']} {r['attn']} {r['provider']} {m}: {r[f'{m}_status']}" for r in rows for m in a.modes
             if (r.get(f"{m}_status") or "ok") != "ok"]
    for line in wrong:
        print(f"[bench.e2e] {line}")
    facts = env.run_facts(dev, "python -m bench.e2e " + shlex.join(argv), wall)
    a.note = "; ".join(n for n in (a.note, cut) if n) or None
    if a.note:
        facts["note"] = a.note
    if skipped:
        facts["skipped"] = skipped
    where = (f"{meta['device']}, {a.amp}, batch {a.batch}, {a.res}x{a.res}, {a.layout}, torch {meta['torch']}, "
             f"commit {meta['commit']}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, a.modes, f"images/s per model and provider ({where})",
         stem.with_name(f"{stem.name}_images_s_{a.amp}_n{a.batch}.png"))
    head = [f"# bench.e2e: {where}", "", f"- command: `{facts['command']}`",
            f"- wall time {wall:.0f} s, threads {facts['threads']}, load average at the end {facts['load_avg_end']}"]
    head += [f"- note: {a.note}"] if a.note else []
    head += [f"- not run here: {k} ({v})" for k, v in skipped.items()] + [f"- {s}" for s in skipped_models]
    head += ["- cells: images/s (throughput over eager and over compile of the same model, and over the plain "
             "ResNet-50 run the same way); compile s: the first call's extra time, not in the figures", ""]
    stem.with_suffix(".md").write_text("\n".join(head + [table] + ([""] + [f"- {w}" for w in wrong] if wrong else [])
                                                 ) + "\n")
    report.save_run(rows, env.meta(str(dev)), stem, COLUMNS, facts)
    print(f"\n{len(rows)} rows in {wall:.0f} s -> {stem.with_suffix('.csv')}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
