"""Compile every Triton kernel variant the launchers use, for sm_90, on a machine without a
GPU: the interpreter does not compile, so this is what catches code that only the compiler
rejects. Run it WITHOUT TRITON_INTERPRET, in its own process:

    python -m tests.triton.compile_sm90

It runs each backend launcher on small CPU tensors with the kernel launches recorded instead
of run (the outputs are then garbage; only the launch arguments matter), and compiles each
distinct (kernel, signature, constexprs, num_warps) to PTX and cubin with Triton's ptxas, as
defined and as torch.compile's generated code copies it (`inductor_copy`).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: this compiles for the GPU"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_CALLS = {}
_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
          torch.int32: "*i32"}


def _record(fn, args, kwargs, configs=None):
    names = fn.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    warps = kwargs.get("num_warps", 4)
    for cfg in configs or [None]:
        b = dict(bound)
        w = warps
        if cfg is not None:
            b.update(cfg.kwargs)
            w = cfg.num_warps
        sig, const = {}, {}
        for i, name in enumerate(names):
            v = b[name]
            if i in fn.constexprs:
                sig[name] = "constexpr"
                const[name] = v
            elif isinstance(v, torch.Tensor):
                sig[name] = _TYPES[v.dtype]
            elif isinstance(v, bool):
                sig[name] = "i1"
            elif isinstance(v, int):
                sig[name] = "i64" if abs(v) >= 2**31 else "i32"
            elif isinstance(v, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: argument {name} of type {type(v)}")
        key = (fn.__name__, tuple(sig.items()), tuple(sorted(const.items())), w)
        _CALLS[key] = (fn, sig, const, w)


def _patch():
    def jit_getitem(self, grid):
        return lambda *a, **k: _record(self, a, k)

    def tuner_getitem(self, grid):
        return lambda *a, **k: _record(self.fn, a, k, self.configs)

    JITFunction.__getitem__ = jit_getitem
    Autotuner.__getitem__ = tuner_getitem


def _exercise():
    from attnfused._options import CHANNEL_POOLS, SPATIAL_MAPS
    from attnfused.backends.triton import cbam, channel, spatial
    from attnfused.backends.triton import reduce as red

    red.programs_wanted = lambda x: 4 * 132  # as on an H100 (x is a CPU tensor here)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for cl in (False, True):
            x = torch.randn(2, 40, 9, 7).to(dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            g = torch.randn_like(x)
            C = x.shape[1]
            for pool in CHANNEL_POOLS:
                for kind, bias in (("mlp", False), ("mlp", True), ("conv", False)):
                    if kind == "mlp":
                        w1, w2 = torch.randn(10, C), torch.randn(C, 10)
                        b1, b2 = (torch.randn(10), torch.randn(C)) if bias else (None, None)
                    else:
                        w1, w2, b1, b2 = torch.randn(1, 1, 5), None, None, None
                    for act, gate, pad in (("relu", "sigmoid", "zeros"), ("silu", "hardsigmoid", "circular")):
                        opts = (kind, pool, act, gate, pad)
                        y, *saved = channel.channel_attention_forward(x, w1, b1, w2, b2, *opts)
                        channel.channel_attention_backward(g, x, *saved, w1, b1, w2, b2, *opts)
                        if pool != "avg+max" or act != "relu":
                            continue
                        for maps in SPATIAL_MAPS:
                            sw = torch.randn(1, 1 if maps == "mix" else 2, 7, 7)
                            sb = torch.randn(1) if bias else None
                            sopts = (maps, gate)
                            out = cbam.cbam_forward(x, w1, b1, w2, b2, sw, sb, *opts, *sopts)
                            cbam.cbam_backward(g, x, *out[1:], w1, b1, w2, b2, sw, sb, *opts, *sopts)
                            y, smaps, sargmax = spatial.spatial_attention_forward(x, sw, sb, *sopts)
                            spatial.spatial_attention_backward(g, x, smaps, sargmax, sw, sb, *sopts)
            smaps, sargmax = spatial.spatial_pool(x)
            spatial.spatial_pool_backward(torch.randn_like(smaps), x, sargmax)
            t = torch.rand(2, 9, 7)
            spatial.spatial_scale_forward(x, t)
            spatial.spatial_scale_backward(g, x, t)
            # the forwards' tail in the output pass: residual and relu, residual alone, relu alone
            r = torch.randn_like(x)
            w1, w2, sw = torch.randn(10, C), torch.randn(C, 10), torch.randn(1, 2, 7, 7)
            opts = ("mlp", "avg+max", "relu", "sigmoid", "zeros", "first")
            channel.channel_attention_forward(x, w1, None, w2, None, *opts, r, "relu")
            cbam.cbam_forward(x, w1, None, w2, None, sw, None, *opts[:-1], "max_mean", "sigmoid", "first", r, "none")
            spatial.spatial_attention_forward(x, sw, None, "max_mean", "sigmoid", "first", None, "relu")
            spatial.spatial_scale_forward(x, t, r, "relu")


@functools.lru_cache(maxsize=None)
def inductor_copy(fn: JITFunction) -> JITFunction:
    """`fn` as torch.compile's generated code defines it: Inductor copies a user kernel's source and
    every global it uses (helper kernels, constants) into a module of its own. Under torch.compile
    the Triton backend's ops run these copies (attnfused.ops), so each must compile as well."""
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code
    src = ("import triton\nimport triton.language as tl\n\n@triton.jit\n"
           + user_defined_triton_kernel_transitive_closure_source_code(fn))
    path = Path(tempfile.mkdtemp(prefix="attnfused_inductor_")) / f"{fn.__name__}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, fn.__name__)


def main():
    _patch()
    _exercise()
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for (name, *_), (fn, sig, const, warps) in sorted(_CALLS.items(), key=lambda kv: kv[0][0]):
        for what, kernel in (("", lambda: fn), (" (Inductor's copy)", lambda: inductor_copy(fn))):
            try:
                triton.compile(ASTSource(kernel(), sig, const), target=target, options={"num_warps": warps})
            except Exception as e:  # report every failure, not just the first
                failed += 1
                print(f"FAILED {name}{what} {const} num_warps={warps}:\n{e}\n", file=sys.stderr)
    print(f"compiled {2 * len(_CALLS) - failed}/{2 * len(_CALLS)} kernel variants for sm_90 "
          f"({len(_CALLS)} variants, each as defined and as Inductor copies it)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
