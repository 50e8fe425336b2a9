"""``gapcache merge A B ... --out C``: one store from stores of the same model and prompt template.

Usage::

    merge(["runs/part1/store.zarr", "runs/part2/store.zarr"], "runs/all/store.zarr")

The inputs must agree on everything that makes their states comparable (``COMPAT_FIELDS``:
schema version, model id/revision/family/dtype/layers/hidden, processor and chat-template
hashes, layer convention, recorded layers, sites, candidates, visual recording, storage
encoding); the first field that differs is named and nothing is written. They may differ in
samples (union, first store's order first) and in conditions (union); a (condition, sample) cell
may be done or failed in at most one input. A sample present in several inputs must have the same
token layout there (visual length, site positions, image hash). Per-sample ``donor`` indices
(blind_randomimage) are remapped to the merged sample order; ``blind_mean`` must use the same mean
colour in every input that has it. The result is created next to ``--out`` and renamed into
place, written through StoreWriter (checksums recorded), and is a normal store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from gapcache.conditions import DEEPSTACK_ATTR, Condition
from gapcache.errors import IncompatibleStoreError, StoreError
from gapcache.store import arrays, codec
from gapcache.store.remote import is_url, zarr_store
from gapcache.store.schema import STATUS_PENDING, Layout


def candidates_of(attrs, g) -> list[str]:
    """The store's candidate set ([] when it records no candidate scores)."""
    return [str(x) for x in g["candidate"][...]] if g["candidate_logprob"].shape[2] else []


#: (name shown in errors, getter(attrs, group))
COMPAT_FIELDS = (
    ("schema_version", lambda a, g: a.get("schema_version")),
    ("model.id", lambda a, g: a.get("model", {}).get("id")),
    ("model.revision", lambda a, g: a.get("model", {}).get("revision")),
    ("model.family", lambda a, g: a.get("model", {}).get("family")),
    ("model.dtype", lambda a, g: a.get("model_dtype")),
    ("model.n_layers", lambda a, g: a.get("model", {}).get("n_layers")),
    ("provenance.processor_class", lambda a, g: a.get("provenance", {}).get("processor_class")),
    ("provenance.chat_template_sha256", lambda a, g: a.get("provenance", {}).get("chat_template_sha256")),
    ("provenance.tokenizer_vocab_sha256", lambda a, g: a.get("provenance", {}).get("tokenizer_vocab_sha256")),
    ("provenance.image_processor_sha256", lambda a, g: a.get("provenance", {}).get("image_processor_sha256")),
    ("layer_convention", lambda a, g: a.get("layer_convention")),
    ("sites", lambda a, g: a.get("sites")),
    ("answer_prefix", lambda a, g: a.get("answer_prefix")),
    ("visual", lambda a, g: a.get("visual")),
    ("candidates", candidates_of),
    ("layer (recorded hidden-state indices)", lambda a, g: [int(x) for x in g["layer"][...]]),
    ("hidden", lambda a, g: int(g["text_states"].shape[-1])),
    ("state storage (dtype, encoding)",
     lambda a, g: [str(g["text_states"].dtype), g["text_states"].attrs.get("gapcache_encoding")]),
)
#: per-sample metadata that must agree where a sample appears in several inputs
SAME_SAMPLE_FIELDS = ("visual_length", "site_position", "seq_len", "image_sha256", "question", "answer")
#: per-sample arrays carried over row by row from the input each sample comes from (or remapped)
CARRIED = (arrays.MERGE_SAMPLE, arrays.MERGE_SAMPLE_INDEX)
RESERVED_ATTRS = {"schema_version", "checksums", "gapcache_version", "layer_convention", "sites", "samples_per_shard",
                  "visual_shard_tokens", "span_shard_tokens", "model_dtype", "conditions", "frozen"}


