"""Dual-channel single-layer patching from the store alone (issue 13, deliverables 6, 7 swap part, 8). No torch.

* ``patching``: per (channel, strategy, patched layer l) Delta_c(l) = s_clean - s_patched(c, l) (s = gold
  log-prob) and the accuracy drop acc_clean - acc_patched, each with paired sample-level CIs; per strategy run
  on both channels, the **crossing layer** and the **transfer window** with bootstrap CIs on both ends
  (:func:`gapcache.analyze.transfer.transfer_window`; its multiple-comparison rule, a simultaneous sup-t band
  over the layer grid, is :data:`gapcache.analyze.transfer.RULE`), on the log-prob Delta and on accuracy, over
  every sample and per category (hard / easy). The report leads with it (``lead=True``), the cliff a
  secondary row.
* ``swap``: per patched layer, the fraction of answers that follow the donor (predicted candidate = the
  model's answer to the sample's question on the donor's image, i.e. under the donor-image blind condition when
  the store has it; else the donor's gold) under visual ``swap``, with CIs, against chance and against the clean answers
  (:func:`gapcache.analyze.transfer.donor_following`).

**Deepstack** (Qwen3-VL): the store's root attribute ``deepstack_layers`` lists the decoder layers after which
the model adds visual features again. A visual-channel patch at l <= max(deepstack_layers) is followed by such an
add (the hooks act on layer l's input only), so the image re-enters the visual positions from the next layer
on; those layers are flagged (``deepstack`` in the summary, ``deepstack_readded`` per curve and transfer window,
a report row, a shaded band in the figure), never dropped: the rule is ``conditions.DEEPSTACK_RULE``.

The conditions are found by the registry's analysis group ``PATCHING`` and read by
``conditions.parse_label`` (``channel``, ``patch_layer``, ``strategy``); no condition name is spelled here.
A store without patched conditions gives ``{"skipped": ...}``.
"""

from __future__ import annotations

import numpy as np

from gapcache import conditions
from gapcache.analyze import metrics as registry
from gapcache.analyze import report, stats, transfer
from gapcache.analyze.metrics import Context, Metric, MetricResult
from gapcache.conditions import REFERENCE

CHANNELS = tuple(conditions.CHANNELS)  # ("visual", "text")
SWAP = "swap"


def patched_rows(ds) -> dict:
    """{(channel, strategy, patched layer): condition index} of the store's patched conditions."""
    rows = {}
    for k, inside in enumerate(conditions.in_group(ds.condition_kind.values, conditions.PATCHING)):
        if inside:
            c = conditions.parse_label(str(ds.condition.values[k]))
            rows[str(c.channel), str(c.strategy), int(c.patch_layer)] = k
    return rows


def recorded_deepstack(ds) -> list[int] | None:
    """The store's ``deepstack_layers`` (decoder layers followed by a deepstack add; [] = none), or None when the
    store does not record them (made before gapcache did)."""
    value = ds.attrs.get(conditions.DEEPSTACK_ATTR)
    return None if value is None else [int(x) for x in value]


def model_layers(ds) -> int:
    """The model's decoder layers (``model.n_layers``; else the deepest recorded hidden-state index)."""
    n = (ds.attrs.get("model") or {}).get("n_layers")
    return int(n) if n is not None else int(np.max(ds.layer.values))


def readds(ds, label: str) -> list[int]:
    """The deepstack layers whose add follows condition ``label``'s intervention ([] when none, or when the store
    does not record its deepstack layers): ``conditions.deepstack_readds``."""
    layers = recorded_deepstack(ds)
    if not layers:
        return []
    return list(conditions.deepstack_readds(conditions.parse_label(label), model_layers(ds), layers))


