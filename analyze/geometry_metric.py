"""The ``geometry`` metric: cross-modal geometry per (condition, sample, layer) from the cache (issue 14,
item 6; formulas in gapcache.analyze.geometry). No torch.

Per condition recording the visual span, per sample and layer:

* ``icc``: mean pairwise cosine among the sample's recorded visual tokens (needs only the visual span);
* ``cka``: debiased linear CKA between the sample's visual tokens and its text tokens of the roles
  ``AnalysisParams.cka_text`` (default ``question``: the question's content tokens, the text channel of
  DESIGN.md; ``text``: every prompt text token; groups of gapcache.analyze.textsites.GROUPS), compared over
  the hidden units (gapcache.analyze.geometry);

and per condition (every condition records the token span), per sample and layer, ``text_er``: the
effective rank (gapcache.analyze.rank) of every text token of the sample. CKA and the text ER need the token
span (``extract.text: all``); without it they are skipped with that reason and ICC is still computed.

Each quantity: the mean over samples per layer with its CI, and with a cliff layer L (``--cliff-layer``
or the one ``evd`` found) the per-sample change after vs up to L (layers > L against layers <= L, the
windows of the ER ratio), with its CI over samples: ``icc`` and ``cka`` as a difference (after - before),
``text_er`` as a ratio (after / before). Pooled or subset visual spans (``extract.visual.mode``) change
ICC and CKA (the summary records the mode).

Reads one (condition, group of samples, layer) block of each span per task (dask), never a whole span.
"""

from __future__ import annotations

import numpy as np

from gapcache.analyze import stats
from gapcache.analyze.geometry import cross_modal_cka, icc
from gapcache.analyze.metrics import Context, MetricResult
from gapcache.analyze.textsites import DERIVED, GROUPS, has_token_span
from gapcache.conditions import REFERENCE
from gapcache.errors import ConfigError

NO_TOKEN_SPAN = "no token span in the store (extract.text: all records every prompt text token)"


def _strs(da) -> list[str]:
    return [str(v) for v in np.asarray(da.values, dtype=object).ravel()]


def _blocks(ds, span: str):
    """The span's states rechunked to (1 condition, one group of samples, 1 layer, hidden) blocks, and the
    groups: (states, sample starts, row bounds, samples per group, offsets, lengths). A group is the store's
    shard group (``rank.block_samples``), so a block is one layer of one shard as the store holds it (no
    rechunking: ~6x fewer tasks on the demo than groups of 32, and no rechunk tasks between)."""
    import dask.array as da

    from gapcache.analyze.rank import _groups, block_samples

    states = ds[f"{span}_states"]
    off, length = np.asarray(ds[f"{span}_offset"].values), np.asarray(ds[f"{span}_length"].values)
    group_size = block_samples(ds)
    starts, bounds = _groups(off, length, group_size)
    sizes = tuple(np.diff(bounds + [states.shape[1]]).tolist())
    n_per = [min(group_size, len(off) - s) for s in starts]
    blocks = da.asarray(states.data).rechunk((1, sizes, 1, -1))  # hidden: one chunk
    return blocks, starts, bounds, n_per, off, length


def _stacked(block, rows):
    """Rows of each sample of a group gathered in one take: (x (rows, hidden) float64, sample of each row,
    position of each row within its sample, row counts per sample)."""
    counts = np.array([len(r) for r in rows], dtype=np.int64)
    idx = np.concatenate(rows).astype(np.intp) if counts.sum() else np.zeros(0, np.intp)
    sid = np.repeat(np.arange(len(rows)), counts)
    pos = np.arange(len(idx)) - np.repeat(np.cumsum(counts) - counts, counts)
    return block[0, idx, 0].astype(np.float64), sid, pos, counts


def _padded(block, rows, center: bool, stacked=None):
    """Rows of each sample of a group, each centred over its rows if ``center``, zero-padded to one stack
    (n, max rows, hidden), and the row counts. Zero rows change neither a scatter matrix Vc'Vc (nor any term
    of cross_modal_cka) nor ICC (zero-norm tokens are left out), so a group is one batched call. Gathered,
    centred and scattered in whole-group numpy calls (a loop over the samples cost ~1 s on the demo)."""
    x, sid, pos, counts = _stacked(block, rows) if stacked is None else stacked
    out = np.zeros((len(rows), max(1, counts.max(initial=0)), block.shape[-1]))
    if center and len(x):
        x = x - (_segment_sums(x, counts) / np.maximum(counts, 1)[:, None])[sid]
    out[sid, pos] = x
    return out, counts


