"""bench.static (the static performance check) on canned SASS, its launch-plan mirror against the
C++ source, one end-to-end run on the built library where cuobjdump is at hand; and the logic of
bench.gpu_check (stage time limits, skips without a GPU, the sanitizer rotation)."""
from __future__ import annotations

import time

import pytest

from bench import gpu_check, sass, static

# ---------------------------------------------------------------------------- canned SASS


def canned(name: str, body: str) -> str:
    """cuobjdump -sass layout: a function header, then `/*addr*/ instruction ;` lines."""
    lines = [f"\t\tFunction : {name}"]
    for k, ins in enumerate(x.strip() for x in body.strip().splitlines()):
        lines.append(f"        /*{k * 16:04x}*/                   {ins} ;   /* 0x000 */")
    return "\n".join(lines) + "\n"


# a loop of two independent 16-byte loads (no branch inside): 2 in flight before the first use
VECTOR_LOOP = canned("_Zvec", """
    S2R R0, SR_TID.X
    IMAD.WIDE R2, R0, 0x10, R8
    LDG.E.128.CONSTANT R4, desc[UR4][R2.64]
    LDG.E.128.CONSTANT R12, desc[UR4][R2.64+0x1000]
    HADD2.F32 R20, -RZ, R4.H0_H0
    FADD R21, R20, R12
    IADD3 R0, R0, 0x100, RZ
    ISETP.GE.AND P0, PT, R0, R7, PT
    @!P0 BRA 0x20
    EXIT
    BRA 0xa0
""")

# one 16-byte load, then an if/else per element (BSSY / BSYNC): the two arms exclude each other
BRANCHY_LOOP = canned("_Zbranchy", """
    MOV R0, RZ
    LDG.E.128.CONSTANT R4, desc[UR4][R2.64]
    BSSY B1, 0xa0
    FSETP.NAN.FTZ.AND P1, PT, R4, R4, PT
    @P1 BRA 0x80
    FSETP.GT.AND P1, PT, R4, R10, PT
    FSEL R10, R4, R10, P1
    BRA 0xa0
    MOV R10, R4
    MOV R11, R0
    BSYNC B1
    IADD3 R0, R0, 0x1, RZ
    ISETP.GE.AND P0, PT, R0, R7, PT
    @!P0 BRA 0x10
    EXIT
""")

# a row loop (spill reload, 2-byte stream loads in an inner loop), then a ticket and per-sample math
SPILL_NARROW = canned("_Zspill", """
    MOV R0, RZ
    LDL.64 R14, [R1+0x8]
    LDG.E.U16 R4, desc[UR4][R14.64]
    LDG.E R5, desc[UR4][R16.64]
    HADD2.F32 R20, -RZ, R4.H0_H0
    FFMA R21, R20, R5, R21
    IADD3 R0, R0, 0x1, RZ
    ISETP.GE.AND P0, PT, R0, R7, PT
    @!P0 BRA 0x20
    IADD3 R9, R9, 0x1, RZ
    ISETP.GE.AND P2, PT, R9, R8, PT
    @!P2 BRA 0x10
    ATOMG.E.ADD.STRONG.GPU PT, R3, desc[UR4][R2.64], R5
    EXIT
""")

# a tile loop: two 16-byte loads and their stores to shared memory, then an inner loop over the
# tile (no global loads) and a butterfly (SHFL) loop
TILE_LOOP = canned("_Ztile", """
    MOV R0, RZ
    LDG.E.128.CONSTANT R4, desc[UR4][R2.64]
    LDG.E.128.CONSTANT R12, desc[UR4][R2.64+0x1000]
    STS.128 [R9], R4
    STS.128 [R9+0x1000], R12
    BAR.SYNC.DEFER_BLOCKING 0x0
    LDS.U16 R20, [R10]
    HADD2.F32 R20, -RZ, R20.H0_H0
    FADD R21, R21, R20
    ISETP.GE.AND P1, PT, R10, R11, PT
    @!P1 BRA 0x60
    SHFL.BFLY PT, R22, R21, R23, R24
    FADD R21, R21, R22
    @!P2 BRA 0xb0
    IADD3 R0, R0, 0x1, RZ
    ISETP.GE.AND P0, PT, R0, R7, PT
    @!P0 BRA 0x10
    EXIT
""")

# nvdisasm layout: labels instead of absolute targets
NVDISASM = """
        .text._Zlab:
        /*0000*/                   MOV R0, RZ ;
.L_x_1:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0030*/              @!P0 BRA `(.L_x_1) ;
        /*0040*/                   EXIT ;
"""


