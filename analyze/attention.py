"""Attention flow and sparsity by layer (issue 14, item 4), from the summaries the forward recorded
(``attn_mass``, ``attn_visual``: ``extract.attention: true``; definitions in gapcache.extract.attention).
No torch.

Per condition, for the prediction site (and the instruction site and the question as a whole), per
layer, with sample-level CIs of the mean over samples (heads averaged within a sample): the attention
mass on the visual span, on the question, on template tokens and on the first token; over the visual
keys only: entropy, N_eff and top-k mass. Each condition minus ``original``, paired by sample. For
one layer (the cliff if known, else the middle one) every head of the prediction site under
``original``. The figure shows the seed's "U-shape" question: does the prediction site's attention
to the image come back in deep layers?
"""

from __future__ import annotations

import numpy as np
from gapcache.analyze import stats
from gapcache.analyze.metrics import Context, MetricResult
from gapcache.conditions import REFERENCE

QUANTITIES = ("visual_mass", "question_mass", "template_mass", "first_mass", "entropy", "n_eff", "top5", "top10",
              "top50")


def _strs(da) -> list[str]:
    return [str(v) for v in np.asarray(da.values, dtype=object).ravel()]


def _curves(xs: dict, layers: list, p, ref: dict | None = None) -> dict:
    """{key: one interval per layer over the samples finite there} for every (sample, layer) array of ``xs``:
    the mean, or with ``ref`` the paired mean difference xs[key] - ref[key]; every curve in one
    stats.column_cis call (columns = key x layer)."""
    keys = list(xs)
    a = np.concatenate([xs[k] for k in keys], axis=1)
    b = None if ref is None else np.concatenate([ref[k] for k in keys], axis=1)
    ci = stats.column_cis(a, b, level=p.level, method=p.ci_method, n_resamples=p.n_resamples, seed=p.seed)
    L = len(layers)
    return {k: {"layers": list(layers), **{f: v[i * L:(i + 1) * L] for f, v in ci.items()}} for i, k in enumerate(keys)}


def quantities(ds, query: str, loaded: dict | None = None) -> dict:
    """{quantity: (condition, sample, layer, head) float array} at the query row ``query``; ``loaded``: the
    store's attn_mass, attn_visual and status already read ({name: DataArray}, one read for every query)."""
    src = loaded or {k: ds[k] for k in ("attn_mass", "attn_visual", "status")}
    q = _strs(ds.attn_query).index(query)
    mass = np.asarray(src["attn_mass"].isel(attn_query=q).transpose("condition", "sample", "layer", "attn_head",
                                                                     "attn_target").values, float)
    vis = np.asarray(src["attn_visual"].isel(attn_query=q).transpose("condition", "sample", "layer", "attn_head",
                                                                      "attn_stat").values, float)
    targets, stat_names = _strs(ds.attn_target), _strs(ds.attn_stat)
    out = {f"{t}_mass": mass[..., targets.index(t)] for t in ("visual", "question", "template", "first")}
    out.update({s: vis[..., stat_names.index(s)] for s in ("entropy", "n_eff", "top5", "top10", "top50")})
    status = np.asarray(src["status"].values) == 1  # (condition, sample)
    return {k: np.where(status[:, :, None, None], v, np.nan) for k, v in out.items()}


