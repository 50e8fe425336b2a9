"""Bootstrap confidence intervals over **samples**, paired tests and multiple-comparison control.

The unit of resampling is always the sample (a question/image pair).  When two conditions or two
stores are compared, the bootstrap is *paired*: one resample of sample indices is applied to both
arrays, so each sample's shared difficulty cancels in the difference.  Extra axes (layers, truncation
points, ...) ride along: one call gives one interval per layer, every layer resampled with the
same sample indices.  Never bootstrap over layers: that gives a CI of a layer average with the
per-sample variability left out (the seed work's mistake; ``tests/test_stats.py`` shows it covers
far less than its nominal level).

Usage::

    from gapcache.analyze import stats

    ci = stats.mean_ci(delta)                          # (sample,) or (sample, layer) ndarray/DataArray
    ci.estimate, ci.low, ci.high, ci.to_dict()         # JSON-ready, records n, level, method, seed

    a, b, dropped_a, dropped_b = stats.align_samples(s_clean, s_blind)   # inner join on sample ids
    d = stats.mean_diff_ci(a, b, method="BCa", n_resamples=1999, seed=0)  # paired by sample id
    q = stats.paired_ci(a, b, lambda a, b, axis: np.median(a - b, axis=axis))

    cmp = stats.compare_paired(a, b, test="signflip", correction="holm", alpha=0.05)
    cmp.survivors                                       # layer labels whose difference survives

All intervals are :func:`scipy.stats.bootstrap`'s (``method`` 'percentile', 'BCa' or 'basic'), seeded with
``numpy.random.default_rng(seed)``; the seed is recorded.  Means and paired mean differences under
'percentile' / 'basic' are computed without calling it, from the very resamples it would draw: the counts
matrix C (B, n) of those draws, cached per (seed, n, B, batch), times the data, theta* = C x / n (``_fast_mean_bootstrap``;
equal to scipy's interval to 1e-15, exactly on 0/1 data; a metric's thousands of per-layer intervals then
share one draw).  ``tests/test_stats.py`` holds the two paths equal.

**One default method everywhere**: :data:`DEFAULT_METHOD` = ``'percentile'``, used by every function
here, by ``gapcache.analyze.probes``, ``gapcache.analyze.evd.evd_gap`` and the pipeline
(``AnalysisParams.ci_method``). Why percentile and not BCa: most gapcache quantities are means of
0/1 correctness or of heavily tied values, where BCa's jackknife acceleration is undefined or
unstable (a single discordant sample moves it) and BCa can return NaN; the percentile interval is
defined whenever the bootstrap distribution is, and it is what the pipeline always reported.
BCa and basic stay one argument away (``method='BCa'``).

**Degenerate intervals are flagged**: an interval of zero width (every resample gives the same
value: all samples identical, e.g. ``mean_ci(np.ones(20))``, or Bernoulli(0.9) at n = 20 with no
failure drawn) carries ``degenerate=True`` (per entry, for intervals over layers) and a ``note``;
it is a statement about the data, not a measured uncertainty of zero.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from gapcache.errors import ConfigError, DataError

METHODS = {"percentile": "percentile", "bca": "BCa", "basic": "basic"}
DEFAULT_METHOD = "percentile"  # the one default CI method (module docstring)
DEGENERATE_NOTE = "zero width: every resample gives the same value (e.g. all samples identical); not a measured certainty"
TESTS = ("signflip", "bootstrap")
CORRECTIONS = ("holm", "bh", "none")
_BATCH_ELEMENTS = 2_000_000  # resampled values held at once (keeps memory ~16 MB and caches warm)


# --------------------------------------------------------------------------- result types


def jsonable(v):
    """Plain Python for ``json.dumps``: numpy scalars/arrays -> floats/ints/lists (NaN stays float('nan')),
    dataclass instances -> dicts, tuples -> lists; dicts and lists converted recursively."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return jsonable(dataclasses.asdict(v))
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


