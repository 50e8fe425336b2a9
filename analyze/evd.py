"""Delta curves, EVD, cliff boundary, EVD gaps and truncation curves. numpy/xarray only, no torch.

Definitions (DESIGN.md, "Metrics"), with ``l`` a truncation layer L (layers 0..L read the real
visual states, layers > L the intervened ones) and s the gold-answer log-prob::

    Delta(l) = s_clean - s_intervened(l)
    EVD      = max{ l : Delta(l) >= tau }           per sample; NaN if Delta never reaches tau
    area     = sum_l max(Delta(l) - tau, 0)         over the recorded layer grid (not width-weighted)
    tau      = fixed, or tau_ratio * max_l mean_pilot Delta(l)   (seeded pilot subset, recorded)

A sample whose Delta never reaches tau gets EVD = NaN, not -1: -1 is a real truncation layer
("no layer sees the image"), so -1 would confuse "needs no layer" with "needs layer -1"
(``evd(..., never_reached=0.0)`` gives the seed's 0 instead). ``mean_evd`` skips NaN and reports
how many samples reached tau.

**EVD gap** (:func:`evd_gap`, the one function the pipeline, the cross-store comparison and users
call): mean EVD of group a - mean EVD of group b, with its bootstrap CI over samples (unpaired for
two groups of one store, ``paired=True`` for the same samples in two stores or conditions). A
never-reaching sample counts as ``never_reached``: ``'below_grid'`` (default) = min(layers) - 1, one
below the earliest truncation point ("needs no layer's visual states"), so the samples that least
need the image are not dropped from their group; ``'skip'`` drops them (counted); a number (the
seed: 0.0, in its layer labels) uses that value. On the simulated data of the issue the rules give
0.23 (skip), 4.34 (below_grid) and 4.14 (seed's 0): the rule is part of the number, and is recorded.

**Seed compatibility** (``docs/seed-compatibility.md``): ``never_reached=0.0``; cliff methods
``seed_median`` (``int(np.median)`` of the EVDs of all samples, never-reached = 0 included) and
``seed_crossing`` (first layer with m(l) < tau, the last layer if none); :func:`seed_tau` (max(floor,
ratio x mean Delta at the first grid layer of the first 5 hard samples)); :func:`layer_labels` for
the seed's output-hook labels (its layer j = our j + 1).

Cliff boundary (a layer of the grid, except ``median_evd``), recorded in :class:`Cliff`:

* ``median_evd``: median over samples of EVD (NaN samples skipped; np.median, so it can fall
  half-way between two grid layers);
* ``steepest``: argmin over k of m(l_{k+1}) - m(l_k), m = mean Delta curve; reports l_k, the
  *last layer before* the steepest drop (ties: the first);
* ``first_crossing``: the first layer l with m(l) < tau that follows a layer with m >= tau, i.e.
  the *first layer below* tau once the curve has been at or above it; NaN if it never is.
* ``seed_median``: the seed's rule, ``int(np.median(EVD))`` over *all* samples with never-reached
  EVD = 0 (truncated toward 0, a grid label only by accident);
* ``seed_crossing``: the seed's rule, the first layer with m(l) < tau (no "was above first"
  condition), the last layer of the grid if there is none.

tau must be positive: a non-positive tau makes every layer "reached". :func:`adaptive_tau` refuses
a non-positive value (DataError) unless given ``floor``; then tau = max(floor, value) and the Tau
records ``raw_value``, ``floored`` and a ``note`` (the pipeline floors at ``AnalysisParams.tau_floor``,
1e-6 like the seed, so the note lands in summary.json).

Usage::

    from gapcache.analyze.evd import truncation_deltas, adaptive_tau, evd, cliff, evd_gap
    d = truncation_deltas(ds.gold_logprob)             # (strategy, layer, sample)
    x = d.sel(strategy="zero").transpose("sample", "layer")
    tau = adaptive_tau(x.values, tau_ratio=0.5, n_pilot=50, seed=0)
    e = evd(x.values, x.layer.values, tau.value)        # (sample,)
    cliff(x.values, x.layer.values, tau.value, "steepest").layer
    g = evd_gap(e[hard], e[easy], "hard", "easy", layers=x.layer.values)   # never reached -> min(layers) - 1
    g.gap, g.low, g.high, g.to_dict()                   # with its bootstrap CI over samples
    evd_gap(e_store_a, e_store_b, paired=True, layers=x.layer.values)      # same samples, two stores
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import numpy as np
from gapcache import conditions
from gapcache.analyze import stats
from gapcache.conditions import REFERENCE
from gapcache.errors import ConfigError, DataError

CLIFF_METHODS = ("median_evd", "steepest", "first_crossing", "seed_median", "seed_crossing")
NEVER_REACHED_RULES = ("below_grid", "skip")  # or a number (the seed: 0.0)


def _curves(delta, layers):
    """Check delta (..., n_layers) against the increasing layer grid; return float arrays."""
    delta, layers = np.asarray(delta, dtype=np.float64), np.asarray(layers)
    if layers.ndim != 1 or delta.ndim < 1 or delta.shape[-1] != layers.size:
        raise ConfigError(
            f"The 'layers' parameter must be 1-D with one entry per column of 'delta'. Got layers of shape "
            f"{layers.shape} for delta of shape {delta.shape} instead."
        )
    if layers.size > 1 and np.any(np.diff(layers) <= 0):
        raise ConfigError(f"The 'layers' parameter must be strictly increasing. Got {layers.tolist()} instead.")
    return delta, layers


def delta(clean, intervened):
    """Delta = s_clean - s_intervened (broadcasting; e.g. clean (sample,), intervened (layer, sample))."""
    return np.asarray(clean, dtype=np.float64) - np.asarray(intervened, dtype=np.float64)


def evd(delta, layers, tau: float, never_reached: float = np.nan) -> np.ndarray:
    """EVD = max{ l : Delta(l) >= tau } over the last axis of ``delta`` (..., layer) -> (...).

    A sample whose Delta never reaches tau gets ``never_reached``: NaN (gapcache) or 0.0 (the seed's
    ``compute_evd``)."""
    delta, layers = _curves(delta, layers)
    hit = delta >= tau
    last = delta.shape[-1] - 1 - np.argmax(hit[..., ::-1], axis=-1)
    return np.where(hit.any(axis=-1), layers[last].astype(np.float64), float(never_reached))


def layer_labels(layers, convention: str = "input") -> np.ndarray:
    """Truncation-layer labels in ``convention``: 'input' (gapcache's: layer L = the stream entering
    decoder layer L + 1 is the first intervened one) or 'output' (the seed's hooks on layer outputs:
    its layer j is our j + 1, so the label is ours - 1). Apply to ``layers`` before :func:`evd`,
    :func:`cliff` or :func:`seed_tau` to get numbers in the seed's labels."""
    if convention not in ("input", "output"):
        raise ConfigError(f"The 'convention' parameter of layer_labels must be one of ['input', 'output']. "
                          f"Got {convention!r} instead.")
    layers = np.asarray(layers)
    return layers - 1 if convention == "output" else layers.copy()


