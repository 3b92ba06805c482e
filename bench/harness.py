"""One benchmark case = (block, shape, dtype, layout, mode); one row per provider.

For each case: the float64 reference is computed once; a same-size copy is timed (the
floor, docs/contract.md §6); then every provider that can run is built with the reference's weights,
checked against the float64 result (output, and gradients for bwd/train) and, only if it
agrees, timed: all of the case's providers and the copy together, their samples
interleaved (see timing). On a GPU the host time to issue one call is taken apart (`host_ms`, see
timing.host_ms), and a row whose host time exceeds its GPU time is noted as host-bound. Bytes saved
for backward (unique storages, parameters excluded) and the peak memory of one call (GPU) are
measured apart from the timing.
"""
from __future__ import annotations

import copy
import gc
import os
import traceback
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import blocks, parity
from .providers import PROVIDERS, Provider
from .shapes import shape_str
from .timing import Timer, synchronize

MODES = ("fwd", "bwd", "train")  # fwd: inference; bwd: dx only; train: forward + dx + weight grads
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}

# the CSV's columns; the first thirteen are fixed by the issue
COLUMNS = ["device", "torch", "triton", "commit", "date", "block", "shape", "dtype", "layout", "mode", "provider",
           "median_ms", "copy_ms", "status", "min_ms", "host_ms", "speedup_eager", "speedup_compile", "copy_frac",
           "gbps", "warm_ms", "warm_copy_ms", "rel_err", "tol", "x_bytes", "saved_bytes", "saved_x", "peak_bytes",
           "threads", "note"]


@dataclass(frozen=True)
class Case:
    block: str
    shape: tuple[int, int, int, int]
    dtype: str
    layout: str
    mode: str

    def __str__(self):
        return f"{self.block} {shape_str(self.shape)} {self.dtype} {self.layout} {self.mode}"


def _input(case: Case, device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh random x and grad_y (never zeros), in the case's dtype and memory format."""
    g = torch.Generator(device=device).manual_seed(seed)
    fmt = LAYOUTS[case.layout]
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.shape, generator=g, device=device).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(case.shape, generator=g, device=device).to(dtype).contiguous(memory_format=fmt)
    return x, dy


def _param_names(mod: nn.Module) -> list[str]:
    return [n.removeprefix("_orig_mod.") for n, _ in mod.named_parameters()]


def _prepare(mod: nn.Module, x: torch.Tensor, mode: str):
    """The input and the tensors to differentiate for `mode` (weights need grads only in train)."""
    for p in mod.parameters():
        p.requires_grad_(mode == "train")
    if mode == "fwd":
        return x, []
    xg = x.detach().requires_grad_(True)
    return xg, [xg] + (list(mod.parameters()) if mode == "train" else [])


def evaluate(mod: nn.Module, x, dy, mode: str) -> tuple[list[torch.Tensor], list[str]]:
    """What the parity check compares: y, and dx (+ weight grads in train)."""
    xin, wrt = _prepare(mod, x, mode)
    with torch.set_grad_enabled(mode != "fwd"):
        y = mod(xin)
        if mode == "fwd":
            return [y], ["y"]
        grads = torch.autograd.grad(y, wrt, dy)
    names = ["dx"] + (["d" + n for n in _param_names(mod)] if mode == "train" else [])
    return [y.detach(), *grads], ["y", *names]


def step_fn(mod: nn.Module, x, dy, mode: str):
    """The timed call. bwd re-runs the backward of one stored forward."""
    xin, wrt = _prepare(mod, x, mode)
    if mode == "fwd":
        return lambda: mod(xin)
    if mode == "bwd":
        y = mod(xin)
        return lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)
    return lambda: torch.autograd.grad(mod(xin), wrt, dy)


def saved_bytes(mod: nn.Module, x) -> int:
    """Bytes of the unique storages autograd saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in mod.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    xg = x.detach().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mod(xg)
    del y
    return sum(seen.values())


def peak_bytes(fn, device) -> int | None:
    """Memory one call allocates at its peak, above what was allocated before (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) - base


def is_host_bound(row: dict) -> bool:
    """Issuing a call takes the host longer than the GPU takes to run it: the GPU waits on the host."""
    host, gpu = row.get("host_ms"), row.get("median_ms")
    return bool(host and gpu and host > gpu)


def mark_host_bound(row: dict) -> None:
    if is_host_bound(row):
        what = f"host-bound: {row['host_ms']:.3g} ms to issue > {row['median_ms']:.3g} ms GPU"
        row["note"] = f"{row['note']}; {what}" if row.get("note") else what