@dataclasses.dataclass(frozen=True, eq=False)
class Interval:
    """A bootstrap confidence interval (one per entry of the extra dims, if any).

    ``estimate``/``low``/``high`` are floats when the data had only the sample axis, else arrays of
    shape ``tuple(len(coords[d]) for d in dims)``.  ``n`` is the number of samples resampled,
    ``n_dropped`` the samples left out by the alignment of two DataArrays.
    """

    statistic: str
    estimate: Any
    low: Any
    high: Any
    n: int
    level: float
    method: str
    n_resamples: int
    seed: int | None
    paired: bool
    dims: tuple = ()
    coords: dict = dataclasses.field(default_factory=dict)
    n_dropped: int = 0
    degenerate: Any = False  # zero width (bool, or bool array like ``low``); see the module docstring
    note: str = ""

    @property
    def width(self):
        """high - low."""
        return np.subtract(self.high, self.low)

    def contains(self, value):
        """low <= value <= high (elementwise)."""
        return (np.asarray(self.low) <= value) & (value <= np.asarray(self.high))

    def to_dict(self) -> dict:
        """Plain-Python dict (``json.dumps`` works on it)."""
        return jsonable(dataclasses.asdict(self))

    def to_xarray(self):
        """An ``xarray.Dataset`` with estimate/low/high over ``dims``; the rest in ``attrs``."""
        import xarray as xr

        data = {k: (self.dims, np.asarray(getattr(self, k))) for k in ("estimate", "low", "high", "degenerate")}
        attrs = {k: v for k, v in self.to_dict().items()
                 if k not in ("estimate", "low", "high", "degenerate", "dims", "coords")}
        return xr.Dataset(data, coords={d: self.coords[d] for d in self.dims}, attrs=attrs)


class Aligned(NamedTuple):
    """Two DataArrays restricted to their common sample ids (same order), and what was dropped."""

    a: Any
    b: Any
    dropped_a: int
    dropped_b: int


# --------------------------------------------------------------------------- validation


def _check_method(method: str, func: str) -> str:
    key = str(method).lower()
    if key not in METHODS:
        raise ConfigError(
            f"The 'method' parameter of {func} must be one of {list(METHODS.values())}. Got {method!r} instead."
        )
    return METHODS[key]


def check_level(level: float, func: str) -> float:
    """``level`` as a float, checked to lie in (0, 1); ``func`` names the caller in the error."""
    if not isinstance(level, (float, int)) or not 0 < level < 1:
        raise ConfigError(f"The 'level' parameter of {func} must be a float in (0, 1). Got {level!r} instead.")
    return float(level)


def _check_resamples(n_resamples: int, func: str) -> int:
    if not isinstance(n_resamples, (int, np.integer)) or isinstance(n_resamples, bool) or n_resamples < 1:
        raise ConfigError(
            f"The 'n_resamples' parameter of {func} must be an int >= 1. Got {n_resamples!r} instead."
        )
    return int(n_resamples)


def _check_choice(value, name: str, choices, func: str):
    if value not in choices:
        raise ConfigError(f"The '{name}' parameter of {func} must be one of {list(choices)}. Got {value!r} instead.")
    return value


def _check_statistic(statistic, func: str, name: str | None = None) -> str:
    """The statistic's label (``name`` or its __name__); it must be callable with an ``axis`` keyword."""
    if not callable(statistic):
        raise ConfigError(f"The 'statistic' parameter of {func} must be a callable. Got {statistic!r} instead.")
    try:
        params = inspect.signature(statistic).parameters
    except (TypeError, ValueError):  # some numpy ufunc-like callables have no signature
        params = {"axis": None}
    if "axis" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(
            f"The 'statistic' parameter of {func} must accept an 'axis' keyword (vectorized, reduce along it), "
            f"e.g. lambda x, axis: np.median(x, axis=axis). Got {getattr(statistic, '__name__', statistic)!r} instead."
        )
    return name or getattr(statistic, "__name__", "statistic")


# --------------------------------------------------------------------------- inputs


def is_dataarray(x) -> bool:
    """True for an xarray.DataArray (duck-typed: dims, coords and transpose; xarray is not imported)."""
    return hasattr(x, "dims") and hasattr(x, "transpose") and hasattr(x, "coords")


def as_samples(x, dim: str = "sample", name: str = "x", func: str = "as_samples"):
    """Array with the sample axis first, plus (extra dims, their coords, sample ids).

    A DataArray is transposed to ``(dim, ...)`` and loaded (dask-backed arrays are computed: the
    inputs to a bootstrap are per-sample scalars, small).  A numpy array must already have samples
    on axis 0.  NaNs are refused (a failed sample must be dropped explicitly, the same in both arms).
    """
    if is_dataarray(x):
        if dim not in x.dims:
            raise DataError(f"The '{name}' parameter of {func} must have a {dim!r} dim. Got dims {x.dims} instead.")
        x = x.transpose(dim, ...)
        rest = tuple(x.dims[1:])
        coords = {d: (x[d].values.tolist() if d in x.coords else list(range(x.sizes[d]))) for d in rest}
        ids = x[dim].values if dim in x.coords else None
        values = np.asarray(x.values, dtype=float)
    else:
        values, rest, coords, ids = np.asarray(x, dtype=float), (), {}, None
        if values.ndim == 0:
            raise DataError(f"The '{name}' parameter of {func} must have a sample axis. Got a scalar instead.")
    _check_finite(values, name, func)
    return values, rest, coords, ids


