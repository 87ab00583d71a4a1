"""The HF transformers integration on the real default model."""
import pytest
import torch

import lessismore as lim
from lessismore import SparseConfig
from lessismore import decode
from lessismore.methods import LayerRole

METHODS = ["lessismore", "tidaldecode", "quest", "streaming", "oracle"]


def _greedy(model, ids, mask=None, new=64, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=2, **kw)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@pytest.fixture(scope="module")
def full_run(default_model, chat_prompt):
    model, _ = default_model
    return _greedy(model, chat_prompt)


@pytest.mark.parametrize("method", ["full"] + METHODS)
def test_budget_over_context_is_exact(default_model, chat_prompt, full_run, method):
    model, _ = default_model
    with lim.sparse_attention(model, SparseConfig.for_method(method, budget=4096)):
        tokens, logits = _greedy(model, chat_prompt)
        stats = lim.stats(model)
    assert tokens.shape[1] >= 64
    assert torch.equal(tokens, full_run[0])
    torch.testing.assert_close(logits, full_run[1], rtol=1e-4, atol=1e-4)
    assert stats["kv_read_fraction"] == pytest.approx(1.0)


def test_sparse_layers_read_only_the_selected_positions(default_model, chat_prompt, monkeypatch):
    model, _ = default_model
    seen = []
    real = decode.ops.decode_attention

    def recording(q, k, v, selection, scale=None, triton=None):
        seen.append((k.shape[2], selection.indices.clone(), selection.counts.clone()))
        out = real(q, k, v, selection, scale, triton)
        # Attention over the selection equals dense attention with everything else masked out.
        b, hq, d = q.shape
        g = hq // k.shape[1]
        keep = torch.zeros(b, k.shape[2], dtype=torch.bool)
        keep[0, selection.indices[0, : selection.counts[0]]] = True
        kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        w = (torch.einsum("bhd,bhld->bhl", q, kk) * scale).masked_fill(~keep[:, None], float("-inf"))
        torch.testing.assert_close(out, torch.einsum("bhl,bhld->bhd", w.softmax(-1), vv), rtol=1e-4, atol=1e-5)
        return out

    monkeypatch.setattr(decode.ops, "decode_attention", recording)
    cfg = lim.enable(model, SparseConfig(method="lessismore", budget=64))
    try:
        _greedy(model, chat_prompt, new=4)
        stats = lim.stats(model)
    finally:
        lim.disable(model)
    sparse_layers = 30 - len(cfg.full_layers) - len(cfg.selection_layers)
    assert len(seen) == 3 * sparse_layers  # 4 new tokens = prefill + 3 decode steps; every sparse layer, nothing else
    for length, indices, counts in seen:
        assert length > 64 and counts.tolist() == [64] and indices.shape == (1, 64)
    assert stats["kv_read_fraction"] < 0.6


def test_roles_follow_tidaldecode_schedule():
    from lessismore.methods import get

    cfg = SparseConfig(method="lessismore", budget=64).resolve("llama", 30, 576)
    roles = get("lessismore").layer_roles(cfg, 30)
    assert cfg.selection_layers == (2, 10)
    assert roles[:3] == [LayerRole.FULL, LayerRole.FULL, LayerRole.SELECT_DENSE]
    assert roles[10] is LayerRole.SELECT_DENSE and roles.count(LayerRole.SPARSE) == 26
    assert SparseConfig(budget=8).resolve("qwen3", 36, 4096).selection_layers == (2, 12)
    quest = get("quest").layer_roles(SparseConfig(method="quest", budget=64, full_layers=()).resolve("llama", 30, 576), 30)
    assert set(quest) == {LayerRole.SELECT_SPARSE}


