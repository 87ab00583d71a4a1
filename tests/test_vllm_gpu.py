"""LESSISMORE on vLLM's CUDA path (lessismore.integrations.vllm_cuda; written for vLLM 0.26.0 on an H200).

A tiny random Qwen3 (saved with transformers, fixed seed) is served by vLLM with the backend in the
CUSTOM slot and run through the HF path (``lessismore.enable``) on the same GPU; greedy tokens must be
equal, for full attention, LessIsMore at budget >= context and LessIsMore at a small budget, over one
batch of prompts of different lengths, with CUDA graphs off (enforce_eager) and on (vLLM's default:
torch.compile, full graphs for decode-only steps, piecewise for mixed steps). The exact comparisons run
in fp32 on the Triton-based backend (``LESSISMORE_VLLM_DENSE=TRITON_ATTN``: FlashAttention has no fp32);
bf16 runs on the FlashAttention-based backend check that ``full`` is vLLM's FlashAttention unchanged
and that LessIsMore runs there with graphs on.
A step budget of 64 tokens makes long prompts prefill in chunks while short ones decode.

vLLM runs in one child process (this file as a script: engines one after another, engine core
in-process with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, FlashInfer's sampler probe patched off as in
shared/vllm-h200/full_bench.py, the plugin registered by calling ``register()``). Run on the GPU machine
with ``TRITON_INTERPRET=0`` (tests/conftest.py turns the interpreter on otherwise).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]

PROMPT_LENGTHS = (20, 45, 70, 100)
NEW_TOKENS = 32
BLOCK_SIZE = 16
STEP_TOKENS = 64  # chunked prefill: 45 -> 44 + 1, 70 -> 62 + 8, 100 -> 54 + 46, never in a decode-only step
MAX_LEN = 512
VOCAB = 2048
SMALL = {"method": "lessismore", "budget": 24, "recent_ratio": 0.5, "sink_tokens": 2, "selection_layers": [2]}
# name -> (the "lessismore" section, or None for vLLM's own backend; dtype; enforce_eager; base backend)
CASES = {
    "default_fp32_eager": (None, "float32", True, "TRITON_ATTN"),
    "full_fp32_eager": ({"method": "full"}, "float32", True, "TRITON_ATTN"),
    "large_fp32_eager": ({"method": "lessismore", "budget": 1024, "selection_layers": [2]}, "float32", True, "TRITON_ATTN"),
    "small_fp32_eager": (SMALL, "float32", True, "TRITON_ATTN"),
    "large_fp32_graphs": ({"method": "lessismore", "budget": 1024, "selection_layers": [2]}, "float32", False, "TRITON_ATTN"),
    "small_fp32_graphs": (SMALL, "float32", False, "TRITON_ATTN"),
    "default_bf16_graphs": (None, "bfloat16", False, "FLASH_ATTN"),
    "full_bf16_graphs": ({"method": "full"}, "bfloat16", False, "FLASH_ATTN"),
    "small_bf16_graphs": (SMALL, "bfloat16", False, "FLASH_ATTN"),
}
BAD = {"method": "lessismore", "budget": 0}
# LESSISMORE_GPU_CASES=name,name,...: run only these (e.g. to re-run a failure within one call)
SELECTED = [c for c in os.environ.get("LESSISMORE_GPU_CASES", "").split(",") if c]


def _need(case):
    if SELECTED and case not in SELECTED:
        pytest.skip(f"not in LESSISMORE_GPU_CASES={','.join(SELECTED)}")


def tiny_qwen3(path) -> None:
    """A random 6-layer Qwen3 (GQA 4/2 heads, head_dim 64), fp32 weights, no tokenizer (vLLM runs with
    skip_tokenizer_init and token-id prompts)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False,
        initializer_range=0.2,  # peaked logits: no near-ties in greedy decoding
        rms_norm_eps=1e-6, rope_theta=10000.0, use_sliding_window=False, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(path)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


# ---- the child process: vLLM engines -----------------------------------------------------------------


def _patch_flashinfer_probe():
    """The staged bundle has no flashinfer: make vLLM's sampler take its PyTorch/Triton path."""
    import vllm.v1.sample.ops.topk_topp_sampler as sampler_ops

    sampler_ops.flashinfer_sampler_supported = lambda *a, **k: False
    try:
        import vllm.v1.worker.gpu.sample.sampler as sampler_v2

        sampler_v2.flashinfer_sampler_supported = lambda *a, **k: False
    except Exception:  # noqa: BLE001 - not in every vLLM
        pass


