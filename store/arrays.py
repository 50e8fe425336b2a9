"""The one declaration of every array a gapcache store holds. No torch.

Every writer, reader, verifier and merger iterates over :data:`ARRAYS`; adding an array to the
store is one :class:`ArraySpec` here plus the code that computes its values::

    register(ArraySpec("router_topk", ("condition", "sample", "layer", "k"), "int16", UNIT, "...", fill=-1, since=2))

What an array is written along (``along``) fixes its chunking, who writes it and when:

=============  =====================================  ===================================================
along          dims start with                        written
=============  =====================================  ===================================================
``index``      its own name (a dimension coordinate)  once, at creation, derived from the Layout
``store``      anything (whole-store tables)          once, at creation (values passed to ``create``)
``sample``     ``sample``                              once, at creation; chunks of ``samples_per_shard``
``span``       ``vtoken``                              once, at creation; ragged rows, a shard group a chunk
``unit``       ``condition, sample``                   per (condition, shard) by StoreWriter; ``status`` last
``vunit``      ``visual_condition, vtoken``            per (condition, shard) by StoreWriter (ragged span)
=============  =====================================  ===================================================

Integrity (schema 2): every array but the hidden states carries the portable ``crc32c`` codec in
its chain, and the arrays written at creation store every chunk (``write_empty_chunks``), so
``gapcache verify`` detects a flipped bit (checksum) and a deleted chunk (missing key) in any of
them. Hidden-state shards and the per-unit score chunks also get a whole-file CRC-32C record at
commit time (:mod:`gapcache.store.checksums`), which also tells a missing file from a pending one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from gapcache.errors import StoreError

INDEX, STORE, SAMPLE, SPAN, UNIT, VUNIT = "index", "store", "sample", "span", "unit", "vunit"
ALONG = (INDEX, STORE, SAMPLE, SPAN, UNIT, VUNIT)
STR = "str"  # zarr v3 variable-length UTF-8 strings (vlen-utf8)
STATE = "state"  # the model's storage dtype (gapcache.store.codec.storage_for): bf16 bits as uint16, ...
#: the array whose value marks a (condition, sample) unit as written; StoreWriter writes it last
FLAG = "status"
#: merge rules: how ``gapcache merge`` builds an array from its inputs
MERGE_LAYOUT = "layout"  # recomputed from the merged Layout (coordinates, offsets)
MERGE_CELL = "cell"  # unit arrays: each (condition, sample) cell from the one input where it is written
MERGE_SAMPLE = "sample"  # per-sample / per-span rows from the input the sample comes from
MERGE_SAMPLE_INDEX = "sample_index"  # per-sample values that are sample indices (remapped to the merged order)
MERGE_EQUAL = "equal"  # whole-store values that must be identical in every input (copied)
MERGE_LENS = "lens"  # the logit-lens tables: union of the candidate token rows


@dataclass(frozen=True)
class SpanSpec:
    """A ragged per-sample span of token positions (the visual span; later e.g. every text token), stored
    unpadded: sample i owns rows ``<name>_offset[i] : + <name>_length[i]`` of the ``token_dim`` axis, each shard
    group of samples starting at a shard boundary. Declaring one SpanSpec declares all of its arrays."""

    name: str  # the span site it stores (gapcache site registry)
    token_dim: str  # its row dimension, e.g. "vtoken"
    condition_dim: str  # the conditions that record it, e.g. "visual_condition"
    records: str  # the Condition property saying whether a condition records it ("records_visual"), or "always"
    doc: str
    optional: bool = False  # a store holds it only when the run records it (its arrays are then created)

    @property
    def states(self) -> str:
        return f"{self.name}_states"

    @property
    def offset(self) -> str:
        return f"{self.name}_offset"

    @property
    def length(self) -> str:
        return f"{self.name}_length"

    @property
    def owner(self) -> str:
        return f"{self.token_dim}_sample"

    @property
    def position(self) -> str:
        return f"{self.token_dim}_position"

    def recorded_by(self, condition) -> bool:
        return self.records == "always" or bool(getattr(condition, self.records))


#: every ragged span the store holds (one entry declares its states, offsets and owner arrays)
SPANS: dict[str, SpanSpec] = {
    "visual": SpanSpec("visual", "vtoken", "visual_condition", "records_visual",
                       "residual stream at the (recorded) visual tokens of the non-truncated conditions"),
    "token": SpanSpec("token", "ttoken", "token_condition", "always",
                      "residual stream at every prompt text token (extract.text: all), under every condition",
                      optional=True),
}


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store: its contract for every tier."""

    name: str
    dims: tuple[str, ...]
    dtype: str  # a numpy dtype name, STR, or STATE
    along: str  # one of ALONG
    doc: str
    fill: object = None  # None: zarr's default (0, '' for strings)
    since: int = 1  # first schema version that has it
    required: bool = True  # every store of schema >= since has it (else: only when its values are given)
    coord: bool = False  # a non-index coordinate: xarray shows it under coords
    merge: str = ""  # one of the MERGE_* rules ('' = derived from ``along``)
    every_unit: bool = True  # unit arrays: every written unit writes it (False: only runs that produce it)
    span: str = ""  # the ragged span (a key of SPANS) a SPAN / VUNIT array, or a span's offsets, belong to

    def __post_init__(self):
        if self.along not in ALONG:
            raise StoreError(f"The 'along' of array spec {self.name!r} must be one of {ALONG}. Got {self.along!r}.")
        if self.along in (SPAN, VUNIT) and self.span not in SPANS:
            raise StoreError(f"The array {self.name!r} is written along {self.along!r}; its 'span' must be one of "
                             f"{list(SPANS)}. Got {self.span!r} instead.")
        sp = SPANS.get(self.span)
        lead = {SAMPLE: ("sample",), SPAN: (sp.token_dim,) if sp else (), UNIT: ("condition", "sample"),
                VUNIT: (sp.condition_dim, sp.token_dim) if sp else (), INDEX: (self.name,)}.get(self.along, ())
        if tuple(self.dims[: len(lead)]) != lead:
            raise StoreError(f"An array written along {self.along!r} must have dimensions starting with {lead}. "
                             f"Got {self.dims} for {self.name!r} instead.")

    @property
    def is_state(self) -> bool:
        return self.dtype == STATE

    @property
    def at_creation(self) -> bool:
        """Written once by ``create`` (all chunks), not per unit."""
        return self.along in (INDEX, STORE, SAMPLE, SPAN)

    @property
    def merge_rule(self) -> str:
        return self.merge or {INDEX: MERGE_LAYOUT, STORE: MERGE_EQUAL, SAMPLE: MERGE_SAMPLE, SPAN: MERGE_SAMPLE,
                              UNIT: MERGE_CELL, VUNIT: MERGE_CELL}[self.along]

    def numpy_dtype(self, model_dtype: str | None = None):
        """The on-disk dtype (``object`` for strings)."""
        if self.dtype == STR:
            return np.dtype(object)
        if self.is_state:
            from gapcache.store.codec import storage_for

            return storage_for(model_dtype)[0]
        return np.dtype(self.dtype)

    def fill_value(self, model_dtype: str | None = None):
        if self.fill is not None:
            return self.fill
        return "" if self.dtype == STR else 0


