"""The crossing layer and the transfer window of dual-channel patching, and swap donor-following. numpy only.

Pure functions of per-sample arrays (issue 13, deliverables 6 and 7; DESIGN.md "Single-layer patching, two
channels"); :mod:`gapcache.analyze.patching` reads them out of a store. With ``l`` a patched layer (the input
of decoder layer l corrupted on one channel only) and s the gold-answer log-prob::

    Delta_c(l) = s_clean - s_patched(c, l)                     per sample, c in {visual, text}
    d(l)       = Delta_text(l) - Delta_visual(l)                per sample (paired: the same samples)

**Multiple-comparison rule** (:data:`RULE`): one *simultaneous* band over the whole layer grid, the sup-t
band (Montiel Olea & Plagborg-Moller 2019, "Simultaneous confidence bands"), by the sample bootstrap:
se(l) = sd_i(d_i(l)) / sqrt(n) (ddof 1); over B resamples of the samples (multinomial weights, seeded),
T*_b = max_l |mean*_b(l) - mean(l)| / se(l) (layers with se = 0 left out of the max); c = the ``level``
quantile of T*; band(l) = mean(l) +- c se(l). The band covers every layer's true mean at once with
probability ``level``, so the chance that *any* layer is declared significant when no layer differs (the
family-wise error over layers) is at most 1 - ``level`` (asymptotically; a test simulates it). Significant
at l: text larger iff low(l) > 0, visual larger iff high(l) < 0.

* **crossing layer**: the first layer from which d stays significantly > 0, i.e. the first l with
  low(l') > 0 for every l' >= l of the grid (None: the last layer is not significant);
* **transfer window** [start, end]: start = the last layer where Delta_visual - Delta_text is
  significantly > 0 (high(l) < 0; None: the visual channel never dominates), end = the crossing layer.
  The layers strictly inside are where neither channel's Delta is significantly larger.

**CIs of both ends**: the same B resamples, the whole rule rerun on each (mean*, se* of the resample,
band mean* +- c se*, crossing and start found again); percentile interval of the B values on the grid
(``np.quantile(..., method='inverted_cdf')``: always a grid layer). A resample where an end is not found
counts as one step beyond the grid (crossing: last layer + 1, start: first layer - 1; ``not_found_as``)
and ``found_fraction`` says how often it was found. The critical value c is calibrated once on the full
sample and reused in every resample (recalibrating it would need a nested bootstrap, B x B resamples).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gapcache.analyze import stats
from gapcache.errors import DataError

RULE = ("simultaneous sup-t band over the layer grid by the sample bootstrap (Montiel Olea & Plagborg-Moller "
        "2019): band(l) = mean(l) +- c se(l), se(l) = sd(l)/sqrt(n), c = the level quantile of "
        "max_l |mean*(l) - mean(l)| / se(l) over the resamples; a layer is significant when the band excludes 0, "
        "so the family-wise error over the layers is at most 1 - level")


@dataclasses.dataclass(frozen=True)
class Band:
    """A simultaneous band over layers: per-layer ``mean``, ``se``, ``low``, ``high`` (arrays over layers),
    the critical value ``critical`` (c) and the resample weights it was calibrated on ((B, n), each row sums
    to 1), kept so that the ends' bootstrap reuses the same resamples."""

    mean: np.ndarray
    se: np.ndarray
    low: np.ndarray
    high: np.ndarray
    critical: float
    weights: np.ndarray = dataclasses.field(repr=False)


