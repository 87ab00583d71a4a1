"""Decoder stacks for decoding: Llama, Qwen2 and Qwen3 (RMSNorm, RoPE, SwiGLU, GQA; Qwen3's q/k norm,
Qwen2's qkv bias), held as plain tensors with the q/k/v and gate/up projections fused into one matrix
each. Weights come from a local HF safetensors folder, a GGUF file through transformers, or are drawn
at random from a config (benchmarks at a model's shape without its checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lessismore.decode import DecodeCache, DecodeExecutor
from lessismore.engine.kernels import add_rmsnorm, qk_norm_rope_store, silu_mul
# Decode's products (<= 64 rows, on CUDA) take ops.skinny: 1.03-1.13x cuBLAS at Qwen3-8B's o, down,
# gate_up and lm_head shapes, ~0.96x at qkv (H200, benchmarks/results/linear-h200.json); the rest F.linear.
from lessismore.ops import linear

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # transformers' rope parameters when not the default rope
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = ()
    hf_config: object = field(default=None, compare=False, repr=False)

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """From a transformers config object (or its dict)."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = d.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(f"model: engine supports model types {', '.join(SUPPORTED)}, got {model_type!r}")
        if d.get("mlp_bias"):
            raise ValueError("model: MLP bias is not supported by the engine")
        if d.get("use_sliding_window") or (model_type == "mistral" and d.get("sliding_window")):
            raise ValueError("model: sliding-window attention is not supported by the engine")
        params = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling") or {}
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
        scaling = None
        if rope_type != "default":
            if rope_type in ("dynamic", "longrope"):
                raise ValueError(f"model: rope type {rope_type!r} (length-dependent) is not supported by the engine")
            scaling = {**legacy, **params, "rope_type": rope_type}
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("model: partial rotary embeddings are not supported by the engine")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            eos_token_ids=eos,
            hf_config=None if isinstance(hf, dict) else hf,
        )

    @classmethod
    def qwen3_8b(cls) -> "ModelConfig":
        """Qwen3-8B's shape (36 layers, hidden 4096, 32/8 heads of 128, vocab 151936)."""
        return cls(
            model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
            num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
            qk_norm=True, eos_token_ids=(151645, 151643),
        )

    def weight_bytes(self, dtype_bytes: int = 2, read_per_step: bool = False) -> int:
        """Parameter bytes; ``read_per_step``: those a decode step reads (the embedding table is read
        one row per token, so it is left out unless tied to the LM head)."""
        h, d = self.hidden_size, self.head_dim
        per_layer = h * d * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * d * h + 3 * h * self.intermediate_size
        per_layer += 2 * h + (2 * d if self.qk_norm else 0) + ((self.num_heads + 2 * self.num_kv_heads) * d if self.qkv_bias else 0)
        total = self.num_layers * per_layer + h + self.vocab_size * h
        if not (self.tie_word_embeddings or read_per_step):
            total += self.vocab_size * h  # separate LM head and embedding: both stored
        return total * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V bytes of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    qk_norm: torch.Tensor | None  # [2, D]: q_norm, k_norm
    wo: torch.Tensor
    post_norm: torch.Tensor
    w_gate_up: torch.Tensor  # [2I, H], gate rows first
    w_down: torch.Tensor


@dataclass
class Weights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] (fp32, CPU) and the attention scaling, as transformers computes them."""
    dim = config.head_dim
    if config.rope_scaling is None:
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
        return inv, 1.0
    rope_type = config.rope_scaling["rope_type"]
    if config.hf_config is not None:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope_type](config.hf_config, torch.device("cpu"))
    inv, _ = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
    p = config.rope_scaling
    if rope_type == "linear":
        return inv / p["factor"], 1.0
    if rope_type == "llama3":
        factor, low, high, old = p["factor"], p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"model: rope type {rope_type!r} needs a transformers config (load from a folder)")


def rope_tables(config: ModelConfig, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, D/2] fp32 for positions 0..max_len-1 (transformers' angles, to the bit)."""
    inv, scaling = rope_inv_freq(config)
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv.float()[None, :]
    return (freqs.cos() * scaling).to(device), (freqs.sin() * scaling).to(device)