def _check_finite(values: np.ndarray, name: str, func: str):
    bad = ~np.isfinite(values).reshape(len(values), -1).all(axis=1)
    if bad.any():
        raise DataError(
            f"The '{name}' parameter of {func} must be finite. Got {int(bad.sum())} of {len(values)} samples "
            f"with NaN/inf instead; drop them first (e.g. x.dropna('sample', how='any'), then align_samples)."
        )
    if len(values) < 2:
        raise DataError(f"The '{name}' parameter of {func} must have at least 2 samples. Got {len(values)} instead.")


def align_samples(a, b, dim: str = "sample") -> Aligned:
    """Inner join of two DataArrays on the sample ids of ``dim`` (order of ``a`` kept).

    Procedure: ``common = [s for s in a[dim] if s in set(b[dim])]``; both are ``.sel``-ected on
    ``common``.  Returns ``Aligned(a, b, dropped_a, dropped_b)`` with the number of samples each side
    lost.  Duplicate ids raise DataError (a pairing would be ambiguous).
    """
    for name, x in (("a", a), ("b", b)):
        if not is_dataarray(x) or dim not in x.coords:
            raise DataError(
                f"The '{name}' parameter of align_samples must be a DataArray with a {dim!r} coordinate. "
                f"Got {type(x).__name__} instead."
            )
        ids = x[dim].values
        if len(set(ids.tolist())) != len(ids):
            raise DataError(
                f"The '{name}' parameter of align_samples must have unique {dim} ids. Got duplicates instead."
            )
    in_b = set(b[dim].values.tolist())
    common = [s for s in a[dim].values.tolist() if s in in_b]
    if not common:
        raise DataError(f"align_samples: a and b share no {dim} id. Got {a.sizes[dim]} and {b.sizes[dim]} ids.")
    return Aligned(
        a.sel({dim: common}), b.sel({dim: common}), a.sizes[dim] - len(common), b.sizes[dim] - len(common)
    )


def _paired_inputs(a, b, dim: str, func: str):
    """(a, b, extra dims, coords, n_dropped) with rows paired by sample id."""
    dropped = 0
    if is_dataarray(a) and is_dataarray(b):
        al = align_samples(a, b, dim)
        a, b, dropped = al.a, al.b, al.dropped_a + al.dropped_b
    elif is_dataarray(a) != is_dataarray(b):
        raise DataError(
            f"The 'a' and 'b' parameters of {func} must both be DataArrays (paired by {dim} id) or both arrays "
            f"(paired by row). Got {type(a).__name__} and {type(b).__name__} instead."
        )
    va, dims, coords, _ = as_samples(a, dim, "a", func)
    vb, _, _, _ = as_samples(b, dim, "b", func)
    if va.shape != vb.shape:
        raise DataError(
            f"The 'a' and 'b' parameters of {func} must have the same shape (row i = the same sample). "
            f"Got {va.shape} and {vb.shape} instead."
        )
    return va, vb, dims, coords, dropped


# --------------------------------------------------------------------------- bootstrap core


