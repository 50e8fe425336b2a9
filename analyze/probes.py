"""Linear probes per layer, cross-validated, with out-of-fold predictions and a shuffled-label control.

For one (condition, site) the states are X (sample, layer, hidden); for each layer a probe
``StandardScaler -> LogisticRegression(class_weight='balanced')`` is scored by stratified k-fold
cross-validation (``StratifiedKFold(n_splits, shuffle=True, random_state=seed)``).  Every sample's
out-of-fold (OOF) prediction is kept, so CIs resample samples (:func:`probe_accuracy_ci`).

Metric: **balanced accuracy** by default (mean over classes of the recall; chance = 1/K whatever
the class proportions, which matches the balanced class weights), computed once on the pooled OOF
predictions of all folds.  ``metric='accuracy'`` gives the plain fraction correct.

Control: the labels permuted once with ``numpy.random.default_rng(seed)`` (same permutation for
every layer), probed by the same fold procedure; ``selectivity = accuracy - control``.

Fitting: ``backend='batched'`` (default) solves the 2k fits of a layer (k folds x 2 arms) together
with :func:`gapcache.analyze.probe_solver.fit_predict_layers`: the same estimator, objective and
scipy L-BFGS-B iterates as the sklearn Pipeline (tested: decision values equal to ~1e-7, OOF labels
equal), one matrix product per evaluation round for all fits instead of one sklearn fit each.
``backend='sklearn'`` runs :func:`make_probe` per fold (needed for solvers other than lbfgs).

Labels: integers, ``-1`` = no label (excluded, counted in ``n_excluded``).  One class, or a class
with fewer labelled samples than ``n_splits``, raises :class:`~gapcache.errors.DataError`; folds are
never reduced silently.

Usage::

    from gapcache.analyze import probes
    ds = gapcache.store.open_store("run.zarr")
    X = ds.text_states.sel(condition="original", site="prediction")      # (sample, layer, hidden), lazy
    res = probes.probe_layers(X, ds.label, n_splits=5, seed=0)           # one layer computed at a time
    res.accuracy, res.control, res.selectivity                           # (layer,)
    ci = probes.probe_accuracy_ci(res, which="selectivity")              # bootstrap over samples
    res.to_xarray()                                                      # + OOF predictions (layer, sample)
    refit = probes.refit_bootstrap_ci(X.isel(layer=12).values, ds.label.values, n_refit=20)
"""

from __future__ import annotations

import dataclasses
import time
import warnings
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from gapcache.analyze import stats
from gapcache.analyze.probe_solver import fit_predict_layers, layers_per_block
from gapcache.errors import ConfigError, DataError

METRICS = ("balanced_accuracy", "accuracy")
LOAD_WHOLE_BYTES = 64 * 2**20  # a lazy X at most this large is loaded at once, larger ones one layer at a time
NO_LABEL = -1


# --------------------------------------------------------------------------- result


@dataclasses.dataclass(frozen=True, eq=False)
class ProbeResult:
    """Probe scores per layer and the OOF predictions behind them.

    ``accuracy``/``control``/``selectivity``: (layer,); ``oof``/``oof_control``: (layer, sample) predicted
    labels; ``y``/``y_control``: (sample,) true and permuted labels of the kept samples (``sample``
    their ids); ``params``: solver settings; ``seconds``: wall time per layer (layers fitted as one block
    share its time equally).
    """

    layers: list
    sample: np.ndarray
    y: np.ndarray
    y_control: np.ndarray | None
    accuracy: np.ndarray
    control: np.ndarray | None
    selectivity: np.ndarray | None
    oof: np.ndarray
    oof_control: np.ndarray | None
    metric: str
    n_splits: int
    seed: int
    n_excluded: int
    class_counts: dict
    params: dict
    seconds: np.ndarray

    def to_dict(self) -> dict:
        """Scalars and per-layer scores as plain Python (OOF predictions left out: see to_xarray)."""
        keep = ("layers", "accuracy", "control", "selectivity", "metric", "n_splits", "seed", "n_excluded",
                "class_counts", "params", "seconds")
        d = {k: getattr(self, k) for k in keep}
        d["n"] = int(len(self.y))
        return stats.jsonable(d)

    def to_xarray(self):
        """``xarray.Dataset``: scores over ``layer``, OOF predictions over (layer, sample)."""
        import xarray as xr

        data = {"accuracy": ("layer", self.accuracy), "oof": (("layer", "sample"), self.oof),
                "y": ("sample", self.y), "seconds": ("layer", self.seconds)}
        if self.control is not None:
            data.update(control=("layer", self.control), selectivity=("layer", self.selectivity),
                        oof_control=(("layer", "sample"), self.oof_control), y_control=("sample", self.y_control))
        attrs = {k: v for k, v in self.to_dict().items() if not isinstance(v, list)}
        attrs.update(class_counts=str(self.class_counts), params=str(self.params))
        return xr.Dataset(data, coords={"layer": self.layers, "sample": self.sample}, attrs=attrs)