def deepstack_summary(ds, rows: dict) -> dict:
    """What the summary says about deepstack: the recorded layers, the rule, and per (channel, strategy) the
    patched layers an add follows, each with the adds ({"layers": None, "note": ...} for a store that does not
    record them)."""
    layers = recorded_deepstack(ds)
    if layers is None:
        return {"layers": None, "note": f"the store does not record '{conditions.DEEPSTACK_ATTR}' (made before "
                                        "gapcache recorded it): patched layers an add follows cannot be flagged"}
    conds = [str(c) for c in ds.condition.values]
    readded: dict = {}
    for (c, s, L), k in sorted(rows.items()):
        after = readds(ds, conds[k])
        if after:
            readded.setdefault(c, {}).setdefault(s, {})[str(L)] = after
    return {"layers": layers, "rule": conditions.DEEPSTACK_RULE, "readded": readded}


def _flagged(m: dict, channel: str = "visual") -> list[int]:
    """The patched layers of ``channel`` an add follows under any strategy of the summary ``m`` (sorted)."""
    per = (m.get("deepstack") or {}).get("readded", {}).get(channel, {})
    return sorted({int(L) for by_layer in per.values() for L in by_layer})


def cube(values, rows: dict, clean: int):
    """(channel, strategy, layer, sample) values[clean] - values[k] of each patched row k; NaN where the store
    has no such condition. Returns (cube, channels, strategies, layers), strategies in registry order."""
    channels = [c for c in CHANNELS if any(r[0] == c for r in rows)]
    strategies = [s for s in conditions.STRATEGIES if any(r[1] == s for r in rows)]
    layers = sorted({r[2] for r in rows})
    values = np.asarray(values, float)
    out = np.full((len(channels), len(strategies), len(layers), values.shape[1]), np.nan)
    for (c, s, L), k in rows.items():
        out[channels.index(c), strategies.index(s), layers.index(L)] = values[clean] - values[k]
    return out, channels, strategies, layers


def _correct(ds):
    from gapcache.analyze.scoring import forced_choice_correct, gold_candidate_index

    gold = gold_candidate_index(ds.answer.values, ds.candidate.values)
    return forced_choice_correct(ds.candidate_logprob.values, ds.candidate_mask.values, gold)  # (condition, sample)


def _kw(p) -> dict:
    return dict(level=p.level, method=p.ci_method, n_resamples=p.n_resamples, seed=p.seed)


def _curve(d, a, layers, p) -> dict:
    """One (channel, strategy) curve over the layers it was run at: mean Delta and accuracy drop (paired CIs)."""
    have = np.isfinite(d).any(0)
    d, a = d[:, have], a[:, have]
    keep = np.isfinite(d).all(1) & np.isfinite(a).all(1)
    if keep.sum() < 2:
        return {"skipped": f"{int(keep.sum())} samples with every layer done"}
    zero = np.zeros_like(d[keep])
    return {"layers": [int(x) for x, h in zip(layers, have) if h], "n": int(keep.sum()),
            "delta": stats.mean_diff_ci(d[keep], zero, **_kw(p)).to_dict(),
            "accuracy_drop": stats.mean_diff_ci(a[keep], zero, **_kw(p)).to_dict()}


def _windows(dv, dt, av, at, layers, cats, p) -> dict:
    """The transfer window of one strategy on its layers done on both channels (log-prob and accuracy)."""
    both = np.isfinite(dv).any(0) & np.isfinite(dt).any(0)
    grid = [int(x) for x, h in zip(layers, both) if h]
    dv, dt, av, at = (x[:, both] for x in (dv, dt, av, at))
    keep = np.isfinite(dv).all(1) & np.isfinite(dt).all(1) & np.isfinite(av).all(1) & np.isfinite(at).all(1)
    if keep.sum() < 2 or len(grid) < 1:
        return {"skipped": f"{int(keep.sum())} samples with both channels done at layers {grid}"}
    kw = dict(level=p.level, n_resamples=p.n_resamples, seed=p.seed)
    return {"logprob": transfer.transfer_window(dv[keep], dt[keep], grid, **kw),
            "accuracy": transfer.transfer_window(av[keep], at[keep], grid, **kw),
            "per_category": transfer.by_group(dv[keep], dt[keep], grid, cats[keep], **kw)}


