"""python -m bench.e2e: a ResNet-50 with SE, ECA or CBAM blocks, end to end.

Times inference and a training step (forward, cross-entropy, backward, SGD step) of the
plain ResNet-50 and of ResNet-50 with an attention block after each bottleneck's last
BatchNorm (on the residual branch, before the addition, as the SE/CBAM/ECA papers place
it): the reference blocks (eager) against the same model converted to fused blocks
(`attnfused.convert`, same state_dict), in images/s, with the attention's overhead over
the plain network. All models of a mode are timed interleaved, in the same run.

  python -m bench.e2e --quick                       # well under a minute on 2 CPU cores
  python -m bench.e2e --batch 64 --res 224 --amp bf16 --layout cl    # a GPU
  python -m bench.e2e --model timm:seresnet50       # a timm model, converted vs original

Anchor (ECA-Net paper): CBAM-ResNet-50 trained at 472 images/s against 1024 for ResNet-50
(46%); our goal is at least 90% on a Hopper GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import blocks, env, parity, report
from .progress import bar
from .timing import Timer

# the attention of each model variant: a bench block name (None: the plain ResNet-50)
ATTN = {"plain": None, "se": "se", "eca": "eca", "cbam": "cbam_fc"}
MODES = ("infer", "train")
AMP = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
COLUMNS = ["device", "torch", "triton", "commit", "date", "model", "attn", "provider", "mode", "batch", "res",
           "amp", "layout", "median_ms", "min_ms", "images_s", "vs_plain", "attn_overhead_ms", "rel_err",
           "backend", "threads", "note"]
QUICK = dict(batch=2, res=64, reps=3, sample_s=0.0)


def resnet50(attn: str | None, backend: str | None = None, num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50 with `attn` (a bench block) after every bottleneck's bn3:
    reference blocks when backend is None, else fused ones on `backend`."""
    try:
        from torchvision.models import resnet50 as tv_resnet50
    except ImportError as e:
        raise SystemExit(f"bench.e2e needs torchvision (pip install torchvision): {e}")
    model = tv_resnet50(num_classes=num_classes)
    if attn is not None:
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            for bottleneck in stage:
                c = bottleneck.bn3.num_features
                bottleneck.bn3 = nn.Sequential(bottleneck.bn3, blocks.make(attn, c, backend))
    return model


def fused_copy(model: nn.Module, attn: str | None, backend: str) -> tuple[nn.Module, str]:
    """The model with fused attention and the same weights, and how it was made:
    `attnfused.convert` where it fuses every block, else the fused classes built in the same
    architecture with the model's state_dict loaded."""
    import attnfused

    note = "attnfused.convert is not available"
    if hasattr(attnfused, "convert"):
        fused, entries = attnfused.convert(model, backend=backend, report=True)
        done = sum(e.converted for e in entries)
        if entries and done == len(entries):
            return fused, f"attnfused.convert: {done}/{len(entries)} attention modules fused"
        left = next((e for e in entries if not e.converted), None)
        note = f"attnfused.convert fused {done}/{len(entries)}" + (f" ({left.reason})" if left else "")
    fused = resnet50(attn, backend).to(next(model.parameters()).device)
    fused.load_state_dict(model.state_dict())
    return fused, note + "; fused classes built and the state_dict loaded instead"


def _timm_models(name: str, backend: str, device) -> tuple[nn.Module, nn.Module, str, int] | str:
    try:
        import timm
    except ImportError:
        return "timm is not installed (pip install timm); skipping --model timm:" + name
    import attnfused

    if not hasattr(attnfused, "convert"):
        return "attnfused.convert is not available yet; skipping --model timm:" + name
    model = timm.create_model(name, pretrained=False).to(device)
    fused, entries = attnfused.convert(model, backend=backend, report=True)
    done = sum(e.converted for e in entries)
    note = f"attnfused.convert: {done}/{len(entries)} attention modules fused"
    if done == 0:
        note += " (nothing to fuse: the timing compares two identical models)"
    return model, fused, note, model.default_cfg.get("input_size", (3, 224, 224))[-1]


def _step(model: nn.Module, x, target, mode: str, amp):
    autocast = (torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext())
    if mode == "infer":
        model.eval()

        def infer():
            with torch.no_grad(), autocast:
                return model(x)
        return infer
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
    return train


