"""The store contract: names, dimensions, chunking. Read by both tiers; no torch here.

A gapcache store is one Zarr v3 group; ``xarray.open_zarr(path)`` opens it without gapcache. The
arrays it holds (name, dims, dtype, what they are written along, fill value, since which schema
version) are declared once, in :mod:`gapcache.store.arrays`.

Schema versions: 1 = the first release; 2 = every array but the hidden states carries a
``crc32c`` codec and the creation-time arrays store every chunk, so every byte is checked
(``gapcache migrate`` upgrades a version-1 store in place).

Layer convention: ``layer`` = i is the residual stream *entering* decoder layer i (i = 0: the
embedding output, visual embeddings merged in); ``layer`` = n_layers is the output of the last
decoder layer *before* the final norm. For Qwen3-VL, the stream entering layer i includes the
deepstack visual features added after layer i-1. For i < n_layers this equals transformers'
``hidden_states[i]`` except for Qwen3-VL's deepstack layers (whose ``hidden_states[i]`` lacks
the deepstack add); ``hidden_states[n_layers]`` is after the final norm and differs. The root
attribute ``deepstack_layers`` lists the decoder layers d after which the add happens ([] for
families without deepstack; absent in stores made before it was recorded), so the CPU tier knows
which interventions it follows (``gapcache.conditions.deepstack_readds``).

Ragged visual spans: samples are grouped into shards of ``samples_per_shard``; each group's visual
tokens start at a multiple of ``visual_shard_tokens``, so one extraction task owns whole zarr
shards. Padding rows are never written and cost no bytes (missing chunks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gapcache.conditions import Condition
from gapcache.sites import POSITION_SITES
from gapcache.errors import ConfigError

SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
STORE_NAME = "store.zarr"  # the store inside a run directory (RUN/store.zarr)
SITES = POSITION_SITES  # the store's ``site`` axis: the position sites of gapcache.sites, in registry order
STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
STATUS_NAMES = {STATUS_PENDING: "pending", STATUS_DONE: "done", STATUS_FAILED: "failed"}
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
    visual_chunk_tokens: int = 64  # inner chunk rows of every span's states
    compression_level: int = 1  # the old zstd level (0 = none, 1 = its default: auto); when ``compression`` is None
    # hidden-state compression (gapcache.store.codec.parse_compression); None: from compression_level
    compression: str | None = None
    span_lengths: tuple = ()  # ((span name, per-sample lengths), ...) of spans other than "visual"
    routing: tuple = ()  # MoE routing recorded: (router layers, experts, top-k); () = none (no route_* arrays)
    visual_offsets: tuple[int, ...] = field(init=False)
    visual_shard_tokens: int = field(init=False)
    n_vtokens: int = field(init=False)
    spans: dict = field(init=False, compare=False)  # span name -> SpanLayout (every declared span)

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
        from gapcache.store.codec import parse_compression

        try:
            parse_compression(self._compression_setting)
        except ValueError as err:
            raise ConfigError(f"The compression of a Layout: {err}") from None
        from gapcache.store.arrays import SPANS

        given = {"visual": self.visual_lengths, **dict(self.span_lengths)}
        unknown = sorted(set(given) - set(SPANS))
        if unknown:
            raise ConfigError(f"The 'span_lengths' of a Layout must name declared spans {list(SPANS)}. Got {unknown}.")
        spans = {}
        for name in SPANS:
            lengths = tuple(int(x) for x in given.get(name, (0,) * n))
            if len(lengths) != n:
                raise ConfigError(f"The {name} span lengths have {len(lengths)} entries for {n} samples.")
            offsets, shard_tokens, total = visual_offsets(lengths, self.samples_per_shard, self.visual_chunk_tokens)
            spans[name] = SpanLayout(name, lengths, offsets, shard_tokens, total)
        object.__setattr__(self, "spans", spans)
        object.__setattr__(self, "visual_offsets", spans["visual"].offsets)
        object.__setattr__(self, "visual_shard_tokens", spans["visual"].shard_tokens)
        object.__setattr__(self, "n_vtokens", spans["visual"].n_tokens)

    @property
    def _compression_setting(self):
        """``compression``, else the old ``compression_level`` (0 = none, n = zstd n), whose default 1 means auto."""
        if self.compression is not None:
            return self.compression
        return "auto" if self.compression_level == 1 else self.compression_level

    @property
    def state_compression(self) -> str:
        """The hidden-state compression, concrete (``auto`` resolved for the stored item size:
        gapcache.store.codec.resolve_compression), e.g. ``"zstd:1"`` for bf16, ``"blosc:lz4:5:shuffle"`` for float32."""
        from gapcache.store.codec import resolve_compression, storage_for

        return resolve_compression(self._compression_setting, storage_for(self.model_dtype)[0].itemsize)

    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def n_shards(self) -> int:
        return -(-self.n_samples // self.samples_per_shard)

    @property
    def visual_conditions(self) -> tuple[Condition, ...]:
        return self.span_conditions("visual")

    def has_span(self, span: str) -> bool:
        """Whether the store holds ``span``: every non-optional span, an optional one when its lengths are given."""
        from gapcache.store.arrays import SPANS

        return not SPANS[span].optional or span in dict(self.span_lengths)

    def span_conditions(self, span: str) -> tuple[Condition, ...]:
        """The conditions that record ``span`` (its ``condition_dim``)."""
        from gapcache.store.arrays import SPANS

        return tuple(c for c in self.conditions if SPANS[span].recorded_by(c))

    def sizes(self) -> dict[str, int]:
        """Size of every dimension the layout fixes."""
        from gapcache.store.arrays import SPANS

        out = {"condition": len(self.conditions), "sample": self.n_samples, "site": len(SITES),
               "layer": len(self.layers), "hidden": self.hidden, "candidate": len(self.candidates)}
        for name, sp in SPANS.items():
            out[sp.condition_dim] = len(self.span_conditions(name))
            out[sp.token_dim] = self.spans[name].n_tokens
        if self.routing:
            from gapcache.store.arrays import MODALITIES

            n_layers, n_experts, top_k = self.routing
            out.update({"route_layer": n_layers, "expert": n_experts, "k": top_k, "modality": len(MODALITIES)})
        return out

    def derived_values(self) -> dict[str, np.ndarray]:
        """Values of the creation-time arrays that follow from the layout (coordinates, offsets, owners);
        ``vtoken_position`` defaults to every token of the span in order (visual mode ``all``)."""
        from gapcache.store.arrays import SPANS

        conds = self.conditions
        strs = lambda xs: np.array(list(xs), dtype=object)  # noqa: E731
        out = {
            "sample": strs(self.sample_ids), "condition": strs(c.label for c in conds),
            "layer": np.array(self.layers, np.int32), "site": strs(SITES), "candidate": strs(self.candidates),
            "condition_kind": strs(c.kind for c in conds),
            "truncation_layer": np.array([c.truncation_layer for c in conds], np.int32),
            "truncation_strategy": strs(c.strategy for c in conds),
        }
        for name, sp in SPANS.items():
            if not self.has_span(name):
                continue
            span = self.spans[name]
            owner, index = span.owners()
            out.update({sp.condition_dim: strs(c.label for c in self.span_conditions(name)),
                        sp.owner: owner, sp.position: index,
                        sp.offset: np.array(span.offsets, np.int64), sp.length: np.array(span.lengths, np.int32)})
        if self.routing:
            from gapcache.store.arrays import MODALITIES

            out.update({"route_layer": np.arange(self.routing[0], dtype=np.int32),
                        "expert": np.arange(self.routing[1], dtype=np.int32), "modality": strs(MODALITIES)})
        return out

    def shard_samples(self, shard: int) -> range:
        """Sample indices of one shard (the unit of writing and of resume)."""
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.n_samples))

    def shard_vtokens(self, shard: int) -> range:
        """Rows of ``vtoken`` a shard owns (whole zarr shards)."""
        start = shard * self.visual_shard_tokens
        return range(start, start + self.visual_shard_tokens)


@dataclass(frozen=True)
class SpanLayout:
    """Where each sample's rows of one ragged span lie (shard groups start at shard boundaries)."""

    name: str
    lengths: tuple[int, ...]
    offsets: tuple[int, ...]
    shard_tokens: int  # rows per shard (the largest shard group, rounded up to the inner chunk)
    n_tokens: int

    def owners(self) -> tuple[np.ndarray, np.ndarray]:
        """(owning sample of each row, -1 padding; index of the row within its sample's span)."""
        owner = np.full(self.n_tokens, -1, np.int32)
        index = np.full(self.n_tokens, -1, np.int32)
        for i, (off, length) in enumerate(zip(self.offsets, self.lengths)):
            owner[off : off + length] = i
            index[off : off + length] = np.arange(length)
        return owner, index


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
