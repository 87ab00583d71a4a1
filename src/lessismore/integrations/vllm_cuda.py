"""LESSISMORE on vLLM's CUDA platform (written for vLLM 0.26.0, the CUSTOM backend slot; 0.32 by name).

vLLM's own GPU backend does everything but the decode rows' sparse work: the KV-cache layout and its
writes, prefill rows, mixed batches and the dense layers. Two bases, the same adapter:

- ``LessIsMoreFlashAttnBackend`` over ``FLASH_ATTN`` (FlashAttention 3 on Hopper; fp16/bf16), the default;
- ``LessIsMoreTritonAttnBackend`` over ``TRITON_ATTN`` (also fp32), with ``LESSISMORE_VLLM_DENSE=TRITON_ATTN``.

Per step the metadata builder finds the decode rows (from host-side data only) and starts a step on the
KV-cache group's ``decode.DecodeExecutor``; per layer the impl hands the executor those rows' queries and
a ``ops.paged.PagedCache`` over the layer's paged cache, in the layer's role:

- full layers: vLLM's kernel's output (the executor only counts);
- selection layers: the method's fused selection, whose dense pass and scores come from the paged split-K
  kernel reading the cache through the block table (no gather), then ``ops.topk_desc`` and the union;
- sparse layers: the paged sparse kernel over the selected positions; the set is carried from the
  selection layer on the executor and dropped when the builder starts the next step.

In a batch of decode rows only (the uniform single-token batches vLLM captures as full CUDA graphs) the
rows are the batch's first tokens and every tensor the layers read is one of vLLM's persistent buffers
(seq_lens, block table) or a kernel's output: no host synchronization, fixed shapes (span = the model's
max_model_len; the score buffer sized for the largest batch), capturable. Mixed batches (prefill and
decode rows; piecewise graphs, attention eager) run vLLM's kernel for every row and then replace the decode
rows of the sparse layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lessismore.decode import DecodeExecutor
from lessismore.integrations import vllm as plugin
from lessismore.methods import LayerRole, Method
from lessismore.ops.paged import PagedCache

from vllm.v1.attention.backend import AttentionCGSupport  # noqa: E402

try:
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadataBuilder,
    )
except ImportError:  # pragma: no cover - a vLLM build without FlashAttention
    FlashAttentionBackend = FlashAttentionImpl = FlashAttentionMetadataBuilder = None
from vllm.v1.attention.backends.triton_attn import (  # noqa: E402
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)


def _backend_name() -> str:
    """The enum member vLLM knows this backend by (``Attention`` looks it up by ``get_name()``)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return plugin.BACKEND_NAME if plugin.BACKEND_NAME in AttentionBackendEnum.__members__ else "CUSTOM"


# ---- one step's decode rows ----------------------------------------------------------------------


@dataclass
class StepRows:
    """The decode rows of one step, built by the metadata builder and read by every layer of its
    KV-cache group. ``tokens`` None: the batch is decode rows only and row i is token i (no tensor of
    this object is then new: seq_lens and block_table are views of vLLM's persistent buffers)."""

    count: int
    batch_rows: int
    tokens: torch.Tensor | None  # [count] int64: each decode row's token, in a mixed batch
    seq_lens: torch.Tensor  # [count] int32, the current token included
    block_table: torch.Tensor  # [count, max_blocks] int32
    span: int  # static: every row's length is at most span (max_model_len)
    executor: DecodeExecutor
    scores: torch.Tensor | None  # fp32 score buffer shared by the selection layers

    @property
    def uniform(self) -> bool:
        return self.tokens is None


def _has_fused_selection(executor: DecodeExecutor) -> bool:
    """Whether the selection layers take the method's fused path (the one that fills the score buffer):
    not where the set is chosen across ranks."""
    return (type(executor.method).fused_attention is not Method.fused_attention and executor.shard_group is None
            and LayerRole.SELECT_DENSE in executor.roles)