def dual_channel(ds, strategy: str, measure: str = "logprob"):
    """(Delta_visual, Delta_text, layers) of one strategy on the layers run on both channels: (sample, layer)
    arrays, NaN where a sample was not done; ``measure`` 'logprob' (s_clean - s_patched) or 'accuracy'
    (correct_clean - correct_patched). DataError when the store lacks one of the two channels."""
    from gapcache.errors import DataError

    rows = {k: v for k, v in patched_rows(ds).items() if k[1] == strategy}
    conds = [str(c) for c in ds.condition.values]
    if {c for c, _, _ in rows} != set(CHANNELS) or REFERENCE not in conds:
        raise DataError(f"dual_channel needs {strategy!r} patching on both channels {list(CHANNELS)} and a "
                        f"{REFERENCE!r} condition. Got {sorted(rows)} instead.")
    values = ds.gold_logprob.values if measure == "logprob" else _correct(ds)
    delta, channels, _, layers = cube(values, rows, conds.index(REFERENCE))
    dv, dt = delta[channels.index("visual"), 0].T, delta[channels.index("text"), 0].T
    both = np.isfinite(dv).any(0) & np.isfinite(dt).any(0)
    return dv[:, both], dt[:, both], [int(x) for x, h in zip(layers, both) if h]


def windows_by(ds, groups, strategy: str = "zero", measure: str = "logprob", **kwargs) -> dict:
    """The transfer window of each group of samples (``groups``: (sample,) labels, e.g. question kinds), on the
    samples done at every layer of both channels: :func:`gapcache.analyze.transfer.by_group` of
    :func:`dual_channel` (``kwargs``: level, n_resamples, seed, min_samples)."""
    dv, dt, layers = dual_channel(ds, strategy, measure)
    keep = np.isfinite(dv).all(1) & np.isfinite(dt).all(1)
    return transfer.by_group(dv[keep], dt[keep], layers, np.asarray(groups, dtype=object)[keep], **kwargs)


def compute(ds, p, ctx: Context) -> MetricResult:
    """Dual-channel curves per (channel, strategy) and the transfer window per strategy run on both channels.
    Array: patch_delta (channel, patch_strategy, patch_layer, sample)."""
    from gapcache.analyze.pipeline import labelled, strs

    rows = patched_rows(ds)
    if not rows:
        return {"skipped": "no patched condition in the store"}
    conds = [str(c) for c in ds.condition.values]
    if REFERENCE not in conds:
        return {"skipped": f"no {REFERENCE!r} condition to compare the patched ones with"}
    clean = conds.index(REFERENCE)
    delta, channels, strategies, layers = cube(ds.gold_logprob.values, rows, clean)
    drop, *_ = cube(_correct(ds), rows, clean)
    out = {"reference": REFERENCE, "layers": layers, "channels": channels, "strategies": strategies,
           "rule": transfer.RULE, "curves": {}, "transfer": {}, "cliff_layer_secondary": ctx.cliff_layer}
    out["deepstack"] = deepstack_summary(ds, rows)
    readded = out["deepstack"].get("readded", {})
    for i, c in enumerate(channels):
        for j, s in enumerate(strategies):
            if np.isfinite(delta[i, j]).any():
                out["curves"].setdefault(c, {})[s] = curve = _curve(delta[i, j].T, drop[i, j].T, layers, p)
                if readded.get(c, {}).get(s):
                    curve["deepstack_readded"] = sorted(int(L) for L in readded[c][s])
    cats = strs(ds.category)
    if set(CHANNELS) <= set(channels):
        v, t = channels.index("visual"), channels.index("text")
        for j, s in enumerate(strategies):
            if np.isfinite(delta[v, j]).any() and np.isfinite(delta[t, j]).any():
                out["transfer"][s] = _windows(delta[v, j].T, delta[t, j].T, drop[v, j].T, drop[t, j].T, layers,
                                              cats, p)
                if readded.get("visual", {}).get(s):  # Delta_visual at these layers: removed until the next add
                    out["transfer"][s]["deepstack_readded"] = sorted(int(L) for L in readded["visual"][s])
    found = [s for s, w in out["transfer"].items() if "logprob" in w]
    out["headline"] = found[0] if found else None
    arr = labelled(ds, delta, ("channel", "patch_strategy", "patch_layer", "sample"), channel=channels,
                   patch_strategy=strategies, patch_layer=layers)
    return MetricResult(out, {"patch_delta": arr})