def resample_weights(n: int, n_resamples: int, seed: int | None) -> np.ndarray:
    """(B, n) bootstrap weights: row b = the counts of a resample of n samples with replacement, / n."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples) / n


def _se(mean, meansq, n):
    """Standard error of the mean (ddof 1) from the (weighted) mean and mean of squares."""
    var = np.clip(meansq - mean**2, 0, None) * n / (n - 1)
    return np.sqrt(var / n)


def sup_t_band(d, *, level: float = 0.95, n_resamples: int = 1999, seed: int | None = 0) -> Band:
    """The simultaneous sup-t band of mean_i d_i(l) over every layer l (module docstring; ``d`` (sample, layer))."""
    d = _matrix(d, "d", "sup_t_band")
    level = stats.check_level(level, "sup_t_band")
    n = len(d)
    mean = d.mean(0)
    se = d.std(0, ddof=1) / np.sqrt(n)
    w = resample_weights(n, n_resamples, seed)
    boot = w @ d  # (B, layer)
    t = np.divide(np.abs(boot - mean), se, out=np.zeros_like(boot), where=se > 0)
    c = float(np.quantile(t.max(axis=1), level))
    return Band(mean, se, mean - c * se, mean + c * se, c, w)


def _matrix(d, name, func) -> np.ndarray:
    d = np.asarray(d, dtype=float)
    if d.ndim != 2 or len(d) < 2 or not np.isfinite(d).all():
        raise DataError(f"The '{name}' parameter of {func} must be a finite (sample, layer) array with >= 2 samples. "
                        f"Got shape {d.shape} with {int((~np.isfinite(d)).sum())} non-finite values instead; drop "
                        "the samples missing at some layer first.")
    return d


def crossing_index(sig_text) -> np.ndarray:
    """Per row of ``sig_text`` (..., layer) bool: the first index from which every later entry is True; -1: none."""
    sig = np.asarray(sig_text, bool)
    stays = np.logical_and.accumulate(sig[..., ::-1], axis=-1)[..., ::-1]
    return np.where(stays.any(-1), np.argmax(stays, axis=-1), -1)


def last_index(sig_visual) -> np.ndarray:
    """Per row of ``sig_visual`` (..., layer) bool: the last True index; -1: none."""
    sig = np.asarray(sig_visual, bool)
    return np.where(sig.any(-1), sig.shape[-1] - 1 - np.argmax(sig[..., ::-1], axis=-1), -1)


def _grid(layers, idx, not_found):
    layers = np.asarray(layers)
    return np.where(idx >= 0, layers[np.clip(idx, 0, None)], not_found)


def _end_ci(values, found, level, not_found) -> dict:
    a = (1 - level) / 2
    lo, hi = np.quantile(values, [a, 1 - a], method="inverted_cdf")
    return {"low": int(lo), "high": int(hi), "found_fraction": float(np.mean(found)), "not_found_as": int(not_found)}


def transfer_window(delta_visual, delta_text, layers, *, level: float = 0.95, n_resamples: int = 1999,
                    seed: int | None = 0) -> dict:
    """Crossing layer and transfer window of two paired Delta curves, with bootstrap CIs of both ends.

    ``delta_visual``, ``delta_text``: (sample, layer) Delta_c(l) of the same samples; ``layers`` the increasing
    patched-layer grid. Returns a JSON-ready dict: ``layers``, ``n``, ``difference`` (the text - visual mean per
    layer with its simultaneous band: estimate/low/high, ``critical``), ``significant_text`` /
    ``significant_visual`` (per layer), ``crossing`` / ``start`` (a layer or None) and ``crossing_ci`` /
    ``start_ci`` (module docstring), ``window`` ([start, crossing]), ``rule``, ``level``, ``n_resamples``, ``seed``.
    """
    dv, dt = _matrix(delta_visual, "delta_visual", "transfer_window"), _matrix(delta_text, "delta_text",
                                                                                "transfer_window")
    layers = np.asarray(layers)
    if dv.shape != dt.shape or layers.shape != (dv.shape[1],) or np.any(np.diff(layers) <= 0):
        raise DataError(f"transfer_window needs delta_visual and delta_text of one (sample, layer) shape and an "
                        f"increasing layer grid of that many layers. Got {dv.shape}, {dt.shape} and layers "
                        f"{layers.tolist()} instead.")
    d = dt - dv
    band = sup_t_band(d, level=level, n_resamples=n_resamples, seed=seed)
    sig_t, sig_v = band.low > 0, band.high < 0
    cross, start = int(crossing_index(sig_t)), int(last_index(sig_v))
    # the whole rule again on every resample (the same resamples, c kept)
    n, w = len(d), band.weights
    mean_b = w @ d
    se_b = _se(mean_b, w @ d**2, n)
    low_b, high_b = mean_b - band.critical * se_b, mean_b + band.critical * se_b
    cross_b, start_b = crossing_index(low_b > 0), last_index(high_b < 0)
    above, below = int(layers[-1]) + 1, int(layers[0]) - 1
    crossing = None if cross < 0 else int(layers[cross])
    first = None if start < 0 else int(layers[start])
    return stats.jsonable({
        "layers": layers.astype(int).tolist(), "n": n, "rule": RULE, "level": level, "n_resamples": n_resamples,
        "seed": seed,
        "difference": {"statistic": "mean(Delta_text - Delta_visual)", "estimate": band.mean, "low": band.low,
                       "high": band.high, "se": band.se, "critical": band.critical, "simultaneous": True},
        "significant_text": sig_t, "significant_visual": sig_v,
        "crossing": crossing, "start": first, "window": [first, crossing],
        "crossing_ci": _end_ci(_grid(layers, cross_b, above), cross_b >= 0, level, above),
        "start_ci": _end_ci(_grid(layers, start_b, below), start_b >= 0, level, below),
    })


def by_group(delta_visual, delta_text, layers, groups, *, min_samples: int = 2, **kwargs) -> dict:
    """:func:`transfer_window` on the samples of each group (``groups``: (sample,) labels, e.g. question kinds or
    hard / easy): {group: result, or {'skipped': why} for a group of fewer than ``min_samples`` samples}."""
    groups = np.asarray([str(g) for g in np.asarray(groups, dtype=object).ravel()])
    dv, dt = np.asarray(delta_visual, float), np.asarray(delta_text, float)
    if len(groups) != len(dv):
        raise DataError(f"The 'groups' parameter of by_group must have one label per sample ({len(dv)}). "
                        f"Got {len(groups)} instead.")
    out = {}
    for g in sorted(set(groups.tolist()) - {""}):
        sel = groups == g
        out[g] = (transfer_window(dv[sel], dt[sel], layers, **kwargs) if sel.sum() >= min_samples
                  else {"skipped": f"{int(sel.sum())} samples (fewer than {min_samples})"})
    return out


# ------------------------------------------------------------------------------------- swap


def forced_choice(candidate_logprob, mask) -> np.ndarray:
    """The predicted candidate index: argmax over each sample's own candidates (ties: the first); -1 where the
    sample has no finite own score. ``candidate_logprob`` (..., sample, candidate), ``mask`` (sample, candidate)."""
    lp, mask = np.asarray(candidate_logprob, float), np.asarray(mask, bool)
    scored = np.where(mask & np.isfinite(lp), lp, -np.inf)
    return np.where(np.isfinite(scored).any(-1), np.argmax(scored, axis=-1), -1)


def donor_gold(gold, donor) -> np.ndarray:
    """g_d(i) = gold[donor[i]]: the donor's gold candidate index (-1 where there is no donor or no gold)."""
    gold, donor = np.asarray(gold, np.int64), np.asarray(donor, np.int64)
    return np.where(donor >= 0, gold[np.clip(donor, 0, None)], -1)