def _segment_sums(x, counts) -> np.ndarray:
    """(samples, hidden): the sum of x's rows of each sample (rows in sample order; a sample with no rows: 0)."""
    out = np.zeros((len(counts), x.shape[1]))
    nz = counts > 0
    out[nz] = np.add.reduceat(x, (np.cumsum(counts) - counts)[nz], axis=0)
    return out


def _group_geometry(vblock, tblock, v_rows, t_rows) -> np.ndarray:
    """(n, 2) [icc, cka] of each sample of a group: v_rows / t_rows are block-relative row indices per sample."""
    vs = _stacked(vblock, v_rows)
    V, nv = _padded(vblock, v_rows, center=False, stacked=vs)
    out = np.full((len(v_rows), 2), np.nan)
    out[:, 0] = np.where(nv > 0, icc(V), np.nan)
    if tblock is not None:
        Vc, _ = _padded(vblock, v_rows, center=True, stacked=vs)
        Tc, nt = _padded(tblock, t_rows, center=True)
        ok = (nv >= 2) & (nt >= 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, 1] = np.where(ok, cross_modal_cka(Vc, Tc, center=False), np.nan)
    return out


def _group_text_er(tblock, t_rows) -> np.ndarray:
    """Effective rank of each sample's rows (gapcache.analyze.rank.effective_rank of its rows): the rows
    centred per sample and zero-padded (zero rows add only zero singular values), the centring floor from
    the uncentred rows' norm, the relative cut of the padded shape."""
    from gapcache.analyze.rank import default_rtol, entropy_rank, floor_of, singular_values

    st = _stacked(tblock, t_rows)
    x, sid, _, n = st
    Tc, _ = _padded(tblock, t_rows, center=True, stacked=st)
    sq = np.bincount(sid, weights=np.einsum("ij,ij->i", x, x), minlength=len(n))  # ||H||_F^2 of each sample's rows
    er = entropy_rank(singular_values(Tc), default_rtol(*Tc.shape[-2:]), floor_of(n, sq))
    return np.where(n > 0, er, np.nan)


def text_rows(ds, group: str) -> list[np.ndarray]:
    """Per sample: the rows (relative to its token offset) of the roles of ``group`` (textsites.GROUPS)."""
    from gapcache.analyze.textsites import _rows

    return [r[0] for r in _rows(ds, [DERIVED[f"{group}_mean"]])]


def per_sample(ds, cka_text: str = "question"):
    """(icc, cka, text_er) as numpy arrays: icc and cka (visual_condition, sample, layer), text_er
    (token_condition, sample, layer); cka and text_er are None without the token span.

    One ``dask.array.blockwise`` per quantity over the (condition, group, layer) blocks of the spans: a graph
    of one layer, culled and ordered in time linear in the blocks (a Delayed per block, as before, culled the
    whole graph once per task: quadratic, 9 s at 8,000 tasks and hours on a real store's ~10^5)."""
    import dask
    import dask.array as da

    vis, starts, vb, n_per, voff, vlen = _blocks(ds, "visual")
    vconds = _strs(ds.visual_condition)
    group = da.arange(len(starts), chunks=1)  # block g of this array: the group's index
    v_rows = _group_rows(starts, n_per, vb, voff, [np.arange(n) for n in vlen])
    out = dict(adjust_chunks={"g": tuple(n_per)}, align_arrays=False, dtype=float, concatenate=True)
    if not has_token_span(ds):
        geo = da.blockwise(_geometry_block, "cgls", vis, "cgld", None, None, group, "g", v_rows, None, None, None,
                           new_axes={"s": 2}, meta=np.empty((0, 0, 0, 0)), **out)
        return geo[..., 0].compute(), None, None
    tok, _, tb, _, toff, tlen = _blocks(ds, "token")
    tconds = _strs(ds.token_condition)
    rows = text_rows(ds, cka_text)
    t_rows = _group_rows(starts, n_per, tb, toff, rows)
    all_rows = _group_rows(starts, n_per, tb, toff, [np.arange(n) for n in tlen])
    paired = tok[[tconds.index(label) for label in vconds]]  # the token span under each visual condition
    geo = da.blockwise(_geometry_block, "cgls", vis, "cgld", paired, "cgld", group, "g", v_rows, None, t_rows, None,
                       new_axes={"s": 2}, meta=np.empty((0, 0, 0, 0)), **out)
    er = da.blockwise(_text_er_block, "cgl", tok, "cgld", group, "g", all_rows, None, meta=np.empty((0, 0, 0)), **out)
    geo, er = dask.compute(geo, er)
    return geo[..., 0], geo[..., 1], er


