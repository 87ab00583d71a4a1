"""Teacher-forced decode analysis: each method's own sparse run and one full-attention run, fed the
same trace one token at a time, with recall and fidelity recorded at every step.

How a batch runs:
  1. prefill the prompts (dense, as generation does) into the reference cache;
  2. decode column by column: the full-attention reference run, and, for every method, its own run with
     its own cache. While every row's cache is at most the budget every method attends to the whole
     cache, so the sparse runs start as copies of the reference cache at the last step where that
     holds (the same result, without decoding the same tokens once per method);
  3. at every decode layer of a sparse run an observer records, per head, the recall of the positions
     the method read under the softmax of the q and K that run computed at that layer, and the oracle
     bound (each head's top-K mass) on the same q and K; after every step, KL(full || sparse), top-1
     agreement and the rank under the sparse run of full attention's top-1 token;
  4. the reference run's observer computes the counterfactual selections of Figs. 2, 3, 8 and 9 on the
     full run's q and K (no error carried forward there).
Means are over (row, step) pairs whose cache is longer than the budget and whose fed token is a trace
token, and over sparse layers and heads.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lessismore import methods
from lessismore.analysis import metrics as M
from lessismore.analysis.traces import Batch, Trace, pack_batches
from lessismore.config import FULL, SETTINGS, SparseConfig, require_sparse_config
from lessismore.integrations import hf
from lessismore.methods import LayerRole
from lessismore.methods.lessismore import union_prefix

DEFAULT_METHODS = ("lessismore", "tidaldecode", "quest", "streaming", "oracle")
DEFAULT_RECENT_RATIOS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)
AGGREGATIONS = ("unified", "head_to_head", "random_head")
DEPTH_BINS = 8  # union depth as a share of k, in bins of k / 8


@dataclass
class AnalysisOptions:
    """base: a LessIsMore SparseConfig; its budget is K for every method, and the counterfactuals
    (extras) use it. configs: each method's config, in the order of ``methods``; empty: made from
    base's settings (``SparseConfig.for_method``: each method takes those it uses)."""

    base: SparseConfig
    methods: tuple[str, ...] = DEFAULT_METHODS
    configs: tuple[SparseConfig, ...] = ()
    recent_ratios: tuple[float, ...] = DEFAULT_RECENT_RATIOS
    batch_size: int = 1
    seed: int = 0
    extras: bool = True  # the Fig. 2/3/8/9 counterfactuals on the reference run
    keep_details: bool = False  # keep per-step tensors (tests)
    progress: bool = True

    def __post_init__(self):
        require_sparse_config(self.base, "base")
        if not self.methods:
            raise ValueError("methods: at least one method is needed")
        for name in self.methods:
            if name not in methods.available():
                raise ValueError(f"methods: unknown method {name!r}; allowed: {', '.join(methods.available())}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: listed twice in {','.join(self.methods)}")
        for r in self.recent_ratios:
            if not 0.0 <= float(r) <= 1.0:
                raise ValueError(f"recent_ratios: each must be in [0, 1], got {r}")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"batch_size: must be a positive integer, got {self.batch_size!r}")
        if self.base.method != "lessismore":
            raise ValueError(f"base: expected a lessismore config, got method {self.base.method!r}")
        if not self.configs:
            shared = {name: getattr(self.base, name) for name in SETTINGS}
            self.configs = tuple(SparseConfig.for_method(name, **shared) for name in self.methods)
        self.configs = tuple(self.configs)
        if tuple(c.method for c in self.configs) != tuple(self.methods):
            raise ValueError("configs: expected one config per method, in the order of methods")
        for cfg in self.configs:
            if cfg.budget is not None and cfg.budget != self.base.budget:
                raise ValueError(f"configs: {cfg.method} has budget {cfg.budget}, expected base's {self.base.budget}")