def _fuse(cfg: ModelConfig, get, device, dtype) -> Weights:
    """Build Weights from ``get(name) -> tensor`` over HF parameter names."""

    def t(name):
        return get(name).to(device=device, dtype=dtype)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        bias = None
        if cfg.qkv_bias:
            bias = torch.cat([t(a + "q_proj.bias"), t(a + "k_proj.bias"), t(a + "v_proj.bias")])
        layers.append(
            LayerWeights(
                input_norm=t(p + "input_layernorm.weight"),
                wqkv=torch.cat([t(a + "q_proj.weight"), t(a + "k_proj.weight"), t(a + "v_proj.weight")]),
                bqkv=bias,
                qk_norm=torch.stack([t(a + "q_norm.weight"), t(a + "k_norm.weight")]) if cfg.qk_norm else None,
                wo=t(a + "o_proj.weight"),
                post_norm=t(p + "post_attention_layernorm.weight"),
                w_gate_up=torch.cat([t(p + "mlp.gate_proj.weight"), t(p + "mlp.up_proj.weight")]),
                w_down=t(p + "mlp.down_proj.weight"),
            )
        )
    embed = t("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else t("lm_head.weight")
    return Weights(embed=embed, layers=layers, final_norm=t("model.norm.weight"), lm_head=lm_head)


def load_folder(path: str | Path, device, dtype) -> tuple[ModelConfig, Weights]:
    """A local HF checkpoint folder (config.json + *.safetensors)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").exists() or not files:
        raise ValueError(f"model: {path} is not a HF checkpoint folder (config.json and *.safetensors)")
    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(path))
    if not cfg.eos_token_ids and (path / "generation_config.json").exists():
        eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
        if eos is not None:
            cfg = dataclasses.replace(cfg, eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    where = {name: h for h in handles for name in h.keys()}

    def get(name):
        if name not in where:
            raise ValueError(f"model: tensor {name} is missing from {path}")
        return where[name].get_tensor(name)

    return cfg, _fuse(cfg, get, device, dtype)


def load_hf_model(model, device, dtype) -> tuple[ModelConfig, Weights]:
    """From an instantiated transformers model (e.g. a GGUF file loaded through transformers)."""
    cfg = ModelConfig.from_hf(model.config)
    state = model.state_dict()
    return cfg, _fuse(cfg, state.__getitem__, device, dtype)


def random_weights(cfg: ModelConfig, device, dtype, seed: int = 0) -> Weights:
    """Random weights drawn on ``device`` (no host copy): N(0, 1/fan_in) matrices, unit norms."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def mat(rows, cols):
        w = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen)
        return w.mul_(cols**-0.5)

    def ones(*shape):
        return torch.ones(*shape, device=device, dtype=dtype)

    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    layers = [
        LayerWeights(
            input_norm=ones(h),
            wqkv=mat(qkv_rows, h),
            bqkv=mat(1, qkv_rows)[0] if cfg.qkv_bias else None,
            qk_norm=ones(2, d) if cfg.qk_norm else None,
            wo=mat(h, cfg.num_heads * d),
            post_norm=ones(h),
            w_gate_up=mat(2 * inter, h),
            w_down=mat(h, inter),
        )
        for _ in range(cfg.num_layers)
    ]
    embed = torch.randn(cfg.vocab_size, h, device=device, dtype=dtype, generator=gen)
    lm_head = embed if cfg.tie_word_embeddings else mat(cfg.vocab_size, h)
    return Weights(embed=embed, layers=layers, final_norm=ones(h), lm_head=lm_head)