class _DecodeBuilderMixin:
    """Metadata builder: vLLM's own metadata, plus ``.lessismore`` (``StepRows``) when LessIsMore runs."""

    supports_update_block_table: bool = False  # the step's rows hold this group's block table
    _lessismore_capturing = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        base = super().get_cudagraph_support(vllm_config, kv_cache_spec)
        cfg = plugin.settings_for(vllm_config)
        if cfg is None:
            return base
        if vllm_config.parallel_config.tensor_parallel_size > 1 and plugin.needs_collectives(cfg):
            # The cross-rank union all-gathers through torch.distributed: eager attention between the
            # pieces of vLLM's piecewise graphs.
            return AttentionCGSupport.NEVER
        if base.value > AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE.value:
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return base

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.sparse_cfg = plugin.settings_for(vllm_config)
        self.executor = None
        self.score_buffer = None
        if self.sparse_cfg is None:
            return
        self.executor = plugin.make_executor(self.sparse_cfg, vllm_config)
        self.executor.reset_stats(device)
        model_config = vllm_config.model_config
        self.span = int(model_config.max_model_len)
        if _has_fused_selection(self.executor):
            compilation = vllm_config.compilation_config
            rows = max(int(vllm_config.scheduler_config.max_num_seqs),
                       int(getattr(compilation, "max_cudagraph_capture_size", None) or 0))
            heads = model_config.get_num_attention_heads(vllm_config.parallel_config)
            self.score_buffer = torch.empty(rows * heads * self.span, dtype=torch.float32, device=device)

    def build_for_cudagraph_capture(self, common_attn_metadata):
        self._lessismore_capturing = True
        try:
            return super().build_for_cudagraph_capture(common_attn_metadata)
        finally:
            self._lessismore_capturing = False

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False, **kwargs):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build, **kwargs)
        if self.executor is not None:
            metadata.lessismore = self._step_rows(common_attn_metadata)
            self.executor.begin_step()
            for observer in self.executor.observers:
                observer.batch_rows = common_attn_metadata.num_reqs
        return metadata

    def _step_rows(self, common) -> StepRows | None:
        """The decode rows of this batch, from host-side data only: a uniform single-token batch (the
        captured kind) takes vLLM's buffers as they are; otherwise the rows with one new token whose
        prompt is done (a one-token prompt chunk is prefill) are picked out."""
        num_reqs = common.num_reqs
        if num_reqs == 0:
            return None
        uniform = common.max_query_len == 1 and common.num_actual_tokens == num_reqs
        prefilling = _prefill_flags(common.is_prefilling, num_reqs)
        if uniform and not self._lessismore_capturing and prefilling is not None:
            uniform = not bool(prefilling.any())
        fields = dict(batch_rows=num_reqs, span=self.span, executor=self.executor, scores=self.score_buffer)
        if uniform:
            return StepRows(count=num_reqs, tokens=None, seq_lens=common.seq_lens[:num_reqs],
                            block_table=common.block_table_tensor[:num_reqs], **fields)
        starts = common.query_start_loc_cpu[: num_reqs + 1]
        decode = (starts[1:] - starts[:-1]) == 1
        if prefilling is not None:
            decode &= ~prefilling
        rows = decode.nonzero().flatten()
        if rows.numel() == 0:
            return None
        device = common.seq_lens.device
        index = rows.to(device)
        return StepRows(count=int(rows.numel()), tokens=starts[rows].to(device=device, dtype=torch.long),
                        seq_lens=common.seq_lens[index], block_table=common.block_table_tensor[index], **fields)


def _prefill_flags(flags, num_reqs: int) -> torch.Tensor | None:
    """vLLM's host-side is_prefilling as a bool tensor of num_reqs rows (rows that vLLM padded for a
    CUDA graph, past its own entries, are not prefilling). None where vLLM gives none, or only on the
    device (no host read in the builder)."""
    if flags is None or flags.device.type != "cpu":
        return None
    flags = flags[:num_reqs].to(torch.bool)
    if flags.shape[0] < num_reqs:
        flags = torch.cat([flags, flags.new_zeros(num_reqs - flags.shape[0])])
    return flags