class _Sum:
    """A running sum and count (float64)."""

    def __init__(self, shape=()):
        self.total = torch.zeros(shape, dtype=torch.float64)
        self.count = torch.zeros(shape, dtype=torch.float64)

    def add(self, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Add values weighted by weights (broadcast together), summed over everything but the trailing
        dimensions of this sum's shape."""
        values, weights = torch.broadcast_tensors(values.detach().double().cpu(), weights.double().cpu())
        shape = self.total.shape
        self.total += torch.nan_to_num(values * weights).reshape(-1, *shape).sum(0)
        self.count += weights.reshape(-1, *shape).sum(0)

    def mean(self):
        out = self.total / self.count.clamp_min(1)
        out = torch.where(self.count > 0, out, torch.full_like(out, float("nan")))
        return float(out) if out.dim() == 0 else out.tolist()


def _nan_to_none(values):
    if isinstance(values, list):
        return [_nan_to_none(v) for v in values]
    return None if values != values else values


@dataclass
class _MethodRecord:
    name: str
    cfg: SparseConfig
    sparse_layers: list[int]
    sparse_set: set = field(default_factory=set)
    n_entries: int = 0  # sparse layers x query heads
    state: hf.HFDecodeState | None = None
    cache: object = None
    recall: torch.Tensor | None = None  # this step [B, nL, Hq], NaN where not recorded
    bound: torch.Tensor | None = None
    recall_sum: _Sum = None
    bound_sum: _Sum = None
    layer_sum: _Sum = None
    kl: _Sum = field(default_factory=_Sum)
    top1: _Sum = field(default_factory=_Sum)
    rank: _Sum = field(default_factory=_Sum)
    series: list = field(default_factory=list)  # per trace {"id", "n": [...], "recall", "kl", "top1", "rank"}
    details: list = field(default_factory=list)


class _Extras:
    """Counterfactual selections on the reference run's q and K (Figs. 2, 3, 8, 9)."""

    def __init__(self, cfg: SparseConfig, roles: list[LayerRole], num_q: int, num_kv: int, ratios, seed: int):
        self.cfg, self.roles, self.num_q, self.num_kv, self.ratios = cfg, roles, num_q, num_kv, tuple(ratios)
        self.generator = torch.Generator().manual_seed(seed)
        n_layers = len(roles)
        self.overlap = _Sum((n_layers, num_q, num_q))
        self.rel_mass, self.rel_top = _Sum((M.RELATIVE_BINS,)), _Sum((M.RELATIVE_BINS,))
        self.dist_mass, self.dist_top = _Sum((M.DISTANCE_BINS,)), _Sum((M.DISTANCE_BINS,))
        self.ratio = {r: _Sum() for r in self.ratios}
        self.agg_selection = {a: _Sum() for a in AGGREGATIONS}
        self.agg_every = {a: _Sum() for a in AGGREGATIONS}
        self.depth, self.depth_share, self.past_prefix = _Sum(), _Sum((DEPTH_BINS,)), _Sum()
        self.sets: dict = {}

    def observe(self, layer, q, k, valid, scale, counted: torch.Tensor) -> None:
        cfg, role = self.cfg, self.roles[layer]
        probs = M.ground_truth_attention(q, k, valid, scale)
        w = counted.double()
        top = M.topk_mask(probs, valid, cfg.budget)
        self.overlap.total[layer] += (M.head_overlap(top).double().cpu() * w[:, None, None]).sum(0)
        self.overlap.count[layer] += w.sum()
        for profile, mass_sum, top_sum in ((M.relative_position_profile, self.rel_mass, self.rel_top),
                                           (M.distance_profile, self.dist_mass, self.dist_top)):
            mass, count = profile(probs, top, valid)
            mass_sum.add(mass, w[:, None])
            top_sum.add(count, w[:, None])
        heads_w = w[:, None].expand(-1, self.num_q)
        if role is LayerRole.SELECT_DENSE:
            self.sets = {("ratio", r): M.lessismore_set(probs, valid, cfg.budget, r, cfg.sink_tokens) for r in self.ratios}
            for name, mask in M.aggregation_sets(probs, valid, cfg.budget, self.num_kv, self.generator).items():
                self.sets[("agg", name)] = mask
            depth = M.union_depth(probs, valid, cfg.budget, cfg.recent_ratio, cfg.sink_tokens)
            ranked = w * ~depth.isnan().cpu()
            self.depth.add(depth, ranked)
            share = depth.nan_to_num(1.0) / max(1, cfg.ranked_share)  # (0, 1]
            bins = (share * DEPTH_BINS).ceil().long().clamp(1, DEPTH_BINS) - 1
            self.depth_share.add(torch.nn.functional.one_hot(bins.cpu(), DEPTH_BINS), ranked[:, None])
            self.past_prefix.add((depth > union_prefix(cfg.ranked_share)).double(), ranked)
        elif role is LayerRole.SPARSE and self.sets:
            for r in self.ratios:
                self.ratio[r].add(M.attention_recall(probs, self.sets[("ratio", r)]), heads_w)
            for a in AGGREGATIONS:
                self.agg_selection[a].add(M.attention_recall(probs, self.sets[("agg", a)]), heads_w)
        if role is not LayerRole.FULL:
            for name, mask in M.aggregation_sets(probs, valid, cfg.budget, self.num_kv, self.generator).items():
                self.agg_every[name].add(M.attention_recall(probs, mask), heads_w)

    def summary(self) -> dict:
        overlap = torch.tensor(self.overlap.mean())  # [nL, Hq, Hq]
        used = self.overlap.count[:, 0, 0] > 0
        matrix = overlap[used].mean(0) if used.any() else torch.full((self.num_q, self.num_q), float("nan"))
        group = self.num_q // self.num_kv
        same = torch.tensor([[i // group == j // group and i != j for j in range(self.num_q)] for i in range(self.num_q)])
        other = torch.tensor([[i // group != j // group for j in range(self.num_q)] for i in range(self.num_q)])
        off = ~torch.eye(self.num_q, dtype=torch.bool)
        per_layer = [float(overlap[i][off].mean()) if used[i] else None for i in range(len(self.roles))]

        def share(s: _Sum):
            t = s.total / s.total.sum().clamp_min(1e-30)
            return t.tolist()

        return {
            "head_overlap": {
                "definition": "|S_i & S_j| / K for per-head top-K sets S (K = budget), full run's q/K, all layers",
                "within_kv_group": float(matrix[same].mean()) if same.any() else None,
                "across_kv_groups": float(matrix[other].mean()) if other.any() else None,
                "all_pairs": float(matrix[off].mean()),
                "matrix": matrix.tolist(),
                "per_layer_all_pairs": per_layer,
            },
            "recency": {
                "relative_bins": M.RELATIVE_BINS,
                "relative_mass_share": share(self.rel_mass),
                "relative_topk_share": share(self.rel_top),
                "distance_bins": M.distance_bin_labels(),
                "distance_mass_share": share(self.dist_mass),
                "distance_topk_share": share(self.dist_top),
            },
            "recent_ratio": {
                "ratios": list(self.ratios),
                "recall": _nan_to_none([self.ratio[r].mean() for r in self.ratios]),
                "definition": "LessIsMore's set chosen at the selection layers from the full run's q/K, recall at the sparse layers after them",
            },
            "union_depth": {
                "ranked_k": self.cfg.ranked_share,
                "heads": self.num_q,
                "mean_ranks": _nan_to_none(self.depth.mean()),
                "bins": [f"<= {(i + 1) / DEPTH_BINS:g} k" for i in range(DEPTH_BINS)],
                "share_of_steps": _nan_to_none(self.depth_share.mean()),
                "definition": "ranks of each head's list the rank-major union reads before it holds k positions, "
                "at the selection layers on the full run's q/K (k / heads when the lists are disjoint, k when equal); "
                "share_of_steps: the share of (row, step, selection layer) whose depth falls in each bin; "
                "past_prefix: the share deeper than the ranks the GPU selection layer sorts first (union_prefix), "
                "which take its second top-k",
                "prefix_ranks": union_prefix(self.cfg.ranked_share),
                "past_prefix": _nan_to_none(self.past_prefix.mean()),
            },
            "aggregation": {
                "selection_layers": {a: _nan_to_none(self.agg_selection[a].mean()) for a in AGGREGATIONS},
                "every_layer": {a: _nan_to_none(self.agg_every[a].mean()) for a in AGGREGATIONS},
                "definition": "top-K without sinks or recency window; selection_layers: chosen at the selection layers, "
                "recall at the sparse layers after them; every_layer: each non-full layer chooses its own",
            },
        }


def _attention_scale(model) -> float:
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "scaling") and type(module).__name__.endswith("Attention"):
            return float(module.scaling)
    return float(model.config.head_dim if hasattr(model.config, "head_dim") else 0) ** -0.5


def _forward(model, batch: Batch, cols: slice, cache, device):
    with warnings.catch_warnings():  # transformers 5.x renames past_key_values; 4.x knows only that name
        warnings.simplefilter("ignore", FutureWarning)
        out = model(
            input_ids=batch.ids[:, cols].to(device),
            attention_mask=batch.attention_mask[:, : cols.stop].to(device),
            position_ids=batch.position_ids[:, cols].to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return out.logits[:, -1].float(), out.past_key_values


class Analyzer:
    """Holds a model with one HFDecodeState per run; ``run(traces)`` returns the summary dict."""

    def __init__(self, model, options: AnalysisOptions):
        self.model, self.opt = model, options
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.num_q = config.num_attention_heads
        self.num_kv = getattr(config, "num_key_value_heads", None) or self.num_q
        self.scale = _attention_scale(model)
        self.device = next(model.parameters()).device
        base = options.base
        self.ref = self._make_state(FULL, observer=self._observe_ref)
        self.records: dict[str, _MethodRecord] = {}
        for name, cfg in zip(options.methods, options.configs):
            rec = _MethodRecord(name=name, cfg=cfg, sparse_layers=[])
            state = self._make_state(cfg, observer=self._method_observer(rec))
            rec.state, rec.cfg = state, state.cfg
            roles = state.roles
            rec.sparse_layers = list(range(self.num_layers)) if methods.get(cfg.method).dense else [
                i for i, r in enumerate(roles) if r in (LayerRole.SPARSE, LayerRole.SELECT_SPARSE)
            ]
            rec.sparse_set = set(rec.sparse_layers)
            rec.n_entries = len(rec.sparse_layers) * self.num_q
            rec.recall_sum, rec.bound_sum, rec.layer_sum = _Sum(), _Sum(), _Sum((self.num_layers,))
            self.records[name] = rec
        lim_cfg = base.resolve(config.model_type, self.num_layers, config.hidden_size)
        self.lim_cfg = lim_cfg
        self.extras = _Extras(lim_cfg, methods.get("lessismore").layer_roles(lim_cfg, self.num_layers),
                              self.num_q, self.num_kv, options.recent_ratios, options.seed) if options.extras else None
        self.counted = None
        self.ref_logits_log: list = []

    # ---- states and observers ----
    def _make_state(self, cfg: SparseConfig, observer):
        hf.enable(self.model, cfg)
        state = hf.state_of(self.model)
        state.observers.append(observer)
        return state

    def _observe_ref(self, layer, role, q, k, v, valid, selection, out) -> None:
        if self.extras is not None and self.counted is not None and bool(self.counted.any()):
            self.extras.observe(layer, q, k, valid, self.scale, self.counted)

    def _method_observer(self, rec: _MethodRecord):
        def observe(layer, role, q, k, v, valid, selection, out):
            if rec.recall is None or layer not in rec.sparse_set:
                return
            probs = M.ground_truth_attention(q, k, valid, self.scale)
            mask = M.selection_mask(selection, valid, self.num_q)  # None in a dense method's layers
            rec.recall[:, layer] = M.attention_recall(probs, mask).cpu()
            rec.bound[:, layer] = M.oracle_recall(probs, valid, self.opt.base.budget).cpu()

        return observe

    # ---- the run ----
    def run(self, traces: list[Trace], pad_id: int) -> dict:
        batches = pack_batches(traces, self.opt.batch_size, pad_id)
        total_steps = sum(b.ids.shape[1] - b.start for b in batches)
        bar = tqdm(total=total_steps, desc="analyze", unit="step", disable=not self.opt.progress)
        try:
            with torch.inference_mode():
                for batch in batches:
                    self._run_batch(batch, bar)
        finally:
            bar.close()
            hf.disable(self.model)
        return self.summary(traces)

    def _run_batch(self, batch: Batch, bar) -> None:
        budget = self.opt.base.budget
        b, length = batch.ids.shape
        min_pad = int(batch.pad.min())
        hf.activate(self.model, self.ref)
        self.counted = None
        _, ref_cache = _forward(self.model, batch, slice(0, batch.start), None, self.device)
        for rec in self.records.values():
            rec.cache = None
            rec.series.extend({"id": t.id, "n": [], "recall": [], "kl": [], "top1": [], "rank": []} for t in batch.traces)
        rows = range(b)
        for s in range(batch.start, length):
            n = s + 1 - batch.pad  # [B] cache length after feeding column s
            counted = (n > budget) & (s >= batch.first_trace)
            fork_now = s + 1 - min_pad > budget
            if fork_now:
                for rec in self.records.values():
                    if rec.cache is None:
                        rec.cache = copy.deepcopy(ref_cache)
            self.counted = counted
            hf.activate(self.model, self.ref)
            ref_logits, ref_cache = _forward(self.model, batch, slice(s, s + 1), ref_cache, self.device)
            self.counted = None
            if self.opt.keep_details:
                self.ref_logits_log.append({"step": s, "traces": [t.id for t in batch.traces], "pad": batch.pad.clone(),
                                            "logits": ref_logits.cpu().clone()})
            if fork_now:
                for rec in self.records.values():
                    rec.recall = torch.full((b, self.num_layers, self.num_q), float("nan"))
                    rec.bound = rec.recall.clone()
                    hf.activate(self.model, rec.state)
                    logits, rec.cache = _forward(self.model, batch, slice(s, s + 1), rec.cache, self.device)
                    fid = {key: val.cpu() for key, val in M.next_token_fidelity(ref_logits, logits).items()}
                    self._record_step(rec, s, n, counted, fid, rows)
                    rec.recall = rec.bound = None
            bar.update(1)
        for rec in self.records.values():
            rec.cache = None

    def _record_step(self, rec: _MethodRecord, s, n, counted, fid, rows) -> None:
        w = counted.double()
        layers = rec.sparse_layers
        recall = rec.recall[:, layers]  # [B, nS, Hq]
        bound = rec.bound[:, layers]
        rec.recall_sum.add(recall.mean((1, 2)), w * rec.n_entries)
        rec.bound_sum.add(bound.mean((1, 2)), w * rec.n_entries)
        per_layer = torch.nan_to_num(rec.recall.mean(2), nan=0.0)
        layer_w = torch.zeros(self.num_layers, dtype=torch.float64)
        layer_w[layers] = 1.0
        rec.layer_sum.add(per_layer, w[:, None] * layer_w)
        rec.kl.add(fid["kl"], w)
        rec.top1.add(fid["top1"], w)
        rec.rank.add(fid["rank"], w)
        base = len(rec.series) - len(rows)
        step_recall = recall.mean((1, 2))
        for i in rows:
            if counted[i]:
                series = rec.series[base + i]
                series["n"].append(int(n[i]))
                series["recall"].append(round(float(step_recall[i]), 6))
                series["kl"].append(round(float(fid["kl"][i]), 7))
                series["top1"].append(float(fid["top1"][i]))
                series["rank"].append(float(fid["rank"][i]))
        if self.opt.keep_details:
            rec.details.append({"step": s, "counted": counted.clone(), "recall": rec.recall.clone(), "bound": rec.bound.clone(),
                                "kl": fid["kl"].clone(), "top1": fid["top1"].clone()})

    def _page_size(self):
        """Quest's page size: of the quest run, else Quest's default (what the report shows)."""
        if "quest" in self.records:
            return self.records["quest"].cfg.page_size
        return methods.get("quest").settings.get("page_size")

    def summary(self, traces: list[Trace]) -> dict:
        out = {
            "budget": self.opt.base.budget,
            "config": {
                "recent_ratio": self.opt.base.recent_ratio,
                "sink_tokens": self.opt.base.sink_tokens,
                "page_size": self._page_size(),
                "full_layers": list(self.opt.base.full_layers),
                "selection_layers": list(self.lim_cfg.selection_layers),
                "num_layers": self.num_layers,
                "num_query_heads": self.num_q,
                "num_kv_heads": self.num_kv,
            },
            "traces": [{"id": t.id, "tokens": len(t.ids), "prompt_tokens": t.prompt_len} for t in traces],
            "methods": {},
        }
        for name, rec in self.records.items():
            out["methods"][name] = {
                "mean_recall": _nan_to_none(rec.recall_sum.mean()),
                "mean_kl": _nan_to_none(rec.kl.mean()),
                "top1_agreement": _nan_to_none(rec.top1.mean()),
                "steps": int(rec.kl.count),
                "oracle_bound_recall": _nan_to_none(rec.bound_sum.mean()),
                "mean_rank_of_full_top1": _nan_to_none(rec.rank.mean()),
                "sparse_layers": rec.sparse_layers,
                "per_layer_recall": _nan_to_none(rec.layer_sum.mean()),
                "series": rec.series,
            }
        if self.extras is not None:
            out.update(self.extras.summary())
        return out


def analyze(model, tokenizer, traces: list[Trace], options: AnalysisOptions) -> dict:
    """Run the analysis of ``traces`` (see ``encode_traces``) on ``model``; returns the summary dict
    (``summary.json``'s content). With ``options.keep_details`` the per-step tensors are returned under
    the key ``"_details"`` (not JSON)."""
    analyzer = Analyzer(model, options)
    result = analyzer.run(traces, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    if options.keep_details:
        result["_details"] = {
            "ref_logits": analyzer.ref_logits_log,
            "methods": {name: rec.details for name, rec in analyzer.records.items()},
        }
    return result