def span_arrays(sp: SpanSpec) -> list[ArraySpec]:
    """The arrays of one span (its condition coordinate is an index array, declared with the others)."""
    since, required = (2, False) if sp.optional else (1, True)
    kw = dict(span=sp.name, since=since, required=required)
    return [
        ArraySpec(sp.states, (sp.condition_dim, sp.token_dim, "layer", "hidden"), STATE, VUNIT,
                  f"{sp.doc}; sample i = rows {sp.offset}[i] : +{sp.length}[i]", **kw),
        ArraySpec(sp.owner, (sp.token_dim,), "int32", SPAN, "owning sample index of each row, -1 = padding",
                  fill=-1, coord=True, merge=MERGE_LAYOUT, **kw),
        ArraySpec(sp.position, (sp.token_dim,), "int32", SPAN,
                  "index in the span (subset: the kept token; pool: first token of the pool)", fill=-1, coord=True,
                  **kw),
        ArraySpec(sp.offset, ("sample",), "int64", SAMPLE, f"first {sp.token_dim} row of the sample",
                  merge=MERGE_LAYOUT, **kw),
        ArraySpec(sp.length, ("sample",), "int32", SAMPLE, f"recorded {sp.name} tokens of the sample", **kw),
    ]


def _span_index(sp: SpanSpec) -> ArraySpec:
    since, required = (2, False) if sp.optional else (1, True)
    return ArraySpec(sp.condition_dim, (sp.condition_dim,), STR, INDEX,
                     f"labels of the conditions that record the {sp.name} span", since=since, required=required,
                     span=sp.name)


