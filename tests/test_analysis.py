"""The analysis tool: recall and fidelity along teacher-forced traces (lessismore.analysis)."""
import hashlib
import math

import pytest
import torch

from lessismore.analysis import (
    PACKAGED_TRACES,
    AnalysisOptions,
    analyze,
    attention_recall,
    encode_traces,
    ground_truth_attention,
    load_traces,
    selection_mask,
)
from lessismore.analysis.metrics import union_depth
from lessismore.analysis.report import write_report
from lessismore.analysis.traces import make_batch
from lessismore.config import FULL, SparseConfig
from lessismore.integrations import hf
from lessismore.methods import Selection

BUDGET = 64
METHODS = ("full", "lessismore", "tidaldecode", "quest", "streaming", "oracle")


def _short_traces(tokenizer):
    """Two real traces with short prompts (76 and 68 tokens), truncated to 90 tokens; the first is cut
    4 tokens shorter so the batch is left-padded."""
    rows = load_traces()
    traces = encode_traces(tokenizer, [rows[3], rows[6]], max_tokens=90)
    traces[0].ids = traces[0].ids[:-4]
    return traces


@pytest.fixture(scope="module")
def result(default_model):
    model, tokenizer = default_model
    traces = _short_traces(tokenizer)
    options = AnalysisOptions(base=SparseConfig(budget=BUDGET), methods=METHODS, batch_size=2,
                              keep_details=True, progress=False)
    return analyze(model, tokenizer, traces, options), traces


def test_packaged_traces():
    assert hashlib.sha256(PACKAGED_TRACES.read_bytes()).hexdigest() == (
        "c3974b8dd8fea12f5a3acdca1a3bea019ad7d10dc5f5cbaebc716c2a119bb1c6"
    )
    rows = load_traces()
    assert len(rows) == 32 and all(r["prompt"] and r["trace"] for r in rows)
    assert len(load_traces(limit=3)) == 3


