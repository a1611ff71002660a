"""Calibration statistics are all-reduced under torch.distributed: two gloo ranks calibrating on
halves of the data give the model a single process gets from the union; repair trains with
DistributedDataParallel and every rank returns the same model."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn as nn

from normswap.convert import convert


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(8, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(8, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(8, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(8, generator=g) - 0.5)
    return m.eval()


def _data() -> torch.Tensor:
    return torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(2))


TARGETS = ("gn", "bn_from_gn", "frn")


def _run(to: str, x: torch.Tensor):
    # under torch.distributed the held-back fast-vs-sequential pick is off (each process would hold
    # back its own samples); the single process on the union is run the same way
    from normswap.convert.core import ConvertOptions

    model = _model()
    opts = ConvertOptions(holdback=False)
    if to == "bn_from_gn":
        model, _ = convert(model, "gn", None)  # a GroupNorm model (uncalibrated is fine)
        return convert(model, "bn", x, batch_size=8, options=opts)
    return convert(model, to, x, batch_size=8, options=opts)


def _repair(x: torch.Tensor):
    from normswap.convert.core import ConvertOptions

    return convert(_model(), "gn", x, batch_size=8, repair=True, time_budget_s=120,
                   options=ConvertOptions(repair_steps=3))


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = _data()
        # unequal shards: rank 0 gets 24 samples, rank 1 gets 16
        part = x[:24] if rank == 0 else x[24:]
        out = {}
        for to in TARGETS:
            conv, rep = _run(to, part)
            out[to] = ({k: v.clone() for k, v in conv.state_dict().items()},
                       rep.calib_samples, rep.fidelity.top1_agreement, rep.distributed_world_size)
        conv, rep = _repair(part)  # DistributedDataParallel: every rank ends with the same model
        out["repair"] = ({k: v.clone() for k, v in conv.state_dict().items()}, rep.repair)
        torch.save(out, f"{outdir}/rank{rank}.pt")
        # both ranks finish before either tears down: rank 0 hosts the TCP store, and a rank that
        # destroys its gloo group while the other still talks to it likely aborts (rank 0 died once
        # with "terminate called without an active exception" in a full-suite run on 2 cores)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_single_process_on_union(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    x = _data()
    for to in TARGETS:
        single, rep = _run(to, x)
        ref = single.state_dict()
        for r in range(2):
            sd, n, agree, world = results[r][to]
            assert n == 40 and world == 2
            assert agree == pytest.approx(rep.fidelity.top1_agreement)
            assert sd.keys() == ref.keys()
            for k in ref:
                assert torch.allclose(sd[k].double(), ref[k].double(), rtol=1e-5, atol=1e-6), (to, k)
    (sd0, r0), (sd1, r1) = results[0]["repair"], results[1]["repair"]
    assert r0.steps == r1.steps == 3 and r0.kept == r1.kept and r0.after == r1.after  # all-reduced decisions
    assert r0.held_samples == 3 and r1.held_samples == 2  # each rank holds back 1/7 of its own samples
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