def _logits_err(a: nn.Module, b: nn.Module, x, amp) -> float:
    """Relative difference of the two models' eval logits (float32 runs: same weights, same math)."""
    a.eval(), b.eval()
    with torch.no_grad():
        autocast = torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with autocast:
            return parity.rel_err(b(x).float(), a(x).float())


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"tiny run for CI and a first look: {QUICK}")
    ap.add_argument("--device", default=None)
    ap.add_argument("--attn", default="plain,se,eca,cbam", help=f"comma list of {list(ATTN)}")
    ap.add_argument("--model", default=None, help="timm:NAME: a timm model converted vs the original instead")
    ap.add_argument("--modes", default="infer,train")
    ap.add_argument("--batch", type=int, default=None, help="default 64 on GPU, 8 on CPU")
    ap.add_argument("--res", type=int, default=None, help="image size (default 224 on GPU, 112 on CPU)")
    ap.add_argument("--amp", default="none", choices=list(AMP), help="autocast dtype (the weights stay fp32)")
    ap.add_argument("--layout", default="nchw", choices=("nchw", "cl"))
    ap.add_argument("--backend", default="auto", help="backend of the fused blocks")
    ap.add_argument("--reps", type=int, default=None, help="samples per median (default 10)")
    ap.add_argument("--sample-s", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--name", default=None, help="file stem (default e2e, e2e_quick, or e2e_timm_NAME)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    a.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = a.device.type == "cuda"
    q = QUICK if a.quick else {}
    a.batch = a.batch or q.get("batch") or (64 if gpu else 8)
    a.res = a.res or q.get("res") or (224 if gpu else 112)
    a.reps = a.reps or q.get("reps") or 10
    a.sample_s = a.sample_s if a.sample_s is not None else q.get("sample_s", 0.0)
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    dev = a.device
    if dev.type == "cpu":
        env.use_all_cores()
        env.keep_freed_memory()
    fmt = torch.channels_last if a.layout == "cl" else torch.contiguous_format
    amp = AMP[a.amp]
    modes = [m for m in a.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        raise SystemExit(f"--modes: choose from {list(MODES)}, got {modes}")
    import attnfused.backends as B

    backend_used = B.resolve(a.backend, torch.empty(1, 1, 1, 1, device=dev, dtype=amp or torch.float32))

    # (model name, attn, provider, module); the eager models first, each fused one after its twin
    models, notes = [], {}
    torch.manual_seed(a.seed)
    if a.model:
        if not a.model.startswith("timm:"):
            raise SystemExit(f"--model: only timm:NAME is supported, got {a.model!r}")
        name = a.model[5:]
        got = _timm_models(name, a.backend, dev)
        if isinstance(got, str):
            print(f"[bench.e2e] {got}")
            return 0
        orig, fused, note, res = got
        a.res = a.res if ("--res" in argv or a.quick) else res  # the model's own size unless asked
        models = [(name, "timm", "eager", orig), (name, "timm", "fused", fused)]
        notes[(name, "fused")] = note
    else:
        for attn in [s for s in a.attn.split(",") if s]:
            if attn not in ATTN:
                raise SystemExit(f"--attn: choose from {list(ATTN)}, got {attn!r}")
            eager = resnet50(ATTN[attn]).to(dev)
            models.append(("resnet50", attn, "eager", eager))
            if ATTN[attn] is not None:
                fused, how = fused_copy(eager, ATTN[attn], a.backend)
                models.append(("resnet50", attn, "fused", fused))
                notes[(attn, "fused")] = how
    models = [(n, at, p, m.to(dev, memory_format=fmt)) for n, at, p, m in models]

    g = torch.Generator(device=dev).manual_seed(a.seed)
    x = torch.randn(a.batch, 3, a.res, a.res, generator=g, device=dev).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (a.batch,), generator=g, device=dev)
    errs = {}
    for i, (n, at, p, m) in enumerate(models):
        if p == "fused":
            errs[(at, p)] = _logits_err(models[i - 1][3], m, x, amp)

    meta = env.meta(str(dev))
    out = a.out or env.RESULTS / meta["device"]
    stem = out / (a.name or (f"e2e_timm_{a.model[5:]}" if a.model else "e2e_quick" if a.quick else "e2e"))
    # GPU: a training step is ~100 ms, so do_bench needs a long window to take ~10 samples
    timer = Timer(dev, reps=a.reps, sample_s=a.sample_s, warmup_s=0.0, rep_ms=1000, warmup_calls=1, warm_l2=False)
    rows = []
    t0 = time.perf_counter()
    pbar = bar(len(modes), enabled=not a.no_progress)
    for mode in modes:
        pbar.set_description(f"e2e {mode}")
        # train steps change the weights: each mode starts from copies, so all models stay twins
        fns = {(n, at, p): _step(copy.deepcopy(m), x, target, mode, amp) for n, at, p, m in models}
        times = timer.time_all(fns)
        plain = times.get(("resnet50", "plain", "eager"), {}).get("median")
        for (n, at, p), t in times.items():
            ms = t["median"]
            rows.append({"model": n, "attn": at, "provider": p, "mode": mode, "batch": a.batch, "res": a.res,
                         "amp": a.amp, "layout": a.layout, "median_ms": ms, "min_ms": t["min"],
                         "images_s": a.batch / ms * 1e3, "vs_plain": plain / ms if plain else None,
                         "attn_overhead_ms": ms - plain if plain and at != "plain" else None,
                         "rel_err": errs.get((at, p)), "backend": backend_used if p == "fused" else "",
                         "threads": torch.get_num_threads(), "note": notes.get((at, p), "")})
        pbar.update(1)
    pbar.close()
    wall = time.perf_counter() - t0

    cols = ["model", "attn", "provider", "mode", "batch", "res", "median_ms", "images_s", "vs_plain",
            "attn_overhead_ms", "rel_err"]
    cells = [cols] + [[report._fmt(r.get(c), 4) for c in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells))
    for (at, p), note in notes.items():
        print(f"  {at} {p}: {note}")
    report.save_run(rows, meta, stem, COLUMNS, env.run_facts(dev, "python -m bench.e2e " + shlex.join(argv), wall))
    print(f"\n{len(rows)} rows in {wall:.0f} s -> {stem.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