def test_parse_both_layouts_and_branch_targets():
    f = sass.parse_sass(VECTOR_LOOP)["_Zvec"]
    assert [x.op for x in f[:3]] == ["S2R", "IMAD.WIDE", "LDG.E.128.CONSTANT"]
    assert f[8].pred == "@!P0" and sass.branch_target(f[8]) == 0x20
    g = sass.parse_sass(NVDISASM)["_Zlab"]
    assert sass.branch_target(g[3]) == 0x10, "a .L_x label must resolve to its instruction's address"
    assert sass.Flow(g).loops == [(1, 3)]


def test_load_widths():
    assert [sass.load_width(op) for op in ("LDG.E.128.CONSTANT", "LDG.E.64", "LDG.E.U16", "LDG.E", "LDG.E.S8")] \
        == [16, 8, 2, 4, 1]


def test_vector_loop_two_loads_in_flight():
    ins = sass.parse_sass(VECTOR_LOOP)["_Zvec"]
    flow = sass.Flow(ins)
    assert flow.loops == [(2, 8)], "the self-branch after EXIT is no loop"
    h = sass.analyze(ins, 16, flow=flow)
    assert (h.stream_loads, h.first_use, h.wide_loads, h.bssy, h.local, h.tail) == (2, 2, 2, 0, 0, 0)
    assert h.instr == 7


def test_branchy_loop_counts_one_arm():
    ins = sass.parse_sass(BRANCHY_LOOP)["_Zbranchy"]
    h = sass.analyze(ins, 16)
    assert h.loop == (1, 13) and h.bssy == 1 and h.bra == 3
    # 13 instructions in the loop; the longest path takes the 3-instruction arm and skips the 2-instruction one
    assert h.instr == 13 - 2, h.instr


# a shuffle the compiler guards with BRA.DIV (taken only when the warp has diverged, to a slow
# path past the loop): the loop's own path falls through it
DIV_LOOP = canned("_Zdiv", """
    MOV R0, RZ
    LDG.E.128.CONSTANT R4, desc[UR4][R2.64]
    LDG.E.128.CONSTANT R8, desc[UR4][R2.64+0x1000]
    BRA.DIV UR4, 0xc0
    SHFL.BFLY PT, R12, R4, 0x1, 0x1f
    FADD R13, R12, R8
    IADD3 R0, R0, 0x1, RZ
    ISETP.GE.AND P0, PT, R0, R7, PT
    @!P0 BRA 0x10
    EXIT
    NOP
    NOP
    SHFL.BFLY PT, R12, R4, 0x1, 0x1f
    BRA 0x50
""")


def test_divergence_guard_falls_through():
    ins = sass.parse_sass(DIV_LOOP)["_Zdiv"]
    h = sass.analyze(ins, 16)
    assert h.loop == (1, 8) and h.stream_loads == 2
    assert h.instr == 8, "the whole loop body, not the 3 instructions up to BRA.DIV"


def test_spill_narrow_row_and_tail():
    ins = sass.parse_sass(SPILL_NARROW)["_Zspill"]
    h = sass.analyze(ins, 2, row_trips=4)
    assert h.loop == (2, 8) and h.parent == (1, 11)
    assert h.local == 1, "the spill reload of the enclosing row loop counts"
    assert (h.stream_loads, h.narrow_loads, h.stream_width) == (1, 1, 2)
    # the row loop's own work: the reload and the 3 instructions closing it, once per 4 inner trips
    assert h.instr == 7 and h.row_instr == 4
    assert h.tail == 2
    k = static.Kernel("k", sass.Res(40, 0, 1024, 0), h, sass.Flow(ins), 6, static.inflight_bytes(6, h), True, 1)
    assert set(static.kernel_flags(k)) == {"spill", "narrow", "inflight"}


def test_tile_loop_is_hot_where_no_innermost_loop_streams():
    ins = sass.parse_sass(TILE_LOOP)["_Ztile"]
    flow = sass.Flow(ins)
    assert flow.loops == [(1, 16), (6, 10), (11, 13)]
    h = sass.analyze(ins, 16, flow=flow, inner_trips=10, shfl_trips=3)
    assert h.loop == (1, 16) and h.parent is None
    assert (h.stream_loads, h.first_use) == (2, 2)
    # 5 of its own (loads, stores, barrier) + the inner loop 10 x 5 + the butterfly 3 x 3 + the 3 closing it
    assert h.instr == 5 + 10 * 5 + 3 * 3 + 3
    assert sass.analyze(ins, 16, flow=flow, inner_trips=0, shfl_trips=3).instr == 5 + 3 * 3 + 3