def host_bound(rows: list[dict]) -> list[str]:
    """One line per host-bound row (none on CPU, where host_ms is not measured)."""
    return [f"{r['block']} {r['shape']} {r['dtype']} {r['layout']} {r['mode']} {r['provider']}: "
            f"{r['host_ms']:.3g} ms to issue, {r['median_ms']:.3g} ms on the GPU" for r in rows if is_host_bound(r)]


def _failed(row: dict, e: Exception) -> None:
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    row.update(status="ERROR", note=f"{type(e).__name__}: {msg}", median_ms=None)
    if os.environ.get("BENCH_TRACEBACK"):
        traceback.print_exc()


def unavailable(name: str, device, dtype) -> str | None:
    if name not in PROVIDERS:
        return f"unknown provider {name!r}; the providers are {list(PROVIDERS)}"
    return PROVIDERS[name].unavailable(torch.device(device), dtype)


def run_case(case: Case, providers: dict[str, Provider], timer: Timer, device, seed: int = 0,
             on_step=lambda what: None) -> list[dict]:
    """Rows for `case`, one per provider in `providers` (already filtered to those that can run)."""
    device = torch.device(device)
    dtype = DTYPES[case.dtype]
    C = case.shape[1]
    torch.manual_seed(seed)
    master = blocks.make(case.block, C).to(device)  # float32 master weights, default (random) init
    ref = copy.deepcopy(master).to(dtype=dtype)
    x, dy = _input(case, device, seed)

    # the oracle, and the error of the PyTorch reference in the case's dtype
    want, _ = evaluate(copy.deepcopy(master).double(), x.double(), dy.double(), case.mode)
    got, names = evaluate(copy.deepcopy(ref), x, dy, case.mode)
    eager_err, _ = parity.max_rel_err(got, want, names)
    tol = parity.bound(dtype, eager_err)
    del got

    x_bytes = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    fns = {"copy": lambda: dst.copy_(x)}
    rows, mods = [], {}
    for name, prov in providers.items():  # build, compile and check; time nothing yet
        row = {"block": case.block, "shape": shape_str(case.shape), "dtype": case.dtype, "layout": case.layout,
               "mode": case.mode, "provider": name, "tol": tol, "x_bytes": x_bytes,
               "threads": torch.get_num_threads()}
        rows.append(row)
        try:
            mod = prov.build(case.block, C, ref)
            got, names = evaluate(mod, x, dy, case.mode)  # also the compile, outside the timing
            err, worst = parity.max_rel_err(got, want, names)
            del got
            row["rel_err"] = err
            if err <= tol:
                fn = step_fn(mod, x, dy, case.mode)
                with torch.set_grad_enabled(case.mode != "fwd"):
                    fn()  # the timed call must run too (bwd: retain_graph under compile)
                mods[name], fns[name] = mod, fn
            else:
                row.update(status="WRONG", note=f"rel. error {err:.3g} of {worst} > {tol:.3g}; not timed")
        except Exception as e:  # a provider that fails is reported, the others still run
            _failed(row, e)
        on_step(name)

    with torch.set_grad_enabled(case.mode != "fwd"):
        times = timer.time_all(fns)
        hosts = timer.host_all({k: f for k, f in fns.items() if k != "copy"})  # {} on CPU
    on_step("timing")
    copy_ms = times["copy"]["median"]
    for row in rows:
        row.update(copy_ms=copy_ms, warm_copy_ms=times["copy"]["warm"])
        name = row["provider"]
        if name not in times:
            continue
        t = times[name]
        row.update(status="ok", median_ms=t["median"], min_ms=t["min"], warm_ms=t["warm"],
                   copy_frac=copy_ms / t["median"], gbps=2 * x_bytes / t["median"] / 1e6,
                   host_ms=hosts.get(name))
        mark_host_bound(row)
        try:
            with torch.set_grad_enabled(case.mode != "fwd"):
                row["peak_bytes"] = peak_bytes(fns[name], device)
            if case.mode != "fwd":
                row["saved_bytes"] = sb = saved_bytes(mods[name], x)
                row["saved_x"] = sb / x_bytes
        except Exception as e:
            _failed(row, e)
    del fns, mods
    gc.collect()
    synchronize(device)

    base = {r["provider"]: r.get("median_ms") for r in rows}
    for r in rows:
        if r.get("median_ms"):
            for col, prov in (("speedup_eager", "eager"), ("speedup_compile", "compile")):
                if base.get(prov):
                    r[col] = base[prov] / r["median_ms"]
    return rows
