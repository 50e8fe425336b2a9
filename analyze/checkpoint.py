"""The seed's checkpoint report (seed: ``run_checkpoint_eval``; DESIGN.md, "Checkpoint report"), restated with
CIs over samples instead of point thresholds (issue 14, item 7). No torch.

Each criterion is an estimate with its CI and a threshold; its verdict (:func:`verdict`) is

* ``holds``: every value of the CI satisfies the criterion (``>``: low > threshold; ``<``: high < threshold);
* ``fails``: no value of it does (``>``: high <= threshold; ``<``: low >= threshold);
* ``undecided (CI straddles the threshold)``: otherwise;
* ``not available``: no estimate (the reason is given: no cliff, no truncation at it, no token span, ...).

A checkpoint holds when all its criteria hold, fails when one fails, and is undecided otherwise (not
available when one criterion is and none fails). The checkpoints, at the cliff layer L (``--cliff-layer``,
else the one ``evd`` found; a fractional cliff is floored, as in the ER ratio):

1. truncation at the cliff hurts hard questions and not easy ones: the paired accuracy drop
   original - truncated_<strategy>_L (forced choice, ``--strategy``), mean over the hard samples > 0.05 and
   over the easy samples < 0.01;
2. hard questions read the image deeper: EVD gap hard - easy > 0 (``evd.evd_gap``, the pipeline's rule for
   samples that never reach tau);
3. geometry after vs up to the cliff (layers > L against layers <= L, per sample, under original): visual ER
   ratio < 0.7, text-token ER ratio > 0.85, ICC change (after - before) > 0.05, CKA change > 0.05
   (gapcache.analyze.geometry_metric).

Layer labels: L is the store's (the stream entering layer L); the seed's hooks labelled outputs (its L is
our L + 1, docs/seed-compatibility.md). The seed's criteria do not say in which direction ICC and CKA
change; gapcache reads "change > 0.05" as an increase after the cliff.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

from gapcache import conditions
from gapcache.analyze import stats
from gapcache.analyze.metrics import Context, MetricResult
from gapcache.conditions import REFERENCE
from gapcache.errors import ConfigError, GapcacheError

HOLDS, FAILS, UNDECIDED, NOT_AVAILABLE = "holds", "fails", "undecided (CI straddles the threshold)", "not available"


def verdict(low, high, threshold: float, direction: str) -> str:
    """HOLDS, FAILS or UNDECIDED for the criterion ``estimate <direction> threshold`` given its CI [low, high]
    (module docstring); NOT_AVAILABLE when a bound is missing or NaN."""
    if direction not in (">", "<"):
        raise ConfigError(f"The 'direction' parameter of verdict must be '>' or '<'. Got {direction!r} instead.")
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return NOT_AVAILABLE
    if low > high:
        raise ConfigError(f"The CI of verdict must have low <= high. Got [{low}, {high}] instead.")
    if direction == ">":
        return HOLDS if low > threshold else FAILS if high <= threshold else UNDECIDED
    return HOLDS if high < threshold else FAILS if low >= threshold else UNDECIDED


def combine(verdicts) -> str:
    """A checkpoint's verdict from its criteria's (module docstring)."""
    v = list(verdicts)
    if FAILS in v:
        return FAILS
    if NOT_AVAILABLE in v:
        return NOT_AVAILABLE
    return HOLDS if all(x == HOLDS for x in v) else UNDECIDED


@dataclass(frozen=True)
class Criterion:
    key: str
    text: str  # what is estimated, for the report
    direction: str
    threshold: float


CHECKPOINTS = (
    ("1", "truncation at the cliff hurts hard questions, not easy ones",
     (Criterion("drop_hard", "accuracy drop original - truncated at L, hard", ">", 0.05),
      Criterion("drop_easy", "accuracy drop original - truncated at L, easy", "<", 0.01))),
    ("2", "hard questions read the image deeper than easy ones",
     (Criterion("evd_gap", "EVD gap hard - easy (layers)", ">", 0.0),)),
    ("3", "geometry after vs up to the cliff (original)",
     (Criterion("visual_er_ratio", "visual ER ratio after / before", "<", 0.7),
      Criterion("text_er_ratio", "text-token ER ratio after / before", ">", 0.85),
      Criterion("icc_change", "ICC change after - before", ">", 0.05),
      Criterion("cka_change", "CKA change after - before", ">", 0.05))),
)


def _ci(x, p) -> dict:
    return stats.mean_ci(x, level=p.level, method=p.ci_method, n_resamples=p.n_resamples, seed=p.seed).to_dict()


def _truncated_at(ds, layer: int, strategy: str) -> str | None:
    """The label of the truncation condition at ``layer`` with ``strategy`` (None if the store has none)."""
    kinds = [str(k) for k in ds.condition_kind.values]
    trunc = conditions.in_group(kinds, conditions.TRUNCATION)
    for k, c in enumerate(ds.condition.values):
        if trunc[k] and int(ds.truncation_layer.values[k]) == layer and str(ds.truncation_strategy.values[k]) == strategy:
            return str(c)
    return None


def _drops(ds, L: int, p) -> dict:
    """{'drop_hard': CI or reason, 'drop_easy': ...}: paired forced-choice accuracy drop at truncation L."""
    from gapcache.analyze.scoring import forced_choice_correct, gold_candidate_index

    label = _truncated_at(ds, L, p.strategy)
    conds = [str(c) for c in ds.condition.values]
    if label is None or REFERENCE not in conds:
        why = f"no truncated_{p.strategy} condition at layer {L} in the store" if label is None else "no original"
        return {"drop_hard": why, "drop_easy": why}
    gold = gold_candidate_index(ds.answer.values, ds.candidate.values)
    idx = [conds.index(REFERENCE), conds.index(label)]
    corr = forced_choice_correct(ds.candidate_logprob.isel(condition=idx).values, ds.candidate_mask.values, gold)
    drop = corr[0] - corr[1]  # (sample,): 1 = right under original, wrong truncated
    cats = np.array([str(c) for c in np.asarray(ds.category.values, dtype=object).ravel()])
    out = {}
    for cat in ("hard", "easy"):
        x = drop[(cats == cat) & np.isfinite(drop)]
        out[f"drop_{cat}"] = {**_ci(x, p), "condition": label} if x.size >= 2 else \
            f"fewer than 2 {cat} samples scored under original and {label}"
    return out


def _evd_gap(ds, ctx: Context, p):
    from gapcache.analyze import evd as evd_mod

    if "evd" not in ctx.arrays:
        return "needs the evd metric (its per-sample EVD)"
    e = np.asarray(ctx.arrays["evd"].values, float)  # (sample,) in store order
    cats = np.array([str(c) for c in np.asarray(ds.category.values, dtype=object).ravel()])
    try:
        g = evd_mod.evd_gap(e[cats == "hard"], e[cats == "easy"], "hard", "easy", never_reached=p.evd_never_reached,
                            layers=ctx.arrays["evd"].attrs.get("trunc_layers"), level=p.level, method=p.ci_method,
                            n_resamples=p.n_resamples, seed=p.seed)
    except GapcacheError as err:
        return str(err)
    return g.to_dict() if g.interval is not None else "fewer than 2 hard or easy samples"


def _geometry(ctx: Context, L: int, p) -> dict:
    """The four checkpoint-3 estimates from the rank and geometry arrays, under original."""
    from gapcache.analyze.geometry_metric import window_change

    spec = {"visual_er_ratio": ("visual_er", "visual_condition", "ratio", "rank"),
            "text_er_ratio": ("geometry_text_er", "token_condition", "ratio", "geometry (with the token span)"),
            "icc_change": ("geometry_icc", "visual_condition", "difference", "geometry"),
            "cka_change": ("geometry_cka", "visual_condition", "difference", "geometry (with the token span)")}
    out = {}
    for key, (name, dim, how, metric) in spec.items():
        if name not in ctx.arrays:
            out[key] = f"needs the {metric} metric"
            continue
        a = ctx.arrays[name]
        if REFERENCE not in [str(c) for c in a[dim].values]:
            out[key] = f"no {REFERENCE} in {name}"
            continue
        x = a.sel({dim: REFERENCE}).transpose("sample", "layer").values
        x = x[np.isfinite(x).all(axis=1)]
        try:
            ch = window_change(x, a.layer.values, L, how)
        except ConfigError as err:
            out[key] = str(err)
            continue
        ch = ch[np.isfinite(ch)]
        out[key] = _ci(ch, p) if ch.size >= 2 else "fewer than 2 samples"
    return out


def compute(ds, p, ctx: Context) -> MetricResult | dict:
    """Each checkpoint: its criteria with estimate, CI, threshold and verdict, and its own verdict."""
    cliff = ctx.cliff_layer
    if cliff is None or not np.isfinite(cliff):
        found = {c.key: "no cliff layer (pass --cliff-layer, or run evd on a store with truncation)"
                 for _, _, crit in CHECKPOINTS for c in crit}
        L = None
    else:
        L = int(np.floor(cliff))
        found = {**_drops(ds, L, p), "evd_gap": _evd_gap(ds, ctx, p), **_geometry(ctx, L, p)}
    out = {"cliff_layer": L, "strategy": p.strategy, "checkpoints": {}}
    for num, text, crit in CHECKPOINTS:
        entries = []
        for c in crit:
            est = found[c.key]
            e = {"key": c.key, "criterion": f"{c.text} {c.direction} {c.threshold:g}", "direction": c.direction,
                 "threshold": c.threshold}
            if isinstance(est, dict):
                e.update(estimate=est, verdict=verdict(est.get("low"), est.get("high"), c.threshold, c.direction))
            else:
                e.update(estimate=None, verdict=NOT_AVAILABLE, reason=est)
            entries.append(e)
        out["checkpoints"][num] = {"text": text, "criteria": entries, "verdict": combine(e["verdict"] for e in entries)}
    return MetricResult(out)


def _fmt(e: dict) -> str:
    from gapcache.analyze.report import fmt_ci

    return fmt_ci(e["estimate"]) if e["estimate"] else e.get("reason", "–")


def rows(s) -> list[tuple[str, str]]:
    """One row per checkpoint: its verdict and its criteria's."""
    m = s["metrics"].get("checkpoint", {})
    return [(f"checkpoint {num} ({cp['text']}, L={m.get('cliff_layer')})",
             f"{cp['verdict']}: " + "; ".join(f"{e['key']} {e['verdict'].split(' (')[0]}" for e in cp["criteria"]))
            for num, cp in m.get("checkpoints", {}).items()]