def test_next_path_tiles_plan():
    # 7x7 and 14x14 in half precision: rows of no whole vector go through tiles of whole rows
    p = static.plan_next_tiles(128, 2048, 49, 8)
    assert (p["R"], p["P"], p["L"], p["tiles"], p["grid"]) == (128, 2, 25, 2048, 528)
    p = static.plan_next_tiles(128, 1024, 196, 8)
    assert p["R"] % 2 == 0 and p["R"] * 196 <= 256 * 4 * 8 and p["R"] * p["P"] <= 256
    assert static.plan_next_tiles(1, 8, 4097, 8) is None, "8 rows of 4097 do not fit a tile"
    uses = static.next_passes("se", 2048, 7, 7, False, "c10::Half", 2)
    assert [(u.kind, u.reads) for u in uses] == [("tiles", 1), ("apply", 1), ("apply", 2), ("tiles", 2), ("apply", 1),
                                                 ("tiles", 2), ("apply", 2)]
    assert [u.kind for u in static.next_passes("se", 2048, 7, 7, True, "c10::Half", 2)] == \
        ["columns", "apply", "apply", "columns", "apply", "columns", "apply"]
    assert static.next_passes("se", 2, 2, 2, False, "c10::Half", 2) == [], "H*W < 8: a vector meets > 2 rows"
    # NCHW CBAM where H*W is a whole number of vectors: the forward (the weighted max down columns;
    # in 2-byte types two lanes per vector) and the backwards (positions' terms held down columns)
    nchw = static.next_passes("cbam", 512, 28, 28, False, "c10::Half", 2)
    assert [(u.label, u.kind, u.over_channels) for u in nchw] == [
        ("next fwd cpool", "rows", False), ("next fwd spool", "columns", True), ("next fwd stscale", "apply", False),
        ("next fwd stscale+res", "apply", False), ("next bwd sdot", "columns", True),
        ("next bwd cdot", "columns", True), ("next bwd dxST", "columns", True), ("next sa dx", "columns", True)]
    assert "_pool_column_halves<c10::Half, 8, true>" in nchw[1].kernel and nchw[1].lanes_per_vector == 2
    assert "_pool_across<c10::Half, 8>" in nchw[5].kernel and "_scale_columns<" in nchw[6].kernel
    assert static.next_passes("cbam", 1024, 14, 14, False, "c10::Half", 2) == [], "196 is no whole number of vectors"
    fp32 = static.next_passes("cbam", 1024, 14, 14, False, "float", 4)
    assert "_pool_columns<float, 4, (attnfused::cuda::next::Job)4>" in fp32[1].kernel and fp32[1].lanes_per_vector == 1


def test_occupancy():
    assert static.blocks_per_sm(32, 1024) == 8
    assert static.blocks_per_sm(48, 25616) == 5
    assert static.blocks_per_sm(107, 9232) == 2
    assert static.blocks_per_sm(32, 200704 + 1024) == 1


def test_plan_mirror_matches_the_source():
    assert static.source_drift() == [], "launch.cuh / kernels.cuh / onchip.cuh changed: update bench/static.py's mirror"
    # ResNet-50 stage 1, fp16, batch 128 (figures of the diagnosis): channel pool (cl: columns), spatial pool (rows)
    assert static.plan_reduce(128, 3136, 256, "COL", 8)["grid"] == 2176
    p = static.plan_reduce(128, 3136, 256, "ROW", 8)
    assert (p["grid"], p["KA"], p["KB"], p["TX"]) == (6272, 8, 1, 32)
    assert static.plan_apply(128 * 256 * 56 * 56, 8)["grid"] == 132 * 32
    assert static.pick_vec(196, 2) == 1 and static.pick_vec(256, 2) == 8
    assert static.onchip_used(2048, 7, 7, 128, 2) and not static.onchip_used(1024, 14, 14, 128, 2)
    labels = [u.label for u in static.passes("cbam", 2048, 7, 7, True, "c10::Half", 2)]
    assert labels == ["fwd chip CBAM", "bwd DOT both", "bwd MASK", "bwd dx CBAM"]
    labels = [u.label for u in static.passes("se", 1024, 14, 14, False, "c10::Half", 2)]
    assert labels == ["fwd chan POOL", "fwd apply", "bwd DOT SE", "bwd dx SE"]
    assert "<c10::Half, 1, (attnfused::cuda::Pass)0, 1, " in static.passes("se", 1024, 14, 14, False, "c10::Half", 2)[0].kernel