def test_recall_hand_computation():
    # One KV head, two query heads, four slots of which slot 0 is left padding.
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [B=1, Hq=2, D=2]
    k = torch.tensor([[[[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])  # [1, 1, L=4, 2]
    valid = torch.tensor([[False, True, True, True]])
    scale = 0.5
    probs = ground_truth_attention(q, k, valid, scale)

    def softmax(xs):
        e = [math.exp(x) for x in xs]
        return [x / sum(e) for x in e]

    head0 = softmax([0.5 * 1, 0.5 * 0, 0.5 * 1])  # q0.k for slots 1, 2, 3
    head1 = softmax([0.5 * 0, 0.5 * 2, 0.5 * 2])
    assert probs[0, :, 0].tolist() == [0.0, 0.0]
    assert torch.allclose(probs[0, 0, 1:], torch.tensor(head0), atol=1e-6)
    assert torch.allclose(probs[0, 1, 1:], torch.tensor(head1), atol=1e-6)

    # A shared set {1, 3}; the padding entry repeats slot 3 and must not count twice or clear it.
    shared = Selection(indices=torch.tensor([[1, 3, 3]]), counts=torch.tensor([2], dtype=torch.int32))
    recall = attention_recall(probs, selection_mask(shared, valid, 2))
    assert torch.allclose(recall[0], torch.tensor([head0[0] + head0[2], head1[0] + head1[2]]), atol=1e-6)

    # Per-head sets: head 0 reads {2}, head 1 reads {2, 3}.
    per_head = Selection(indices=torch.tensor([[[2, 2], [2, 3]]]), counts=torch.tensor([[1, 2]], dtype=torch.int32))
    recall = attention_recall(probs, selection_mask(per_head, valid, 2))
    assert torch.allclose(recall[0], torch.tensor([head0[1], head1[1] + head1[2]]), atol=1e-6)

    # Dense (no selection) reads everything valid: recall 1.
    assert torch.allclose(attention_recall(probs, selection_mask(None, valid, 2)), torch.ones(1, 2))


def test_union_depth_hand_built():
    """Budget 8, half of it recent (4 sinks, no window): k = 4 ranked of slots 4..39, two heads."""
    valid = torch.ones(4, 40, dtype=torch.bool)
    valid[3, 9:] = False  # 9 slots: 5 in the middle, so 4 fit but the row is ranked
    scores = torch.zeros(4, 2, 40)
    top = {0: ([10, 11, 12, 13], [20, 21, 22, 23]),  # disjoint lists: 2 ranks give 4 positions
           1: ([10, 11, 12, 13], [10, 11, 12, 13]),  # the same list: 4 ranks
           2: ([10, 11, 12, 13], [10, 20, 21, 22]),  # 10, 20, 11 after two ranks, 12 at the third
           3: ([5, 6, 7, 8], [8, 7, 6, 5])}  # the whole middle, read from both ends: 2 ranks
    for row, lists in top.items():
        for head, positions in enumerate(lists):
            scores[row, head, positions] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    depth = union_depth(scores, valid, budget=8, recent_ratio=0.5, sinks=4)
    assert depth.tolist() == [2.0, 4.0, 3.0, 2.0]
    valid[3, 8:] = False  # 8 slots fit the budget: nothing is ranked, no depth
    assert math.isnan(union_depth(scores, valid, 8, 0.5, 4)[3].item())
    assert union_depth(scores, valid, 8, 0.5, 4)[:3].tolist() == [2.0, 4.0, 3.0]


def test_union_depth_in_the_run(result):
    summary, _ = result
    depth = summary["union_depth"]
    k, heads = depth["ranked_k"], depth["heads"]
    assert k / heads <= depth["mean_ranks"] <= k
    assert sum(depth["share_of_steps"]) == pytest.approx(1.0)
    # The share past the prefix lies between the bins' shares past its bin's bounds.
    bins = depth["share_of_steps"]
    at = depth["prefix_ranks"] / k * len(bins)
    assert sum(bins[math.ceil(at):]) - 1e-9 <= depth["past_prefix"] <= sum(bins[math.floor(at):]) + 1e-9


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_ground_truth_equals_dense_attention(default_model):
    """At every decode layer, softmax(scale q.K) @ V from the recorded q/K/V equals the output of the
    model's dense attention, in a left-padded batch."""
    model, tokenizer = default_model
    batch = make_batch(_short_traces(tokenizer), tokenizer.pad_token_id)
    scale = next(m.scaling for m in model.modules() if type(m).__name__.endswith("Attention"))
    checked = []

    def observer(layer, role, q, k, v, valid, selection, out):
        probs = ground_truth_attention(q, k, valid, scale)  # [B, Hq, L]
        group = q.shape[1] // k.shape[1]
        expected = torch.matmul(probs.unsqueeze(2), v.float().repeat_interleave(group, dim=1)).squeeze(2)
        checked.append(float((expected - out.float()).abs().max()))

    hf.enable(model, FULL)
    hf.state_of(model).observers.append(observer)
    try:
        with torch.inference_mode():
            out = model(input_ids=batch.ids[:, : batch.start], attention_mask=batch.attention_mask[:, : batch.start],
                        position_ids=batch.position_ids[:, : batch.start], use_cache=True)
            cache = out.past_key_values
            for s in range(batch.start, batch.start + 3):
                model(input_ids=batch.ids[:, s: s + 1], attention_mask=batch.attention_mask[:, : s + 1],
                      position_ids=batch.position_ids[:, s: s + 1], past_key_values=cache, use_cache=True)
    finally:
        hf.disable(model)
    assert len(checked) == 3 * model.config.num_hidden_layers
    assert max(checked) < 1e-4


def test_full_has_recall_one_and_zero_kl(result):
    summary, _ = result
    full = summary["methods"]["full"]
    assert full["steps"] > 0
    assert full["mean_recall"] == pytest.approx(1.0, abs=1e-5)
    assert full["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert full["top1_agreement"] == 1.0
    # Same step counts for all methods: both rows' trace steps with cache > budget.
    assert {m["steps"] for m in summary["methods"].values()} == {full["steps"]}


def test_oracle_bounds_every_method(result):
    """At every step, sparse layer and head, no method's set holds more attention than the oracle's
    top-K on the same q and K (same budget); the oracle method reaches exactly that bound."""
    summary, _ = result
    details = summary["_details"]["methods"]
    for name, steps in details.items():
        assert steps, name
        if name == "full":  # reads the whole cache, not K positions
            continue
        for d in steps:
            rows = d["counted"]
            recall, bound = d["recall"][rows], d["bound"][rows]
            seen = ~torch.isnan(recall)
            assert seen.any(), name
            assert torch.all(bound[seen] >= recall[seen] - 1e-5), (name, d["step"])
            if name == "oracle":
                assert torch.allclose(recall[seen], bound[seen], atol=1e-5)
    # The same holds for the means.
    for name, m in summary["methods"].items():
        if name != "full":
            assert m["mean_recall"] <= m["oracle_bound_recall"] + 1e-6, name


def test_teacher_forcing_is_decode(result, default_model):
    """The full run's logits at every step equal a plain forward over the same (unpadded) prefix."""
    model, _ = default_model
    summary, traces = result
    by_id = {t.id: t for t in traces}
    log = summary["_details"]["ref_logits"]
    assert len(log) > 10
    worst = 0.0
    with torch.inference_mode():
        for entry in log[::3]:
            for row, trace_id in enumerate(entry["traces"]):
                prefix = by_id[trace_id].ids[: entry["step"] + 1 - int(entry["pad"][row])]
                plain = model(input_ids=torch.tensor([prefix])).logits[0, -1].float()
                worst = max(worst, float((plain - entry["logits"][row]).abs().max()))
    assert worst < 2e-3


def test_report_files(result, tmp_path):
    summary, _ = result
    files = write_report(summary, tmp_path)
    for name in ("summary.json", "summary.md", "recall_vs_step.png", "kl_vs_step.png",
                 "recall_vs_recent_ratio.png", "head_overlap.png"):
        assert name in files and (tmp_path / name).stat().st_size > 0
    import json

    data = json.loads((tmp_path / "summary.json").read_text())
    for m in data["methods"].values():
        assert set(m) >= {"mean_recall", "mean_kl", "top1_agreement", "steps"}
    assert "_details" not in data
    assert len(data["recent_ratio"]["recall"]) == 6


def test_options_configs():
    """Each method's config takes base's settings it uses; explicit configs must match the methods and
    share base's budget."""
    options = AnalysisOptions(base=SparseConfig(budget=BUDGET, full_layers=()), methods=("quest", "full", "streaming"))
    assert options.configs == (SparseConfig(method="quest", budget=BUDGET, full_layers=()), FULL,
                               SparseConfig(method="streaming", budget=BUDGET, sink_tokens=4, full_layers=()))
    quest = SparseConfig(method="quest", budget=BUDGET, page_size=64, full_layers=())
    assert AnalysisOptions(base=SparseConfig(budget=BUDGET), methods=("quest",), configs=(quest,)).configs == (quest,)
    with pytest.raises(ValueError, match="^configs: "):
        AnalysisOptions(base=SparseConfig(budget=BUDGET), methods=("full",), configs=(quest,))
    with pytest.raises(ValueError, match="^configs: quest has budget 64"):
        AnalysisOptions(base=SparseConfig(budget=128), methods=("quest",), configs=(quest,))
    with pytest.raises(ValueError, match="^base: "):
        AnalysisOptions(base=quest, methods=("quest",))


@pytest.mark.parametrize("argv, field", [
    (["--limit", "0"], "limit"),
    (["--methods", "lessismore,nope"], "--methods"),
    (["--recent-ratios", "0,1.5"], "recent_ratios"),
    (["--budget", "0"], "--budget"),
    (["--max-tokens", "1"], "max_tokens"),
    (["--methods", "quest", "--no-extras", "--recent-ratio", "0.5"], "--recent-ratio"),
    (["--methods", "tidaldecode", "--page-size", "8"], "--page-size"),
])
def test_cli_rejects_bad_input(argv, field, tmp_path, capsys):
    from lessismore.cli import main

    assert main(["analyze", *argv, "--out", str(tmp_path)]) == 2
    assert f"error: {field}:" in capsys.readouterr().err
