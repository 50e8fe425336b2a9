"""Soft truncation and window masking, from the store alone (issue 13, deliverable 7). No torch.

* ``soft_truncation``: per truncation strategy, accuracy and mean Delta(L) = s_clean - s_trunc(L) with CIs,
  and the paired difference of each strategy from ``zero`` at every L (Delta_s - Delta_zero =
  s_zero - s_s, and accuracy_s - accuracy_zero), paired by sample, bootstrap CIs: does zeroing hurt through
  content loss (soft strategies hurt as much) or through distribution shock (they hurt less)?
* ``window``: per window condition (strategy, [a, b]), accuracy with its CI, accuracy - original (paired) and
  mean Delta = s_clean - s_window: does a deep window still re-read the image? A state-changing window that a
  deepstack add follows (b <= max of the store's ``deepstack_layers``, Qwen3-VL) is flagged
  (``deepstack_readded``: the image comes back after it; ``conditions.DEEPSTACK_RULE``).

Both are registered metrics (figure ``soft_truncation.png`` / ``window.png``, report rows); a store without
such conditions gives ``{"skipped": ...}``.
"""

from __future__ import annotations

import numpy as np

from gapcache import conditions
from gapcache.analyze import evd as evd_mod
from gapcache.analyze import metrics as registry
from gapcache.analyze import report
from gapcache.analyze import stats
from gapcache.analyze.metrics import Context, Metric, MetricResult

#: the strategy every other truncation strategy is compared with
REFERENCE = "zero"


def _ci(x, p):
    return stats.mean_ci(x, level=p.level, method=p.ci_method, n_resamples=p.n_resamples, seed=p.seed).to_dict()


def _diff(a, b, p):
    return stats.mean_diff_ci(a, b, level=p.level, method=p.ci_method, n_resamples=p.n_resamples,
                              seed=p.seed).to_dict()


def _correct(ds):
    from gapcache.analyze.scoring import forced_choice_correct, gold_candidate_index

    gold = gold_candidate_index(ds.answer.values, ds.candidate.values)
    return forced_choice_correct(ds.candidate_logprob.values, ds.candidate_mask.values, gold)  # (condition, sample)


def _clean_label(ds) -> str | None:
    kinds = [str(k) for k in ds.condition_kind.values]
    for k, c in zip(kinds, ds.condition.values):
        if k in conditions.kinds_in_group(conditions.CLEAN):
            return str(c)
    return None


def soft_truncation(ds, p, ctx: Context) -> MetricResult:
    """Per strategy: accuracy and mean Delta per L, and the paired difference from ``zero``.
    Array: soft_delta_minus_zero (strategy, trunc_layer, sample)."""
    from gapcache.analyze.pipeline import labelled

    kinds = ds.condition_kind.values
    if not any(conditions.in_group(kinds, conditions.TRUNCATION)):
        return {"skipped": "no truncated condition in the store"}
    delta = evd_mod.truncation_deltas(ds.gold_logprob.load())  # (strategy, layer, sample)
    strategies = [str(s) for s in delta.strategy.values]
    soft = [s for s in strategies if s in conditions.STRATEGIES and conditions.STRATEGIES[s].soft]
    if not soft:
        return {"skipped": f"no soft-truncation strategy in the store (strategies {strategies})"}
    if REFERENCE not in strategies:
        return {"skipped": f"no '{REFERENCE}' truncation to compare the soft strategies with"}
    layers = [int(x) for x in delta.layer.values]
    correct = _correct(ds)
    row = {}  # (strategy, L) -> condition index
    for k, in_trunc in enumerate(conditions.in_group(kinds, conditions.TRUNCATION)):
        if in_trunc:
            row[str(ds.truncation_strategy.values[k]), int(ds.truncation_layer.values[k])] = k
    clean = _clean_label(ds)
    conds = [str(c) for c in ds.condition.values]

    def acc(s):  # (sample, layer) correctness
        return np.stack([correct[row[s, L]] if (s, L) in row else np.full(correct.shape[1], np.nan)
                         for L in layers], axis=1)

    ref_d = delta.sel(strategy=REFERENCE).transpose("sample", "layer").values
    ref_a = acc(REFERENCE)
    out = {"reference": REFERENCE, "layers": layers, "strategies": {}}
    if clean is not None:
        c = correct[conds.index(clean)]
        out["clean_accuracy"] = float(np.nanmean(c)) if np.isfinite(c).any() else None
    diffs = np.full((len(strategies), len(layers), delta.sizes["sample"]), np.nan)
    for j, s in enumerate(strategies):
        d, a = delta.sel(strategy=s).transpose("sample", "layer").values, acc(s)
        keep = np.isfinite(d).all(1) & np.isfinite(a).all(1) & np.isfinite(ref_d).all(1) & np.isfinite(ref_a).all(1)
        diffs[j] = (d - ref_d).T
        if keep.sum() < 2:
            out["strategies"][s] = {"skipped": f"{int(keep.sum())} samples with every L of {s} and {REFERENCE}"}
            continue
        entry = {"n": int(keep.sum()), "soft": s in soft, "mean_delta": _ci(d[keep], p), "accuracy": _ci(a[keep], p)}
        if s != REFERENCE:
            entry["delta_minus_zero"] = _diff(d[keep], ref_d[keep], p)
            entry["accuracy_minus_zero"] = _diff(a[keep], ref_a[keep], p)
        out["strategies"][s] = entry
    arr = labelled(ds, diffs, ("strategy", "trunc_layer", "sample"), strategy=strategies, trunc_layer=layers)
    return MetricResult(out, {"soft_delta_minus_zero": arr})


