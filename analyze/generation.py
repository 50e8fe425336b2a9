"""The ``generation`` metric: scored greedy generations (lmms-eval rules) per condition, beside forced choice.

Registered in the metric registry right after ``accuracy`` (by :mod:`gapcache.analyze.pipeline`). Each
condition's generations are scored with :func:`gapcache.analyze.scoring.score_store` (the task chosen
per sample from its dataset, every stored gold answer used). Summary:

* ``per_condition[c]``: mean score with its sample-bootstrap CI; ``tasks``: the tasks used;
* ``vs_original[c]``: mean(score_c - score_original) over the samples done in both, paired CI;
* ``truncation[strategy]``: ``layers`` (L), ``score`` (mean score per L, CI per L) and ``vs_original``
  (paired mean difference per L against the untruncated ``original`` run, CI per L), on the samples
  whose every truncation layer and the original are scored (``n``).

Array: ``generation_score`` (condition, sample). Skipped (``{"skipped": reason}``) when the store has no
generations. No torch.
"""

from __future__ import annotations

import numpy as np
from gapcache import conditions
from gapcache.analyze import stats
from gapcache.analyze.metrics import Context, MetricResult
from gapcache.conditions import REFERENCE


def _ci(x, p):
    return stats.mean_ci(x, level=p.level, method=p.ci_method, n_resamples=p.n_resamples, seed=p.seed)


def _diff(a, b, p):
    return stats.mean_diff_ci(a, b, level=p.level, method=p.ci_method, n_resamples=p.n_resamples, seed=p.seed)


def compute(ds, p, ctx: Context) -> MetricResult:
    """Generation scores per condition, each condition - original (paired), truncation curves on them."""
    from gapcache.analyze.scoring import has_generations, score_store

    if not has_generations(ds):
        return {"skipped": "the store has no generations (extract.generate.enabled: false)"}
    scores = score_store(ds)
    s = scores.values
    conds = [str(c) for c in ds.condition.values]
    out = {"tasks": list(scores.attrs["tasks"]), "per_condition": {}, "vs_original": {}, "truncation": {}}
    for k, c in enumerate(conds):
        ok = np.isfinite(s[k])
        if ok.sum() >= 2:
            out["per_condition"][c] = _ci(s[k][ok], p).to_dict()
    if REFERENCE in conds:
        o = conds.index(REFERENCE)
        for k, c in enumerate(conds):
            both = np.isfinite(s[k]) & np.isfinite(s[o])
            if c != REFERENCE and both.sum() >= 2:
                out["vs_original"][c] = _diff(s[k][both], s[o][both], p).to_dict()
        truncated = conditions.in_group(ds.condition_kind.values, conditions.TRUNCATION)
        strategies = [str(v) for v in ds.truncation_strategy.values]
        layers = [int(v) for v in ds.truncation_layer.values]
        for st in sorted({strategies[k] for k in range(len(conds)) if truncated[k]}):
            ks = sorted((k for k in range(len(conds)) if truncated[k] and strategies[k] == st), key=lambda k: layers[k])
            curve = s[ks].T  # (sample, L)
            keep = np.isfinite(curve).all(axis=1) & np.isfinite(s[o])
            if keep.sum() < 2:
                continue
            clean = np.repeat(s[o][keep][:, None], len(ks), axis=1)
            out["truncation"][st] = {"layers": [layers[k] for k in ks], "n": int(keep.sum()),
                                     "score": _ci(curve[keep], p).to_dict(),
                                     "vs_original": _diff(curve[keep], clean, p).to_dict()}
    return MetricResult(out, {"generation_score": scores})


def figure(s, out, ctx: Context):
    """Mean generation score per condition (bars) and per truncation layer (bands) -> generation.png."""
    from gapcache.analyze.report import band, bars_ci, pyplot, save_figure

    m = s["metrics"].get("generation", {})
    per, tr = m.get("per_condition", {}), m.get("truncation", {})
    if not per:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if tr else 1, figsize=(9 if tr else 7, 3.2), squeeze=False)
    ax = axes[0, 0]
    bars_ci(ax, per, "tab:green", "generation score")
    ax.set_title(f"Generation score ({', '.join(m.get('tasks', []))})")
    if tr:
        for st, v in tr.items():
            band(axes[0, 1], v["layers"], v["score"], st)
        axes[0, 1].set_xlabel("truncation layer L")
        axes[0, 1].set_ylabel("generation score")
        axes[0, 1].legend(fontsize=7)
    return save_figure(fig, out, "generation")


def rows(s) -> list[tuple[str, str]]:
    """Generation score per condition outside the truncation / patching groups, each - original (paired), and the truncation ends."""
    from gapcache.analyze.report import fmt_ci, shown_apart

    m = s["metrics"].get("generation", {})
    out = []
    for c, ci in m.get("per_condition", {}).items():
        if not shown_apart(c):
            out.append((f"generation score {c}", fmt_ci(ci)))
    for c, ci in m.get("vs_original", {}).items():
        if not shown_apart(c):
            out.append((f"generation score {c} - original (paired)", fmt_ci(ci)))
    for st, v in m.get("truncation", {}).items():
        d = v["vs_original"]
        out.append((f"generation truncation {st}: score - original at L={v['layers'][0]} -> L={v['layers'][-1]}",
                    f"{d['estimate'][0]:.3f} -> {d['estimate'][-1]:.3f} (n={v['n']})"))
    return out
