"""GPU checks of the HF path (lessismore.enable, Triton kernels behind ops) and of `lessismore analyze
--device cuda`, on random small Llama and Qwen3 models (no weights need to travel to the GPU machine).

    PYTHONPATH=src python3 benchmarks/hf_gpu_check.py TOKENIZER_DIR    (DEV=cpu runs it on the CPU)

For every method: budget >= context must give full attention's greedy tokens exactly; at budget 32 the
token agreement with full attention and the KV read fraction are recorded (the same figures on CPU
and GPU mean the two paths select the same sets).
"""
import datetime
import json
import os
import subprocess
import sys
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
import lessismore as lim
DEV = os.environ.get("DEV", "cuda")

tok = AutoTokenizer.from_pretrained(sys.argv[1])
tok.padding_side = "left"
results = {}
for name, cls, conf in [
    ("llama", LlamaForCausalLM, LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                                            num_hidden_layers=8, vocab_size=len(tok), max_position_embeddings=4096)),
    ("qwen3", Qwen3ForCausalLM, Qwen3Config(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                                            head_dim=64, num_hidden_layers=8, vocab_size=len(tok), max_position_embeddings=4096)),
]:
    torch.manual_seed(0)
    model = cls(conf).to(DEV, torch.float32).eval()
    model.set_attn_implementation("sdpa")
    prompts = ["hello there " * 40, "a b c " * 100, "The capital of France is"]
    enc = tok(prompts, return_tensors="pt", padding=True).to(DEV)
    gen = dict(max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
    full = model.generate(**enc, **gen)
    row = {}
    for method in ["lessismore", "tidaldecode", "quest", "streaming", "oracle"]:
        with lim.sparse_attention(model, lim.SparseConfig.for_method(method, budget=4096, selection_layers=(2, 5))):
            exact = model.generate(**enc, **gen)
        with lim.sparse_attention(model, lim.SparseConfig.for_method(method, budget=32, selection_layers=(2, 5))):
            t0 = time.perf_counter(); small = model.generate(**enc, **gen); dt = time.perf_counter() - t0
            st = lim.stats(model)
        row[method] = dict(exact_equal=bool(torch.equal(exact, full)),
                           small_agreement=float((small == full).float().mean()), kv_read_fraction=st["kv_read_fraction"],
                           seconds=round(dt, 2))
    results[name] = row
    print(name, json.dumps(row), flush=True)
    if name == "llama":
        model.save_pretrained("/tmp/tinyllama"); tok.save_pretrained("/tmp/tinyllama")
out = os.environ.get("OUT", "/tmp")
os.makedirs(out, exist_ok=True)
cmd = [sys.executable, "-m", "lessismore.cli", "analyze", "--model", "/tmp/tinyllama", "--limit", "2", "--max-tokens", "160",
       "--methods", "lessismore,tidaldecode,quest,streaming,oracle", "--budget", "48", "--device", DEV, "--out", out + "/analysis"]
t0 = time.perf_counter()
rc = subprocess.call(cmd)
print("analyze rc", rc, "seconds", round(time.perf_counter() - t0, 1))
print(open(out + "/analysis/summary.md").read()[:3000] if rc == 0 else "")
meta = dict(command="PYTHONPATH=src python3 benchmarks/hf_gpu_check.py TOKENIZER_DIR", date=datetime.date.today().isoformat(),
            device=torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", torch=torch.__version__, analyze_rc=rc)
json.dump(dict(meta, models=results), open(out + "/hf_gpu_check.json", "w"), indent=2)