def window(ds, p, ctx: Context) -> MetricResult:
    """Per window condition: accuracy, accuracy - original (paired) and mean Delta, with CIs."""
    kinds = ds.condition_kind.values
    from gapcache.analyze.patching import readds

    which = np.flatnonzero(conditions.in_group(kinds, conditions.WINDOW))
    clean = _clean_label(ds)
    if not len(which):
        return {"skipped": "no window condition in the store"}
    if clean is None:
        return {"skipped": "no clean condition to compare the windows with"}
    correct, gold = _correct(ds), ds.gold_logprob.values
    conds = [str(c) for c in ds.condition.values]
    o = conds.index(clean)
    out = {"reference": clean, "windows": {}}
    for k in which:
        c = conditions.parse_label(conds[k])
        both = np.isfinite(correct[k]) & np.isfinite(correct[o]) & np.isfinite(gold[k]) & np.isfinite(gold[o])
        if both.sum() < 2:
            out["windows"][conds[k]] = {"skipped": f"{int(both.sum())} samples done in both"}
            continue
        out["windows"][conds[k]] = entry = {
            "strategy": c.strategy, "window": [c.window_start, c.window_end], "n": int(both.sum()),
            "accuracy": _ci(correct[k][both], p), "accuracy_minus_original": _diff(correct[k][both], correct[o][both], p),
            "mean_delta": _diff(gold[o][both], gold[k][both], p)}
        after = readds(ds, conds[k])
        if after:  # a deepstack add after the window's last layer brings the image back (conditions.DEEPSTACK_RULE)
            entry["deepstack_readded"] = after
    return MetricResult(out)


# ------------------------------------------------------------------------------------- figures and rows
def fig_soft(s, out, ctx: Context):
    """Accuracy and mean Delta against L for every strategy, and each one's paired difference from zero
    -> soft_truncation.png."""
    m = s["metrics"].get("soft_truncation", {})
    entries = {k: v for k, v in m.get("strategies", {}).items() if "mean_delta" in v}
    if not entries:
        return None
    plt = report.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    L = m["layers"]
    for name, v in entries.items():
        report.band(axes[0, 0], L, v["mean_delta"], name)
        report.band(axes[0, 1], L, v["accuracy"], name)
        if "delta_minus_zero" in v:
            report.band(axes[1, 0], L, v["delta_minus_zero"], name)
            report.band(axes[1, 1], L, v["accuracy_minus_zero"], name)
    if m.get("clean_accuracy") is not None:
        axes[0, 1].axhline(m["clean_accuracy"], color="gray", lw=0.8)
    for ax in axes[1]:
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("truncation layer L")
    axes[0, 0].set(ylabel="mean Delta (log-prob)", title="Delta(L) = s_clean - s_trunc(L)")
    axes[0, 1].set(ylabel="accuracy", title="accuracy (gray: original)")
    axes[1, 0].set(ylabel="Delta_s - Delta_zero", title="paired difference from zero (Delta)")
    axes[1, 1].set(ylabel="acc_s - acc_zero", title="paired difference from zero (accuracy)")
    for ax in axes.ravel():
        report.mark_cliff(ax, ctx.cliff_layer)
        ax.legend(fontsize=7)
    return report.save_figure(fig, out, "soft_truncation")


def fig_window(s, out, ctx: Context):
    """Accuracy - original per window, with paired CIs -> window.png."""
    w = {k: v for k, v in s["metrics"].get("window", {}).get("windows", {}).items() if "accuracy" in v}
    if not w:
        return None
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(w) + 2), 3.2))
    labels = list(w)
    est = np.array([w[k]["accuracy_minus_original"]["estimate"] for k in labels], float)
    lo = np.array([w[k]["accuracy_minus_original"]["low"] for k in labels], float)
    hi = np.array([w[k]["accuracy_minus_original"]["high"] for k in labels], float)
    ax.errorbar(range(len(labels)), est, yerr=[est - lo, hi - est], fmt="o", capsize=3)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="accuracy - original (paired)", title="window masking")
    return report.save_figure(fig, out, "window")


def rows_soft(s) -> list[tuple[str, str]]:
    m = s["metrics"].get("soft_truncation", {})
    rows = []
    for name, v in m.get("strategies", {}).items():
        if "accuracy_minus_zero" in v:
            est = np.asarray(v["accuracy_minus_zero"]["estimate"], float)
            rows.append((f"soft {name} - zero: accuracy at L={m['layers'][0]} -> L={m['layers'][-1]} (paired)",
                         f"{est[0]:+.3f} -> {est[-1]:+.3f} (n={v['n']})"))
    return rows


def rows_window(s) -> list[tuple[str, str]]:
    def note(v):
        after = v.get("deepstack_readded")
        return f"; deepstack re-adds the image after layer(s) {', '.join(map(str, after))}" if after else ""

    return [(f"window {k}: accuracy - original (paired)", report.fmt_ci(v["accuracy_minus_original"]) + note(v))
            for k, v in s["metrics"].get("window", {}).get("windows", {}).items() if "accuracy_minus_original" in v]


registry.register(Metric("soft_truncation", soft_truncation, fig_soft, rows_soft,
                         "each truncation strategy's accuracy and Delta(L), and its paired difference from zero"))
registry.register(Metric("window", window, fig_window, rows_window,
                         "accuracy per window-masking condition, and its paired difference from original"))
