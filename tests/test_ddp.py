"""DistributedDataParallel: two processes on gloo train a converted CBAM network a few steps
and end where single-process training of the original (unconverted) network ends."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import attnfused
from attnfused import reference as ref

timm = pytest.importorskip("timm")
from timm.layers import cbam as tcbam  # noqa: E402

WORLD = 2
STEPS = 3
LR = 0.1
DT = torch.float64  # gloo all-reduces float64: the comparison stays tight


def make_net() -> nn.Module:
    # timm's CbamModule has a BatchNorm on the spatial conv: in training mode it runs on batch
    # statistics, each rank on its own half, as it would unconverted
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), tcbam.CbamModule(16, rd_ratio=1 / 4),
                         nn.ReLU(), ref.CBAMBlock("FC", 3, 16, 4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).to(DT)


def batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4 * WORLD, 3, 8, 8, generator=g, dtype=DT), torch.randint(0, 4, (4 * WORLD,), generator=g))
            for _ in range(STEPS)]


def _worker(rank: int, init_file: str, state: dict, seed: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        net = make_net()
        net.load_state_dict(state)
        model = nn.parallel.DistributedDataParallel(attnfused.convert(net))
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for x, y in batches(seed):
            half = slice(rank * 4, rank * 4 + 4)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[half]), y[half]).backward()
            opt.step()
        if rank == 0:
            torch.save(model.module.state_dict(), out)
    finally:
        dist.destroy_process_group()


def single_process(net: nn.Module, seed: int) -> dict:
    """What DDP computes: the mean of the ranks' gradients; the buffers of rank 0 (DDP
    broadcasts them to the other ranks before each forward), updated by its own half only."""
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for x, y in batches(seed):
        opt.zero_grad()
        buffers = {k: v.clone() for k, v in net.named_buffers()}
        for rank in reversed(range(WORLD)):  # rank 0 last: its statistics are kept
            with torch.no_grad():
                for k, v in net.named_buffers():
                    v.copy_(buffers[k])
            half = slice(rank * 4, rank * 4 + 4)
            (nn.functional.cross_entropy(net(x[half]), y[half]) / WORLD).backward()
        opt.step()
    return net.state_dict()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_two_processes_match_single_process(tmp_path):
    net = make_net()
    seed = int(torch.randint(0, 2**31, ()).item())
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(str(tmp_path / "store"), net.state_dict(), seed, str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)
    want = single_process(copy.deepcopy(net), seed)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-9, atol=1e-12), k
    assert not torch.equal(got["0.weight"], net.state_dict()["0.weight"])  # it did train