_SPECS = [
    # ------------------------------------------------------------------ dimension coordinates
    ArraySpec("sample", ("sample",), STR, INDEX, "sample ids"),
    ArraySpec("condition", ("condition",), STR, INDEX, "condition labels (e.g. truncated_zero_L3)"),
    *[_span_index(sp) for sp in SPANS.values()],
    ArraySpec("layer", ("layer",), "int32", INDEX, "recorded hidden-state index i = the stream entering decoder layer i"),
    ArraySpec("site", ("site",), STR, INDEX, "text sites (store.schema.SITES)"),
    ArraySpec("candidate", ("candidate",), STR, INDEX, "every closed-set candidate answer of the run"),
    # ------------------------------------------------------------------ condition coordinates
    ArraySpec("condition_kind", ("condition",), STR, STORE, "registry kind of each condition", coord=True,
              merge=MERGE_LAYOUT),
    ArraySpec("truncation_layer", ("condition",), "int32", STORE, "L of a truncated condition (-999: none)",
              coord=True, merge=MERGE_LAYOUT),
    ArraySpec("truncation_strategy", ("condition",), STR, STORE, "intervention strategy ('' if none)", coord=True,
              merge=MERGE_LAYOUT),
    # ------------------------------------------------------------------ per (condition, sample) unit
    ArraySpec("text_states", ("condition", "sample", "site", "layer", "hidden"), STATE, UNIT,
              "residual stream at the text sites"),
    ArraySpec("gold_logprob", ("condition", "sample"), "float32", UNIT,
              "sum of teacher-forced log p(gold answer token)", fill=np.nan),
    ArraySpec("candidate_logprob", ("condition", "sample", "candidate"), "float32", UNIT,
              "log p(candidate) at the prediction site", fill=np.nan),
    ArraySpec("generation", ("condition", "sample"), STR, UNIT, "greedy generation ('' if off)", every_unit=False),
    ArraySpec("error", ("condition", "sample"), STR, UNIT, "failure reason ('' if none)"),
    ArraySpec(FLAG, ("condition", "sample"), "uint8", UNIT, "0 pending, 1 done, 2 failed (written last)", fill=0),
    # ------------------------------------------------------------------ ragged spans (visual: visual_states, ...)
    *[spec for sp in SPANS.values() for spec in span_arrays(sp)],
    ArraySpec("ttoken_id", ("ttoken",), "int32", SPAN, "vocabulary id of each prompt text token", fill=-1, coord=True,
              since=2, required=False, span="token"),
    ArraySpec("ttoken_role", ("ttoken",), "int8", SPAN, "role of each prompt text token (attrs: roles)", fill=-1,
              coord=True, since=2, required=False, span="token"),
    # ------------------------------------------------------------------ per-sample metadata
    ArraySpec("dataset_name", ("sample",), STR, SAMPLE, "dataset of the sample", required=False),
    ArraySpec("split", ("sample",), STR, SAMPLE, "split of the sample", required=False),
    ArraySpec("category", ("sample",), STR, SAMPLE, "category (hard / easy / '')", required=False),
    ArraySpec("question", ("sample",), STR, SAMPLE, "question text", required=False),
    ArraySpec("answer", ("sample",), STR, SAMPLE, "gold answer", required=False),
    ArraySpec("answers", ("sample",), STR, SAMPLE,
              "every gold answer of the sample, in dataset order, as a JSON-encoded list of str (e.g. the ten "
              "VQAv2 annotators); decode with gapcache.store.reader.gold_answers or json.loads", required=False),
    ArraySpec("image_sha256", ("sample",), STR, SAMPLE, "sha256 of the decoded RGB pixels and size", required=False),
    ArraySpec("failure", ("sample",), STR, SAMPLE, "planning failure ('' if none)", required=False),
    ArraySpec("label", ("sample",), "int32", SAMPLE, "probe label (-1: none)", required=False),
    ArraySpec("seq_len", ("sample",), "int32", SAMPLE, "prompt tokens", required=False),
    ArraySpec("visual_start", ("sample",), "int32", SAMPLE, "first visual token position in the prompt",
              required=False),
    ArraySpec("span_length", ("sample",), "int32", SAMPLE, "visual tokens in the prompt (before subset/pool)",
              required=False),
    ArraySpec("gold_ntokens", ("sample",), "int32", SAMPLE, "tokens of the gold answer", required=False),
    ArraySpec("site_position", ("sample", "site"), "int32", SAMPLE, "token index of each text site",
              required=False),
    ArraySpec("candidate_mask", ("sample", "candidate"), "bool", SAMPLE, "the sample's own candidate set",
              required=False),
    ArraySpec("candidate_prefix_tokens", ("sample",), "int32", SAMPLE, "tokens shared by the sample's candidates",
              required=False),
    ArraySpec("donor", ("sample",), "int64", SAMPLE, "blind_randomimage donor sample index (-1: none)",
              required=False, merge=MERGE_SAMPLE_INDEX),
    # ------------------------------------------------------------------ logit lens tables
    ArraySpec("lens_norm_weight", ("hidden",), "float32", STORE, "final norm weight (attrs: form, eps)",
              required=False, merge=MERGE_LENS),
    ArraySpec("lens_token_id", ("lens_token",), "int64", STORE, "vocabulary ids of the lens rows", required=False,
              merge=MERGE_LENS),
    ArraySpec("lens_unembed", ("lens_token", "hidden"), "float32", STORE, "unembedding rows of the candidates",
              required=False, merge=MERGE_LENS),
    ArraySpec("candidate_lens_token", ("sample", "candidate"), "int32", SAMPLE,
              "lens row scoring candidate c of sample i (-1: not the sample's)", fill=-1, required=False,
              merge=MERGE_LENS),
    # ------------------------------------------------------------------ attention summaries (extract.attention)
    # optional: created only when extract.attention is on (their coordinates are given to ``create``); then every
    # unit writes them. Computed in the forward by gapcache.extract.attention (definitions there).
    ArraySpec("attn_query", ("attn_query",), STR, STORE, "query rows of the attention summaries: instruction, "
              "prediction, question (the mean row of the question's tokens)", required=False),
    ArraySpec("attn_target", ("attn_target",), STR, STORE, "key groups of attn_mass: visual, question, template "
              "(every other prompt token), first (position 0, also in its group)", required=False),
    ArraySpec("attn_stat", ("attn_stat",), STR, STORE, "statistics of attn_visual: entropy (nats), n_eff = "
              "exp(entropy), top5 / top10 / top50 mass, over the visual keys (row renormalised there)",
              required=False),
    ArraySpec("attn_head", ("attn_head",), "int32", STORE, "query head index (GQA: every query head)",
              required=False),
    ArraySpec("attn_mass", ("condition", "sample", "attn_query", "layer", "attn_head", "attn_target"), "float32",
              UNIT,
              "attention mass from each query row on each key group; layer i = decoder layer i's attention (the "
              "layer reading hidden state i; NaN at the last index)", fill=np.nan, required=False),
    ArraySpec("attn_visual", ("condition", "sample", "attn_query", "layer", "attn_head", "attn_stat"), "float32",
              UNIT,
              "attention over the visual keys only: entropy, N_eff, top-k mass (NaN where the visual mass is 0)",
              fill=np.nan, required=False),
    # ------------------------------------------------------------------ statistics fitted on original (soft truncation)
    ArraySpec("fit_layer", ("fit_layer",), "int32", STORE,
              "decoder layers whose input the fitted statistics describe (hidden-state index = layer)", required=False),
    ArraySpec("fit_mean", ("fit_layer", "hidden"), "float32", STORE,
              "mean visual state of original over the run at the input of each fit layer (strategy mean, pca_noise)",
              required=False),
    ArraySpec("fit_pca_basis", ("fit_layer", "pca_component", "hidden"), "float32", STORE,
              "top principal directions of original's visual states per fit layer (rows unit norm; pca_noise)",
              required=False),
    ArraySpec("fit_pca_variance", ("fit_layer", "pca_component"), "float32", STORE,
              "variance of original's visual states along each principal direction (pca_noise)", required=False),
    ArraySpec("fit_sigma", ("fit_layer",), "float32", STORE,
              "std of every entry of original's visual states at the input of each fit layer (patched gaussian)",
              required=False),
    ArraySpec("fit_question_mean", ("fit_layer", "hidden"), "float32", STORE,
              "mean state of original over every question content token at the input of each fit layer (patched "
              "text mean)", required=False),
    ArraySpec("fit_question_sigma", ("fit_layer",), "float32", STORE,
              "std of every entry of original's question-token states at the input of each fit layer (patched text "
              "gaussian)", required=False),
    # ------------------------------------------------------------------ MoE routing (extract.routing: true)
    # Optional: a store has them only when its Layout has ``routing`` (MoE families, routing on); their
    # dimensions come from the Layout. ``route_layer`` = decoder layer index (its router), not a hidden-state index.
    ArraySpec("route_layer", ("route_layer",), "int32", INDEX, "decoder layer of each router (MoE routing)",
              required=False),
    ArraySpec("expert", ("expert",), "int32", INDEX, "expert index of the MoE routers", required=False),
    ArraySpec("modality", ("modality",), STR, INDEX, "positions a route_load histogram counts (MODALITIES)",
              required=False),
    ArraySpec("route_expert", ("condition", "sample", "site", "route_layer", "k"), "int16", UNIT,
              "the router's top-k expert ids at each text site, by descending weight (-1: layer without router)",
              fill=-1, required=False),
    ArraySpec("route_weight", ("condition", "sample", "site", "route_layer", "k"), "float32", UNIT,
              "the router's weight of each top-k expert as the model applies it (renormalized over the top k)",
              fill=np.nan, required=False),
    ArraySpec("route_load", ("condition", "sample", "route_layer", "modality", "expert"), "int32", UNIT,
              "top-k assignments per expert over the sample's visual span / its other prompt positions "
              "(teacher-forced answer and padding excluded; -1: layer without router)", fill=-1, required=False),
]

