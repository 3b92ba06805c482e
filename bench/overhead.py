"""python -m bench.overhead: what each layer of a fused block costs per call, on CPU.

At a tiny shape (2x64x8x8 float32, one thread), where a kernel takes microseconds, one call of
each block goes through every layer below, all of them timed in one run, their samples interleaved
(medians; see bench.timing), on this thread's CPU time by default (everything runs on it with one
thread, and the time the OS gives other processes stays out). Each layer's time is printed as its
excess over the raw kernel:

  kernel      torch.ops.attnfused_C.<op>: the C++ kernel through the dispatcher, no Python
  backend     attnfused.backends.kernel("cpu", <op>): the backend's Python kernel
  op          torch.ops.attnfused.<op>(..., "cpu"): the public custom op
  op+grad     the custom op on inputs that require grad: its registered autograd
  functional  attnfused.functional.<fn>(..., backend="cpu")
  module      attnfused.<Name>(..., backend="cpu")
  eager       attnfused.reference.<Name>, the same block in eager PyTorch (module / eager: the ratio)

`fwd` is inference (no grad; op+grad records the graph), `train` a forward and a backward for
the input and the weights: kernel, backend and op call the backward op after the forward op, the
others run torch.autograd.grad. The ops and their arguments are the ones the module's own call
dispatches (recorded once, under a dispatch mode), so every layer runs the same kernels.

The floor of the mechanisms, in the same run: `empty_like` (what a no-op kernel does), then a
custom op whose kernel is that no-op, the same op with a registered autograd formula, and an
`autograd.Function` around the no-op.

  python -m bench.overhead                      # prints the tables
  python -m bench.overhead --reps 51 --out bench/results/<device>/overhead.txt
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import env
from .blocks import make
from .timing import Timer

SHAPE = (2, 64, 8, 8)
BACKEND = "cpu"
LAYERS = ("kernel", "backend", "op", "op+grad", "functional", "module", "eager")
# block key (bench.blocks) -> the name printed
BLOCKS = {"se": "SEBlock", "eca": "ECABlock", "spatial": "SpatialAttention", "cbam_fc": "CBAMBlock-FC"}


def _functional(block: str):
    """The functional call the fused module makes (public API, the module's weights)."""
    import attnfused.functional as F

    if block == "se":
        return lambda m, x: F.channel_attention(x, m.fc_layers[0].weight, None, m.fc_layers[2].weight, None,
                                                kind="mlp", pool="avg", backend=BACKEND)
    if block == "eca":
        return lambda m, x: F.channel_attention(x, m.conv.weight, kind="conv", pool="avg", backend=BACKEND)
    if block == "spatial":
        return lambda m, x: F.spatial_attention(x, m.conv.weight, maps="max_mean", backend=BACKEND)
    if block == "cbam_fc":
        ca = lambda m: m.channel_attention_block  # noqa: E731
        return lambda m, x: F.cbam(x, ca(m).fc_layers[0].weight, None, ca(m).fc_layers[2].weight, None,
                                   m.spatial_attention_block.conv.weight, kind="mlp", pool="avg+max",
                                   maps="max_mean", backend=BACKEND)
    raise ValueError(f"block must be one of {list(BLOCKS)}, got {block!r}")


class _Record(TorchDispatchMode):
    """Records the calls of `torch.ops.attnfused.*` ops (op, args) that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "attnfused":
            self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def _record(fn) -> list[tuple]:
    with _Record() as rec:
        fn()
    if not rec.calls:
        raise RuntimeError("the call dispatched no torch.ops.attnfused op: nothing to time layer by layer")
    for func, args in rec.calls:
        if not args or args[-1] != BACKEND:
            raise RuntimeError(f"{func} was called with backend {args[-1] if args else None!r}, expected {BACKEND!r}")
    return rec.calls


def _seq(pairs):
    def run():
        for f, a in pairs:
            f(*a)
    return run


def _low_layers(calls: list[tuple]) -> dict:
    """The three lowest layers of a recorded sequence of op calls: kernel, backend, op (no grad)."""
    import attnfused.backends as B

    names = [func._schema.name.split("::")[1] for func, _ in calls]
    args = [a[:-1] for _, a in calls]  # the op's arguments less `backend`
    return {"kernel": _seq([(getattr(torch.ops.attnfused_C, n), a) for n, a in zip(names, args)]),
            "backend": _seq([(B.kernel(BACKEND, n), a) for n, a in zip(names, args)]),
            "op": _seq(calls)}


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _grad_step(forward, wrt, dy):
    def run():
        out = forward()
        return torch.autograd.grad(out[0] if isinstance(out, (tuple, list)) else out, wrt, dy)
    return run


def block_fns(block: str, seed: int = 0) -> dict[str, dict]:
    """{"fwd": {layer: fn}, "train": {layer: fn}} for one block at SHAPE (run them with grad enabled)."""
    g = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    eager = make(block, SHAPE[1])
    fused = make(block, SHAPE[1], backend=BACKEND)
    fused.load_state_dict(copy.deepcopy(eager.state_dict()))
    functional = _functional(block)
    xg = x.detach().requires_grad_(True)
    wrt, eager_wrt = [xg, *fused.parameters()], [xg, *eager.parameters()]

    # fwd: what an inference call dispatches; train: a forward with grad, then its backward
    with torch.no_grad():
        fwd_calls = _record(lambda: fused(x))
    train_calls = _record(lambda: torch.autograd.grad(fused(xg), wrt, dy))
    train_fwd = _record(lambda: fused(xg))  # the forward's share of train_calls
    if len(train_fwd) != 1:
        raise RuntimeError(f"op+grad times one forward op; the module's forward dispatched {len(train_fwd)}")
    op, op_args = train_fwd[0]

    fwd = {k: _no_grad(f) for k, f in _low_layers(fwd_calls).items()}
    fwd |= {"op+grad": lambda: op(*op_args), "functional": _no_grad(lambda: functional(fused, x)),
            "module": _no_grad(lambda: fused(x)), "eager": _no_grad(lambda: eager(x))}
    train = {k: _no_grad(f) for k, f in _low_layers(train_calls).items()}
    train |= {"op+grad": _grad_step(lambda: op(*op_args), wrt, dy),
              "functional": _grad_step(lambda: functional(fused, xg), wrt, dy),
              "module": _grad_step(lambda: fused(xg), wrt, dy),
              "eager": _grad_step(lambda: eager(xg), eager_wrt, dy)}
    return {"fwd": fwd, "train": train}


# ----------------------------------------------------------------------------- the mechanisms' floor

@torch.library.custom_op("attnfused_bench::noop", mutates_args=())
def _noop_op(x: torch.Tensor, w: torch.Tensor, option: str) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("attnfused_bench::noop_grad", mutates_args=())
def _noop_grad_op(x: torch.Tensor, w: torch.Tensor, option: str) -> torch.Tensor:
    return torch.empty_like(x)


_noop_grad_op.register_autograd(lambda ctx, grad: (grad, None, None), setup_context=lambda ctx, inputs, output: None)


class _NoopFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, option):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


FLOORS = ("empty_like", "noop op", "noop op+grad", "noop Function")


def floor_fns() -> dict[str, dict]:
    """The floor's items, fwd (graph recorded where the item has autograd) and train (+ its backward)."""
    x, dy, w = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE[1])
    xg = x.detach().requires_grad_(True)
    # (call, input): the op without autograd takes x, which needs no grad
    calls = {"empty_like": (torch.empty_like, xg), "noop op": (lambda t: _noop_op(t, w, "a"), x),
             "noop op+grad": (lambda t: _noop_grad_op(t, w, "a"), xg),
             "noop Function": (lambda t: _NoopFunction.apply(t, w, "a"), xg)}
    fwd = {k: (lambda f=f, t=t: f(t)) for k, (f, t) in calls.items()}
    train = {k: _grad_step(lambda f=f: f(xg), [xg], dy) for k, (f, _) in calls.items()
             if k not in ("empty_like", "noop op")}
    train["empty_like"] = lambda: (torch.empty_like(xg), torch.empty_like(dy))  # a forward's and a backward's output
    return {"fwd": fwd, "train": train}