def _group_rows(starts, n_per, bounds, offsets, rows) -> list[list[np.ndarray]]:
    """Per group g, per sample i of it: ``rows[i]`` (relative to the sample's offset) relative to the group's
    first row ``bounds[g]``, i.e. row indices into the group's block."""
    return [[rows[i] + int(offsets[i] - bounds[g]) for i in range(s, s + n_per[g])] for g, s in enumerate(starts)]


def _geometry_block(vblock, tblock, g, v_rows, t_rows) -> np.ndarray:
    """(1, n, 1, 2) [icc, cka] of the samples of group ``g`` (a 1-element array) under one condition and layer."""
    g = int(np.asarray(g).ravel()[0])
    got = _group_geometry(vblock, tblock, v_rows[g], None if t_rows is None else t_rows[g])
    return got[None, :, None, :]


def _text_er_block(tblock, g, rows) -> np.ndarray:
    """(1, n, 1) text-token effective rank of the samples of group ``g`` under one condition and layer."""
    g = int(np.asarray(g).ravel()[0])
    return _group_text_er(tblock, rows[g])[None, :, None]


def window_change(x: np.ndarray, layers, cliff: float, how: str) -> np.ndarray:
    """Per sample of ``x`` (sample, layer): mean over layers > cliff against mean over layers <= cliff,
    as ``how`` = 'difference' (after - before) or 'ratio' (after / before). ConfigError if a side is empty."""
    layers = np.asarray(layers)
    before, after = layers <= cliff, layers > cliff
    if not before.any() or not after.any():
        raise ConfigError(f"undefined: cliff layer {cliff} leaves no stored layer on one side "
                          f"(layers {layers.min()}..{layers.max()}); pass --cliff-layer to choose one")
    b, a = x[:, before].mean(axis=1), x[:, after].mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return a - b if how == "difference" else a / b


def _entry(x: np.ndarray, layers, cliff, how: str, p) -> dict | None:
    """{'layers', 'mean' (CI per layer), 'change' (CI over samples of the window change) or a note}."""
    ok = np.isfinite(x).all(axis=1)
    if ok.sum() < 2:
        return None
    ci = lambda v: stats.mean_ci(v, level=p.level, method=p.ci_method, n_resamples=p.n_resamples,  # noqa: E731
                                 seed=p.seed).to_dict()
    out = {"layers": [int(v) for v in layers], "n": int(ok.sum()), "mean": ci(x[ok])}
    if cliff is not None and np.isfinite(cliff):
        L = int(np.floor(cliff))
        out["cliff_layer"], out["change_kind"] = L, how
        try:
            ch = window_change(x[ok], layers, L, how)
        except ConfigError as err:
            out["change_note"] = str(err)
            return out
        fin = np.isfinite(ch)
        if fin.sum() >= 2:
            out["change"] = ci(ch[fin])
    return out