#: the ``modality`` coordinate of route_load: the visual span, and every other prompt position
MODALITIES = ("visual", "text")
#: the unit arrays of MoE routing (written only by runs with ``extract.routing: true``)
ROUTING = ("route_expert", "route_weight", "route_load")

#: name -> spec, in declaration order (the order arrays are created, written and checked)
ARRAYS: dict[str, ArraySpec] = {s.name: s for s in _SPECS}


def register(spec: ArraySpec) -> ArraySpec:
    """Add an array to the store contract (one line per new recorded quantity)."""
    if spec.name in ARRAYS:
        raise StoreError(f"The array {spec.name!r} is already declared in gapcache.store.arrays.ARRAYS.")
    ARRAYS[spec.name] = spec
    return spec


def register_span(span: SpanSpec, since: int = 2) -> SpanSpec:
    """Add a ragged span to the store contract: its condition coordinate, states, owners and offsets."""
    if span.name in SPANS:
        raise StoreError(f"The span {span.name!r} is already declared in gapcache.store.arrays.SPANS.")
    SPANS[span.name] = span
    for spec in (_span_index(span), *span_arrays(span)):
        register(dataclasses.replace(spec, since=since))
    return span


def specs(along=None, *, state: bool | None = None, version: int | None = None) -> list[ArraySpec]:
    """Declared arrays, optionally only those written ``along`` (a name or a tuple of names), state or not,
    and existing at schema ``version``."""
    along = (along,) if isinstance(along, str) else along
    return [s for s in ARRAYS.values()
            if (along is None or s.along in along) and (state is None or s.is_state == state)
            and (version is None or s.since <= version)]