# ----------------------------------------------------------------------------- run and report

CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def measure(blocks=tuple(BLOCKS), reps: int = 51, sample_s: float = 0.002, seed: int = 0,
            clock: str = "thread") -> dict:
    """{(block or "floor", mode): {item: median us}}, every item timed in one interleaved run."""
    fns, keys = {}, {}
    groups = [(b, block_fns(b, seed)) for b in blocks] + [("floor", floor_fns())]
    for what, by_mode in groups:
        for mode, items in by_mode.items():
            for item, f in items.items():
                fns[f"{what}/{mode}/{item}"] = f
                keys[f"{what}/{mode}/{item}"] = (what, mode, item)
    timer = Timer(torch.device("cpu"), reps=reps, sample_s=sample_s, warmup_s=min(0.05, 10 * sample_s),
                  clock=CLOCKS[clock])
    with torch.enable_grad():
        times = timer.time_all(fns)
    out: dict = {}
    for k, t in times.items():
        what, mode, item = keys[k]
        out.setdefault((what, mode), {})[item] = 1e3 * t["median"]
    return out


def _table(lines: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in lines)


def layer_table(res: dict) -> str:
    """One line per (block, mode): the kernel's us, each layer's excess over it, eager's us and the ratio."""
    lines = [["block", "mode", "kernel"] + [f"+{k}" for k in LAYERS[1:-1]] + ["eager", "module/eager"]]
    for (what, mode), t in res.items():
        if what != "floor":
            k = t["kernel"]
            lines.append([BLOCKS[what], mode, f"{k:.1f}"] + [f"{t[layer] - k:+.1f}" for layer in LAYERS[1:-1]]
                         + [f"{t['eager']:.1f}", f"{t['module'] / t['eager']:.2f}x"])
    return _table(lines)