class Model:
    """A decoder stack and its rotary tables, with the two forward passes the engine runs: a prompt
    chunk of one sequence (prefill) and one token for each of a batch of rows (decode)."""

    def __init__(self, cfg: ModelConfig, weights: Weights, max_len: int, device, dtype):
        self.cfg, self.w, self.device, self.dtype = cfg, weights, torch.device(device), dtype
        self.cos, self.sin = rope_tables(cfg, max_len, self.device)

    def _qkv(self, layer: LayerWeights, h, slots, positions, k_cache, v_cache):
        c = self.cfg
        qkv = linear(h, layer.wqkv, layer.bqkv)
        return qk_norm_rope_store(
            qkv, c.num_heads, c.num_kv_heads, c.head_dim, slots, positions, self.cos, self.sin,
            k_cache, v_cache, layer.qk_norm, c.rms_norm_eps,
        )

    def _mlp_and_next_norm(self, i: int, attn, residual):
        """o_proj, residual, MLP, residual; returns the normed input of layer i + 1 (or the final norm)."""
        c, layer = self.cfg, self.w.layers[i]
        h = add_rmsnorm(linear(attn, layer.wo), residual, layer.post_norm, c.rms_norm_eps)
        mlp = linear(silu_mul(linear(h, layer.w_gate_up)), layer.w_down)
        nxt = self.w.layers[i + 1].input_norm if i + 1 < c.num_layers else self.w.final_norm
        return add_rmsnorm(mlp, residual, nxt, c.rms_norm_eps)

    def prefill(self, tokens: torch.Tensor, slot: int, start: int, k_caches, v_caches, logits: bool) -> torch.Tensor | None:
        """Run tokens [T] of the sequence in cache row ``slot`` at positions start..start+T-1 (its
        earlier positions already cached), writing their K/V. Returns the last token's logits [V] fp32
        when ``logits``."""
        c = self.cfg
        t = tokens.shape[0]
        end = start + t
        positions = torch.arange(start, end, device=self.device, dtype=torch.int32)
        slots = torch.full((t,), slot, device=self.device, dtype=torch.int32)
        residual = torch.nn.functional.embedding(tokens, self.w.embed)
        h = add_rmsnorm(None, residual, self.w.layers[0].input_norm, c.rms_norm_eps)
        group = c.num_heads // c.num_kv_heads
        mask = None
        if start > 0:
            mask = torch.arange(end, device=self.device)[None, :] <= positions[:, None]
        for i, layer in enumerate(self.w.layers):
            q = self._qkv(layer, h, slots, positions, k_caches[i], v_caches[i])
            k = k_caches[i][slot : slot + 1, :, :end]
            v = v_caches[i][slot : slot + 1, :, :end]
            q = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D]
            sdpa = torch.nn.functional.scaled_dot_product_attention
            if mask is None:
                out = sdpa(q, k, v, is_causal=True, enable_gqa=group > 1)
            else:
                # A chunk after the first: an explicit mask (is_causal aligns top-left); the KV heads
                # repeated so the memory-efficient kernel (no GQA support) can take the mask.
                if group > 1:
                    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
                out = sdpa(q, k, v, attn_mask=mask)
            attn = out[0].transpose(0, 1).reshape(t, c.num_heads * c.head_dim)
            h = self._mlp_and_next_norm(i, attn, residual)
        if not logits:
            return None
        return torch.nn.functional.linear(h[-1:], self.w.lm_head).float()[0]

    def decode(self, tokens, slots, positions, k_caches, v_caches, executor: DecodeExecutor, rows=None,
               states=None) -> torch.Tensor:
        """One token per row: tokens [b] at positions [b] (= the rows' lengths before this step) of
        cache rows slots [b] = 0..b-1. Writes their K/V, runs each layer's attention through
        ``executor`` (``rows`` [b] bool: the rows its counters count; ``states``: each layer's method
        state or None, ``DecodeCache.state``) and returns logits [b, V] in the weights' dtype (the
        sampler reads them as they are: no fp32 copy of [b, V] a step)."""
        c = self.cfg
        b = tokens.shape[0]
        lengths = positions + 1
        executor.begin_step(rows)
        residual = torch.nn.functional.embedding(tokens, self.w.embed)
        h = add_rmsnorm(None, residual, self.w.layers[0].input_norm, c.rms_norm_eps)
        for i, layer in enumerate(self.w.layers):
            q = self._qkv(layer, h, slots, positions, k_caches[i], v_caches[i])
            state = None if states is None else states[i]
            out = executor.layer(i, q, DecodeCache(k_caches[i][:b], v_caches[i][:b], lengths=lengths, state=state))
            h = self._mlp_and_next_norm(i, out.reshape(b, c.num_heads * c.head_dim), residual)
        return linear(h, self.w.lm_head)
