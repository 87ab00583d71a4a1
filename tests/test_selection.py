"""Selection semantics on hand-built scores: the definitions in the methods' docstrings, checked."""
import pytest
import torch

from lessismore import SparseConfig
from lessismore.methods import get
from lessismore.methods.base import mask_to_selection
from lessismore.methods.lessismore import lessismore_mask, unified_union
from lessismore.methods.quest import page_bounds, quest_mask
from lessismore.methods.streaming import streaming_mask
from lessismore.methods.tidaldecode import tidaldecode_mask
from lessismore.ops import naive


def test_unified_union_is_rank_major_with_first_occurrence():
    # head 0 ranks 5, 7, 9; head 1 ranks 5, 3, 7; head 2 ranks 8, 3, 1.
    top = torch.tensor([[[5, 7, 9], [5, 3, 7], [8, 3, 1]]])
    ok = torch.ones_like(top, dtype=torch.bool)
    # rank-major list: 5 5 8 | 7 3 3 | 9 7 1 -> distinct in order: 5 8 7 3 9 1
    for k, expected in [(1, {5}), (2, {5, 8}), (3, {5, 8, 7}), (4, {5, 8, 7, 3}), (5, {5, 8, 7, 3, 9})]:
        mask = unified_union(top, ok, 12, k)
        assert set(mask[0].nonzero().flatten().tolist()) == expected


def test_unified_union_differs_from_per_head_score_union():
    # A head-major union (head 0's whole list first) would keep {5, 7, 9}; rank-major keeps {5, 8, 7}.
    top = torch.tensor([[[5, 7, 9], [5, 3, 7], [8, 3, 1]]])
    mask = unified_union(top, torch.ones_like(top, dtype=torch.bool), 12, 3)
    assert set(mask[0].nonzero().flatten().tolist()) == {5, 7, 8}


def _scores(b, h, length, seed=0):
    return torch.randn(b, h, length, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("budget,ratio,sinks", [(16, 0.25, 4), (20, 0.5, 4), (16, 0.0, 4), (16, 1.0, 4), (8, 0.25, 4)])
def test_lessismore_set_composition(budget, ratio, sinks):
    cfg = SparseConfig(method="lessismore", budget=budget, recent_ratio=ratio, sink_tokens=sinks)
    length = 64
    scores = _scores(1, 4, length)
    valid = torch.ones(1, length, dtype=torch.bool)
    mask = lessismore_mask(scores, valid, budget, cfg.recent_share, cfg.effective_sinks)[0]
    chosen = set(mask.nonzero().flatten().tolist())
    assert len(chosen) == budget
    s, r = cfg.effective_sinks, cfg.recent_share
    assert set(range(s)) <= chosen
    assert set(range(length - (r - s), length)) <= chosen
    if r < sinks:
        assert s == 0  # sinks dropped when the recent share can't hold them
    # The ranked part is the rank-major union of the per-head top-k over the middle.
    k = budget - r
    middle = torch.zeros(length, dtype=torch.bool)
    middle[s:length - (r - s)] = True
    if k:
        top = scores.masked_fill(~middle, float("-inf")).topk(k, dim=-1).indices[0]  # [H, k]
        order = []
        for rank in range(k):
            for head in range(top.shape[0]):
                pos = int(top[head, rank])
                if pos not in order:
                    order.append(pos)
        assert chosen - set(range(s)) - set(range(length - (r - s), length)) == set(order[:k])


def test_rounding_and_default_split():
    cfg = SparseConfig(method="lessismore", budget=2048)
    assert (cfg.ranked_share, cfg.effective_sinks, cfg.recent_share - cfg.effective_sinks) == (1536, 4, 508)
    assert SparseConfig(budget=10, recent_ratio=0.25, sink_tokens=2).recent_share == 2  # round(2.5) = 2
    assert SparseConfig(budget=14, recent_ratio=0.25, sink_tokens=2).recent_share == 4  # round(3.5) = 4


def test_selection_has_no_duplicates_and_exact_size():
    cfg = SparseConfig(method="lessismore", budget=24)
    b, hkv, g, d, length = 3, 2, 3, 8, 80
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(b, hkv * g, d, generator=gen)
    k = torch.randn(b, hkv, length, d, generator=gen)
    lengths = torch.tensor([80, 50, 20])
    valid = torch.arange(length) >= (length - lengths)[:, None]  # left padding
    sel = get("lessismore").select(cfg, q, k, valid)
    assert sel.indices.shape == (b, 24)
    assert sel.counts.tolist() == [24, 24, 20]
    for row in range(b):
        idx = sel.indices[row, : sel.counts[row]].tolist()
        assert len(set(idx)) == len(idx) and idx == sorted(idx)
        assert all(valid[row, i] for i in idx)
    assert sel.indices[2, :20].tolist() == list(range(60, 80))  # n <= K: everything, exact


def test_padded_row_selects_what_it_selects_alone():
    cfg = SparseConfig(method="lessismore", budget=16)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 8, generator=gen)
    k = torch.randn(2, 2, 60, 8, generator=gen)
    valid = torch.ones(2, 60, dtype=torch.bool)
    valid[1, :25] = False
    batch = get("lessismore").select(cfg, q, k, valid)
    alone = get("lessismore").select(cfg, q[1:], k[1:, :, 25:], torch.ones(1, 35, dtype=torch.bool))
    got = batch.indices[1, : batch.counts[1]] - 25
    assert got.tolist() == alone.indices[0, : alone.counts[0]].tolist()


