"""Text sites by name, derived from the token span with no GPU (issue 14, item 8). No torch.

A store recorded with ``extract.text: all`` holds every prompt text token's state (the ``token`` span:
``token_states (token_condition, ttoken, layer, hidden)``, a role per row in ``ttoken_role``, roles named
in its ``roles`` attribute = ``gapcache.sites.TOKEN_ROLES``). This module is the one place that turns it
into text sites: ``<group>_<reduction>`` for each group of roles and each reduction::

    group     rows of the sample's token span
    question  role question (the question's content tokens)
    template  role template (chat-template text)
    special   role special (special tokens of the tokenizer)
    text      every row (every prompt token outside the visual span)

    reduction  state (layer, hidden) of the sample
    mean       mean over the group's rows (float64, stored dtype)
    first      the group's first row in prompt order (bit for bit the recorded state)
    last       the group's last row (question_last is the instruction site, text_last the prediction site)

``with_sites(ds, ["question_mean", ...])`` gives the store's Dataset with ``text_states`` (condition,
sample, site, layer, hidden) holding the store's own sites followed by the derived ones (lazy, dask: one
task per group of samples and layer), and ``site_position`` their prompt positions (-1 for a mean), so
every metric that reads ``text_states`` by site (probes, the text ER, the logit lens) accepts them. A
sample without a row of the group (failed, or no such token) gets NaN. ``gapcache analyze --site``
and ``AnalysisParams.sites`` pass through here; an unknown name is refused with the names available.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gapcache.errors import ConfigError
from gapcache.sites import TOKEN_ROLES
from gapcache.store import arrays

REDUCTIONS = ("mean", "first", "last")
#: group name -> the roles (gapcache.sites.TOKEN_ROLES) whose rows it takes
GROUPS: dict[str, tuple[str, ...]] = {**{r: (r,) for r in sorted(TOKEN_ROLES, key=lambda r: r != "question")},
                                      "text": TOKEN_ROLES}  # the question's tokens first: the text channel


@dataclass(frozen=True)
class Derived:
    """A text site computed from the token span: the rows of ``roles``, reduced by ``reduction``."""

    name: str
    roles: tuple[str, ...]
    reduction: str


#: every derived site, by name (question_mean, question_first, ..., text_last)
DERIVED: dict[str, Derived] = {f"{g}_{r}": Derived(f"{g}_{r}", roles, r) for g, roles in GROUPS.items()
                               for r in REDUCTIONS}


def has_token_span(ds) -> bool:
    return "token_states" in ds and "ttoken_role" in ds


def stored_sites(ds) -> list[str]:
    return [str(s) for s in np.asarray(ds.site.values, dtype=object).ravel()]


def available(ds) -> list[str]:
    """The sites a metric can read from this store: its own, then the derived ones if it has the token span."""
    return stored_sites(ds) + (list(DERIVED) if has_token_span(ds) else [])


def check_sites(ds, names) -> list[str]:
    """``names`` as a list, each a stored or derived site this store can give; ConfigError naming the first
    that is not, with the available ones (and why the derived ones are missing)."""
    names = list(names)
    have = available(ds)
    for n in names:
        if n in have:
            continue
        why = ("" if has_token_span(ds) or n not in DERIVED else
               f"; {n!r} is derived from the token span, which this store lacks: record it with extract.text: all")
        raise ConfigError(f"The 'site' parameter (--site) must name sites of this store, one of {have}. "
                          f"Got {n!r} instead{why}.")
    return names


def _rows(ds, sites: list[Derived]):
    """Per sample, per site: the sample-relative rows of the token span it reduces (int arrays)."""
    names = [str(r) for r in ds.ttoken_role.attrs.get("roles", TOKEN_ROLES)]
    role = np.asarray(ds.ttoken_role.values)
    off, length = np.asarray(ds.token_offset.values), np.asarray(ds.token_length.values)
    out = []
    for i in range(len(off)):
        r = role[off[i] : off[i] + length[i]]
        row = []
        for s in sites:
            idx = np.flatnonzero(np.isin(r, [names.index(x) for x in s.roles if x in names]))
            row.append(idx if s.reduction == "mean" or idx.size == 0 else idx[:1] if s.reduction == "first" else idx[-1:])
        out.append(row)
    return out


def _reduce_block(block, rows, offsets, start, dtype):
    """(1, rows of a group, 1, hidden) -> (1, samples, sites, 1, hidden)."""
    n_sites = len(rows[0]) if rows else 0
    out = np.full((1, len(rows), n_sites, 1, block.shape[-1]), np.nan, dtype=dtype)
    for j, (per_site, off) in enumerate(zip(rows, offsets)):
        for k, idx in enumerate(per_site):
            if idx.size == 1:
                out[0, j, k, 0] = block[0, off - start + idx[0], 0]
            elif idx.size:
                out[0, j, k, 0] = block[0, off - start + idx, 0].astype(np.float64).mean(axis=0)
    return out


def derived_states(ds, names, group_size: int = 32):
    """Lazy DataArray (condition, sample, site, layer, hidden) of the derived sites ``names`` (keys of DERIVED)."""
    import dask.array as da
    import xarray as xr

    from gapcache.analyze.rank import _groups

    sites = [DERIVED[n] for n in names]
    ts = ds["token_states"]
    offsets, lengths = np.asarray(ds.token_offset.values), np.asarray(ds.token_length.values)
    starts, bounds = _groups(offsets, lengths, group_size)
    sizes = tuple(np.diff(bounds + [ts.sizes["ttoken"]]).tolist())
    arr = da.asarray(ts.data).rechunk((1, sizes, 1, -1))
    n_per = tuple(min(group_size, len(offsets) - s) for s in starts)
    rows = _rows(ds, sites)

    def block_fn(block, block_info=None):
        g = block_info[0]["chunk-location"][1]
        sl = slice(starts[g], starts[g] + n_per[g])
        return _reduce_block(block, rows[sl], offsets[sl], bounds[g], ts.dtype)

    out = da.map_blocks(block_fn, arr, new_axis=2, dtype=ts.dtype,
                        chunks=(arr.chunks[0], n_per, (len(sites),), arr.chunks[2], arr.chunks[3]))
    # token_condition lists every condition (the span is recorded under all of them), in store order
    return xr.DataArray(out, dims=("condition", "sample", "site", "layer", "hidden"),
                        coords={"condition": ds.condition.values, "sample": ds.sample.values, "site": list(names),
                                "layer": ds.layer.values})


def _positions(ds, names, rows) -> np.ndarray:
    """(sample, site) prompt position of each first/last site (-1: a mean, or no row)."""
    vstart = np.asarray(ds.visual_start.values) if "visual_start" in ds else np.zeros(len(rows), int)
    vlen = np.asarray(ds.span_length.values) if "span_length" in ds else np.zeros(len(rows), int)
    pos = np.full((len(rows), len(names)), -1, np.int32)
    for i, per_site in enumerate(rows):
        for k, (n, idx) in enumerate(zip(names, per_site)):
            if DERIVED[n].reduction != "mean" and idx.size:
                r = int(idx[0])
                pos[i, k] = r if vstart[i] < 0 or r < vstart[i] else r + int(vlen[i])
    return pos


def with_sites(ds, names):
    """``ds`` with ``text_states`` and ``site_position`` over the store's sites followed by the derived ones
    in ``names`` (stored names in ``names`` are already there); ``ds`` itself when nothing is added."""
    import xarray as xr

    names = check_sites(ds, names)
    extra = [n for n in dict.fromkeys(names) if n not in stored_sites(ds)]
    if not extra:
        return ds
    if list(np.asarray(ds.token_condition.values).tolist()) != list(np.asarray(ds.condition.values).tolist()):
        raise ConfigError("The store's 'token_condition' must list every condition in store order (the token span "
                          "is recorded under all of them). Got a different list; the store is damaged.")
    new = derived_states(ds, extra)
    ts = xr.concat([ds.text_states, new.astype(ds.text_states.dtype)], dim="site")
    site_dims = [v for v in ds.data_vars if "site" in ds[v].dims and v not in ("text_states", "site_position")]
    out = ds.drop_vars(["text_states", "site_position", *site_dims]).drop_dims("site", errors="ignore")
    out = out.assign_coords(site=ts.site.values).assign(text_states=ts)
    if "site_position" in ds:
        derived = _positions(ds, extra, _rows(ds, [DERIVED[n] for n in extra]))
        out["site_position"] = (("sample", "site"), np.concatenate([np.asarray(ds.site_position.values), derived], 1))
    for v in site_dims:  # e.g. routing at the text sites: only the stored sites have values (the array's fill)
        spec = arrays.ARRAYS.get(v)
        out[v] = ds[v].reindex(site=ts.site.values, fill_value=spec.fill_value() if spec else np.nan)
    return out