# ------------------------------------------------------------------------------------- swap


def swap_donor(ds) -> np.ndarray | None:
    """Each sample's swap donor index (-1: none): ``condition_params.<patching kind>.swap.donor``, else the store's
    ``donor`` array (the derangement blind_randomimage feeds, which swap reuses); None when it records neither."""
    params = (ds.attrs.get("condition_params") or {})
    for name, entry in conditions.KINDS.items():
        if entry.group != conditions.PATCHING:
            continue
        donor = ((params.get(name) or {}).get(SWAP) or {}).get("donor")
        if donor is not None:
            return np.asarray(donor, np.int64)
    return np.asarray(ds.donor.values, np.int64) if "donor" in ds else None


def donor_answer(ds, lp, mask, conds, gold, donor) -> tuple[np.ndarray, str]:
    """What following the donor means per sample, and where it comes from: the model's answer to *this* sample's
    question on the donor's image, i.e. its forced choice under the blind condition that feeds the same donors
    (the registry's donor-image kind, recorded with the same derangement); else the donor's gold
    (:func:`transfer.donor_gold`, right only where the donor asks the same question of its own image)."""
    store_donor = np.asarray(ds.donor.values, np.int64) if "donor" in ds else None
    for k, label in enumerate(conds):
        try:
            c = conditions.parse_label(label)
        except Exception:  # a label of no registered kind: not a donor-image condition
            continue
        if c.image_kind in conditions.NEEDS_DONOR and store_donor is not None and np.array_equal(store_donor, donor):
            return transfer.forced_choice(lp[k], mask), (
                f"the model's answer to the sample's own question on the donor's image (forced choice under {label})")
    return transfer.donor_gold(gold, donor), "the donor's gold (transfer.donor_gold)"


def swap(ds, p, ctx: Context) -> MetricResult:
    """Per visual-swap layer: the fraction of answers following the donor, vs chance and vs clean."""
    from gapcache.analyze.pipeline import strs
    from gapcache.analyze.scoring import gold_candidate_index

    rows = {L: k for (c, s, L), k in patched_rows(ds).items() if c == "visual" and s == SWAP}
    if not rows:
        return {"skipped": "no visual swap condition in the store"}
    conds = [str(c) for c in ds.condition.values]
    donor = swap_donor(ds)
    if REFERENCE not in conds or donor is None:
        return {"skipped": f"no {REFERENCE!r} condition or no recorded swap donor"}
    layers = sorted(rows)
    lp, mask = ds.candidate_logprob.values, ds.candidate_mask.values
    pred = transfer.forced_choice(lp[[rows[L] for L in layers]], mask)  # (layer, sample)
    clean = transfer.forced_choice(lp[conds.index(REFERENCE)], mask)
    gold = gold_candidate_index(ds.answer.values, ds.candidate.values)
    answer, source = donor_answer(ds, lp, mask, conds, gold, donor)
    out = {"layers": layers, "donor_answer": source,
           **transfer.donor_following(pred, clean, gold, answer, mask, **_kw(p)), "per_category": {}}
    flagged = [L for L in layers if readds(ds, conds[rows[L]])]
    if flagged:  # after these layers the model adds this sample's own image's deepstack features again
        out["deepstack_readded"] = flagged
    cats = strs(ds.category)
    for cat in sorted(set(cats.tolist()) - {""}):
        sel = cats == cat
        out["per_category"][cat] = transfer.donor_following(pred, clean, gold, np.where(sel, answer, -1), mask,
                                                            **_kw(p))
    return MetricResult(out)


# ------------------------------------------------------------------------------------- figures and rows