@pytest.mark.parametrize("method", ["full"] + METHODS)
def test_left_padded_batch_matches_single(default_model, method):
    model, tokenizer = default_model
    prompts = ["The capital of France is", "Write a short poem about the sea and the wind in the night sky:",
               "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch.attention_mask[:, 0].tolist() == [0, 0, 1]
    cfg = SparseConfig.for_method(method, budget=16, sink_tokens=2, page_size=4)
    with lim.sparse_attention(model, cfg):
        together, _ = _greedy(model, batch.input_ids, batch.attention_mask, new=24)
        for i, prompt in enumerate(prompts):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            alone = _greedy(model, ids, new=24)[0][0].tolist()
            # A row that stopped at EOS (id 2) early is padded with 2 in the batch.
            assert together[i].tolist() == alone + [2] * (24 - len(alone)), f"prompt {i}"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(budget=0), "budget"),
        (dict(budget=-3), "budget"),
        (dict(recent_ratio=1.5), "recent_ratio"),
        (dict(recent_ratio=-0.1), "recent_ratio"),
        (dict(budget=8, sink_tokens=8), "sink_tokens"),
        (dict(method="nope"), "method"),
        (dict(method="tidaldecode", recent_ratio=0.9), "recent_ratio"),
        (dict(method="tidaldecode", page_size=7), "page_size"),
        (dict(method="tidaldecode", sink_tokens=2), "sink_tokens"),
        (dict(method="full", budget=64), "budget"),
        (dict(method="quest", budget=32, page_size=64), "page_size"),
        (dict(method="streaming", recent_ratio=0.5), "recent_ratio"),
        (dict(selection_layers=(2,), full_layers=(2,)), "selection_layers"),
        (dict(full_layers="01"), "full_layers"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SparseConfig(**kwargs)


def test_config_defaults_come_from_the_method():
    assert SparseConfig(method="tidaldecode", budget=2) == SparseConfig(method="tidaldecode", budget=2, full_layers=(0, 1))
    lim_cfg = SparseConfig()
    assert (lim_cfg.budget, lim_cfg.recent_ratio, lim_cfg.sink_tokens, lim_cfg.page_size) == (2048, 0.25, 4, None)
    assert SparseConfig(method="quest").page_size == 16 and SparseConfig(method="quest").sink_tokens is None
    assert SparseConfig(method="full").budget is None
    assert SparseConfig.for_method("full", budget=64, page_size=4) == SparseConfig(method="full")
    assert SparseConfig.for_method("quest", budget=64, page_size=64, recent_ratio=0.5).page_size == 64


def test_selection_layer_out_of_range(default_model):
    model, _ = default_model
    with pytest.raises(ValueError, match="selection_layers"):
        lim.enable(model, SparseConfig(budget=64, selection_layers=(2, 30)))
    assert model.config._attn_implementation == "sdpa"  # nothing changed


def test_unsupported_models_are_refused():
    from transformers import MistralConfig, MistralForCausalLM, T5Config, T5ForConditionalGeneration

    tiny = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                vocab_size=100)
    sliding = MistralForCausalLM(MistralConfig(sliding_window=16, **tiny))
    with pytest.raises(ValueError, match="sliding-window"):
        lim.enable(sliding, SparseConfig(budget=8))
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=100))
    with pytest.raises(ValueError, match="model"):
        lim.enable(t5, SparseConfig(budget=8))


def test_import_has_no_side_effects():
    """import lessismore loads neither transformers nor the engine and registers nothing; enable()
    registers the attention and mask functions."""
    import subprocess
    import sys

    heavy = "('torch', 'transformers', 'lessismore.integrations.hf', 'lessismore.engine')"
    code = (f"import sys, lessismore; print(sorted(m for m in {heavy} if m in sys.modules)); "
            "lessismore.SparseConfig(method='quest'); print(sorted(m for m in " + heavy + " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "['torch']"]  # a config needs the method registry (torch), nothing more


def test_enable_registers_the_attention_function(default_model):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    model, _ = default_model
    with lim.sparse_attention(model, SparseConfig(budget=64)):
        assert "lessismore" in AttentionInterface._global_mapping
        assert "lessismore" in AttentionMaskInterface._global_mapping
