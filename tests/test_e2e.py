"""bench.e2e on a small torchvision ResNet (one bottleneck per stage, CBAM after each bn3): the
columns it writes, the parity check it makes before timing, and that this check can fail."""
from __future__ import annotations

import csv
import json

import pytest
import torch

pytest.importorskip("torchvision")

import attnfused.backends as B  # noqa: E402
from bench import e2e, report  # noqa: E402

SMALL = ["--attn", "cbam", "--layers", "1,1,1,1", "--batch", "2", "--res", "64", "--reps", "1", "--backend", "cpu",
         "--no-progress"]
pytestmark = pytest.mark.skipif(B.unavailable_reason("cpu", "cpu") is not None, reason="no cpu backend")


@pytest.mark.slow  # four compiles of a small ResNet: minutes on 2 cores
def test_every_provider_is_checked_then_timed(tmp_path):
    rc = e2e.main(SMALL + ["--providers", "eager,compile,fused,fused+compile,compile-ro", "--out", str(tmp_path),
                           "--name", "e"])
    assert rc == 0
    with open(tmp_path / "e.csv", newline="") as f:
        assert csv.DictReader(f).fieldnames == e2e.COLUMNS
    rows = report.read_csv(tmp_path / "e.csv")
    assert [r["provider"] for r in rows] == ["eager", "compile", "fused", "fused+compile"]
    for r in rows:
        assert r["model"] == "resnet_1-1-1-1" and r["attn"] == "cbam" and r["amp"] == "none"
        for m in e2e.MODES:
            assert r[f"{m}_status"] == "ok", (r["provider"], m, r[f"{m}_status"])
            assert r[f"{m}_batch_size"] == 2 and r[f"{m}_img_size"] == 64
            assert r[f"{m}_samples_per_sec"] > 0 and r[f"{m}_step_time"] > 0
            # logits and gradients against eager's: float32 reorderings only (the gradients of a
            # batch of 2 through train-mode BatchNorm are ill-conditioned, hence the wide margin)
            assert r[f"{m}_rel_err"] < (1e-4 if m == "infer" else 0.1), (r["provider"], m, r[f"{m}_rel_err"])
            assert (r[f"{m}_compile_s"] is not None) == ("compile" in r["provider"])
    assert "gradients" in rows[1]["note"] and "off float64" in rows[1]["note"]  # compile's, reported
    fused = rows[2]
    assert fused["backend"] == "cpu" and "4/4 attention modules fused" in fused["note"]
    assert abs(fused["infer_vs_eager"] - fused["infer_samples_per_sec"] / rows[0]["infer_samples_per_sec"]) < 1e-3
    facts = json.loads((tmp_path / "e.json").read_text())
    assert "compile-ro" in facts["skipped"] and "GPU only" in facts["skipped"]["compile-ro"]
    table = (tmp_path / "e.md").read_text()
    assert all(f"| {p} |" in table for p in ("eager", "compile", "fused", "fused+compile"))


def test_a_provider_off_by_a_tenth_of_a_percent_is_wrong_and_not_timed(tmp_path, monkeypatch):
    """A CBAM forward kernel whose output is 1.001x the right one: the parity check must catch it."""
    real = B.kernel

    def kernel(backend, op):
        fn = real(backend, op)
        if backend == "cpu" and op == "cbam":
            return lambda *args: (fn(*args)[0] * 1.001, *fn(*args)[1:])
        return fn

    monkeypatch.setattr(B, "kernel", kernel)
    rc = e2e.main(SMALL + ["--providers", "eager,fused", "--out", str(tmp_path), "--name", "w"])
    assert rc == 1
    eager, fused = report.read_csv(tmp_path / "w.csv")
    for m in e2e.MODES:
        assert eager[f"{m}_status"] == "ok"
        assert fused[f"{m}_status"].startswith("WRONG: logits"), fused[f"{m}_status"]
        assert fused[f"{m}_samples_per_sec"] is None


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit, match="--providers"):
        e2e.parse_args(["--providers", "eager,nope"])
    with pytest.raises(SystemExit, match="--layers"):
        e2e.parse_args(["--layers", "1,1"])
    with pytest.raises(SystemExit, match="--convert-arg"):
        e2e.parse_args(["--convert-arg", "fuse_tail"])
    a = e2e.parse_args(["--convert-arg", "fuse_tail=False", "--providers", "fused,compile"])
    assert [p.name for p in a.providers] == ["eager", "compile", "fused"]
    assert a.providers[2].convert_kwargs == (("fuse_tail", False),) and a.providers[1].convert_kwargs == ()
    (orig,) = [p for p in e2e.parse_args(["--providers", "fused+compile-orig"]).providers if p.fused]
    assert orig.compiles and orig.convert_kwargs == (("compile_as", "original"),)
    assert torch.device("cpu") == e2e.parse_args(["--device", "cpu"]).device