def test_measured_profile_is_read():
    meas = static.read_measured(static.MEASURED)
    name = "void attnfused::cuda::_apply_kernel<c10::Half, 8, unsigned int, true, false, false>(c10::Half const*, x)"
    assert static.measured_for(meas, name, "128x256x56x56", "cl") == pytest.approx(142.3)


def _fake_library(monkeypatch, with_new_spill: bool):
    """read_library answering with canned SASS: today's forward apply (as the vector loop) and,
    optionally, a new-path kernel with a spill."""
    apply_name = "void attnfused::cuda::_apply_kernel<c10::Half, 8, unsigned int, true, false, false>(x)"
    funcs = {"_Zvec": (apply_name, VECTOR_LOOP, sass.Res(32, 0, 1024, 0))}
    if with_new_spill:
        funcs["_Zspill"] = ("void attnfused::cuda::next::_pool<c10::Half, 1>(x)", SPILL_NARROW, sass.Res(40, 0, 1024, 0))

    def fake(lib, tool, want):
        res = {m: r for m, (_, _, r) in funcs.items()}
        sass_ = {m: sass.parse_sass(t)[m] for m, (_, t, _) in funcs.items()}
        return res, sass_, {m: d for m, (d, _, _) in funcs.items()}

    monkeypatch.setattr(static, "read_library", fake)
    monkeypatch.setattr(static, "find_tool", lambda name: "/bin/true")


@pytest.mark.parametrize("with_new_spill", [False, True])
def test_new_path_flags_fail_old_ones_do_not(monkeypatch, capsys, with_new_spill):
    _fake_library(monkeypatch, with_new_spill)
    rc = static.main(["--lib", "fake.so", "--ops", "se"])
    out = capsys.readouterr().out
    assert "fwd apply" in out
    assert rc == (1 if with_new_spill else 0), out
    if with_new_spill:
        assert "spill" in out and "(new path)" in out


def test_end_to_end_on_the_built_library():
    lib, tool = static.find_library(), static.find_tool("cuobjdump")
    if not lib or not tool:
        pytest.skip(f"needs the built extension and cuobjdump (library {lib}, cuobjdump {tool})")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = static.main([])
    out = buf.getvalue()
    if "skipped" in out.splitlines()[0]:
        pytest.skip(out.splitlines()[0])
    assert rc == 0, out
    stage1 = [ln.rstrip() for ln in out.splitlines() if " 256x56x56 " in ln]
    today = [ln for ln in stage1 if not ln.endswith("(new path)")]
    new = [ln for ln in stage1 if ln.endswith("(new path)")]
    # calibration: at ResNet-50 stage 1 (fp16), today's slow passes are flagged and the forward apply is not
    assert len(today) == 16, out
    for ln in today:
        assert ln.endswith(" ok") == ln.startswith("fwd apply"), ln
    # the new path's channel forward (its last pass also with the tail's residual) and backward passes
    # at stage 1 in both layouts, CBAM's three forward and three backward passes and spatial
    # attention's dx pass in both layouts, none flagged
    channel = ("fwd pool", "fwd scale", "fwd scale+res", "bwd dot", "bwd dx", "bwd dotT", "bwd dxT")
    cbam = ("fwd cpool", "fwd spool", "fwd stscale", "fwd stscale+res", "bwd sdot", "bwd cdot", "bwd dxST", "sa dx")
    assert sorted(" ".join(ln.split()[i] for i in (0, 1, 2, 4)) for ln in new) == sorted(
        [f"next {p} {lay}" for p in channel + cbam for lay in ("cl", "nchw")]), out
    assert all(ln.endswith(" ok (new path)") for ln in new), out


# ---------------------------------------------------------------------------- bench.gpu_check


def test_gpu_check_stage_overrun_is_killed_and_logged(tmp_path):
    r = gpu_check.Runner(tmp_path, gpu=False, total_s=60, echo=lambda *a: None)
    t = time.monotonic()
    r.stage("slow", 1.5, [gpu_check.Step("sleeper", "sleep 30 & sleep 30; echo never", gpu=False)], {})
    assert time.monotonic() - t < 15, "the overrunning step was not stopped"
    (res,) = r.results
    assert res.status == "timeout" and res.summary.startswith("killed"), res
    assert "killed after" in (tmp_path / "slow_sleeper.log").read_text()