def section(s) -> str:
    """The report's checkpoint section: a table of every criterion with its estimate, CI and verdict."""
    m = s["metrics"].get("checkpoint", {})
    if "checkpoints" not in m:
        return ""
    esc = html.escape
    colour = {HOLDS: "#d7f0d7", FAILS: "#f6d5d5", UNDECIDED: "#f7ecc8", NOT_AVAILABLE: "#e8e8e8"}
    head = (f"<h3>Seed checkpoints (cliff L={esc(str(m['cliff_layer']))}, strategy {esc(m['strategy'])}; "
            "95% CIs over samples)</h3><table><tr><th>checkpoint</th><th>criterion</th>"
            "<th>estimate [CI]</th><th>verdict</th></tr>")
    body = []
    for num, cp in m["checkpoints"].items():
        for k, e in enumerate(cp["criteria"]):
            first = (f"<td rowspan='{len(cp['criteria'])}' style='background:{colour[cp['verdict']]}'>"
                     f"{esc(num)}. {esc(cp['text'])}: <b>{esc(cp['verdict'])}</b></td>") if k == 0 else ""
            body.append(f"<tr>{first}<td>{esc(e['criterion'])}</td><td>{esc(_fmt(e))}</td>"
                        f"<td style='background:{colour[e['verdict']]}'>{esc(e['verdict'])}</td></tr>")
    return head + "".join(body) + "</table>"