def compute(ds, p, ctx: Context) -> MetricResult | dict:
    import xarray as xr

    if "attn_mass" not in ds:
        return {"skipped": "no attention summaries in the store (extract.attention: true records them)"}
    conds = _strs(ds.condition)
    all_layers = [int(x) for x in ds.layer.values]
    out = {"queries": {}}
    arrays = {}
    loaded = {k: ds[k].load() for k in ("attn_mass", "attn_visual", "status")}  # one read for every query
    for query in _strs(ds.attn_query):
        Q = quantities(ds, query, loaded)
        head_mean = {k: v.mean(axis=-1) for k, v in Q.items()}  # NaN stays NaN (every head is NaN together)
        keep = [li for li in range(len(all_layers)) if np.isfinite(Q["visual_mass"][:, :, li]).any()]
        layers = [all_layers[li] for li in keep]
        hm = {k: v[:, :, keep] for k, v in head_mean.items()}  # (condition, sample, layer)
        entry = {"layers": layers, "per_condition": {}, "vs_original": {}}
        curves = _curves({(c, name): hm[name][k] for k, c in enumerate(conds) for name in QUANTITIES}, layers, p)
        for (c, name), curve in curves.items():
            entry["per_condition"].setdefault(c, {})[name] = curve
        if REFERENCE in conds:
            o = conds.index(REFERENCE)
            pairs = [(k, c, name) for k, c in enumerate(conds) if c != REFERENCE
                     for name in ("visual_mass", "entropy", "n_eff")]
            diffs = _curves({(c, name): hm[name][k] for k, c, name in pairs}, layers, p,
                            ref={(c, name): hm[name][o] for _, c, name in pairs}) if pairs else {}
            for (c, name), curve in diffs.items():
                entry["vs_original"].setdefault(c, {})[name] = curve
        if query == "prediction" and layers:
            chosen = int(ctx.cliff_layer) if ctx.cliff_layer is not None and int(ctx.cliff_layer) in layers \
                else layers[len(layers) // 2]
            c0 = conds.index(REFERENCE) if REFERENCE in conds else 0
            x = Q["visual_mass"][c0][:, all_layers.index(chosen)]  # (sample, head)
            heads = [int(h) for h in ds.attn_head.values]
            entry["per_head"] = {"layer": chosen, "condition": conds[c0], "heads": heads,
                                 "visual_mass": _curves({0: x}, heads, p)[0]}
        out["queries"][query] = entry
        arrays[f"attention_{query}"] = xr.DataArray(
            np.stack([hm[n] for n in QUANTITIES]), dims=("attention_quantity", "condition", "sample", "layer"),
            coords={"attention_quantity": list(QUANTITIES), "condition": conds,
                    "sample": _strs(ds.sample), "layer": layers})
    return MetricResult(out, arrays)


def figure(s, out, ctx: Context):
    """Visual mass and visual N_eff at the prediction site per layer, per condition (the U-shape question;
    truncation: drop only, no patched condition: those are in the summary), per head at the chosen layer
    -> attention_flow.png."""
    from gapcache import conditions
    from gapcache.analyze.report import band, mark_cliff, pyplot, save_figure

    m = s["metrics"].get("attention", {})
    entry = m.get("queries", {}).get("prediction") if isinstance(m, dict) else None
    if not entry or not entry.get("layers"):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for c, v in entry["per_condition"].items():
        if conditions.label_in_group(c, conditions.TRUNCATION) and not c.startswith("truncated_drop"):
            continue
        if conditions.label_in_group(c, conditions.PATCHING):  # several per layer: unreadable in one panel
            continue
        for ax, name in zip(axes[:2], ("visual_mass", "n_eff")):
            ci = v[name]
            if all(e is not None for e in ci["estimate"]):
                band(ax, ci["layers"], ci, c)
    for ax, name in zip(axes[:2], ("attention mass on the image", "N_eff over visual keys")):
        mark_cliff(ax, ctx.cliff_layer)
        ax.set(xlabel="layer", ylabel=name, title=f"prediction site: {name}")
    axes[0].legend(fontsize=6)
    ph = entry.get("per_head")
    if ph:
        est = np.asarray([np.nan if e is None else e for e in ph["visual_mass"]["estimate"]], float)
        axes[2].bar(ph["heads"], est)
        axes[2].set(xlabel="head", ylabel="mass on the image", title=f"per head, layer {ph['layer']} ({ph['condition']})")
    return save_figure(fig, out, "attention_flow")


def rows(s) -> list[tuple[str, str]]:
    """Prediction-site visual mass under original: first, minimum and last layer (the U-shape)."""
    entry = s["metrics"].get("attention", {}).get("queries", {}).get("prediction")
    if not entry or REFERENCE not in entry.get("per_condition", {}):
        return []
    ci = entry["per_condition"][REFERENCE]["visual_mass"]
    est = np.asarray([np.nan if e is None else e for e in ci["estimate"]], float)
    if not np.isfinite(est).any():
        return []
    lo = int(np.nanargmin(est))
    L = ci["layers"]
    return [("attention mass on the image at the prediction site (original)",
             f"layer {L[0]} {est[0]:.3f}, min at layer {L[lo]} {est[lo]:.3f}, layer {L[-1]} {est[-1]:.3f}")]