def test_gpu_check_skips_gpu_steps_and_runs_dry_forms(tmp_path):
    r = gpu_check.Runner(tmp_path, gpu=False, total_s=60, echo=lambda *a: None)
    r.stage("s", 30, [gpu_check.Step("needs_gpu", ["false"]),
                      gpu_check.Step("dry", ["false"], dry=["echo", "collected"]),
                      gpu_check.Step("cpu", ["echo", "done"], gpu=False)], {})
    got = [(x.step, x.status, x.summary) for x in r.results]
    assert got == [("needs_gpu", "skipped", gpu_check.SKIP_NO_GPU), ("dry", "dry", "collected"), ("cpu", "ok", "done")]
    assert "summary" in r.table()
    assert (tmp_path / "s_cpu.log").read_text().endswith("done\n")  # logs are <stage>_<step>.log


def test_gpu_check_stage_past_the_total_is_skipped(tmp_path):
    r = gpu_check.Runner(tmp_path, gpu=False, total_s=0.5, echo=lambda *a: None)
    time.sleep(0.6)
    r.stage("late", 30, [gpu_check.Step("x", ["echo", "hi"], gpu=False)], {})
    assert r.results[0].status == "skipped" and "no time left" in r.results[0].summary


def test_gpu_check_rotation_covers_every_slice_and_both_dtypes():
    slices = gpu_check.sanitizer_slices()
    seen, dtypes, blocks = set(), set(), set()
    for c in range(400):
        i, expr, dt, block = gpu_check.pick_rotation(f"{c:07x}", "2026-12-07")
        seen.add(i)
        dtypes.add(dt)
        blocks.add(block)
        assert expr == slices[i]
    assert seen == set(range(len(slices))) and dtypes == {"fp16", "bf16"} and blocks == set(gpu_check.BENCH_BLOCKS)
    assert gpu_check.pick_rotation("abc", "d") == gpu_check.pick_rotation("abc", "d")
    assert gpu_check.pick_rotation("abc", "d", slice_arg=3, dtype_arg="bf16")[0:3:2] == (3, "bf16")
    assert sum(gpu_check.BUDGETS.values()) <= gpu_check.TOTAL_S - 45, "keep a margin in the 540 s"


def test_gpu_check_steps_cover_every_stage(tmp_path):
    steps = gpu_check.build_steps("python3", tmp_path, "parity_all_options and cbam", "fp16", "se", [])
    assert list(steps) == gpu_check.STAGES
    for stage, ss in steps.items():
        assert ss, stage
        for st in ss:
            # a GPU step either has a dry form or is logged as skipped without a GPU
            assert st.gpu or st.dry is None, (stage, st.name)
    bench = {st.name: st.cmd for st in steps["bench"]}
    assert "compile" in ",".join(bench["b128_se"]) and "compile" not in ",".join(bench["b128_rest"])


def test_gpu_check_sanitizer_slices_are_small_and_cover_the_parity_tests():
    from _pytest.mark.expression import Expression

    from tests.cases import ALL_CASES

    # the parity tests' ids as tests/test_cuda_backend.py makes them (path, case, dtype, layout)
    ids = [f"test_parity_all_options[{p}-{c}-torch.{d}-{lay}]" for p in ("multipass", "onchip") for c in ALL_CASES
           for d in ("float32", "float16", "bfloat16") for lay in ("nchw", "channels_last")]
    covered = set()
    for expr in gpu_check.sanitizer_slices():
        e = Expression.compile(expr)
        hit = {t for t in ids if e.evaluate(lambda k, t=t: k.lower() in t.lower())}
        assert 1 <= len(hit) <= 20, (expr, len(hit))
        covered |= hit
    assert covered == set(ids)


@pytest.mark.parametrize("local", [0, 16])
def test_new_small_math_kernel_is_flagged_only_for_spills(monkeypatch, capsys, local):
    """A new-path kernel with no loop over a streamed tensor (the gate, MLP or conv kernels): one
    block per SM at 255 registers does not flag it, a spill does."""
    name = "void attnfused::cuda::next::_channel_gate<float, false>(x)"
    body = canned("_Zgate", """
        S2R R0, SR_TID.X
        LDG.E R4, desc[UR4][R2.64]
        FADD R5, R4, R4
        STG.E desc[UR4][R2.64], R5
        EXIT
    """)
    funcs = {"_Zgate": (name, body, sass.Res(255, 0, 0, local))}
    monkeypatch.setattr(static, "read_library", lambda lib, tool, want: (
        {m: r for m, (_, _, r) in funcs.items()}, {m: sass.parse_sass(t)[m] for m, (_, t, _) in funcs.items()},
        {m: d for m, (d, _, _) in funcs.items()}))
    monkeypatch.setattr(static, "find_tool", lambda name: "/bin/true")
    rc = static.main(["--lib", "fake.so", "--ops", "se"])
    out = capsys.readouterr().out
    assert "small" in out and "(new path)" in out
    assert rc == (1 if local else 0), out