def donor_following(pred, clean_pred, gold, donor_answer, mask, *, level: float = 0.95,
                    method: str = stats.DEFAULT_METHOD, n_resamples: int = 1999, seed: int | None = 0) -> dict:
    """Per patched layer: the fraction of answers that follow the donor, with CIs, against chance.

    ``pred`` (layer, sample): the predicted candidate under swap at each layer; ``clean_pred`` (sample,): under
    the clean condition; ``gold`` (sample,) each sample's gold candidate index; ``donor_answer`` (sample,) the
    candidate the donor's image implies, g_d(i) (-1: none); the store knows the donor's gold, :func:`donor_gold`
    (right when the donor asks the same question of its own image; a caller who can read the answer off the
    donor's image for this sample's question passes that instead); ``mask`` (sample, candidate) each sample's own
    candidates. A sample counts (is *informative*) when g_d(i) is one of its own candidates and differs from its
    own gold (otherwise following the donor cannot be told from being right). Per layer l over the informative
    samples with a prediction:

        follows(l)        = mean_i [pred(l, i) == g_d(i)]                  (mean_ci)
        chance            = mean_i 1 / |candidates(i)|                     (a uniform guess)
        follows - chance  = mean_i ([pred(l, i) == g_d(i)] - 1/|cand(i)|)   (mean_ci)
        follows - clean   = mean_i ([pred(l, i) == g_d(i)] - [clean_pred(i) == g_d(i)])   (paired, mean_diff_ci)
    """
    pred, clean_pred = np.asarray(pred, np.int64), np.asarray(clean_pred, np.int64)
    gold, dg, mask = np.asarray(gold, np.int64), np.asarray(donor_answer, np.int64), np.asarray(mask, bool)
    own = mask[np.arange(len(gold)), np.clip(dg, 0, None)] & (dg >= 0)
    informative = own & (dg != gold) & (gold >= 0) & (clean_pred >= 0) & (pred >= 0).all(0)
    n = int(informative.sum())
    out = {"n_informative": n, "n": int(len(gold)),
           "rule": "informative: the donor's answer is one of the sample's candidates and not its own gold"}
    if n < 2:
        return {**out, "skipped": f"{n} informative samples (need >= 2)"}
    kw = dict(level=level, method=method, n_resamples=n_resamples, seed=seed)
    f = (pred[:, informative] == dg[informative]).astype(float).T  # (sample, layer)
    base = (clean_pred[informative] == dg[informative]).astype(float)
    inv = 1.0 / mask[informative].sum(1)
    out.update({"follows": stats.mean_ci(f, **kw).to_dict(), "chance": float(inv.mean()),
                "follows_minus_chance": stats.mean_ci(f - inv[:, None], **kw).to_dict(),
                "clean_follows": float(base.mean()),
                "follows_minus_clean": stats.mean_diff_ci(f, np.repeat(base[:, None], f.shape[1], 1), **kw).to_dict()})
    return out