def floor_table(res: dict) -> str:
    """One line per mode: empty_like's us, and each mechanism's excess over it."""
    lines = [["floor", "empty_like"] + [f"+{k}" for k in FLOORS[1:]]]
    for (what, mode), t in res.items():
        if what == "floor":
            e = t["empty_like"]
            lines.append([mode, f"{e:.1f}"] + [f"{t[k] - e:+.1f}" if k in t else "" for k in FLOORS[1:]])
    return _table(lines)


def report(res: dict, reps: int, clock: str) -> str:
    shape = "x".join(map(str, SHAPE))
    return "\n".join([
        f"us per call ({clock} clock): {shape} float32, {torch.get_num_threads()} thread(s), backend {BACKEND!r}, "
        f"medians of {reps} interleaved samples; +layer = that layer's time minus the raw kernel's "
        f"(fwd: no grad; train: fwd + bwd)",
        layer_table(res), "",
        "floor of the mechanisms, us: +item = its time minus empty_like's (fwd: graph recorded; train: + backward)",
        floor_table(res)])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default=",".join(BLOCKS), help=f"comma list of {list(BLOCKS)}")
    ap.add_argument("--reps", type=int, default=51, help="samples per median (default 51)")
    ap.add_argument("--sample-s", type=float, default=0.002, help="least seconds per sample (default 0.002)")
    ap.add_argument("--clock", choices=list(CLOCKS), default="thread",
                    help="thread: this thread's CPU time (default; with one thread); wall: elapsed time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the output to this file")
    a = ap.parse_args(argv)
    blocks = [b.strip() for b in a.blocks.split(",") if b.strip()]
    if not blocks or any(b not in BLOCKS for b in blocks):
        raise SystemExit(f"--blocks: choose from {list(BLOCKS)}, got {a.blocks!r}")
    torch.set_num_threads(a.threads)
    env.keep_freed_memory()
    if a.clock == "thread" and a.threads != 1:
        raise SystemExit("--clock thread counts this thread only: use it with --threads 1, or --clock wall")
    res = measure(blocks, a.reps, a.sample_s, a.seed, a.clock)
    meta = env.meta("cpu")
    text = (f"python -m bench.overhead {' '.join(argv)}\n{env.device_name('cpu')}, torch {meta['torch']}, "
            f"commit {meta['commit']}, {meta['date']}, load average {os.getloadavg()[0]:.2f}\n\n"
            + report(res, a.reps, a.clock))
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
