"""A progress bar: tqdm when installed, else a one-line counter on stderr."""
from __future__ import annotations

import sys
import time


class _Simple:
    def __init__(self, total: int, desc: str):
        self.total, self.n, self.desc, self.t0 = total, 0, desc, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def set_description(self, desc: str):
        self.desc = desc

    def update(self, k: int = 1):
        self.n += k
        if self.tty or self.n == self.total:
            end = "\n" if self.n == self.total else ""
            print(f"\r{self.n}/{self.total} [{time.perf_counter() - self.t0:5.0f}s] {self.desc[:70]:70s}",
                  end=end, file=sys.stderr, flush=True)

    def write(self, s: str):
        print(("\n" if self.tty else "") + s, file=sys.stderr)

    def close(self):
        pass


def bar(total: int, desc: str = "", enabled: bool = True):
    if not enabled:
        total = -1  # never prints
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)
    except ImportError:
        return _Simple(total, desc)