def paged_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's per-layer cache -> key and value views [num_blocks, block_size, Hkv, D]. vLLM 0.26 packs
    both in the last dim of a logical [num_blocks, Hkv, block_size, 2 * D] tensor (any physical order);
    older layouts stack them as [2, num_blocks, block_size, Hkv, D]."""
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
        return kv_cache[0], kv_cache[1]
    if kv_cache.dim() == 4 and kv_cache.shape[-1] == 2 * head_size:
        key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
        return key_cache, value_cache
    raise NotImplementedError(f"{plugin.BACKEND_NAME}: unknown KV-cache layout {tuple(kv_cache.shape)}")


def _require_cuda(name: str) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        raise NotImplementedError(f"{plugin.BACKEND_NAME}: {name} runs on CUDA only; got platform "
                                  f"{current_platform.device_name!r}")


class _DecodeImplMixin(plugin.LayerIndexMixin):
    """Attention impl: vLLM's kernel for what it does; the decode rows through the executor."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type="decoder", kv_sharing_target_layer_name=None, **extra):
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, **extra)
        from vllm.config import get_current_vllm_config

        cfg = plugin.settings_for(get_current_vllm_config())
        self.sparse_cfg = cfg if attn_type == "decoder" else None  # AttentionType.DECODER (a str enum)
        if self.sparse_cfg is None:
            return
        _require_cuda(type(self).__name__)
        unsupported = {
            "alibi_slopes": alibi_slopes is not None,
            "sliding_window": sliding_window is not None,
            "logits_soft_cap": bool(logits_soft_cap),
            "attention sinks": extra.get("sinks") is not None,
            "kv_cache_dtype": kv_cache_dtype != "auto",
            "use_alibi_sqrt": bool(extra.get("use_alibi_sqrt")),
        }
        plugin.reject_unsupported(unsupported)
        if head_size < 16 or head_size & (head_size - 1):
            raise ValueError(f"head_size: {plugin.BACKEND_NAME}'s kernels need a power of two >= 16, got {head_size}")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        rows: StepRows | None = None
        if self.sparse_cfg is not None and attn_metadata is not None and output_scale is None:
            rows = getattr(attn_metadata, "lessismore", None)
        base_forward = super().forward
        if rows is None:
            return base_forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                output_block_scale)
        index = self._index(layer)
        role = rows.executor.roles[index]
        n = rows.count
        out3 = output.view(output.shape[0], self.num_heads, self.head_size)
        state = {"dense": False, "used": False}

        def run_dense():
            if not state["dense"]:
                base_forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
                state["dense"] = True

        def dense() -> torch.Tensor:
            run_dense()
            state["used"] = True
            return out3[:n] if rows.uniform else out3.index_select(0, rows.tokens)

        if not rows.uniform or role is LayerRole.FULL:
            run_dense()  # prefill rows need vLLM's kernel; full layers are vLLM's kernel
        q = query[:n] if rows.uniform else query.index_select(0, rows.tokens)
        q = q.view(n, self.num_heads, self.head_size)
        key_cache, value_cache = paged_views(kv_cache, self.head_size)
        cache = PagedCache(key_cache, value_cache, rows.block_table, rows.seq_lens, rows.span, scores=rows.scores)
        out = rows.executor.layer(index, q, cache, self.scale, dense=dense)
        if not state["used"]:
            out = out.to(output.dtype)
            if rows.uniform:
                out3[:n].copy_(out)
            else:
                out3.index_copy_(0, rows.tokens, out)
        return output


# ---- the backends ---------------------------------------------------------------------------------


class LessIsMoreTritonAttnImpl(_DecodeImplMixin, TritonAttentionImpl):
    pass


class LessIsMoreTritonAttnBuilder(_DecodeBuilderMixin, TritonAttentionMetadataBuilder):
    pass


class LessIsMoreTritonAttnBackend(TritonAttentionBackend):
    """``TRITON_ATTN`` with LessIsMore's decode schedule (fp16, bf16, fp32)."""

    @staticmethod
    def get_name() -> str:
        return _backend_name()

    @staticmethod
    def get_impl_cls():
        return LessIsMoreTritonAttnImpl

    @staticmethod
    def get_builder_cls():
        return LessIsMoreTritonAttnBuilder


if FlashAttentionBackend is not None:

    class LessIsMoreFlashAttnImpl(_DecodeImplMixin, FlashAttentionImpl):
        pass

    class LessIsMoreFlashAttnBuilder(_DecodeBuilderMixin, FlashAttentionMetadataBuilder):
        pass

    class LessIsMoreFlashAttnBackend(FlashAttentionBackend):
        """``FLASH_ATTN`` with LessIsMore's decode schedule (fp16, bf16)."""

        @staticmethod
        def get_name() -> str:
            return _backend_name()

        @staticmethod
        def get_impl_cls():
            return LessIsMoreFlashAttnImpl

        @staticmethod
        def get_builder_cls():
            return LessIsMoreFlashAttnBuilder

        @classmethod
        def validate_configuration(cls, *args, **kwargs) -> list[str]:
            reasons = super().validate_configuration(*args, **kwargs)
            return [f"{r} (FLASH_ATTN takes fp16/bf16; for fp32 set {plugin.DENSE_ENV}=TRITON_ATTN)"
                    if r == "dtype not supported" else r for r in reasons]


__all__ = ["StepRows", "PagedCache", "paged_views",
           "LessIsMoreTritonAttnBackend"] + (["LessIsMoreFlashAttnBackend"] if FlashAttentionBackend is not None else [])