def get(name: str) -> ArraySpec:
    try:
        return ARRAYS[name]
    except KeyError:
        raise StoreError(f"The array {name!r} is not declared in gapcache.store.arrays.ARRAYS "
                         f"(declared: {', '.join(ARRAYS)}). Declare it there with register(ArraySpec(...)).") from None


def unit_row_shape(spec: ArraySpec, sizes: dict) -> tuple[int, ...]:
    """Shape of one sample's (UNIT) or one token's (VUNIT) values: the dims after the leading two."""
    return tuple(sizes[d] for d in spec.dims[2:])


def unit_buffers(names, sizes: dict, n: int, n_vtokens: int, model_dtype: str) -> dict:
    """Fill-valued buffers of one (condition, shard) payload for the unit arrays ``names``:
    UNIT arrays (n, *row), VUNIT arrays (n_vtokens, *row), in storage dtype."""
    out = {}
    for name in names:
        spec = get(name)
        lead = n if spec.along == UNIT else n_vtokens
        dtype = spec.numpy_dtype(model_dtype)
        shape = (lead, *unit_row_shape(spec, sizes))
        if dtype == object:
            out[name] = np.full(shape, spec.fill_value(), dtype=object)
        else:
            out[name] = np.full(shape, spec.fill_value(), dtype=dtype)
    return out


def bytes_per_sample(sizes: dict, model_dtype: str, span_tokens: dict) -> float:
    """Uncompressed bytes one (condition, sample) adds to the store: every fixed-size UNIT array, plus
    ``span_tokens[span]`` rows of each VUNIT array of the spans given (those the condition records; strings: 0)."""
    total = 0.0
    for spec in specs((UNIT, VUNIT)):
        dtype = spec.numpy_dtype(model_dtype)
        if dtype == object or (spec.along == VUNIT and spec.span not in span_tokens):
            continue
        if not spec.required and any(d not in sizes for d in spec.dims[2:]):
            continue  # an optional array whose option is off (its dimensions are not sized)
        if not spec.required and not set(spec.dims[2:]) <= set(sizes):  # an optional array this run lacks
            continue
        row = float(np.prod(unit_row_shape(spec, sizes), dtype=np.float64)) * dtype.itemsize
        total += row * (span_tokens[spec.span] if spec.along == VUNIT else 1)
    return total