def evd_area(delta, layers, tau: float) -> np.ndarray:
    """Area form = sum_l max(Delta(l) - tau, 0) over the layer grid (NaN Delta counts as 0)."""
    delta, _ = _curves(delta, layers)
    return np.nansum(np.maximum(delta - tau, 0.0), axis=-1)


@dataclass(frozen=True)
class Tau:
    """A threshold and how it was chosen (store it with the results)."""

    value: float
    rule: str  # 'fixed' | 'adaptive'
    tau_ratio: float | None = None
    seed: int | None = None
    pilot: tuple[int, ...] = ()  # sample indices of the pilot subset
    pilot_curve: tuple[float, ...] = ()  # mean Delta over the pilot, per layer
    floor: float | None = None  # tau = max(floor, raw value) when given
    raw_value: float | None = None  # the rule's value before the floor
    floored: bool | None = None  # True when the floor replaced the rule's value
    note: str | None = None

    def as_attrs(self) -> dict:
        return {f"tau_{k}": (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}


def fixed_tau(value: float) -> Tau:
    """tau = value."""
    if not np.isfinite(value):
        raise ConfigError(f"The 'value' parameter of fixed_tau must be a finite number. Got {value!r} instead.")
    return Tau(float(value), "fixed")


def adaptive_tau(delta, tau_ratio: float, n_pilot: int | None = None, seed: int = 0,
                 floor: float | None = None) -> Tau:
    """tau = tau_ratio * max_l mean_{i in pilot} Delta_i(l); ``delta`` is (sample, layer).

    The pilot is ``n_pilot`` samples drawn without replacement by ``np.random.default_rng(seed)``
    (all samples when ``n_pilot`` is None), sorted; its indices are recorded in the result.
    A non-positive value (the pilot's mean Delta is <= 0 at every layer) would make every layer
    "reached": it raises DataError, unless ``floor`` (> 0) is given, in which case tau =
    max(floor, value), recorded with ``raw_value``, ``floored`` and a ``note``.
    """
    delta = np.asarray(delta, dtype=np.float64)
    if delta.ndim != 2:
        raise ConfigError(
            f"The 'delta' parameter of adaptive_tau must be 2-D (sample, layer). Got shape {delta.shape} instead."
        )
    if not 0 < tau_ratio <= 1:
        raise ConfigError(f"The 'tau_ratio' parameter of adaptive_tau must be in (0, 1]. Got {tau_ratio!r} instead.")
    n = delta.shape[0]
    if n_pilot is None:
        pilot = np.arange(n)
    elif isinstance(n_pilot, (int, np.integer)) and 1 <= n_pilot <= n:
        pilot = np.sort(np.random.default_rng(seed).choice(n, size=int(n_pilot), replace=False))
    else:
        raise ConfigError(
            f"The 'n_pilot' parameter of adaptive_tau must be an int in [1, {n}] or None. Got {n_pilot!r} instead."
        )
    curve = _nanmean(delta[pilot], axis=0)
    if not np.isfinite(curve).any():
        raise DataError("adaptive_tau: the pilot samples have no finite Delta value; check the store's status.")
    raw = float(tau_ratio * np.nanmax(curve))
    return _floored(Tau(raw, "adaptive", float(tau_ratio), int(seed), tuple(int(i) for i in pilot),
                        tuple(float(c) for c in curve)), floor, "adaptive_tau")


def _floored(t: Tau, floor: float | None, fn: str) -> Tau:
    """``t`` with the floor rule applied (see :func:`adaptive_tau`)."""
    import dataclasses

    if floor is not None and not (np.isfinite(floor) and floor > 0):
        raise ConfigError(f"The 'floor' parameter of {fn} must be a positive number or None. Got {floor!r} instead.")
    if floor is None:
        if not t.value > 0:
            raise DataError(
                f"{fn}: tau = {t.value:.6g} is not positive (tau_ratio {t.tau_ratio} x a pilot mean Delta of "
                f"{t.value / t.tau_ratio:.6g}), so every layer would count as reached. The intervention does not "
                f"lower the gold log-prob on the pilot: check the conditions, pass a fixed tau, or pass floor= "
                f"(the seed used 1e-6).")
        return t
    floored = not t.value >= floor
    note = (f"{t.rule} tau {t.value:.6g} is below the floor {floor:g}: tau = {floor:g}"
            + (" (a non-positive tau would make every layer reached)" if not t.value > 0 else "")) if floored else None
    if floored:
        import warnings

        warnings.warn(f"{fn}: {note}", RuntimeWarning, stacklevel=3)
    return dataclasses.replace(t, value=float(max(floor, t.value)), floor=float(floor), raw_value=t.value,
                               floored=bool(floored), note=note)


def seed_tau(delta, categories, tau_ratio: float = 0.1, n_pilot: int = 5, floor: float = 1e-6,
             hard: str = "hard") -> Tau:
    """The seed's adaptive tau: max(floor, tau_ratio x mean Delta at the first grid layer over the first
    ``n_pilot`` samples whose category is ``hard``, in sample order). ``delta`` is (sample, layer).

    The seed took ``hard_samples[:5]`` (fewer if there are fewer) and the Delta of its first
    truncation point ("layer 0" in its output-hook labels, the first column of the grid here).
    """
    delta, categories = np.asarray(delta, dtype=np.float64), np.asarray(categories)
    if delta.ndim != 2 or categories.shape != delta.shape[:1]:
        raise ConfigError(f"seed_tau needs 'delta' (sample, layer) and 'categories' (sample,). Got shapes "
                          f"{delta.shape} and {categories.shape} instead.")
    if not 0 < tau_ratio <= 1:
        raise ConfigError(f"The 'tau_ratio' parameter of seed_tau must be in (0, 1]. Got {tau_ratio!r} instead.")
    pilot = np.flatnonzero(categories == hard)[:n_pilot]
    if pilot.size == 0:
        raise DataError(f"seed_tau: no sample has category {hard!r}; got {sorted(set(categories.tolist()))}.")
    value = float(tau_ratio * _nanmean(delta[pilot, 0], axis=0))
    if not np.isfinite(value):
        raise DataError("seed_tau: the pilot samples have no finite Delta at the first layer.")
    return _floored(Tau(value, "seed", float(tau_ratio), None, tuple(int(i) for i in pilot),
                        tuple(float(c) for c in _nanmean(delta[pilot], axis=0))), floor, "seed_tau")


def _nanmean(x, axis):
    """Mean ignoring NaN; NaN (no warning) where every value is NaN."""
    x = np.asarray(x, dtype=np.float64)
    count = np.isfinite(x).sum(axis=axis)
    total = np.where(np.isfinite(x), x, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass(frozen=True)
class Cliff:
    """A cliff boundary and how it was found."""

    layer: float  # NaN when the method finds none
    method: str
    tau: float | None
    mean_curve: tuple[float, ...]  # m(l), mean Delta over samples
    layers: tuple[int, ...]
    n_samples: int

    def as_attrs(self) -> dict:
        return {"cliff_layer": self.layer, "cliff_method": self.method, "cliff_tau": self.tau,
                "cliff_n_samples": self.n_samples}


def mean_curve(delta) -> np.ndarray:
    """m(l) = mean over samples of Delta_i(l); ``delta`` is (sample, layer); NaN entries skipped."""
    return _nanmean(delta, axis=0)


def steepest_decline(curve, layers) -> float:
    """l_k with k = argmin_k (m(l_{k+1}) - m(l_k)): the last layer before the steepest drop."""
    curve, layers = _curves(curve, layers)
    if curve.size < 2:
        raise ConfigError(f"steepest_decline needs at least 2 layers. Got {curve.size} instead.")
    step = np.diff(curve)
    if not np.isfinite(step).any():
        return float("nan")
    return float(layers[int(np.nanargmin(step))])


def first_crossing(curve, layers, tau: float) -> float:
    """First layer l with m(l) < tau after a layer with m >= tau; NaN if the curve never falls below."""
    curve, layers = _curves(curve, layers)
    above = curve >= tau
    if not above.any():
        return float("nan")
    start = int(np.argmax(above))
    below = np.nonzero(curve[start:] < tau)[0]
    return float(layers[start + below[0]]) if below.size else float("nan")


def cliff(delta, layers, tau: float | None = None, method: str = "steepest") -> Cliff:
    """Cliff boundary of ``delta`` (sample, layer) by ``method`` (see the module docstring)."""
    if method not in CLIFF_METHODS:
        raise ConfigError(
            f"The 'method' parameter of cliff must be one of {list(CLIFF_METHODS)}. Got {method!r} instead."
        )
    delta, layers = _curves(delta, layers)
    if delta.ndim != 2:
        raise ConfigError(
            f"The 'delta' parameter of cliff must be 2-D (sample, layer). Got shape {delta.shape} instead."
        )
    if method not in ("steepest",) and tau is None:
        raise ConfigError(f"The 'tau' parameter of cliff must be a number for method {method!r}. Got None instead.")
    m = mean_curve(delta)
    if method == "steepest":
        layer = steepest_decline(m, layers)
    elif method == "first_crossing":
        layer = first_crossing(m, layers, tau)
    elif method == "seed_crossing":
        below = np.flatnonzero(m < tau)
        layer = float(layers[below[0]] if below.size else layers[-1])
    elif method == "seed_median":
        layer = float(int(np.median(evd(delta, layers, tau, never_reached=0.0))))
    else:
        e = evd(delta, layers, tau)
        layer = float(np.median(e[np.isfinite(e)])) if np.isfinite(e).any() else float("nan")
    return Cliff(layer, method, None if tau is None else float(tau), tuple(m.tolist()),
                 tuple(int(v) for v in layers), int(delta.shape[0]))


@dataclass(frozen=True)
class Gap:
    """EVD gap = mean EVD of group a - mean EVD of group b, with its CI (``interval``) and the rule used
    for the samples whose Delta never reached tau (``never_reached``, their value ``never_reached_as``)."""

    gap: float
    mean_a: float
    mean_b: float
    n_a: int  # samples with a finite EVD
    n_b: int
    n_missing_a: int  # samples whose Delta never reached tau
    n_missing_b: int
    label_a: str = "a"
    label_b: str = "b"
    never_reached: str | float = "below_grid"
    never_reached_as: float | None = None  # value given to a never-reaching sample (None: skipped)
    n_used_a: int = 0  # samples in each mean
    n_used_b: int = 0
    paired: bool = False
    interval: object = None  # stats.Interval of the gap, or None (fewer than 2 samples in a group)

    @property
    def low(self) -> float:
        return float("nan") if self.interval is None else self.interval.low

    @property
    def high(self) -> float:
        return float("nan") if self.interval is None else self.interval.high

    def to_dict(self) -> dict:
        """The interval's fields (estimate = gap) plus the counts and the never-reached rule, JSON-ready."""
        base = self.interval.to_dict() if self.interval is not None else {"estimate": self.gap}
        extra = {k: getattr(self, k) for k in ("mean_a", "mean_b", "n_a", "n_b", "n_missing_a", "n_missing_b",
                                                "label_a", "label_b", "never_reached", "never_reached_as",
                                                "n_used_a", "n_used_b", "paired")}
        return stats.jsonable({**base, **extra})


def _never_value(never_reached, layers, fn: str):
    """The value a never-reaching sample takes under ``never_reached`` (None: skipped)."""
    if isinstance(never_reached, str):
        if never_reached not in NEVER_REACHED_RULES:
            raise ConfigError(f"The 'never_reached' parameter of {fn} must be one of {list(NEVER_REACHED_RULES)} "
                              f"or a number. Got {never_reached!r} instead.")
        if never_reached == "skip":
            return None
        if layers is None or np.size(layers) == 0:
            raise ConfigError(f"The 'layers' parameter of {fn} must give the truncation grid when never_reached="
                              f"'below_grid' (a never-reaching sample counts as min(layers) - 1). Got None instead; "
                              f"pass layers=..., or never_reached='skip' or a number.")
        return float(np.min(layers)) - 1.0
    if isinstance(never_reached, bool) or not np.isfinite(never_reached):
        raise ConfigError(f"The 'never_reached' parameter of {fn} must be one of {list(NEVER_REACHED_RULES)} or a "
                          f"finite number. Got {never_reached!r} instead.")
    return float(never_reached)


def evd_gap(evd_a, evd_b, label_a: str = "a", label_b: str = "b", *, never_reached="below_grid", layers=None,
            layers_b=None, paired: bool = False, ci: bool = True, level: float = 0.95, method: str = stats.DEFAULT_METHOD,
            n_resamples: int = 1999, seed: int | None = 0) -> Gap:
    """gap = mean(EVD_a) - mean(EVD_b) with its bootstrap CI over samples; EVDs as :func:`evd` returns them
    (NaN = never reached tau). The one EVD-gap function: the pipeline (hard - easy) and the cross-store
    comparison call it.

    ``never_reached``: 'below_grid' (default: min(layers) - 1, ``layers`` = the truncation grid of a;
    ``layers_b`` that of b when it differs), 'skip' (dropped, counted) or a number (the seed: 0.0).
    ``paired=False``: two groups of samples (e.g. hard vs easy), CI by resampling each group
    (``stats.bootstrap_ci(paired=False)``); ``paired=True``: row i of a and of b is the same sample (two
    stores or conditions, aligned first: ``stats.align_samples``), CI of the mean paired difference
    (``stats.mean_diff_ci``; with 'skip' a pair is dropped when either side never reached tau).
    ``ci=False`` or a group of fewer than 2 samples:
    ``interval`` is None.
    """
    if isinstance(never_reached, str) and never_reached not in NEVER_REACHED_RULES:
        _never_value(never_reached, layers, "evd_gap")  # raises the error naming the choices
    a, b = np.asarray(evd_a, np.float64).ravel(), np.asarray(evd_b, np.float64).ravel()
    fa, fb = np.isfinite(a), np.isfinite(b)
    va = _never_value(never_reached, layers, "evd_gap") if not fa.all() else None
    vb = _never_value(never_reached, layers if layers_b is None else layers_b, "evd_gap") if not fb.all() else None
    if paired:
        if a.shape != b.shape:
            raise DataError(f"evd_gap(paired=True) needs one EVD per sample on each side. Got {a.size} and {b.size}.")
        keep = fa & fb if never_reached == "skip" else np.ones(a.size, bool)
        xa, xb = _filled(a, fa, va)[keep], _filled(b, fb, vb)[keep]
    else:
        xa, xb = _filled(a, fa, va)[np.isfinite(_filled(a, fa, va))], _filled(b, fb, vb)[np.isfinite(_filled(b, fb, vb))]
    if xa.size == 0 or xb.size == 0:
        raise DataError(
            f"evd_gap needs at least one finite EVD in each group. Got {int(fa.sum())} in {label_a!r} and "
            f"{int(fb.sum())} in {label_b!r}: lower tau or check the inputs."
        )
    ma, mb = float(xa.mean()), float(xb.mean())
    interval = None
    if ci and xa.size >= 2 and xb.size >= 2:
        name = f"evd_gap_{label_a}_minus_{label_b}"
        if paired:
            interval = dataclasses.replace(stats.mean_diff_ci(xa, xb, level=level, method=method,
                                                              n_resamples=n_resamples, seed=seed), statistic=name)
        else:
            interval = stats.bootstrap_ci((xa, xb), _gap_statistic, paired=False, level=level, method=method,
                                          n_resamples=n_resamples, seed=seed, name=name)
    return Gap(ma - mb, ma, mb, int(fa.sum()), int(fb.sum()), int((~fa).sum()), int((~fb).sum()), str(label_a),
               str(label_b), never_reached if isinstance(never_reached, str) else float(never_reached),
               va if va is not None else vb, int(xa.size), int(xb.size), bool(paired), interval)


def _filled(x, finite, value):
    """x with its never-reached (NaN) entries set to ``value`` (left NaN when ``value`` is None: skipped)."""
    return x if value is None else np.where(finite, x, value)


def _gap_statistic(x, y, axis):
    return x.mean(axis) - y.mean(axis)


def evd_gap_by_group(evd_values, groups, a: str = "hard", b: str = "easy", **kwargs) -> Gap:
    """EVD gap between the samples labelled ``a`` and ``b`` in ``groups`` (e.g. the store's ``category``);
    ``kwargs`` go to :func:`evd_gap` (never_reached, layers, level, method, n_resamples, seed, ci)."""
    evd_values, groups = np.asarray(evd_values, np.float64), np.asarray(groups)
    if groups.shape != evd_values.shape:
        raise ConfigError(f"The 'groups' parameter of evd_gap_by_group must have the shape of 'evd_values' "
                          f"{evd_values.shape}. Got {groups.shape} instead.")
    for name in (a, b):
        if not (groups == name).any():
            raise ConfigError(f"The group {name!r} has no sample. Got groups {sorted(set(groups.tolist()))} instead.")
    return evd_gap(evd_values[groups == a], evd_values[groups == b], str(a), str(b), **kwargs)


# ---------------------------------------------------------------- store-shaped (xarray) inputs


def _require_coords(da, names, fn):
    missing = [c for c in names if c not in da.coords]
    if missing:
        raise ConfigError(f"The input of {fn} must carry the store's coordinates {list(names)}. Missing {missing}.")


def truncation_deltas(gold, clean: str = REFERENCE):
    """Delta (strategy, layer, sample) from gold log-probs labelled like the store.

    ``gold`` has dims (condition, sample) and the coordinates ``condition_kind``,
    ``truncation_layer`` and ``truncation_strategy`` along ``condition`` (``ds.gold_logprob``).
    Delta[strategy, L, i] = gold[clean, i] - gold[truncated_<strategy>_L<L>, i] over the conditions
    of the registry's truncation group; a (strategy, L) the store lacks is NaN.
    """
    import xarray as xr

    _require_coords(gold, ("condition_kind", "truncation_layer", "truncation_strategy"), "truncation_deltas")
    if clean not in gold["condition"].values:
        raise ConfigError(
            f"The 'clean' parameter of truncation_deltas must name a condition of the input. Got {clean!r} "
            f"with conditions {list(gold['condition'].values)} instead."
        )
    s_clean = gold.sel(condition=clean, drop=True)
    trunc = gold.isel(condition=np.nonzero(conditions.in_group(gold["condition_kind"].values, conditions.TRUNCATION))[0])
    if trunc.sizes["condition"] == 0:
        raise DataError("truncation_deltas: the input has no truncated condition.")
    strategies = sorted(set(trunc["truncation_strategy"].values.tolist()))
    layers = np.unique(trunc["truncation_layer"].values.astype(np.int64))
    out = xr.DataArray(np.full((len(strategies), len(layers), gold.sizes["sample"]), np.nan),
                       dims=("strategy", "layer", "sample"),
                       coords={"strategy": strategies, "layer": layers, "sample": gold["sample"].values})
    for k in range(trunc.sizes["condition"]):
        row = trunc.isel(condition=k)
        st, lay = str(row["truncation_strategy"].values), int(row["truncation_layer"].values)
        out.loc[{"strategy": st, "layer": lay}] = (s_clean - row).values
    return out.rename("delta")


def truncation_curves(gold, candidate_logprob=None, candidate_mask=None, gold_index=None,
                      clean: str = REFERENCE):
    """Truncation curves per (strategy, layer): mean Delta and, with candidates, forced-choice accuracy.

    Returns a Dataset with ``delta`` (strategy, layer, sample), ``mean_delta`` (strategy, layer),
    ``n`` (finite Delta count) and, when ``candidate_logprob`` (condition, sample, candidate),
    ``candidate_mask`` (sample, candidate) and ``gold_index`` (sample,) are given, ``accuracy``
    (strategy, layer) and ``clean_accuracy`` (scalar): argmax over each sample's own candidates
    == gold index (see ``gapcache.analyze.scoring.forced_choice_correct``).
    """
    import xarray as xr
    from gapcache.analyze.scoring import forced_choice_correct

    d = truncation_deltas(gold, clean)
    ds = xr.Dataset({"delta": d, "mean_delta": d.mean("sample", skipna=True), "n": d.notnull().sum("sample")})
    if candidate_logprob is None:
        return ds
    correct = forced_choice_correct(np.asarray(candidate_logprob), candidate_mask, gold_index)  # (condition, sample)
    acc = xr.DataArray(np.full(d.shape[:2], np.nan), dims=("strategy", "layer"),
                       coords={k: d[k] for k in ("strategy", "layer")})
    cond = list(gold["condition"].values)
    for k, truncated in enumerate(conditions.in_group(gold["condition_kind"].values, conditions.TRUNCATION)):
        if truncated:
            st, lay = str(gold["truncation_strategy"].values[k]), int(gold["truncation_layer"].values[k])
            acc.loc[{"strategy": st, "layer": lay}] = _nanmean(correct[k], axis=0)
    ds["accuracy"] = acc
    ds["clean_accuracy"] = float(_nanmean(correct[cond.index(clean)], axis=0))
    return ds