# --------------------------------------------------------------------------- labels and probe


def clean_labels(y, n_splits: int, func: str = "probe_layers"):
    """(mask of labelled samples, their labels, n_excluded, class counts); checks classes vs n_splits.

    Labels must be integers; -1 = no label.  Raises DataError when fewer than 2 classes remain or a
    class has fewer than ``n_splits`` samples (stratified k-fold needs one per fold).
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"The 'y' parameter of {func} must be 1-D (one label per sample). Got shape {y.shape} instead.")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise DataError(
                f"The 'y' parameter of {func} must hold integer labels (-1 = none). Got dtype {y.dtype} instead."
            )
        y = y.astype(np.int64)
    mask = y != NO_LABEL
    classes, counts = np.unique(y[mask], return_counts=True)
    class_counts = {int(c): int(k) for c, k in zip(classes, counts)}
    excluded = int((~mask).sum())
    if len(classes) < 2:
        raise DataError(
            f"The 'y' parameter of {func} must have at least 2 classes after excluding {excluded} unlabelled (-1) "
            f"samples. Got class counts {class_counts} instead."
        )
    small = {c: k for c, k in class_counts.items() if k < n_splits}
    if small:
        raise DataError(
            f"The 'y' parameter of {func} must have at least n_splits={n_splits} labelled samples per class "
            f"(stratified {n_splits}-fold). Got class counts {class_counts} instead (too few: {small}); "
            f"lower n_splits to {min(class_counts.values())} or label more samples."
        )
    return mask, y[mask], excluded, class_counts


def make_probe(C: float = 1.0, solver: str = "lbfgs", max_iter: int = 1000, tol: float = 1e-4) -> Pipeline:
    """``Pipeline([StandardScaler(), LogisticRegression(C, class_weight='balanced', solver, max_iter, tol)])``.

    L2-penalized logistic regression (sklearn's default penalty) on z-scored features; the scaler is
    fitted inside each training fold, so no test statistics leak.
    """
    lr = LogisticRegression(C=C, class_weight="balanced", solver=solver, max_iter=max_iter, tol=tol)
    return Pipeline([("scale", StandardScaler()), ("logreg", lr)])


def score(y, pred, metric: str = "balanced_accuracy") -> float:
    """balanced accuracy = (1/K) sum_k #{pred_i = y_i = k} / #{y_i = k} over the K classes of y;
    accuracy = mean(pred_i = y_i) (:func:`score_layers` of one layer)."""
    return float(score_layers(y, np.asarray(pred)[None, :], metric)[0])


def score_layers(y, pred, metric: str = "balanced_accuracy") -> np.ndarray:
    """:func:`score` of every layer at once: pred (layer, sample) -> (layer,).

    balanced accuracy = (1/K) sum_k mean_{i: y_i = k} [pred_li = k] over the K classes of y; accuracy =
    mean_i [pred_li = y_i].  Written out (the same floats as sklearn's ``balanced_accuracy_score`` and
    ``accuracy_score``, tests check) because sklearn's input validation costs ~1-2 ms per call and a probe
    scores every layer of every split and refit.
    """
    y = np.asarray(y)
    hit = np.asarray(pred) == y[None, :]  # (layer, sample)
    if metric != "balanced_accuracy":
        return hit.mean(axis=1)
    return np.mean([hit[:, y == k].mean(axis=1) for k in np.unique(y)], axis=0)


def oof_predict(X, y, folds, probe: Pipeline, n_jobs=None, threads: int | None = 1) -> np.ndarray:
    """Out-of-fold predicted label of every sample: each fold's test part predicted by a probe fitted
    on the other folds (``cross_val_predict`` with the given fold list).

    ``threads`` caps BLAS/OpenMP threads per fit (threadpoolctl; None = library default).  Probe-sized
    fits run fastest single-threaded (measured 3x faster for 800 x 2048 on a busy 2-core node);
    parallelize over folds with ``n_jobs`` instead.
    """
    with warnings.catch_warnings(), threadpool_limits(limits=threads):
        warnings.simplefilter("ignore", ConvergenceWarning)  # counted as a param choice (max_iter), not per fit
        return cross_val_predict(probe, X, y, cv=folds, n_jobs=n_jobs)


def _folds(y, n_splits: int, seed: int):
    return list(StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


# --------------------------------------------------------------------------- inputs


def _layer_source(X, sample_dim: str, layer_dim: str, feature_dim: str):
    """(n_samples, layer labels, sample ids or None, get(slice of layers) -> (sample, layer, hidden) ndarray)."""
    if stats.is_dataarray(X):
        missing = [d for d in (sample_dim, layer_dim, feature_dim) if d not in X.dims]
        if missing or X.ndim != 3:
            raise DataError(
                f"The 'X' parameter of probe_layers must be a DataArray with dims ({sample_dim}, {layer_dim}, "
                f"{feature_dim}). Got dims {X.dims} instead."
            )
        X = X.transpose(sample_dim, layer_dim, feature_dim)
        layers = X[layer_dim].values.tolist() if layer_dim in X.coords else list(range(X.sizes[layer_dim]))
        ids = X[sample_dim].values if sample_dim in X.coords else None
        if X.nbytes <= LOAD_WHOLE_BYTES:
            X = X.load()  # one read of each store chunk, not one per layer (a chunk often holds several layers)
        return X.sizes[sample_dim], layers, ids, lambda sl: np.asarray(X.isel({layer_dim: sl}).values)
    X = np.asarray(X) if not hasattr(X, "compute") or X.nbytes <= LOAD_WHOLE_BYTES else X
    if X.ndim == 2:
        X = X[:, None, :]
    if X.ndim != 3:
        raise DataError(
            f"The 'X' parameter of probe_layers must be (sample, hidden) or (sample, layer, hidden). "
            f"Got shape {X.shape} instead."
        )
    return X.shape[0], list(range(X.shape[1])), None, lambda sl: np.asarray(X[:, sl, :])


def _labels_for(y, ids, n: int, sample_dim: str):
    """Labels in X's sample order: a DataArray y is selected by X's sample ids."""
    if stats.is_dataarray(y):
        if ids is not None and sample_dim in y.coords:
            known = set(y[sample_dim].values.tolist())
            missing = [s for s in ids.tolist() if s not in known]
            if missing:
                raise DataError(
                    f"The 'y' parameter of probe_layers must label every sample of X. "
                    f"Got no label for {len(missing)} samples instead, e.g. {missing[:3]}."
                )
            y = y.sel({sample_dim: ids})
        y = y.values
    y = np.asarray(y)
    if len(y) != n:
        raise DataError(
            f"The 'y' parameter of probe_layers must have one label per sample of X ({n}). Got {len(y)} instead."
        )
    return y


def _check_params(n_splits, metric, func="probe_layers"):
    if not isinstance(n_splits, (int, np.integer)) or isinstance(n_splits, bool) or n_splits < 2:
        raise ConfigError(f"The 'n_splits' parameter of {func} must be an int >= 2. Got {n_splits!r} instead.")
    if metric not in METRICS:
        raise ConfigError(f"The 'metric' parameter of {func} must be one of {list(METRICS)}. Got {metric!r} instead.")


# --------------------------------------------------------------------------- main entry


def probe_layers(X, y, *, n_splits: int = 5, seed: int = 0, control: bool = True, metric: str = "balanced_accuracy",
                 C: float = 1.0, solver: str = "lbfgs", max_iter: int = 1000, tol: float = 1e-4, n_jobs=None,
                 threads: int | None = 1, backend: str = "batched", sample_dim: str = "sample",
                 layer_dim: str = "layer", feature_dim: str = "hidden") -> ProbeResult:
    """Cross-validated linear probe at every layer, plus the shuffled-label control.

    Procedure, per layer l: folds = StratifiedKFold(n_splits, shuffle=True, random_state=seed) on the
    labelled samples; OOF predictions from :func:`make_probe` fitted on k-1 folds; accuracy_l =
    :func:`score` (y, OOF).  Control: y_perm = default_rng(seed).permutation(y), folds stratified on
    y_perm by the same procedure, control_l = score(y_perm, OOF_perm); selectivity_l = accuracy_l - control_l.
    The same folds serve every layer.

    ``X``: (sample, hidden) or (sample, layer, hidden) numpy, or a DataArray (sample, layer, hidden),
    possibly dask-backed: one layer is loaded at a time (memory ~ one layer, if the store chunks
    layers separately), or all at once when X is at most ``LOAD_WHOLE_BYTES`` (64 MiB).
    ``y``: (sample,) integer labels (-1 = none) or a DataArray selected by X's ids.
    ``backend``: 'batched' (default) fits the 2k probes of a layer together
    (:func:`gapcache.analyze.probe_solver.fit_predict_layers`: the same estimator and the same
    L-BFGS-B iterates, every evaluation one matrix product for all folds and both arms; about 5x
    faster, see ``benchmarks/bench_probes.py``); 'sklearn' fits one sklearn Pipeline per fold
    (:func:`oof_predict`; ``n_jobs`` = folds fitted in parallel by joblib; needed for solvers other
    than lbfgs).  ``threads``: BLAS/OpenMP threads.  Solver: lbfgs, max_iter 1000
    (ConvergenceWarnings silenced; on these L2-penalized problems lbfgs converges in tens of iterations).
    """
    _check_params(n_splits, metric)
    _check_backend(backend, solver)
    n_all, layers, ids, get = _layer_source(X, sample_dim, layer_dim, feature_dim)
    mask, yk, excluded, counts = clean_labels(_labels_for(y, ids, n_all, sample_dim), n_splits)
    folds = _folds(yk, n_splits, seed)
    y_ctrl = np.random.default_rng(seed).permutation(yk) if control else None
    folds_ctrl = _folds(y_ctrl, n_splits, seed) if control else None
    fit = _batched_arms if backend == "batched" else _sklearn_arms
    probe = dict(C=C, solver=solver, max_iter=max_iter, tol=tol, n_jobs=n_jobs, threads=threads)
    oof, oof_c, secs = [], [], []
    step = layers_per_block(int(mask.sum()), _hidden_size(X, feature_dim)) if backend == "batched" else 1
    for a in range(0, len(layers), step):
        t0 = time.perf_counter()
        Xi = get(slice(a, a + step))[mask]  # (sample, L, hidden)
        for j in range(Xi.shape[1]):
            _check_finite(Xi[:, j], layers[a + j])
        one, ctrl = fit(Xi, yk, folds, y_ctrl, folds_ctrl, probe)  # (L, sample) each
        oof.extend(one)
        if control:
            oof_c.extend(ctrl)
        secs.extend([(time.perf_counter() - t0) / Xi.shape[1]] * Xi.shape[1])
    params = dict(C=C, solver=solver, max_iter=max_iter, tol=tol, class_weight="balanced", scaler="standard",
                  backend=backend)
    return _result(layers, ids, mask, yk, y_ctrl, oof, oof_c, metric, n_splits, seed, excluded, counts, params, secs)


BACKENDS = ("batched", "sklearn")


def _check_backend(backend, solver):
    if backend not in BACKENDS:
        raise ConfigError(f"The 'backend' parameter of probe_layers must be one of {list(BACKENDS)}. "
                          f"Got {backend!r} instead.")
    if backend == "batched" and solver != "lbfgs":
        raise ConfigError(f"The 'solver' parameter of probe_layers must be 'lbfgs' with backend='batched'. Got "
                          f"{solver!r} instead; pass backend='sklearn' for sklearn's other solvers.")


def _sklearn_arms(Xi, yk, folds, y_ctrl, folds_ctrl, p):
    """(OOF predictions, control OOF or None), each (1, sample), of a block of one layer: one sklearn
    Pipeline per fold."""
    probe = make_probe(C=p["C"], solver=p["solver"], max_iter=p["max_iter"], tol=p["tol"])
    Xi = Xi[:, 0]
    one = oof_predict(Xi, yk, folds, probe, p["n_jobs"], p["threads"])
    ctrl = oof_predict(Xi, y_ctrl, folds_ctrl, probe, p["n_jobs"], p["threads"]) if y_ctrl is not None else None
    return one[None], (None if ctrl is None else ctrl[None])


def _batched_arms(Xi, yk, folds, y_ctrl, folds_ctrl, p):
    """(OOF predictions, control OOF or None), each (layer, sample), of a block of layers: all folds of
    both arms of every layer of the block in one batched fit."""
    arms = [(yk, folds)] + ([(y_ctrl, folds_ctrl)] if y_ctrl is not None else [])
    splits = [s for _, fs in arms for s in fs]
    labels = np.stack([y for y, fs in arms for _ in fs])  # (split, sample)
    preds = fit_predict_layers(Xi, labels, splits, C=p["C"], tol=p["tol"], max_iter=p["max_iter"],
                               threads=p["threads"])
    out = []
    for a, (y, fs) in enumerate(arms):
        oof = np.empty((Xi.shape[1], len(y)), dtype=y.dtype)
        for f, (_, test) in enumerate(fs):
            oof[:, test] = preds[a * len(fs) + f]
        out.append(oof)
    return out[0], (out[1] if len(out) > 1 else None)


def _hidden_size(X, feature_dim: str) -> int:
    return int(X.sizes[feature_dim]) if stats.is_dataarray(X) else int(np.shape(X)[-1])


def _check_finite(Xi, layer):
    if not np.all(np.isfinite(Xi)):
        bad = int((~np.isfinite(Xi)).any(axis=1).sum())
        raise DataError(f"The states of layer {layer!r} must be finite. Got NaN/inf in {bad} samples instead.")


def _result(layers, ids, mask, yk, y_ctrl, oof, oof_c, metric, n_splits, seed, excluded, counts, params, secs):
    oof = np.stack(oof)
    acc = score_layers(yk, oof, metric)
    ctrl = oof_c = np.stack(oof_c) if oof_c else None
    if oof_c is not None:
        ctrl = score_layers(y_ctrl, oof_c, metric)
    sample = np.asarray(ids)[mask] if ids is not None else np.flatnonzero(mask)
    return ProbeResult(
        layers=layers, sample=sample, y=yk, y_control=y_ctrl, accuracy=acc, control=ctrl,
        selectivity=None if ctrl is None else acc - ctrl, oof=oof, oof_control=oof_c, metric=metric,
        n_splits=n_splits, seed=seed, n_excluded=excluded, class_counts=counts, params=params,
        seconds=np.asarray(secs),
    )


# --------------------------------------------------------------------------- confidence intervals


def _class_masks(y, classes):
    return [(y == c).astype(float)[:, None] for c in classes]


def _balanced(correct, masks, axis):
    """(1/K') sum_k sum_i c_i m_ik / sum_i m_ik, along ``axis``, over the K' classes present.

    A bootstrap resample of a small class can miss it (4 classes of 8: ~1 resample in 1000); like
    sklearn's ``balanced_accuracy_score`` the mean is then over the classes that are there, not NaN
    (a single NaN resample would make the whole percentile interval NaN)."""
    counts = np.stack([np.sum(m, axis=axis) for m in masks])
    hits = np.stack([np.sum(correct * m, axis=axis) for m in masks])
    present = counts > 0
    recalls = np.divide(hits, counts, out=np.zeros(hits.shape, dtype=float), where=present)
    return recalls.sum(axis=0) / present.sum(axis=0)


def _statistic(metric: str, n_classes: int, which: str):
    """Vectorized statistic over (correct[, correct_ctrl], masks..[, masks_ctrl..])."""
    def acc(c, masks, axis):
        return _balanced(c, masks, axis) if metric == "balanced_accuracy" else np.mean(c, axis=axis)

    if which in ("accuracy", "control"):
        return lambda c, *m, axis: acc(c, m, axis)
    k = n_classes
    return lambda c, cc, *m, axis: acc(c, m[:k], axis) - acc(cc, m[k:], axis)


def _ci_data(result: ProbeResult, classes, which: str) -> tuple:
    """(correct[, correct_control], class masks..[, control class masks..]), each (sample, layer)."""
    def arm(oof, y):
        correct = (oof == y).T.astype(float)  # (sample, layer)
        return [correct], [np.broadcast_to(m, correct.shape) for m in _class_masks(y, classes)]

    c, m = arm(result.oof, result.y)
    if which == "accuracy":
        return tuple(c + m)
    cc, mc = arm(result.oof_control, result.y_control)
    return tuple(cc + mc) if which == "control" else tuple(c + cc + m + mc)


def probe_accuracy_ci(result: ProbeResult, *, which: str = "accuracy", level: float = 0.95, method: str = stats.DEFAULT_METHOD,
                      n_resamples: int = 1999, seed: int = 0) -> stats.Interval:
    """Per-layer CI of probe accuracy (or control, or selectivity) by bootstrapping samples.

    Data: the OOF correctness indicator c_il = [oof_il == y_i] (layers as an extra axis).  Each
    resample draws samples with replacement (the same draw for every layer, and for the true and
    control arms of 'selectivity', i.e. paired) and recomputes the metric from the resampled
    (c, y): balanced accuracy = mean over the classes present of the resampled class recall.  This is the
    *evaluation* uncertainty with the fitted OOF predictions held fixed; :func:`refit_bootstrap_ci`
    adds the training variability.  Returns a :class:`stats.Interval` over dim 'layer'.

    Caveat (measured): at chance level the CV accuracy varies more than a binomial of n (the folds
    are not independent test sets: sd 0.044 vs 0.035 for 200 samples, 16 dims), so this interval
    covers 0.5 for a chance layer about 90% of the time at level 0.95.  Use the selectivity CI or
    :func:`refit_bootstrap_ci` before calling a single layer "above chance".
    """
    if which not in ("accuracy", "control", "selectivity"):
        raise ConfigError(f"The 'which' parameter of probe_accuracy_ci must be one of ['accuracy', 'control', "
                          f"'selectivity']. Got {which!r} instead.")
    if which != "accuracy" and result.oof_control is None:
        raise ConfigError(f"probe_accuracy_ci(which={which!r}) needs a result computed with control=True.")
    classes = np.unique(result.y)
    data = _ci_data(result, classes, which)
    ci = stats.bootstrap_ci(data, _statistic(result.metric, len(classes), which), paired=True, level=level,
                            method=method, n_resamples=n_resamples, seed=seed, name=f"probe_{which}")
    return dataclasses.replace(ci, dims=("layer",), coords={"layer": list(result.layers)})


def refit_bootstrap_ci(X, y, *, n_refit: int = 20, n_splits: int = 5, seed: int = 0, level: float = 0.95,
                       metric: str = "balanced_accuracy", C: float = 1.0, solver: str = "lbfgs",
                       max_iter: int = 1000, tol: float = 1e-4, backend: str = "batched") -> stats.Interval:
    """Slower CI of one layer's probe accuracy that refits the probe on each bootstrap resample.

    Procedure: estimate = the cross-validated score on the data (as :func:`probe_layers`).  For
    b = 1..n_refit: draw a *stratified* bootstrap resample (within each class, n_k indices with
    replacement, so class counts are kept), run StratifiedGroupKFold(n_splits, shuffle=True,
    random_state=seed + b) cross-validation on it with groups = original sample index (copies of a
    sample never sit in both train and test), score the OOF predictions.  Interval = the
    (a/2, 1-a/2) percentiles of the n_refit scores (``method='percentile-refit'``).  Cost =
    n_refit * n_splits fits; with n_refit ~ 20 the interval ends are themselves noisy: read it as
    a check that training variability does not dwarf the OOF interval, not as a precise CI.
    ``backend='batched'`` fits all (n_refit + 1) * n_splits probes in one
    :func:`~gapcache.analyze.probe_solver.fit_predict_layers` call (a resample's repeated rows are
    weights); 'sklearn' refits one Pipeline per fold.
    """
    _check_params(n_splits, metric, "refit_bootstrap_ci")
    _check_backend(backend, solver)
    if not isinstance(n_refit, (int, np.integer)) or n_refit < 2:
        raise ConfigError(
            f"The 'n_refit' parameter of refit_bootstrap_ci must be an int >= 2. Got {n_refit!r} instead."
        )
    level = stats.check_level(level, "refit_bootstrap_ci")
    X = np.asarray(X)
    mask, yk, _, _ = clean_labels(y, n_splits, "refit_bootstrap_ci")
    X = X[mask]
    rng = np.random.default_rng(seed)
    resamples = [(np.arange(len(yk)), _folds(yk, n_splits, seed))]
    resamples += [_resample(yk, n_splits, seed + b, rng) for b in range(1, n_refit + 1)]
    fit = _batched_oof if backend == "batched" else _sklearn_oof
    oofs = fit(X, yk, resamples, dict(C=C, solver=solver, max_iter=max_iter, tol=tol))
    estimate, *scores = [score(yk[idx], oof, metric) for (idx, _), oof in zip(resamples, oofs)]
    low, high = np.quantile(scores, [(1 - level) / 2, (1 + level) / 2])
    return stats.Interval(statistic=f"probe_{metric}_refit", estimate=estimate, low=float(low), high=float(high),
                          n=int(len(yk)), level=level, method="percentile-refit", n_resamples=int(n_refit),
                          seed=seed, paired=False)


def _resample(y, n_splits, fold_seed, rng):
    """(idx, folds over positions of idx): a stratified bootstrap resample and its group k-fold."""
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), size=int((y == c).sum())) for c in np.unique(y)])
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=fold_seed)
    return idx, list(cv.split(np.zeros(len(idx)), y[idx], groups=idx))


def _sklearn_oof(X, y, resamples, p):
    probe = make_probe(**p)
    return [oof_predict(X[idx], y[idx], folds, probe) for idx, folds in resamples]


def _batched_oof(X, y, resamples, p):
    """OOF predictions of every resample's positions, all folds of all resamples fitted together."""
    splits = [(idx[tr], idx[te]) for idx, folds in resamples for tr, te in folds]
    preds = fit_predict_layers(X, y, splits, C=p["C"], tol=p["tol"], max_iter=p["max_iter"])
    out, i = [], 0
    for idx, folds in resamples:
        oof = np.empty(len(idx), dtype=y.dtype)
        for _, te in folds:
            oof[te] = preds[i][0]
            i += 1
        out.append(oof)
    return out
