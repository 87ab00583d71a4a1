"""The cross-rank LessIsMore union with torch.distributed's gloo backend in 2 processes: every
rank ends with the same set, equal to the single-process selection of all heads."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lessismore import SparseConfig, methods
from lessismore.methods.base import Method
from lessismore.methods.lessismore import distributed as cross_rank
from lessismore.methods.lessismore import unified_union

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case(seed: int):
    """A batch with padding (valid has holes at the front), GQA 8 query / 4 KV heads."""
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, length, d = 3, 8, 4, 150, 16
    q = torch.randn(b, hq, d, generator=g)
    k = torch.randn(b, hkv, length, d, generator=g)
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[1, :37] = False
    valid[2, :140] = False  # 10 valid positions: fits in the budget, every slot kept
    return q, k, valid


CONFIGS = [
    SparseConfig(method="lessismore", budget=32, recent_ratio=0.25, sink_tokens=4, selection_layers=(2,)),
    SparseConfig(method="lessismore", budget=20, recent_ratio=0.5, sink_tokens=2, selection_layers=(2,)),
    SparseConfig(method="lessismore", budget=16, recent_ratio=1.0, sink_tokens=4, selection_layers=(2,)),  # k = 0
]


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = []
        for seed, cfg in enumerate(CONFIGS):
            q, k, valid = _case(seed)
            hq, hkv = q.shape[1] // WORLD, k.shape[1] // WORLD
            # Through the method, as the executor calls it.
            sel = methods.get("lessismore").select_sharded(
                cfg, q[:, rank * hq : (rank + 1) * hq], k[:, rank * hkv : (rank + 1) * hkv], valid, dist.group.WORLD
            )
            results.append((sel.indices, sel.counts))
        # The union alone, on per-head lists with some entries that are not real.
        g = torch.Generator().manual_seed(7)
        top = torch.randint(0, 50, (2, 8, 6), generator=g)
        ok = torch.rand(2, 8, 6, generator=g) > 0.2
        h = top.shape[1] // WORLD
        union = cross_rank.cross_rank_union(top[:, rank * h : (rank + 1) * h], ok[:, rank * h : (rank + 1) * h], 50, 9)
        out[rank] = (results, union)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank():
    manager = mp.Manager()
    out = manager.dict()
    # fork: the children inherit the imported modules (spawn would import torch and transformers again).
    mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, join=True, start_method="fork")
    return dict(out)


def test_cross_rank_selection_identical_on_every_rank_and_equal_to_single_process(per_rank):
    for i, cfg in enumerate(CONFIGS):
        q, k, valid = _case(i)
        expected = methods.get("lessismore").select(cfg, q, k, valid)
        for rank in range(WORLD):
            indices, counts = per_rank[rank][0][i]
            assert torch.equal(counts, expected.counts), (cfg, rank)
            assert torch.equal(indices, expected.indices), (cfg, rank)


def test_cross_rank_union_equals_single_process_union(per_rank):
    g = torch.Generator().manual_seed(7)
    top = torch.randint(0, 50, (2, 8, 6), generator=g)
    ok = torch.rand(2, 8, 6, generator=g) > 0.2
    expected = unified_union(top, ok, 50, 9)
    for rank in range(WORLD):
        assert torch.equal(per_rank[rank][1], expected)


def test_cross_rank_single_process_is_the_plain_selection():
    """Without an initialized process group (one rank) the functions are the single-process ones."""
    for i, cfg in enumerate(CONFIGS):
        q, k, valid = _case(i)
        got = cross_rank.select_across_ranks(cfg, q, k, valid)
        expected = methods.get("lessismore").select(cfg, q, k, valid)
        assert torch.equal(got.indices, expected.indices) and torch.equal(got.counts, expected.counts)


def test_sharded_selection_of_other_methods():
    """Per-head methods select on a rank's own heads; a shared, query-dependent set without a
    cross-rank union is refused rather than silently made per rank."""
    q, k, valid = _case(0)
    cfg = SparseConfig(method="tidaldecode", budget=8, selection_layers=(2,))
    tidal = methods.get("tidaldecode")
    got = tidal.select_sharded(cfg, q[:, :4], k[:, :2], valid, group=object())
    expected = tidal.select(cfg, q[:, :4], k[:, :2], valid)
    assert torch.equal(got.indices, expected.indices)

    class SharedSet(Method):
        name = "shared-set-test"

    with pytest.raises(NotImplementedError, match="tensor-parallel"):
        SharedSet().select_sharded(cfg, q, k, valid, group=object())
