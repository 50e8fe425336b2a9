"""The store contract: names, dimensions, chunking. Read by both tiers; no torch here.

A gapcache store is one Zarr v3 group. ``xarray.open_zarr(path)`` opens it without gapcache:

====================  ==========================================  =====================================
array                 dims                                        meaning
====================  ==========================================  =====================================
text_states           (condition, sample, site, layer, hidden)    residual stream at the text sites
visual_states         (visual_condition, vtoken, layer, hidden)   residual stream at the visual span
gold_logprob          (condition, sample)                         sum of teacher-forced log p(answer)
candidate_logprob     (condition, sample, candidate)              log p(candidate) at the prediction site
generation            (condition, sample)                         greedy generation ('' if off)
status                (condition, sample)                         0 pending, 1 done, 2 failed
error                 (condition, sample)                         failure reason, '' if none
sample (coord)        (sample,)                                   sample ids
site_position         (sample, site)                              token index of each text site
visual_offset/length  (sample,)                                   the sample's rows of ``vtoken``
vtoken_sample         (vtoken,)                                   owning sample index, -1 = padding
vtoken_position       (vtoken,)                                   index in the span (subset: the kept token; pool: first token of the pool)
====================  ==========================================  =====================================

Layer convention: ``layer`` = i is the residual stream *entering* decoder layer i (i = 0: the
embedding output, visual embeddings merged in); ``layer`` = n_layers is the output of the last
decoder layer *before* the final norm. For Qwen3-VL, the stream entering layer i includes the
deepstack visual features added after layer i-1. For i < n_layers this equals transformers'
``hidden_states[i]`` except for Qwen3-VL's deepstack layers (whose ``hidden_states[i]`` lacks
the deepstack add); ``hidden_states[n_layers]`` is after the final norm and differs.

Ragged visual spans: samples are grouped into shards of ``samples_per_shard``; each group's visual
tokens start at a multiple of ``visual_shard_tokens``, so one extraction task owns whole zarr
shards. Padding rows are never written and cost no bytes (missing chunks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gapcache.conditions import Condition
from gapcache.errors import ConfigError

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
SITES = ("instruction", "prediction")
STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
LAYER_CONVENTION = (
    "layer i = residual stream entering decoder layer i (0 = embedding output); "
    "layer n_layers = output of the last decoder layer before the final norm; "
    "Qwen3-VL deepstack features are included in the stream entering the next layer"
)


def align_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Layout:
    """Everything that fixes the shapes of a store. Built by the extraction planner."""

    sample_ids: tuple[str, ...]
    conditions: tuple[Condition, ...]
    layers: tuple[int, ...]  # recorded hidden-state indices (0 = embedding output)
    hidden: int
    model_dtype: str  # 'bfloat16' | 'float16' | 'float32'
    candidates: tuple[str, ...]
    visual_lengths: tuple[int, ...]  # recorded visual tokens per sample (0 if failed at plan time)
    samples_per_shard: int = 32
    visual_chunk_tokens: int = 64
    compression_level: int = 1
    visual_offsets: tuple[int, ...] = field(init=False)
    visual_shard_tokens: int = field(init=False)
    n_vtokens: int = field(init=False)

    def __post_init__(self):
        n = len(self.sample_ids)
        if n == 0:
            raise ConfigError("A store needs at least one sample. Got 0 samples instead.")
        if len(self.visual_lengths) != n:
            raise ConfigError(f"visual_lengths has {len(self.visual_lengths)} entries for {n} samples.")
        if self.samples_per_shard < 1 or self.visual_chunk_tokens < 1:
            raise ConfigError("The 'samples_per_shard' and 'visual_chunk_tokens' parameters must be >= 1.")
        if len(set(self.sample_ids)) != n:
            raise ConfigError("Sample ids must be unique within a store.")
        offsets, shard_tokens, total = visual_offsets(
            self.visual_lengths, self.samples_per_shard, self.visual_chunk_tokens
        )
        object.__setattr__(self, "visual_offsets", offsets)
        object.__setattr__(self, "visual_shard_tokens", shard_tokens)
        object.__setattr__(self, "n_vtokens", total)

    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def n_shards(self) -> int:
        return -(-self.n_samples // self.samples_per_shard)

    @property
    def visual_conditions(self) -> tuple[Condition, ...]:
        return tuple(c for c in self.conditions if c.records_visual)

    def shard_samples(self, shard: int) -> range:
        """Sample indices of one shard (the unit of writing and of resume)."""
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.n_samples))

    def shard_vtokens(self, shard: int) -> range:
        """Rows of ``vtoken`` a shard owns (whole zarr shards)."""
        start = shard * self.visual_shard_tokens
        return range(start, start + self.visual_shard_tokens)


def visual_offsets(lengths, samples_per_shard: int, chunk_tokens: int):
    """Offsets of each sample's visual rows; each shard group starts at a shard boundary.

    Returns (offsets, visual_shard_tokens, n_vtokens). ``visual_shard_tokens`` is the largest
    group's token count rounded up to ``chunk_tokens``, so every group fits in exactly one shard.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    groups = [lengths[i : i + samples_per_shard] for i in range(0, len(lengths), samples_per_shard)]
    shard_tokens = align_up(max(1, max(int(g.sum()) for g in groups)), chunk_tokens)
    offsets = []
    for gi, g in enumerate(groups):
        start = gi * shard_tokens
        offsets.extend(int(start + o) for o in np.concatenate([[0], np.cumsum(g)[:-1]]))
    return tuple(offsets), shard_tokens, shard_tokens * len(groups)