def run_engines(spec: dict) -> None:
    _patch_flashinfer_probe()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from lessismore.integrations import vllm as plugin

    plugin.register()  # no installed dist-info here: the entry point is not seen
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    except ImportError:  # pragma: no cover
        cleanup_dist_env_and_memory = lambda: None  # noqa: E731

    def engine(section, dtype, eager, base):
        os.environ[plugin.DENSE_ENV] = base
        plugin.register()  # the CUSTOM slot follows LESSISMORE_VLLM_DENSE
        return LLM(
            model=spec["model"], dtype=dtype, enforce_eager=eager, block_size=BLOCK_SIZE, max_model_len=MAX_LEN,
            max_num_seqs=8, max_num_batched_tokens=STEP_TOKENS, enable_prefix_caching=False, seed=0,
            skip_tokenizer_init=True, gpu_memory_utilization=0.08,
            additional_config={} if section is None else {"lessismore": section},
            attention_backend=("CUSTOM" if section is not None else base),
        )

    def close(llm):
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
        del llm
        cleanup_dist_env_and_memory()
        torch.cuda.empty_cache()

    results = {"tokens": {}, "seconds": {}, "errors": {}}
    batch = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)

    def save():  # after every case: a child cut short by the caller's timeout still reports what it ran
        with open(spec["out"], "w") as f:
            json.dump(results, f)

    for name in spec["cases"]:
        section, dtype, eager, base = CASES[name]
        start = time.time()
        os.environ.pop(plugin.RECORD_ENV, None)
        if eager:  # record the sets of eager steps (a graph replay runs no Python to record them)
            os.environ[plugin.RECORD_ENV] = os.path.join(spec["record"], name)
            os.makedirs(os.environ[plugin.RECORD_ENV], exist_ok=True)
        try:
            llm = engine(section, dtype, eager, base)
            outputs = llm.generate(batch, params, use_tqdm=False)
            results["tokens"][name] = [list(o.outputs[0].token_ids) for o in outputs]
            close(llm)
        except Exception as exc:  # noqa: BLE001 - reported per case
            import traceback

            results["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"
        results["seconds"][name] = round(time.time() - start, 1)
        print(f"CASE {name}: {results['seconds'][name]} s", "ERROR" if name in results["errors"] else "", flush=True)
        save()
    os.environ.pop(plugin.RECORD_ENV, None)
    if spec.get("bad"):
        try:
            engine(BAD, "float32", True, "TRITON_ATTN")
        except Exception as exc:  # noqa: BLE001 - the test checks its type and text
            results["bad_error"] = f"{type(exc).__name__}: {exc}"
        else:
            results["bad_error"] = None
    save()


def run_child(folder, spec: dict) -> dict:
    spec = dict(spec, out=str(folder / "out.json"), record=str(folder / "record"))
    (folder / "spec.json").write_text(json.dumps(spec))
    # TRITON_F32_DEFAULT=ieee: vLLM's Triton attention takes fp32 dots as fp32 (Triton's default on
    # NVIDIA is TF32), as the HF side and the package's kernels do.
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TRITON_INTERPRET="0", VLLM_NO_USAGE_STATS="1",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TRITON_F32_DEFAULT="ieee")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # The child's output goes straight to the log file, so a run killed from outside still leaves it.
    log = os.environ.get("LESSISMORE_GPU_LOG") or str(folder / "child.log")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, str(folder / "spec.json")], env=env, stdout=f,
                              stderr=subprocess.STDOUT, text=True, timeout=1500)
    if proc.returncode != 0 or not (folder / "out.json").exists():
        pytest.fail(f"the vLLM child process failed ({proc.returncode}):\n{open(log).read()[-8000:]}")
    results = json.loads((folder / "out.json").read_text())
    results["record"] = spec["record"]
    return results


# ---- the tests ----------------------------------------------------------------------------------------


def _skip_without_gpu_vllm():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm", reason="vLLM is not installed here")
    pytest.importorskip("triton")
    from lessismore.ops import triton_decode

    if triton_decode.INTERPRETED:
        pytest.skip("the Triton interpreter is on: run with TRITON_INTERPRET=0")
    try:
        from lessismore.integrations import vllm_cuda  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"vLLM's GPU backends do not import: {exc}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    _skip_without_gpu_vllm()
    path = tmp_path_factory.mktemp("tiny-qwen3")
    tiny_qwen3(path)
    return path


@pytest.fixture(scope="module")
def vllm_results(checkpoint, tmp_path_factory):
    cases = [c for c in CASES if not SELECTED or c in SELECTED]
    spec = {"model": str(checkpoint), "prompts": prompts(), "cases": cases, "bad": not SELECTED or "bad" in SELECTED}
    return run_child(tmp_path_factory.mktemp("vllm-gpu"), spec)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to("cuda").eval()
    model.set_attn_implementation("sdpa")
    return model