def test_tidaldecode_per_head_topk_plus_current():
    scores = _scores(1, 3, 40, seed=3)
    valid = torch.ones(1, 40, dtype=torch.bool)
    mask = tidaldecode_mask(scores, valid, 8)[0]
    for h in range(3):
        chosen = set(mask[h].nonzero().flatten().tolist())
        expected = set(scores[0, h, :39].topk(7).indices.tolist()) | {39}
        assert chosen == expected
    assert mask.sum(-1).tolist() == [8, 8, 8]


def test_tidaldecode_budget_one_is_the_current_token_per_head():
    mask = tidaldecode_mask(_scores(2, 3, 10), torch.ones(2, 10, dtype=torch.bool), 1)
    assert mask.shape == (2, 3, 10) and mask.sum(-1).tolist() == [[1, 1, 1]] * 2 and mask[:, :, 9].all()


def test_streaming_keeps_sinks_and_recent():
    valid = torch.ones(1, 30, dtype=torch.bool)
    valid[0, :5] = False
    mask = streaming_mask(valid, 10, 4)[0]
    assert mask.nonzero().flatten().tolist() == [5, 6, 7, 8] + list(range(24, 30))


def test_quest_page_score_bounds_every_key():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 16, generator=gen)
    k = torch.randn(2, 2, 50, 16, generator=gen)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :7] = False
    lo, hi, page = page_bounds(k, valid, 8)
    bound = naive.quest_page_scores(q, lo, hi, valid.sum(-1), 8)  # [B, Hq, NP]; the current page +inf
    exact = torch.einsum("bhgd,bhld->bhgl", q.view(2, 2, 2, 16), k).reshape(2, 4, 50)
    for b in range(2):
        for pos in range(50):
            if valid[b, pos]:
                assert torch.all(bound[b, :, page[b, pos]] >= exact[b, :, pos] - 1e-5)


def test_quest_includes_current_page_and_budget_pages():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 8, generator=gen)
    k = torch.randn(1, 1, 70, 8, generator=gen)
    valid = torch.ones(1, 70, dtype=torch.bool)
    mask = quest_mask(q, k, valid, budget=20, page_size=8)[0]  # ceil(20/8) = 3 pages
    for h in range(2):
        positions = mask[h].nonzero().flatten()
        pages = set((positions // 8).tolist())
        assert len(pages) == 3 and 8 in pages  # page 8 holds positions 64..69, the current one


def test_mask_to_selection_pads_with_valid_positions():
    mask = torch.tensor([[False, True, False, True, False], [False, False, False, False, True]])
    sel = mask_to_selection(mask, 3)
    assert sel.counts.tolist() == [2, 1]
    assert sel.indices[0, :2].tolist() == [1, 3] and sel.indices[1, 0] == 4
    assert int(sel.indices.max()) < 5


@pytest.mark.parametrize("method", ["lessismore", "tidaldecode", "quest", "streaming", "oracle"])
def test_budget_at_least_cache_selects_everything(method):
    cfg = SparseConfig(method=method, budget=64)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 8, generator=gen)
    k = torch.randn(2, 2, 40, 8, generator=gen)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[0, :10] = False
    sel = get(method).select(cfg, q, k, valid)
    counts = sel.counts if not sel.per_head else sel.counts[:, 0]
    assert counts.tolist() == [30, 40]