def _batch(arrays: Sequence[np.ndarray], n_resamples: int) -> int:
    """Resamples per vectorized call so that about _BATCH_ELEMENTS values are held at once."""
    per_resample = max(a.size for a in arrays)
    return int(np.clip(_BATCH_ELEMENTS // max(per_resample, 1), 1, n_resamples))


def _to_output(x):
    x = np.asarray(x, dtype=float)
    return float(x) if x.ndim == 0 else x


_COUNTS_CACHE: dict = {}  # (seed, n, n_resamples, batch) -> (n_resamples, n) resample counts
_COUNTS_CACHE_ELEMENTS = 8_000_000  # ~64 MB of float64 counts kept at most (a few (B, n) draws)


def _resample_counts(n: int, n_resamples: int, batch: int, seed):
    """Counts C (n_resamples, n): C[b, j] = how often sample j is in resample b, for exactly the index
    draws ``scipy.stats.bootstrap`` makes with ``rng = default_rng(seed)`` and this ``batch``
    (``rng.integers(0, n, (batch, n))`` per batch, in order; a paired bootstrap draws the same).

    Every call with the same (seed, n, n_resamples, batch) draws the same indices, so an integer seed's
    counts are cached: all the per-layer and per-condition intervals of a metric share one draw.
    """
    key = (seed, n, n_resamples, batch)
    cacheable = isinstance(seed, (int, np.integer))  # seed None: fresh entropy on every call
    if cacheable and key in _COUNTS_CACHE:
        return _COUNTS_CACHE[key]
    rng = np.random.default_rng(seed)
    counts = np.empty((n_resamples, n))
    for k in range(0, n_resamples, batch):
        i = rng.integers(0, n, (min(batch, n_resamples - k), n), dtype="int64")  # (b, n) resampled indices
        rows = np.arange(len(i))[:, None] * n
        counts[k:k + len(i)] = np.bincount((rows + i).ravel(), minlength=len(i) * n).reshape(len(i), n)
    if cacheable and counts.size <= _COUNTS_CACHE_ELEMENTS:
        while _COUNTS_CACHE and sum(c.size for c in _COUNTS_CACHE.values()) + counts.size > _COUNTS_CACHE_ELEMENTS:
            _COUNTS_CACHE.pop(next(iter(_COUNTS_CACHE)))  # oldest first
        _COUNTS_CACHE[key] = counts
    return counts


def _linear_quantile(dist: np.ndarray, q: float) -> np.ndarray:
    """The q-quantile along the last axis by scipy.stats.quantile's default rule ('linear', Hyndman-Fan 7), with
    its arithmetic: j + 1 = floor(q B + 1 - q), g = its fraction, (1 - g) y_(j) + g y_(j+1) of the sorted y
    (``np.quantile`` differs from it in the last bit)."""
    B = dist.shape[-1]
    jg = q * B + (1 - q)
    hi = int(jg // 1)
    g = jg % 1
    lo, hi = min(max(hi - 1, 0), B - 1), min(max(hi, 0), B - 1)
    y = np.partition(dist, (lo, hi), axis=-1)  # the two order statistics, as a full sort would place them
    return (1 - g) * y[..., lo] + g * y[..., hi]


def _fast_mean_bootstrap(arrays, statistic, *, paired, level, method, n_resamples, seed, batch=None):
    """The bootstrap distribution of a mean (or a paired mean difference) as one matrix product, or None.

    theta*_b = (1/n) sum_j C[b, j] x_j with C the resample counts of :func:`_resample_counts`: the same
    resamples as scipy's, so the interval is scipy's up to rounding in the last bits (sums of 0/1 data
    are exact, so their intervals are identical).  Used for 'percentile' and 'basic' only (BCa needs
    scipy's jackknife).  This is what makes thousands of per-layer intervals cheap: scipy gathers a
    (B, n) copy of the data per call; here the draw is shared and the work is one (B, n) x (n, columns)
    product.
    """
    if method not in ("percentile", "basic"):
        return None
    if statistic is _mean and not paired and len(arrays) == 1:
        x = np.asarray(arrays[0], dtype=float)
    elif statistic is _mean_diff and paired and len(arrays) == 2:
        x = np.asarray(arrays[0], dtype=float) - np.asarray(arrays[1], dtype=float)
    else:
        return None
    n = x.shape[0]
    columns = x.reshape(n, -1)  # (sample, columns)
    batch = _batch(arrays, n_resamples) if batch is None else batch
    counts = _resample_counts(n, n_resamples, batch, seed)  # (B, sample)
    dist = (counts @ columns / n).T.reshape(x.shape[1:] + (n_resamples,))  # (..., B)
    alpha = (1 - level) / 2
    low, high = (_linear_quantile(dist, q) for q in (alpha, 1 - alpha))
    if method == "basic":
        theta = np.asarray(statistic(*arrays, axis=0), dtype=float)
        low, high = 2 * theta - high, 2 * theta - low
    constant = np.ptp(x, axis=0) == 0  # its resample sums can differ in the last bit: zero spread by fiat
    return low, high, dist, constant


def _run_bootstrap(arrays, statistic, *, paired, level, method, n_resamples, seed, batch=None):
    """scipy.stats.bootstrap along axis 0 -> (estimate, low, high, bootstrap distribution).

    Means and paired mean differences under 'percentile' / 'basic' take :func:`_fast_mean_bootstrap`
    (the same resamples, one matrix product); everything else calls scipy.  Where the bootstrap
    distribution has zero spread (e.g. a constant difference, every sample identical), the interval
    is set to [estimate, estimate] exactly (BCa is undefined there).
    """
    import scipy.stats  # imported here: ~1 s, and the CLI imports this module (metric registry)

    estimate = np.asarray(statistic(*arrays, axis=0), dtype=float)
    batch = _batch(arrays, n_resamples) if batch is None else batch  # resamples drawn per call (see _resample_counts)
    fast = _fast_mean_bootstrap(arrays, statistic, paired=paired, level=level, method=method,
                                n_resamples=n_resamples, seed=seed, batch=batch)
    if fast is not None:
        low, high, dist, constant = fast
        flat = (np.ptp(dist, axis=-1) == 0) | constant
    else:
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)  # handled just below
            res = scipy.stats.bootstrap(
                tuple(arrays), statistic, paired=paired, vectorized=True, axis=0, confidence_level=level,
                method=method, n_resamples=n_resamples, batch=batch,
                rng=np.random.default_rng(seed),
            )
        low, high = (np.asarray(v, dtype=float) for v in res.confidence_interval)
        dist = np.asarray(res.bootstrap_distribution, dtype=float)
        flat = np.ptp(dist, axis=-1) == 0
    low, high = np.where(flat, estimate, low), np.where(flat, estimate, high)
    if np.isnan(low).any() or np.isnan(high).any():
        warnings.warn(
            f"{method} interval undefined for {int(np.isnan(low).sum())} entries (degenerate bootstrap "
            f"distribution); left as NaN." + (" Try method='percentile'." if method != "percentile" else ""),
            RuntimeWarning, stacklevel=3,
        )
    return estimate, low, high, dist


def _interval(name, arrays, statistic, *, paired, level, method, n_resamples, seed, dims, coords, dropped=0):
    est, low, high, _ = _run_bootstrap(
        arrays, statistic, paired=paired, level=level, method=method, n_resamples=n_resamples, seed=seed
    )
    return Interval(
        statistic=name, estimate=_to_output(est), low=_to_output(low), high=_to_output(high),
        n=int(arrays[0].shape[0]), level=level, method=method, n_resamples=n_resamples, seed=seed,
        paired=paired, dims=tuple(dims), coords=dict(coords), n_dropped=int(dropped),
        **degeneracy(low, high),
    )


def degeneracy(low, high) -> dict:
    """``{'degenerate': bool or bool array, 'note': str}`` for an interval [low, high]: zero width flagged."""
    flat = np.asarray(np.subtract(high, low) == 0)
    return {"degenerate": bool(flat) if flat.ndim == 0 else flat, "note": DEGENERATE_NOTE if flat.any() else ""}


def _mean(x, axis):
    return np.mean(x, axis=axis)


def _mean_diff(a, b, axis):
    return np.mean(a - b, axis=axis)


# --------------------------------------------------------------------------- public intervals


def bootstrap_ci(data, statistic: Callable, *, paired: bool = True, level: float = 0.95, method: str = DEFAULT_METHOD,
                 n_resamples: int = 1999, seed: int | None = 0, dim: str = "sample",
                 name: str | None = None) -> Interval:
    """CI of ``statistic(*data, axis=0)`` by resampling samples (rows) with replacement.

    Procedure (Efron): draw ``n_resamples`` index vectors i*_1..n from {1..n} uniformly with
    replacement (one vector shared by every array when ``paired``), evaluate the statistic on each
    resample, and form the interval from that distribution: 'percentile' = its (a/2, 1-a/2) quantiles,
    'basic' = 2*estimate minus those, 'BCa' = percentile levels corrected for bias z0 and
    acceleration (jackknife).  Delegates to ``scipy.stats.bootstrap(..., axis=0, vectorized=True)``.

    ``data`` is one array or a tuple of arrays with samples on axis 0 (numpy, or DataArrays with a
    ``dim`` dim, which must list the same sample ids; use :func:`align_samples` first).  Further axes
    are vectorized over (one interval per layer).  ``statistic(*arrays, axis)`` must reduce along
    ``axis``.
    """
    func = "bootstrap_ci"
    label = _check_statistic(statistic, func, name)
    method, level = _check_method(method, func), check_level(level, func)
    n_resamples = _check_resamples(n_resamples, func)
    data = tuple(data) if isinstance(data, (tuple, list)) else (data,)
    _check_same_ids(data, dim, func)
    parsed = [as_samples(x, dim, f"data[{i}]", func) for i, x in enumerate(data)]
    arrays = [p[0] for p in parsed]
    if paired and len({len(a) for a in arrays}) > 1:
        raise DataError(
            f"The 'data' arrays of {func} must have the same number of samples. "
            f"Got {[len(a) for a in arrays]} instead."
        )
    return _interval(label, arrays, statistic, paired=paired, level=level, method=method,
                     n_resamples=n_resamples, seed=seed, dims=parsed[0][1], coords=parsed[0][2])


def _check_same_ids(data, dim, func):
    ids = [x[dim].values.tolist() for x in data if is_dataarray(x) and dim in x.coords]
    if any(i != ids[0] for i in ids[1:]):
        raise DataError(
            f"The 'data' DataArrays of {func} must list the same {dim} ids in the same order. "
            f"Got different ids instead; call align_samples(a, b) first."
        )


def mean_ci(x, *, level: float = 0.95, method: str = DEFAULT_METHOD, n_resamples: int = 1999, seed: int | None = 0,
            dim: str = "sample") -> Interval:
    """CI of the mean over samples, mean(x_i), by the sample bootstrap (see :func:`bootstrap_ci`).

    ``x``: (sample,) or (sample, ...) numpy array, or a DataArray with a ``dim`` dim (one interval
    per entry of the other dims).
    """
    return bootstrap_ci(x, _mean, paired=False, level=level, method=method, n_resamples=n_resamples,
                        seed=seed, dim=dim, name="mean")


def paired_ci(a, b, statistic: Callable, *, level: float = 0.95, method: str = DEFAULT_METHOD, n_resamples: int = 1999,
              seed: int | None = 0, dim: str = "sample", name: str | None = None) -> Interval:
    """CI of ``statistic(a, b, axis=0)`` by the *paired* sample bootstrap.

    The same resampled indices i*_1..n are applied to a and b (``scipy.stats.bootstrap(paired=True)``).
    DataArrays are first inner-joined on sample id (:func:`align_samples`; ``n_dropped`` records the
    samples lost); numpy arrays must be row-aligned already.
    """
    func = "paired_ci"
    label = _check_statistic(statistic, func, name)
    method, level = _check_method(method, func), check_level(level, func)
    n_resamples = _check_resamples(n_resamples, func)
    va, vb, dims, coords, dropped = _paired_inputs(a, b, dim, func)
    return _interval(label, [va, vb], statistic, paired=True, level=level, method=method,
                     n_resamples=n_resamples, seed=seed, dims=dims, coords=coords, dropped=dropped)


def mean_diff_ci(a, b, *, level: float = 0.95, method: str = DEFAULT_METHOD, n_resamples: int = 1999,
                 seed: int | None = 0, dim: str = "sample") -> Interval:
    """CI of the paired mean difference  mean_i(a_i - b_i)  by the paired sample bootstrap.

    a and b are two conditions (or two stores) for the same samples; see :func:`paired_ci`.
    A constant difference c gives the zero-width interval [c, c].
    """
    return paired_ci(a, b, _mean_diff, level=level, method=method, n_resamples=n_resamples, seed=seed,
                     dim=dim, name="mean_difference")


def column_cis(a, b=None, *, level: float = 0.95, method: str = DEFAULT_METHOD, n_resamples: int = 1999,
               seed: int | None = 0) -> dict:
    """Per column j of ``a`` (sample, column): :func:`mean_ci` of ``a[ok_j, j]`` (with ``b``: :func:`mean_diff_ci`
    of ``a[ok_j, j]`` and ``b[ok_j, j]``, paired), ok_j = the rows finite in column j (and in b's), as
    ``{"estimate": [...], "low": [...], "high": [...], "n": [...]}`` with None where fewer than 2 rows are finite.

    Each column's interval is the one its own call gives (the same resample draw: that call's ``batch``) up to
    the last bits of the bootstrap means (one matrix product for the columns that share a mask instead of one
    per column): the per-layer curves of a metric are then one call per mask, not thousands of ~0.2 ms."""
    func = "column_cis"
    method, level = _check_method(method, func), check_level(level, func)
    n_resamples = _check_resamples(n_resamples, func)
    arrays = [np.asarray(a, dtype=float)] + ([] if b is None else [np.asarray(b, dtype=float)])
    if arrays[0].ndim != 2 or any(x.shape != arrays[0].shape for x in arrays):
        raise DataError(f"The 'a' (and 'b') parameters of {func} must be (sample, column) arrays of one shape. "
                        f"Got shapes {[x.shape for x in arrays]} instead.")
    ok = np.logical_and.reduce([np.isfinite(x) for x in arrays])  # (sample, column)
    cols = arrays[0].shape[1]
    out = {"estimate": [None] * cols, "low": [None] * cols, "high": [None] * cols, "n": ok.sum(axis=0).tolist()}
    groups: dict = {}
    for j in range(cols):
        if ok[:, j].sum() >= 2:
            groups.setdefault(ok[:, j].tobytes(), []).append(j)
    statistic, paired = (_mean, False) if b is None else (_mean_diff, True)
    step = max(1, _BATCH_ELEMENTS // n_resamples)  # columns per bootstrap: its (column, B) means ~16 MB at most
    for key, group in groups.items():
        rows = [x[np.frombuffer(key, dtype=bool)] for x in arrays]  # (finite rows, column) of each array
        for start in range(0, len(group), step):
            js = group[start:start + step]
            sub = [x[:, js] for x in rows]
            est, low, high, _ = _run_bootstrap(sub, statistic, paired=paired, level=level, method=method,
                                               n_resamples=n_resamples, seed=seed,
                                               batch=_batch([x[:, :1] for x in sub], n_resamples))
            for k, j in enumerate(js):
                out["estimate"][j], out["low"][j], out["high"][j] = float(est[k]), float(low[k]), float(high[k])
    return out


# --------------------------------------------------------------------------- p-values


def paired_pvalues(a, b, *, test: str = "signflip", n_resamples: int = 9999, seed: int | None = 0,
                   dim: str = "sample"):
    """Two-sided p-values for H0: E[a - b] = 0, one per entry of the extra dims.

    - ``'signflip'``: paired permutation test of the mean difference (:func:`signflip_pvalue`; a_i and
      b_i swapped at random = the sign of d_i flipped).  Valid when d_i is symmetric about 0 under H0.
    - ``'bootstrap'``: from the paired bootstrap distribution θ*_1..B of d̄ (percentile-interval
      inversion: the smallest alpha whose (1 - alpha) percentile CI excludes 0):
      p = min(1, 2 * min(1 + #{θ* <= 0}, 1 + #{θ* >= 0}) / (B + 1)).

    Returns a float (no extra dims) or an ndarray over the extra dims.
    """
    func = "paired_pvalues"
    _check_choice(test, "test", TESTS, func)
    n_resamples = _check_resamples(n_resamples, func)
    va, vb, _, _, _ = _paired_inputs(a, b, dim, func)
    if test == "signflip":
        return _to_output(signflip_pvalue(va - vb, n_resamples=n_resamples, seed=seed))
    _, _, _, dist = _run_bootstrap([va, vb], _mean_diff, paired=True, level=0.95, method="percentile",
                                   n_resamples=n_resamples, seed=seed)
    return _to_output(bootstrap_pvalue(dist))


def signflip_pvalue(d, *, n_resamples: int = 9999, seed: int | None = 0):
    """Two-sided sign-flip (paired permutation) p-value of mean(d) = 0, vectorized over d's extra axes.

    t = mean_i d_i; T*_b = mean_i s_bi d_i with signs s_bi = +-1.  Exact when 2**n <= n_resamples
    (all sign vectors, p = #{|T*| >= |t|} / 2**n), else B = n_resamples random sign vectors
    (seeded) and p = (1 + #{|T*| >= |t|}) / (B + 1).  A relative tolerance of 1e-9 on |t| counts ties.
    All layers share the same sign vectors (the samples are what is permuted).
    """
    d = np.asarray(d, dtype=float)
    n = d.shape[0]
    flat = d.reshape(n, -1)
    t = np.abs(flat.mean(axis=0))
    exact = n < 63 and 2**n <= n_resamples
    if exact:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_resamples, n))
    ge = np.zeros(flat.shape[1])
    for start in range(0, len(signs), 4096):  # bounded memory: (4096, layers) at a time
        ge += (np.abs(signs[start:start + 4096] @ flat / n) >= t * (1 - 1e-9)).sum(axis=0)
    p = ge / len(signs) if exact else (ge + 1) / (len(signs) + 1)
    return np.minimum(p, 1.0).reshape(d.shape[1:])


def bootstrap_pvalue(distribution, null: float = 0.0):
    """Two-sided p from a bootstrap distribution (last axis = resamples).

    p = min(1, 2 * min(1 + #{θ* <= null}, 1 + #{θ* >= null}) / (B + 1)).
    """
    dist = np.asarray(distribution, dtype=float)
    b = dist.shape[-1]
    below = (dist <= null).sum(axis=-1) + 1
    above = (dist >= null).sum(axis=-1) + 1
    return np.minimum(1.0, 2 * np.minimum(below, above) / (b + 1))


def adjust_pvalues(p, method: str = "holm"):
    """Family-wise (Holm) or false-discovery (Benjamini-Hochberg) adjusted p-values.

    With sorted p_(1) <= ... <= p_(m):
    - Holm: p~_(i) = max_{j <= i} min(1, (m - j + 1) * p_(j))  (controls the FWER, any dependence);
    - BH:   p~_(i) = min_{j >= i} min(1, m * p_(j) / j)         (controls the FDR, independence or
      positive dependence; ``scipy.stats.false_discovery_control(method='bh')``);
    - none: p unchanged.
    Reject H_i at level alpha iff p~_i <= alpha.  Shape of ``p`` is kept (all entries = one family).
    """
    func = "adjust_pvalues"
    _check_choice(method, "method", CORRECTIONS, func)
    p = np.asarray(p, dtype=float)
    if p.size == 0 or not np.all((p >= 0) & (p <= 1)):
        raise DataError(f"The 'p' parameter of {func} must be non-empty p-values in [0, 1]. Got {p!r} instead.")
    flat = p.ravel()
    if method == "none":
        out = flat.copy()
    elif method == "bh":
        import scipy.stats

        out = scipy.stats.false_discovery_control(flat, method="bh")
    else:
        out = _holm(flat)
    return out.reshape(p.shape)


def _holm(p: np.ndarray) -> np.ndarray:
    m = len(p)
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.maximum.accumulate(stepped)
    return out


# --------------------------------------------------------------------------- comparisons


@dataclasses.dataclass(frozen=True, eq=False)
class Comparison:
    """Per-layer paired comparison: the mean-difference CI, raw and adjusted p, who survives."""

    interval: Interval
    pvalue: Any
    p_adjusted: Any
    reject: Any
    alpha: float
    test: str
    correction: str
    n_tests: int

    @property
    def survivors(self) -> list:
        """Labels (coords of the single extra dim, or index tuples) whose H0 is rejected."""
        idx = np.argwhere(np.atleast_1d(self.reject))
        dims = self.interval.dims
        if len(dims) == 1:
            return [self.interval.coords[dims[0]][i[0]] for i in idx]
        return [tuple(int(j) for j in i) for i in idx]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("pvalue", "p_adjusted", "reject", "alpha", "test", "correction", "n_tests")}
        return jsonable({"interval": self.interval.to_dict(), **d, "survivors": self.survivors})