def _mark_window(ax, w: dict) -> None:
    start, cross = w.get("start"), w.get("crossing")
    if cross is not None:
        ax.axvline(cross, color="tab:red", lw=1.2, label=f"crossing L={cross}")
    if start is not None and cross is not None:
        ax.axvspan(start, cross, color="tab:purple", alpha=0.12, label=f"transfer window {start}..{cross}")
    elif start is not None:
        ax.axvline(start, color="tab:orange", lw=1.2, label=f"last visual-dominant L={start}")


def _dual_panels(ax0, ax1, m: dict, head: str) -> dict:
    """The headline strategy's two Delta curves and their text - visual difference with its band; its window."""
    w = m["transfer"][head]["logprob"]
    for c in CHANNELS:
        report.band(ax0, m["curves"][c][head]["layers"], m["curves"][c][head]["delta"], f"Delta_{c} ({head})")
    report.band(ax1, w["layers"], w["difference"], "Delta_text - Delta_visual (simultaneous band)")
    ax1.axhline(0, color="k", lw=0.8)
    ax0.set(title=f"Dual-channel patching ({head}; {int(100 * w['level'])}% paired CIs)", ylabel="Delta (log-prob)")
    ax1.set(title=f"text - visual, sup-t band; window {w['start']}..{w['crossing']} (None: not found)",
            ylabel="Delta_text - Delta_visual")
    return w


def _all_curves(ax, curves: dict) -> None:
    for c, per in curves.items():
        for name, v in per.items():
            if "delta" in v:
                ax.plot(v["layers"], v["delta"]["estimate"], ls="-" if c == "visual" else "--", marker="o", ms=3,
                        label=f"{c} {name}")
    ax.set(title="every strategy (solid: visual, dashed: text)", ylabel="mean Delta")


def figure(s, out, ctx: Context):
    """Delta_visual and Delta_text against l (paired CI bands) with the crossing and the window marked, the
    text - visual difference with its simultaneous band, and every strategy's curves -> transfer_window.png
    (a store with one channel only: the curves alone)."""
    m = s["metrics"].get("patching", {})
    head = m.get("headline")
    if not any("delta" in v for per in m.get("curves", {}).values() for v in per.values()):
        return None
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 3 if head else 1, figsize=(14, 3.6) if head else (6, 3.6), squeeze=False)
    axes = axes[0]
    w = _dual_panels(axes[0], axes[1], m, head) if head else {}
    _all_curves(axes[-1], m["curves"])
    flagged = _flagged(m)
    for ax in axes:
        _mark_window(ax, w)
        for n, L in enumerate(flagged):
            ax.axvspan(L - 0.3, L + 0.3, color="gold", alpha=0.25, lw=0,
                       label="visual patch followed by a deepstack add" if n == 0 else None)
        cliff = ctx.cliff_layer
        if cliff is not None and np.isfinite(cliff):
            ax.axvline(cliff, color="gray", ls=":", lw=1, label=f"truncation cliff L={cliff:g} (secondary)")
        ax.set_xlabel("patched layer l (input of decoder layer l)")
        ax.set_xticks(m["layers"])
        ax.legend(fontsize=6)
    return report.save_figure(fig, out, "transfer_window")


def _end(value, ci) -> str:
    """'3 [2, 4] (found in 97%)'; an end not found (or a CI bound beyond the grid) reads 'none'."""
    def name(x):
        return "none" if x is None or x == ci["not_found_as"] else str(x)

    return f"{name(value)} [{name(ci['low'])}, {name(ci['high'])}] (found in {ci['found_fraction']:.0%} of resamples)"


def window_text(w: dict) -> str:
    """'start S [lo, hi] -> crossing C [lo, hi] (n, rule)' of one transfer_window result."""
    return (f"start {_end(w['start'], w['start_ci'])} -> crossing {_end(w['crossing'], w['crossing_ci'])} "
            f"(n={w['n']}; FWER <= {1 - w['level']:.2g} over {len(w['layers'])} layers, sup-t band)")


