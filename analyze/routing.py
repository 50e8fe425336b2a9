"""The ``routing`` metric: MoE expert routing by modality and under blind / truncated inputs. No torch.

Reads the arrays ``extract.routing: true`` records (``route_load``, ``route_expert``; see
:mod:`gapcache.extract.routing`). Per condition, router layer and sample:

* ``jsd``: Jensen-Shannon divergence (base 2, in [0, 1]) between the expert-load distribution over the
  sample's visual positions and over its text positions, ``p_m = load[m] / sum(load[m])``;
* ``visual_share``: the share of experts that take mostly visual tokens: among the experts with at least
  one assignment in the sample, those with more visual than text assignments (raw counts, so it also
  follows the sample's mix of visual and text tokens; ``visual_token_share`` gives that mix);
* ``overlap`` (every condition but ``original``): the top-k overlap at the prediction site with
  ``original``, ``|topk_c ∩ topk_original| / k``.

Summary per condition: ``layers`` and the mean over samples with its sample-bootstrap CI per layer
(``jsd``, ``visual_share``, ``overlap``). Arrays: ``route_jsd``, ``route_visual_share``, ``route_overlap``
(condition, sample, route_layer). Skipped when the store has no routing.

Registration: ``register()`` appends :data:`METRIC` to the metric registry (not done at import; see the
module's note in the report of issue 14).
"""

from __future__ import annotations

import numpy as np
from gapcache.analyze import metrics, stats
from gapcache.analyze.metrics import Context, Metric, MetricResult
from gapcache.conditions import REFERENCE


def _ci(x, p):
    return stats.mean_ci(x, level=p.level, method=p.ci_method, n_resamples=p.n_resamples, seed=p.seed)


def jensen_shannon(a, b, axis=-1) -> np.ndarray:
    """JSD (base 2) between the distributions proportional to counts ``a`` and ``b`` along ``axis``;
    NaN where either has no mass."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sa, sb = a.sum(axis, keepdims=True), b.sum(axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p, q = a / sa, b / sb
        m = (p + q) / 2

        def kl(x):
            return np.where(x > 0, x * np.log2(np.where(x > 0, x, 1) / np.where(m > 0, m, 1)), 0.0).sum(axis)

        out = (kl(p) + kl(q)) / 2
    bad = (np.squeeze(sa, axis) <= 0) | (np.squeeze(sb, axis) <= 0)
    return np.where(bad, np.nan, np.clip(out, 0.0, 1.0))


def visual_expert_share(load_visual, load_text, axis=-1) -> np.ndarray:
    """Share of the experts with any assignment whose visual assignments outnumber their text ones."""
    v, t = np.asarray(load_visual, np.float64), np.asarray(load_text, np.float64)
    used = (v + t) > 0
    n = used.sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, ((v > t) & used).sum(axis) / n, np.nan)


def topk_overlap(a, b) -> np.ndarray:
    """|set(a) ∩ set(b)| / k over the last axis (expert ids, -1 = none: NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    hit = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1)
    bad = (a < 0).any(-1) | (b < 0).any(-1)
    return np.where(bad, np.nan, hit / a.shape[-1])


def has_routing(ds) -> bool:
    return "route_load" in ds.variables and "route_expert" in ds.variables