def hf_greedy(model, section):
    """HF path: batched greedy generation with left padding, the method enabled with ``section`` (None:
    plain SDPA). Returns (tokens per prompt, per-step logits [steps][B, V])."""
    import lessismore
    from lessismore.integrations import vllm as plugin

    batch = prompts()
    width = max(map(len, batch))
    device = next(model.parameters()).device
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    model.generation_config.eos_token_id = None
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
               do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        if section is None:
            out = model.generate(**gen)
        else:
            with lessismore.sparse_attention(model, plugin.parse_settings(section)):
                out = model.generate(**gen)
    return out.sequences[:, width:].tolist(), [s.float() for s in out.scores]


def assert_greedy_equal(got, want, scores, tol=1e-3):
    """Token lists equal; where they part, the two tokens must tie in HF's logits to within ``tol``
    (relative): two correct implementations may break a tie differently, nothing else."""
    for row, (a, b) in enumerate(zip(got, want)):
        if a == b:
            continue
        t = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        logits = scores[t][row]
        gap = float(logits[b[t]] - logits[a[t]])
        scale = float(logits.abs().max())
        assert gap <= tol * max(scale, 1.0), (
            f"prompt {row} (length {PROMPT_LENGTHS[row]}) parts at new token {t}: vLLM {a[t]}, HF {b[t]}, "
            f"HF logit gap {gap:.3g} (max |logit| {scale:.3g})\nvLLM {a}\nHF   {b}")


def _tokens(vllm_results, case):
    _need(case)
    error = vllm_results["errors"].get(case)
    assert error is None, f"{case} failed in vLLM:\n{error}"
    return vllm_results["tokens"][case]


@pytest.mark.parametrize("case, section", [
    ("default_fp32_eager", None),
    ("full_fp32_eager", {"method": "full"}),
    ("large_fp32_eager", CASES["large_fp32_eager"][0]),
    ("small_fp32_eager", SMALL),
    ("large_fp32_graphs", CASES["large_fp32_graphs"][0]),
    ("small_fp32_graphs", SMALL),
])
def test_vllm_gpu_greedy_tokens_equal_hf(vllm_results, hf_model, case, section):
    got = _tokens(vllm_results, case)
    want, scores = hf_greedy(hf_model, section)
    assert all(len(t) == NEW_TOKENS for t in got)
    assert_greedy_equal(got, want, scores)


def test_vllm_gpu_full_is_vllm_own_attention(vllm_results):
    """``full``: every layer is vLLM's own kernel, the same launches: the same tokens, bit for bit."""
    assert _tokens(vllm_results, "full_fp32_eager") == _tokens(vllm_results, "default_fp32_eager")


def test_vllm_gpu_small_budget_changes_tokens(vllm_results):
    """The sparse layers did run: at budget 24 the long prompts' continuations differ from full."""
    assert _tokens(vllm_results, "small_fp32_eager") != _tokens(vllm_results, "full_fp32_eager")


def test_vllm_gpu_flash_attention_base(vllm_results):
    """bf16 over FlashAttention: full is vLLM's FlashAttention unchanged; LessIsMore runs, graphs on."""
    assert _tokens(vllm_results, "full_bf16_graphs") == _tokens(vllm_results, "default_bf16_graphs")
    small = _tokens(vllm_results, "small_bf16_graphs")
    assert all(len(t) == NEW_TOKENS and all(0 <= x < VOCAB for x in t) for t in small)


def test_vllm_gpu_eager_steps_mixed_prefill_and_decode_rows(vllm_results):
    """Chunked prefill did mix: some eager steps selected for decode rows while other rows prefilled."""
    _need("small_fp32_eager")
    folder = os.path.join(vllm_results["record"], "small_fp32_eager")
    lines = [json.loads(x) for name in os.listdir(folder) for x in open(os.path.join(folder, name)).read().splitlines()]
    assert any(line["batch_rows"] > len(line["seq_lens"]) for line in lines)
    assert any(line["batch_rows"] == len(line["seq_lens"]) == len(PROMPT_LENGTHS) for line in lines)


def test_vllm_gpu_bad_setting_fails_at_engine_start_naming_it(vllm_results):
    _need("bad")
    error = vllm_results["bad_error"]
    assert error is not None and error.startswith("ValueError"), error
    assert "budget" in error and "LESSISMORE" in error


if __name__ == "__main__":
    run_engines(json.loads(open(sys.argv[1]).read()))  # writes spec["out"] itself, after every case