def figure(s, out, ctx: Context):
    """Each criterion's estimate and CI against its threshold, coloured by verdict -> checkpoints.png."""
    from gapcache.analyze.report import pyplot, save_figure

    m = s["metrics"].get("checkpoint", {})
    crit = [(num, e) for num, cp in m.get("checkpoints", {}).items() for e in cp["criteria"]]
    if not crit:
        return None
    colour = {HOLDS: "tab:green", FAILS: "tab:red", UNDECIDED: "tab:orange", NOT_AVAILABLE: "gray"}
    plt = pyplot()
    fig, axes = plt.subplots(len(crit), 1, figsize=(7, 0.75 * len(crit) + 0.8), squeeze=False)
    for ax, (num, e) in zip(axes[:, 0], crit):
        ax.axvline(e["threshold"], color="k", lw=1, ls="--")
        est = e["estimate"]
        if est:
            ax.errorbar([est["estimate"]], [0], xerr=[[est["estimate"] - est["low"]], [est["high"] - est["estimate"]]],
                        fmt="o", color=colour[e["verdict"]], capsize=4)
            lo, hi = min(est["low"], e["threshold"]), max(est["high"], e["threshold"])
            pad = 0.15 * (hi - lo) or 0.05
            ax.set_xlim(lo - pad, hi + pad)
        ax.set_yticks([])
        ax.set_title(f"{num}: {e['criterion']} -> {e['verdict']}", fontsize=7, loc="left")
        ax.tick_params(labelsize=6)
    return save_figure(fig, out, "checkpoints")