def compare_paired(a, b, *, test: str = "signflip", correction: str = "holm", alpha: float = 0.05,
                   level: float = 0.95, method: str = DEFAULT_METHOD, n_resamples: int = 1999, seed: int | None = 0,
                   dim: str = "sample") -> Comparison:
    """Paired comparison of two conditions at every layer at once, with multiplicity control.

    For each entry of the extra dims (e.g. each layer): CI of mean_i(a_i - b_i) (:func:`mean_diff_ci`),
    a two-sided p-value (:func:`paired_pvalues`, ``test``), then all p-values adjusted as one family
    (:func:`adjust_pvalues`, ``correction`` 'holm' | 'bh' | 'none'); ``reject = p_adjusted <= alpha``.
    """
    func = "compare_paired"
    _check_choice(correction, "correction", CORRECTIONS, func)
    if not isinstance(alpha, (float, int)) or not 0 < alpha < 1:
        raise ConfigError(f"The 'alpha' parameter of {func} must be a float in (0, 1). Got {alpha!r} instead.")
    ci = mean_diff_ci(a, b, level=level, method=method, n_resamples=n_resamples, seed=seed, dim=dim)
    p = np.asarray(paired_pvalues(a, b, test=test, n_resamples=n_resamples, seed=seed, dim=dim))
    adj = adjust_pvalues(p, correction)
    reject = (adj <= alpha) if adj.ndim else bool(adj <= alpha)
    return Comparison(
        interval=ci, pvalue=_to_output(p), p_adjusted=_to_output(adj), reject=reject,
        alpha=float(alpha), test=test, correction=correction, n_tests=int(p.size),
    )
