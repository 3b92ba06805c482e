"""Reading sm_90 SASS and resource usage for the static check (`bench.static`): instructions,
the control flow of a kernel, its hot loop (the innermost loop streaming the most 16-byte loads)
and what one trip of it issues and keeps in flight."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class Ins:
    addr: int
    pred: str
    op: str  # opcode with modifiers, e.g. LDG.E.128.CONSTANT
    args: str
    base: str = ""  # the opcode alone, e.g. LDG

    def __post_init__(self):
        self.base = self.op.split(".")[0]


_INS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TEXT = re.compile(r"^\s*\.text\.(\S+?):")


def parse_sass(text: str) -> dict[str, list[Ins]]:
    """Functions of `cuobjdump -sass` (absolute branch targets) or `nvdisasm` (.L_x labels) output."""
    funcs: dict[str, list[Ins]] = {}
    cur: list[Ins] | None = None
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("/* 0x"):  # the second half of an instruction's encoding
            continue
        m = _FUNC.match(line) or _TEXT.match(line)
        if m:  # a template instantiated in several files: its first copy (the others are the same code)
            cur = None if m.group(1) in funcs else funcs.setdefault(m.group(1), [])
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INS.match(line)
        if m and cur is not None:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            cur.append(Ins(addr, (m.group(2) or "").strip(), m.group(3), m.group(4)))
    for ins in (i for f in funcs.values() for i in f):  # nvdisasm: `(.L_x_3) -> its address
        ins.args = re.sub(r"`\((\.L_x_\d+)\)", lambda mm: hex(labels.get(mm.group(1), 0)), ins.args)
    return funcs


@dataclass
class Res:
    regs: int
    stack: int
    shared: int  # bytes per block, the 1 KB the system reserves per block included
    local: int


def parse_res_usage(text: str) -> dict[str, Res]:
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^\s*Function\s+(\S+?):?\s*$", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", line)
        if m and name:
            out.setdefault(name, Res(*(int(g) for g in m.groups())))
            name = None
    return out


def load_width(op: str) -> int:
    mods = op.split(".")[1:]
    for m, w in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if m in mods:
            return w
    return 4


def is_branch(i: Ins) -> bool:
    return i.base in ("BRA", "BRX", "JMP", "JMX")


_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")


def branch_target(i: Ins) -> int | None:
    if not is_branch(i):
        return None
    m = _TARGET.search(i.args)
    return int(m.group(1), 16) if m else None


def is_stream_load(x: Ins, stream_width: int) -> bool:
    return x.base in ("LDG", "LD") and load_width(x.op) == stream_width


class Flow:
    """Loops of one function and the longest path through each (its back edge removed), with a
    loop nested in it counted as trips(inner) times its own longest path."""

    def __init__(self, ins: list[Ins]):
        self.ins = ins
        at = {x.addr: k for k, x in enumerate(ins)}
        self.succ = []
        loops = set()
        for k, x in enumerate(ins):
            t = branch_target(x)
            out = [at[t]] if t in at else []
            if t is not None and t < x.addr and t in at:
                loops.add((at[t], k))  # a backward branch closes a loop; self-loops (t == addr) are not loops
            # BRA.DIV / BRA.CONV branch only when the warp is (not) converged: they fall through too
            conditional = x.pred or any(m in ("DIV", "CONV") for m in x.op.split(".")[1:])
            if not ((is_branch(x) or x.base == "EXIT") and not conditional):
                out.append(k + 1)
            self.succ.append(out)
        self.loops = sorted(loops)
        self.parent = {}
        for lp in self.loops:
            outer = [o for o in self.loops if o != lp and o[0] <= lp[0] and lp[1] <= o[1]]
            self.parent[lp] = min(outer, key=lambda o: o[1] - o[0]) if outer else None
        self.children = {lp: [c for c in self.loops if self.parent[c] == lp] for lp in self.loops}

    def innermost(self):
        return [lp for lp in self.loops if not self.children[lp]]

    def longest(self, loop, trips) -> tuple[float, list[int]]:
        """(cost, instruction indices on the path outside nested loops) once through `loop`."""
        lo, hi = loop
        owner = {k: c for c in self.children[loop] for k in range(c[0], c[1] + 1)}
        best: dict = {}
        nxt: dict = {}
        k = hi
        while k >= lo:  # reverse address order: successors first (structured code branches forward)
            node = owner.get(k, k)
            if isinstance(node, tuple):
                weight = self.longest(node, trips)[0] * trips(node)
                outs = [t for j in range(node[0], node[1] + 1) for t in self.succ[j] if not node[0] <= t <= node[1]]
                start = node[0]
            else:
                weight, outs, start = 1.0, self.succ[k], k
            tail, pick = 0.0, None
            for t in outs:
                if lo < t <= hi and t > start:
                    c = best.get(owner.get(t, t), 0.0)
                    if c > tail:
                        tail, pick = c, owner.get(t, t)
            best[node], nxt[node] = weight + tail, pick
            k = start - 1
        path, node = [], owner.get(lo, lo)
        while node is not None:
            if not isinstance(node, tuple):
                path.append(node)
            node = nxt[node]
        return best[owner.get(lo, lo)], path


@dataclass
class Hot:
    """The hot loop of one kernel, per trip (one thread), counted along its longest path."""
    loop: tuple | None
    parent: tuple | None
    stream_loads: int = 0  # loads of the streamed tensors
    stream_width: int = 16
    narrow_loads: int = 0  # other global loads narrower than 16 B (side vectors, indices)
    wide_loads: int = 0  # 16-byte global loads
    local: int = 0  # LDL/STL in the loop or its row
    bssy: int = 0  # in the loop, every path
    bra: int = 0
    first_use: int = 0  # stream loads issued before the first use of any of them
    instr: float = 0.0  # longest path through the loop
    row_instr: float = 0.0  # the enclosing loop's own work (besides the hot loop), per row
    size: int = 0  # instructions in the function
    tail: int = 0  # instructions after the sample ticket (per-sample math)


def analyze(ins: list[Ins], stream_width: int, row_trips: float = 1.0, shfl_trips: float = 5.0,
            flow: Flow | None = None, inner_trips: float = 1.0) -> Hot:
    """The hot loop: the innermost loop with the most stream loads; where no innermost loop has
    any, a tile loop (stream loads of its own, inner loops over a tile in shared memory, each
    counted inner_trips times; SHFL loops shfl_trips times)."""
    flow = flow or Flow(ins)
    ticket = next((k for k, x in enumerate(ins) if x.base in ("ATOMG", "ATOM", "RED", "REDG")), None)
    h = Hot(None, None, stream_width=stream_width, size=len(ins), tail=len(ins) - ticket if ticket is not None else 0)

    def own_loads(lp):
        inner = {k for c in flow.children[lp] for k in range(c[0], c[1] + 1)}
        return sum(1 for k in range(lp[0], lp[1] + 1) if k not in inner and is_stream_load(ins[k], stream_width))

    cands = [(n, -lp[0], lp) for lp in flow.innermost() if (n := own_loads(lp))]
    if not cands:
        cands = [(n, -lp[0], lp) for lp in flow.loops if (n := own_loads(lp))]
    if not cands:
        return h
    lp = h.loop = max(cands)[2]
    par = h.parent = flow.parent[lp]
    scope = par or lp
    shfl = {c for c in flow.loops if c != lp and scope[0] <= c[0] and c[1] <= scope[1]
            and any(x.base == "SHFL" for x in ins[c[0]:c[1] + 1])}

    def trips(c):
        if c == lp:
            return row_trips
        return shfl_trips if c in shfl else (inner_trips if flow.parent[c] == lp else 1.0)

    h.instr, path = flow.longest(lp, trips)
    seen = set()  # a load of an address already loaded on the path (an L1 hit) counts once
    for x in (ins[k] for k in path):
        if x.base in ("LDG", "LD"):
            w = load_width(x.op)
            addr = x.args.split(",", 1)[-1].strip()
            h.stream_loads += w == stream_width
            h.wide_loads += w == 16
            h.narrow_loads += w < 16 and w != stream_width and addr not in seen
            seen.add(addr)
    body = ins[lp[0]:lp[1] + 1]
    h.bssy = sum(x.base == "BSSY" for x in body)
    h.bra = sum(is_branch(x) for x in body)
    region = ins[par[0]:par[1] + 1] if par else body
    h.local = sum(1 for x in region if x.base in ("LDL", "STL"))
    h.first_use = independent_loads([ins[k] for k in path], stream_width)
    if par:
        h.row_instr = flow.longest(par, trips)[0] - h.instr * row_trips
    return h


_REG = re.compile(r"\bR(\d+)\b")


def independent_loads(body: list[Ins], stream_width: int) -> int:
    """Stream loads issued, in program order, before any instruction reads one of their results."""
    pending: set[int] = set()
    n = 0
    for x in body:
        operands = x.args.split(",")
        stores = x.base.startswith("ST") or x.base in ("RED", "REDG")
        srcs = operands if stores else operands[1:]
        used = {int(r) for src in srcs for r in _REG.findall(src)}
        if pending & used:
            break
        if is_stream_load(x, stream_width):
            m = _REG.search(operands[0])
            if m:
                r0 = int(m.group(1))
                pending |= set(range(r0, r0 + max(1, stream_width // 4)))
                n += 1
    return n