def rows(s) -> list[tuple[str, str]]:
    """The transfer window of each strategy (the headline first), per category, the deepstack flag, the cliff
    (secondary), then each (channel, strategy) curve's Delta and accuracy drop at its first and last layer."""
    m = s["metrics"].get("patching", {})
    order = sorted(m.get("transfer", {}), key=lambda k: k != m.get("headline"))
    out = []
    for name in order:
        t = m["transfer"][name]
        if "logprob" not in t:
            continue
        out.append((f"transfer window ({name}, log-prob Delta)", window_text(t["logprob"])))
        out.append((f"transfer window ({name}, accuracy)", window_text(t["accuracy"])))
        for cat, w in t["per_category"].items():
            if "crossing" in w:
                out.append((f"transfer window ({name}, log-prob Delta) [{cat}]", window_text(w)))
    windows_found = bool(out)
    flagged = _flagged(m)
    if flagged:
        adds = (m.get("deepstack") or {}).get("layers", [])
        out.append(("deepstack re-adds the image (visual patches)",
                    f"after decoder layers {', '.join(map(str, adds))}: a visual patch at l = "
                    f"{', '.join(map(str, flagged))} removes the image only until the next add, so Delta_visual "
                    "there is the effect of a partial removal (numbers kept; conditions.DEEPSTACK_RULE)"))
    if windows_found:
        cliff = m.get("cliff_layer_secondary")
        out.append(("cliff layer (truncation; secondary to the transfer window)", "–" if cliff is None else f"{cliff:g}"))
    for channel, per in m.get("curves", {}).items():
        for name, v in per.items():
            if "delta" not in v:
                continue
            d, a, L = v["delta"]["estimate"], v["accuracy_drop"]["estimate"], v["layers"]
            flag = v.get("deepstack_readded")
            out.append((f"patching {channel} {name}: Delta at l={L[0]} -> l={L[-1]}",
                        f"{d[0]:.3f} -> {d[-1]:.3f}, accuracy drop {a[0]:+.3f} -> {a[-1]:+.3f} (n={v['n']})"
                        + (f"; deepstack re-adds the image after l = {', '.join(map(str, flag))}" if flag else "")))
    return out


def swap_figure(s, out, ctx: Context):
    """Fraction of answers following the donor per swap layer (CI band), chance and clean lines -> swap.png."""
    m = s["metrics"].get("swap", {})
    if "follows" not in m:
        return None
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    report.band(ax, m["layers"], m["follows"], f"all (n={m['n_informative']})")
    for cat, v in m.get("per_category", {}).items():
        if "follows" in v:
            report.band(ax, m["layers"], v["follows"], f"{cat} (n={v['n_informative']})")
    ax.axhline(m["chance"], color="k", ls="--", lw=0.8, label="chance (uniform guess)")
    ax.axhline(m["clean_follows"], color="gray", lw=0.8, label="clean answers = donor's gold")
    ax.set(xlabel="swap layer l", ylabel="answers = donor's gold", title="Counterfactual swap (visual channel)",
           ylim=(0, 1))
    ax.legend(fontsize=7)
    return report.save_figure(fig, out, "swap")


def swap_rows(s) -> list[tuple[str, str]]:
    m = s["metrics"].get("swap", {})
    if "follows" not in m:
        return []
    est, lo, hi = (np.asarray(m["follows"][k], float) for k in ("estimate", "low", "high"))
    readded = set(m.get("deepstack_readded", ()))
    return [(f"swap: answers following the donor at L={L}",
             f"{e:.3f} [{a:.3f}, {b:.3f}] (chance {m['chance']:.3f}, n={m['n_informative']})"
             + ("; deepstack re-adds the sample's own image after this layer" if L in readded else ""))
            for L, e, a, b in zip(m["layers"], est, lo, hi)]


registry.register(Metric("patching", compute, figure, rows,
                         "dual-channel patching curves, the crossing layer and the transfer window (report lead)",
                         lead=True))
registry.register(Metric("swap", swap, swap_figure, swap_rows,
                         "counterfactual swap: answers following the donor per patched layer, vs chance"))