def compute(ds, p, ctx: Context) -> MetricResult | dict:
    """ICC and CKA per visual condition, text ER per condition: per layer with CIs, change at the cliff."""
    import xarray as xr

    if "visual_states" not in ds or ds.sizes.get("vtoken", 0) == 0:
        return {"skipped": "no visual span in the store"}
    cka_text = getattr(p, "cka_text", "question")
    if cka_text not in GROUPS:
        raise ConfigError(f"The 'cka_text' parameter must be one of {list(GROUPS)}. Got {cka_text!r} instead.")
    icc_v, cka_v, ter = per_sample(ds, cka_text)
    layers = [int(v) for v in ds.layer.values]
    vconds, samples = _strs(ds.visual_condition), _strs(ds.sample)
    status = np.asarray(ds.status.values) == 1  # (condition, sample)
    conds = _strs(ds.condition)
    vdone = status[[conds.index(c) for c in vconds]][..., None]
    icc_v = np.where(vdone, icc_v, np.nan)
    cliff = ctx.cliff_layer
    mode = ((ds.attrs.get("config") or {}).get("extract") or {}).get("visual", {}).get("mode", "all")
    out = {"visual_mode": mode, "cka_text": cka_text, "icc": {}, "cka": {}, "text_er": {}}
    coords = {"visual_condition": vconds, "sample": samples, "layer": layers}
    arrays = {"geometry_icc": xr.DataArray(icc_v, dims=tuple(coords), coords=coords)}
    for k, c in enumerate(vconds):
        e = _entry(icc_v[k], layers, cliff, "difference", p)
        if e:
            out["icc"][c] = e
    if cka_v is None:
        out["cka"] = out["text_er"] = {"skipped": NO_TOKEN_SPAN}
        return MetricResult(out, arrays)
    cka_v = np.where(vdone, cka_v, np.nan)
    ter = np.where(status[..., None], ter, np.nan)
    arrays["geometry_cka"] = xr.DataArray(cka_v, dims=tuple(coords), coords=coords)
    tcoords = {"token_condition": _strs(ds.token_condition), "sample": samples, "layer": layers}
    arrays["geometry_text_er"] = xr.DataArray(ter, dims=tuple(tcoords), coords=tcoords)
    for k, c in enumerate(vconds):
        e = _entry(cka_v[k], layers, cliff, "difference", p)
        if e:
            out["cka"][c] = e
    for k, c in enumerate(tcoords["token_condition"]):
        e = _entry(ter[k], layers, cliff, "ratio", p)
        if e:
            out["text_er"][c] = e
    return MetricResult(out, arrays)


def figure(s, out, ctx: Context):
    """ICC, CKA (visual vs text) and the text-token ER per layer, per visual condition -> geometry.png."""
    from gapcache.analyze.report import band, mark_cliff, pyplot, save_figure

    m = s["metrics"].get("geometry", {})
    if not m.get("icc"):
        return None
    vconds = list(m["icc"])
    panels = [("icc", "ICC (mean pairwise cosine, visual tokens)"),
              ("cka", f"CKA visual vs {m.get('cka_text', 'question')} tokens (debiased)"),
              ("text_er", "effective rank of every text token")]
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (key, title) in zip(axes, panels):
        per = m.get(key, {})
        if "skipped" in per:
            ax.text(0.5, 0.5, f"skipped:\n{per['skipped']}", ha="center", va="center", wrap=True, fontsize=7)
            ax.set(title=title)
            continue
        for c in vconds:
            if c in per:
                band(ax, per[c]["layers"], per[c]["mean"], c)
        mark_cliff(ax, ctx.cliff_layer)
        ax.set(xlabel="layer (stream entering)", title=title)
        ax.legend(fontsize=6)
    return save_figure(fig, out, "geometry")


def rows(s) -> list[tuple[str, str]]:
    """Under original (else the first condition): each quantity at the first and last layer, and its change
    at the cliff with the CI."""
    from gapcache.analyze.report import fmt_ci

    m = s["metrics"].get("geometry", {})
    out = []
    for key, name in (("icc", "ICC"), ("cka", f"CKA visual vs {m.get('cka_text')} tokens"),
                      ("text_er", "text-token ER")):
        per = m.get(key, {})
        if "skipped" in per:
            out.append((f"geometry {name}", f"skipped: {per['skipped']}"))
            continue
        c = REFERENCE if REFERENCE in per else next(iter(per), None)
        if c is None:
            continue
        e = per[c]
        est = np.asarray(e["mean"]["estimate"], dtype=float)
        out.append((f"{name} {c} at layer {e['layers'][0]} -> {e['layers'][-1]}",
                    f"{est[0]:.3f} -> {est[-1]:.3f} (n={e['n']})"))
        if "change" in e:
            what = "after - before" if e["change_kind"] == "difference" else "after / before"
            out.append((f"{name} {c} change ({what} L={e['cliff_layer']})", fmt_ci(e["change"])))
        elif "change_note" in e:
            out.append((f"{name} {c} change at the cliff", e["change_note"]))
    return out