def compute(ds, p, ctx: Context) -> MetricResult:
    """JSD visual vs text load, share of mostly-visual experts, prediction-site top-k overlap with original."""
    from gapcache.analyze.pipeline import labelled

    if not has_routing(ds):
        return {"skipped": "the store has no MoE routing (extract.routing: false, or a model without experts)"}
    conds = [str(c) for c in ds.condition.values]
    modality = [str(m) for m in ds.modality.values]
    iv, it = modality.index("visual"), modality.index("text")
    load = ds.route_load.values.astype(np.float64)  # (condition, sample, route_layer, modality, expert)
    done = (ds.status.values == 1)[:, :, None] & (load >= 0).all(axis=(-1, -2))  # routed layers of done units
    jsd = np.where(done, jensen_shannon(load[..., iv, :], load[..., it, :]), np.nan)
    share = np.where(done, visual_expert_share(load[..., iv, :], load[..., it, :]), np.nan)
    n_vis, n_text = load[..., iv, :].sum(-1), load[..., it, :].sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        token_share = np.where(done, n_vis / (n_vis + n_text), np.nan)
    pred = [str(x) for x in ds.site.values].index("prediction")
    ids = ds.route_expert.values[:, :, pred]  # (condition, sample, route_layer, k)
    overlap = np.full(jsd.shape, np.nan)
    if REFERENCE in conds:
        o = conds.index(REFERENCE)
        both = done & done[o][None]
        overlap = np.where(both, topk_overlap(ids, ids[o][None]), np.nan)
        overlap[o] = np.nan
    layers = [int(x) for x in ds.route_layer.values]
    out = {"layers": layers, "jsd": {}, "visual_share": {}, "visual_token_share": {}, "overlap": {}}
    for k, c in enumerate(conds):
        for key, x in (("jsd", jsd), ("visual_share", share), ("visual_token_share", token_share),
                       ("overlap", overlap)):
            ok = np.isfinite(x[k]).all(axis=1)
            if ok.sum() >= 2:
                out[key][c] = _ci(x[k][ok], p).to_dict()
    dims = ("condition", "sample", "route_layer")
    arrays = {"route_jsd": labelled(ds, jsd, dims), "route_visual_share": labelled(ds, share, dims),
              "route_overlap": labelled(ds, overlap, dims)}
    return MetricResult(out, arrays)


def figure(s, out, ctx: Context):
    """JSD (visual vs text load), share of mostly-visual experts, top-k overlap with original, by layer."""
    from gapcache.analyze.report import band, pyplot, save_figure

    m = s["metrics"].get("routing", {})
    if not m.get("jsd"):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    x = m["layers"]
    for ax, key, ylabel in ((axes[0], "jsd", "JSD(visual, text load)"),
                            (axes[1], "visual_share", "share of mostly-visual experts"),
                            (axes[2], "overlap", "top-k overlap with original (prediction site)")):
        for c, ci in m.get(key, {}).items():
            band(ax, x, ci, c)
        ax.set_xlabel("decoder layer (router)")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_ylim(0, 1.02)
        if m.get(key):
            ax.legend(fontsize=6)
    fig.suptitle("MoE routing by modality, and under blind / truncated inputs", fontsize=9)
    return save_figure(fig, out, "routing")


def rows(s) -> list[tuple[str, str]]:
    """JSD and the mostly-visual share (original) at the first / last router layer; overlap per condition."""
    m = s["metrics"].get("routing", {})
    out = []
    if not m.get("jsd"):
        return out
    x = m["layers"]

    def ends(ci):
        est = np.asarray(ci["estimate"], float)
        return f"{est[0]:.3f} -> {est[-1]:.3f} (n={ci['n']})"

    ref = REFERENCE if REFERENCE in m["jsd"] else next(iter(m["jsd"]))
    out.append((f"routing JSD(visual, text load) {ref} at layer {x[0]} -> {x[-1]}", ends(m["jsd"][ref])))
    if ref in m["visual_share"]:
        out.append((f"routing share of mostly-visual experts {ref} at layer {x[0]} -> {x[-1]}",
                    ends(m["visual_share"][ref])))
    for c, ci in m.get("overlap", {}).items():
        est = np.asarray(ci["estimate"], float)
        out.append((f"routing top-k overlap with original at the prediction site, {c} (mean over layers)",
                    f"{np.nanmean(est):.3f} (n={ci['n']})"))
    return out


METRIC = Metric("routing", compute, figure, rows,
                "MoE routing: JSD of visual vs text expert load, mostly-visual experts, top-k overlap with original")


def register() -> Metric:
    """Append the routing metric to the registry (after every metric registered so far)."""
    return metrics.register(METRIC)