def safe_out(out) -> Path:
    """An output store path: no '..' component, not a symlink, not an existing path."""
    if is_url(out):
        raise StoreError(f"--out must be a local directory; remote stores are read-only. Got {out} instead.")
    p = Path(out)
    if ".." in p.parts:
        raise StoreError(f"--out must not contain '..' (it could write outside the run directory). Got {out} instead.")
    if p.is_symlink():
        raise StoreError(f"--out {out} is a symlink; give the real directory (a store never writes through links).")
    if p.exists():
        raise StoreError(f"--out {out} already exists; merge writes a new store. Remove it or choose another path.")
    for parent in p.parents:
        if parent.is_symlink() and parent != Path("/") and not parent.is_absolute() and str(parent) != ".":
            raise StoreError(f"--out {out} goes through the symlink {parent}; give the real path.")
    return p


class _Source:
    def __init__(self, path, storage_options=None):
        import zarr

        from gapcache.store.reader import root_attrs

        self.path = str(path)
        self.attrs = root_attrs(path, storage_options)
        self.g = zarr.open_group(zarr_store(path, storage_options), mode="r", zarr_format=3)
        self.samples = [str(x) for x in self.g["sample"][...]]
        self.conds = [Condition.from_dict(c) for c in self.attrs["conditions"]]
        self.labels = [c.label for c in self.conds]
        # per span: labels of the conditions recording it, each sample's offset and length
        self.span_labels = {n: [str(x) for x in self.g[sp.condition_dim][...]] if sp.condition_dim in self.g else []
                            for n, sp in arrays.SPANS.items()}
        self.span_off = {n: self.g[sp.offset][...] if sp.offset in self.g else np.zeros(len(self.samples), np.int64)
                         for n, sp in arrays.SPANS.items()}
        self.span_len = {n: self.g[sp.length][...] if sp.length in self.g else np.zeros(len(self.samples), np.int32)
                         for n, sp in arrays.SPANS.items()}
        self.status = self.g["status"][...]
        self.spc = int(self.attrs["samples_per_shard"])
        self.meta_names = sorted(s.name for s in arrays.specs(arrays.SAMPLE) if s.merge_rule in CARRIED
                                 and s.name in self.g)
        undeclared = sorted(n for n, _ in self.g.arrays() if n not in arrays.ARRAYS)
        if undeclared:
            raise IncompatibleStoreError(
                f"Cannot merge {self.path}: it holds arrays this gapcache does not declare ({undeclared}); merge "
                "with the gapcache version that wrote it (attribute 'gapcache_version').")
        self._cache: dict = {}

    def block(self, name, lead, s0, s1):
        key = (name, lead, s0, s1)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = self.g[name][lead, s0:s1]
        return self._cache[key]

    def row(self, name, ci, i):
        """Row i of array ``name`` at condition ci, through a per-shard read cache."""
        s0 = (i // self.spc) * self.spc
        return self.block(name, ci, s0, min(s0 + self.spc, len(self.samples)))[i - s0]


def check_compatible_stores(sources) -> None:
    first = sources[0]
    for src in sources[1:]:
        for name, get in COMPAT_FIELDS:
            a, b = get(first.attrs, first.g), get(src.attrs, src.g)
            if a != b:
                raise IncompatibleStoreError(
                    f"Cannot merge {src.path} into {first.path}: they differ in {name!r} "
                    f"({first.path} has {a!r}, {src.path} has {b!r}). Only stores of the same model revision, prompt "
                    "template and schema can be merged."
                )
    merged_condition_params(sources, None)  # refuses kinds whose inputs must agree (e.g. blind_mean's colour)
    names = {src.path: src.meta_names for src in sources}
    if len({tuple(v) for v in names.values()}) > 1:
        raise IncompatibleStoreError(f"Cannot merge: the per-sample metadata arrays differ: {names}.")


def merge(paths, out, storage_options: dict | None = None, show: bool = False) -> Path:
    """Merge the stores at ``paths`` (local or URLs, read-only) into a new local store ``out``."""
    from gapcache.store.writer import StoreWriter, create

    if len(paths) < 2:
        raise StoreError(f"merge needs at least two stores. Got {len(paths)} instead.")
    out = safe_out(out)
    sources = [_Source(p, storage_options) for p in paths]
    check_compatible_stores(sources)
    first = sources[0]

    # samples and conditions: unions in order of first appearance
    sample_ids, home = [], {}  # home: sample id -> (source, index there) of its metadata
    for src in sources:
        for i, s in enumerate(src.samples):
            if s not in home:
                home[s] = (src, i)
                sample_ids.append(s)
            else:
                _same_sample(home[s], (src, i), s)
    conds, seen = [], set()
    for src in sources:
        for c in src.conds:
            if c.label not in seen:
                seen.add(c.label)
                conds.append(c)
    # every (condition, sample) cell: the one source where it is done/failed
    owner: dict = {}
    for src in sources:
        for sci, label in enumerate(src.labels):
            for i in np.flatnonzero(src.status[sci] != STATUS_PENDING):
                cell = (label, src.samples[i])
                if cell in owner:
                    raise IncompatibleStoreError(
                        f"Cannot merge: condition {label!r} of sample {src.samples[i]!r} is written in both "
                        f"{owner[cell][0].path} and {src.path}; each (condition, sample) may come from one store only."
                    )
                owner[cell] = (src, sci, int(i))

    vchunk = int(first.g["visual_states"].chunks[1])
    layout = Layout(
        sample_ids=tuple(sample_ids), conditions=tuple(conds), layers=tuple(int(x) for x in first.g["layer"][...]),
        hidden=int(first.g["text_states"].shape[-1]), model_dtype=first.attrs["model_dtype"],
        candidates=tuple(candidates_of(first.attrs, first.g)),
        visual_lengths=_span_lengths("visual", home, sample_ids),
        span_lengths=tuple((n, _span_lengths(n, home, sample_ids)) for n, sp in arrays.SPANS.items()
                           if n != "visual" and sp.offset in first.g),
        samples_per_shard=first.spc, visual_chunk_tokens=vchunk,
        compression=codec.array_compression(first.g["text_states"]),
        routing=_routing_shape(first.g),
    )
    values, array_attrs = _creation_values(sources, home, sample_ids, layout)
    attrs = _merged_attrs(sources, layout, values.get("donor"))

    tmp = out.parent / f".{out.name}.{os.getpid()}.merge.tmp"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        group = create(tmp, layout, attrs, values, array_attrs=array_attrs)
        with StoreWriter(tmp) as w:
            for ci, cond in enumerate(conds):
                for shard in range(layout.n_shards):
                    p = _payload(ci, cond, shard, layout, owner, sample_ids, group)
                    if p is not None:
                        w.submit(p)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _creation_values(sources, home, sample_ids, layout) -> tuple[dict, dict]:
    """Values (and array attributes) of every array written at creation, by each declared array's merge rule."""
    first = sources[0]
    new_index = {s: i for i, s in enumerate(sample_ids)}
    values, array_attrs = {}, {}
    for spec in arrays.specs((arrays.STORE, arrays.SAMPLE, arrays.SPAN)):
        rule, name = spec.merge_rule, spec.name
        if rule == arrays.MERGE_LAYOUT or name not in first.g:
            continue
        if rule in CARRIED and spec.along == arrays.SAMPLE:
            cols = {src.path: src.g[name][...] for src in sources}
            rows = [cols[home[s][0].path][home[s][1]] for s in sample_ids]
            if rule == arrays.MERGE_SAMPLE_INDEX:  # index into the source's samples -> into the merged samples
                values[name] = np.array([new_index[home[s][0].samples[int(d)]] if int(d) >= 0 else -1
                                         for s, d in zip(sample_ids, rows)], np.int64)
            else:
                kind = cols[first.path].dtype.kind
                values[name] = np.array(rows, dtype=object if kind in "OUST" else cols[first.path].dtype)
        elif rule == arrays.MERGE_SAMPLE and spec.along == arrays.SPAN:
            values[name] = _span_rows(name, sources, home, sample_ids, layout)
        elif rule == arrays.MERGE_EQUAL:
            values[name] = _equal_everywhere(name, sources)
            array_attrs[name] = first.g[name].attrs.asdict()
    lens, lens_attrs = _merge_lens(sources, home, sample_ids, layout)
    values.update(lens)
    array_attrs.update(lens_attrs)
    return values, array_attrs


def _routing_shape(g) -> tuple:
    """(router layers, experts, top-k) of a store that records MoE routing, () otherwise."""
    if "route_expert" not in g:
        return ()
    _, _, n_layers, _, n_experts = g["route_load"].shape
    return int(n_layers), int(n_experts), int(g["route_expert"].shape[-1])


def _span_lengths(span, home, sample_ids) -> tuple[int, ...]:
    return tuple(int(home[s][0].span_len[span][home[s][1]]) for s in sample_ids)


def _equal_everywhere(name, sources) -> np.ndarray:
    first = sources[0].g[name][...]
    for src in sources[1:]:
        other = src.g[name][...] if name in src.g else None
        if other is None or other.shape != first.shape or not (other == first).all():
            raise IncompatibleStoreError(f"Cannot merge: the whole-store array {name!r} differs between "
                                         f"{sources[0].path} and {src.path}; it must be identical in every input.")
    return first


def _same_sample(a, b, sample_id) -> None:
    (sa, ia), (sb, ib) = a, b
    for name in SAME_SAMPLE_FIELDS:
        if name in sa.g and name in sb.g:
            x, y = np.asarray(sa.g[name][ia]), np.asarray(sb.g[name][ib])
            if x.shape != y.shape or not (x == y).all():
                raise IncompatibleStoreError(
                    f"Cannot merge: sample {sample_id!r} differs in {name!r} between {sa.path} ({x.tolist()!r}) and "
                    f"{sb.path} ({y.tolist()!r}); the same sample id must have the same token layout."
                )


def _merged_attrs(sources, layout, donor) -> dict:
    first = sources[0]
    attrs = {k: v for k, v in first.attrs.items() if k not in RESERVED_ATTRS}
    merged_from = [{"path": s.path, "config_hash": s.attrs.get("config_hash"), "n_samples": len(s.samples),
                    "conditions": s.labels, "dataset": s.attrs.get("dataset"),
                    "created": s.attrs.get("provenance", {}).get("created")} for s in sources]
    attrs["merged_from"] = merged_from
    attrs["config_hash"] = "merge:" + hashlib.sha256(
        json.dumps([m["config_hash"] for m in merged_from]).encode()).hexdigest()[:16]
    names = sorted({str((s.attrs.get("dataset") or {}).get("name")) for s in sources})
    splits = sorted({str((s.attrs.get("dataset") or {}).get("split")) for s in sources})
    attrs["dataset"] = {"name": "+".join(names), "split": "+".join(splits), "n_samples": layout.n_samples}
    attrs["condition_params"] = merged_condition_params(sources, donor)
    recorded = [s.attrs[DEEPSTACK_ATTR] for s in sources if DEEPSTACK_ATTR in s.attrs]
    if recorded:  # the model's fact (model.id / revision / n_layers agree): from any input that records it
        attrs[DEEPSTACK_ATTR] = recorded[0]
    return attrs


def merged_condition_params(sources, donor) -> dict:
    """Each condition kind's recorded parameters, combined by the kind's own rule (``merge_params`` in the
    condition registry: equal inputs, remapped donors, the union of truncation layers, ...)."""
    from gapcache import conditions

    params = {}
    names = [k for s in sources for k in (s.attrs.get("condition_params") or {})]
    for name in dict.fromkeys(names):
        found = [(s.path, json.loads(json.dumps(s.attrs["condition_params"][name]))) for s in sources
                 if name in (s.attrs.get("condition_params") or {}) and any(c.kind == name for c in s.conds)]
        if not found:  # recorded but not run by any input: keep the first record
            found = [(s.path, s.attrs["condition_params"][name]) for s in sources
                     if name in (s.attrs.get("condition_params") or {})][:1]
        entry = conditions.KINDS.get(name)  # a kind this gapcache does not know: the first record
        value = entry.merge_params(name, found, donor) if entry else found[0][1]
        if value is not None:
            params[name] = value
    return params


def _span_rows(name, sources, home, sample_ids, layout) -> np.ndarray:
    """A per-token (span row) array gathered sample by sample from the input each sample comes from."""
    spec = arrays.get(name)
    span = layout.spans[spec.span]
    cache = {}
    out = None
    for i, s in enumerate(sample_ids):
        src, j = home[s]
        if src.path not in cache:
            cache[src.path] = src.g[name][...]
        col = cache[src.path]
        if out is None:
            out = np.full((span.n_tokens, *col.shape[1:]), spec.fill_value(), dtype=col.dtype)
        n, o = span.lengths[i], int(src.span_off[spec.span][j])
        out[span.offsets[i] : span.offsets[i] + n] = col[o : o + n]
    return out


def _merge_lens(sources, home, sample_ids, layout) -> tuple[dict, dict]:
    """Union of the logit-lens rows (when every input has them; the model is the same, so rows agree)."""
    if not all("lens_token_id" in s.g for s in sources):
        return {}, {}
    first = sources[0]
    weight = first.g["lens_norm_weight"]
    rows = {}
    tokens_of = {id(s): s.g["lens_token_id"][...] for s in sources}  # read once per source
    for s in sources:
        for r, t in enumerate(tokens_of[id(s)]):
            rows.setdefault(int(t), (s, r))
    tokens = sorted(rows)
    unembed = np.stack([rows[t][0].g["lens_unembed"][rows[t][1]] for t in tokens]) if tokens \
        else np.zeros((0, layout.hidden), np.float32)
    which = np.full((layout.n_samples, len(layout.candidates)), -1, np.int32)
    new_row = {t: r for r, t in enumerate(tokens)}
    for i, s in enumerate(sample_ids):
        src, j = home[s]
        old = src.g["candidate_lens_token"][j]
        src_tokens = tokens_of[id(src)]
        which[i, : old.shape[0]] = [new_row[int(src_tokens[r])] if r >= 0 else -1 for r in old]
    values = {"lens_norm_weight": weight[...], "lens_token_id": np.array(tokens, np.int64),
              "lens_unembed": unembed.astype(np.float32), "candidate_lens_token": which}
    return values, {"lens_norm_weight": weight.attrs.asdict()}


def _payload(ci, cond, shard, layout, owner, sample_ids, group):
    """The merged unit (condition ``ci``, ``shard``): every declared unit array, cell by cell from its owner."""
    from gapcache.store.writer import ShardPayload

    idx = list(layout.shard_samples(shard))
    cells = [owner.get((cond.label, sample_ids[i])) for i in idx]
    if all(c is None for c in cells):
        return None
    specs = [s for s in arrays.specs((arrays.UNIT, arrays.VUNIT)) if s.name in group
             and (s.along == arrays.UNIT or arrays.SPANS[s.span].recorded_by(cond))]
    sizes = layout.sizes()
    for s in specs:
        sizes.update(zip(s.dims, group[s.name].shape))
    vals = {}
    for s in specs:  # a VUNIT array holds the shard group's rows of its span
        span = layout.spans.get(s.span)
        n_tok = sum(span.lengths[i] for i in idx) if span else 0
        vals.update(arrays.unit_buffers([s.name], sizes, len(idx), n_tok, layout.model_dtype))
    for j, (i, cell) in enumerate(zip(idx, cells)):
        if cell is None:
            continue
        src, sci, si = cell
        for s in specs:
            if s.name not in src.g:
                continue
            if s.along == arrays.UNIT:
                vals[s.name][j] = src.row(s.name, sci, si)
                continue
            span = layout.spans[s.span]
            if span.lengths[i]:
                vci = src.span_labels[s.span].index(cond.label)
                o, m = int(src.span_off[s.span][si]), int(src.span_len[s.span][si])
                d = span.offsets[i] - span.offsets[idx[0]]
                vals[s.name][d : d + m] = src.g[s.name][vci, o : o + m]
    return ShardPayload(ci, shard, vals)
