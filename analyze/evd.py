"""Delta curves, EVD, cliff boundary, EVD gaps and truncation curves. numpy/xarray only, no torch.

Definitions (DESIGN.md, "Metrics"), with ``l`` a truncation layer L (layers 0..L read the real
visual states, layers > L the intervened ones) and s the gold-answer log-prob::

    Delta(l) = s_clean - s_intervened(l)
    EVD      = max{ l : Delta(l) >= tau }           per sample; NaN if Delta never reaches tau
    area     = sum_l max(Delta(l) - tau, 0)         over the recorded layer grid (not width-weighted)
    tau      = fixed, or tau_ratio * max_l mean_pilot Delta(l)   (seeded pilot subset, recorded)

A sample whose Delta never reaches tau gets EVD = NaN, not -1: -1 is a real truncation layer
("no layer sees the image"), so -1 would confuse "needs no layer" with "needs layer -1". Means
and gaps skip NaN and report how many samples reached tau.

Cliff boundary (a layer of the grid, except ``median_evd``), recorded in :class:`Cliff`:

* ``median_evd``: median over samples of EVD (NaN samples skipped; np.median, so it can fall
  half-way between two grid layers);
* ``steepest``: argmin over k of m(l_{k+1}) - m(l_k), m = mean Delta curve; reports l_k, the
  *last layer before* the steepest drop (ties: the first);
* ``first_crossing``: the first layer l with m(l) < tau that follows a layer with m >= tau, i.e.
  the *first layer below* tau once the curve has been at or above it; NaN if it never is.

Usage::

    from gapcache.analyze.evd import truncation_deltas, adaptive_tau, evd, cliff, evd_gap
    d = truncation_deltas(ds.gold_logprob)             # (strategy, layer, sample)
    x = d.sel(strategy="zero").transpose("sample", "layer")
    tau = adaptive_tau(x.values, tau_ratio=0.5, n_pilot=50, seed=0)
    e = evd(x.values, x.layer.values, tau.value)        # (sample,)
    cliff(x.values, x.layer.values, tau.value, "steepest").layer
    evd_gap(e[hard], e[easy]).gap
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from gapcache import conditions
from gapcache.errors import ConfigError, DataError

CLIFF_METHODS = ("median_evd", "steepest", "first_crossing")


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


def evd(delta, layers, tau: float) -> np.ndarray:
    """EVD = max{ l : Delta(l) >= tau } over the last axis of ``delta`` (..., layer) -> (...); NaN if none."""
    delta, layers = _curves(delta, layers)
    hit = delta >= tau
    last = delta.shape[-1] - 1 - np.argmax(hit[..., ::-1], axis=-1)
    return np.where(hit.any(axis=-1), layers[last].astype(np.float64), np.nan)


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

    def as_attrs(self) -> dict:
        return {f"tau_{k}": (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}


def fixed_tau(value: float) -> Tau:
    """tau = value."""
    if not np.isfinite(value):
        raise ConfigError(f"The 'value' parameter of fixed_tau must be a finite number. Got {value!r} instead.")
    return Tau(float(value), "fixed")


def adaptive_tau(delta, tau_ratio: float, n_pilot: int | None = None, seed: int = 0) -> Tau:
    """tau = tau_ratio * max_l mean_{i in pilot} Delta_i(l); ``delta`` is (sample, layer).

    The pilot is ``n_pilot`` samples drawn without replacement by ``np.random.default_rng(seed)``
    (all samples when ``n_pilot`` is None), sorted; its indices are recorded in the result.
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
    return Tau(float(tau_ratio * np.nanmax(curve)), "adaptive", float(tau_ratio), int(seed),
               tuple(int(i) for i in pilot), tuple(float(c) for c in curve))


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
    if method != "steepest" and tau is None:
        raise ConfigError(f"The 'tau' parameter of cliff must be a number for method {method!r}. Got None instead.")
    m = mean_curve(delta)
    if method == "steepest":
        layer = steepest_decline(m, layers)
    elif method == "first_crossing":
        layer = first_crossing(m, layers, tau)
    else:
        e = evd(delta, layers, tau)
        layer = float(np.median(e[np.isfinite(e)])) if np.isfinite(e).any() else float("nan")
    return Cliff(layer, method, None if tau is None else float(tau), tuple(m.tolist()),
                 tuple(int(v) for v in layers), int(delta.shape[0]))


@dataclass(frozen=True)
class Gap:
    """EVD gap = mean EVD of group a - mean EVD of group b (NaN EVDs skipped and counted)."""

    gap: float
    mean_a: float
    mean_b: float
    n_a: int  # samples with a finite EVD
    n_b: int
    n_missing_a: int  # samples whose Delta never reached tau
    n_missing_b: int
    label_a: str = "a"
    label_b: str = "b"


def evd_gap(evd_a, evd_b, label_a: str = "a", label_b: str = "b") -> Gap:
    """gap = mean(EVD_a) - mean(EVD_b); the groups may come from one store, two conditions or two models."""
    a, b = np.asarray(evd_a, np.float64).ravel(), np.asarray(evd_b, np.float64).ravel()
    fa, fb = np.isfinite(a), np.isfinite(b)
    if not fa.any() or not fb.any():
        raise DataError(
            f"evd_gap needs at least one finite EVD in each group. Got {int(fa.sum())} in {label_a!r} and "
            f"{int(fb.sum())} in {label_b!r}: lower tau or check the inputs."
        )
    ma, mb = float(a[fa].mean()), float(b[fb].mean())
    return Gap(ma - mb, ma, mb, int(fa.sum()), int(fb.sum()), int((~fa).sum()), int((~fb).sum()), label_a, label_b)


def evd_gap_by_group(evd_values, groups, a: str = "hard", b: str = "easy") -> Gap:
    """EVD gap between the samples labelled ``a`` and ``b`` in ``groups`` (e.g. the store's ``category``)."""
    evd_values, groups = np.asarray(evd_values, np.float64), np.asarray(groups)
    if groups.shape != evd_values.shape:
        raise ConfigError(f"The 'groups' parameter of evd_gap_by_group must have the shape of 'evd_values' "
                          f"{evd_values.shape}. Got {groups.shape} instead.")
    for name in (a, b):
        if not (groups == name).any():
            raise ConfigError(f"The group {name!r} has no sample. Got groups {sorted(set(groups.tolist()))} instead.")
    return evd_gap(evd_values[groups == a], evd_values[groups == b], str(a), str(b))


# ---------------------------------------------------------------- store-shaped (xarray) inputs


def _require_coords(da, names, fn):
    missing = [c for c in names if c not in da.coords]
    if missing:
        raise ConfigError(f"The input of {fn} must carry the store's coordinates {list(names)}. Missing {missing}.")


def truncation_deltas(gold, clean: str = "original"):
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
                      clean: str = "original"):
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
