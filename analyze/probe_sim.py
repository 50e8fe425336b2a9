"""Simulated probe data with a known answer, to measure the coverage of probe intervals.

Used by ``benchmarks/bench_probe_coverage.py`` and the slow coverage tests in
``tests/test_probe_stats.py``.

- :func:`planted`: labels with fixed class proportions; states (sample, layer, hidden) standard
  normal, plus ``signal`` times the one-hot of the class in the first K hidden units at the layers
  listed in ``signal_layers`` (all layers by default).  signal = 0 is chance.
- :func:`true_score`: the target of a k-fold CV score: the expected balanced accuracy of the
  procedure fitted on n (k-1)/k samples (class proportions kept), on the population (a large fresh
  test set), averaged over fresh training sets.  Chance: exactly 1/K for any fitted probe
  (balanced accuracy of predictions independent of the label is (1/K) sum_k P(pred = k) = 1/K).
- :func:`centroid_fit_predict`: a fast learner with the ``fit_predict(X, y, splits)`` signature of
  :func:`gapcache.analyze.probe_stats.sklearn_fit_predict` (z-score on the training rows, nearest
  class mean), so that coverage can be simulated with thousands of cross-validations.  Its OOF
  predictions are dependent across folds in the same way as the logistic probe's (every training
  sample moves the fitted centroids that predict the other folds), which is what breaks the
  sample bootstrap.
"""

from __future__ import annotations

import numpy as np

PROPORTIONS = {2: (0.5, 0.5), 4: (0.4, 0.25, 0.2, 0.15)}  # 2 classes balanced; 4 imbalanced


def class_counts(n: int, proportions) -> np.ndarray:
    """Counts n_k summing to n: floor(n p_k), the remainder given to the largest classes first."""
    p = np.asarray(proportions, dtype=float)
    counts = np.floor(n * p).astype(int)
    counts[np.argsort(-p, kind="stable")[: n - counts.sum()]] += 1
    return counts


def planted(n: int, proportions, signal: float, rng, *, hidden: int = 16, layers: int = 1,
            signal_layers=None):
    """(X (sample, layer, hidden), y (sample,)): see the module docstring; rows in random order."""
    counts = class_counts(n, proportions)
    y = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    X = rng.standard_normal((n, layers, hidden))
    at = range(layers) if signal_layers is None else signal_layers
    for layer in at:
        X[np.arange(n), layer, y] += signal
    return X, y


def centroid_fit_predict(X, y, splits, **_) -> list:
    """Nearest class mean on features z-scored with the training rows' mean and sd; (layer, n_test) per split.

    Vectorized over splits: training rows enter as counts (a row listed twice weighs twice), so the
    means are count-weighted: mu = W X / sum W, class means = (W * [y = k]) X / sum(W * [y = k]).
    A class absent from a split's training rows is never predicted.
    """
    X = X if X.ndim == 3 else X[:, None, :]
    n = X.shape[0]
    Y = np.broadcast_to(np.asarray(y), (len(splits), n)) if np.ndim(y) == 1 else np.asarray(y)
    classes = np.unique(Y)
    W = np.stack([np.bincount(tr, minlength=n) for tr, _ in splits]).astype(float)  # (T, n)
    onehot = (Y[:, :, None] == classes).astype(float)  # (T, n, K)
    out = [np.empty((X.shape[1], len(te)), dtype=classes.dtype) for _, te in splits]
    for layer in range(X.shape[1]):
        x = np.asarray(X[:, layer, :], dtype=float)  # (n, hidden)
        total = W.sum(axis=1, keepdims=True)
        mu = W @ x / total  # (T, hidden)
        sd = np.sqrt(np.maximum(W @ x**2 / total - mu**2, 0.0))
        sd = np.where(sd > 1e-12, sd, 1.0)
        Wk = W[:, :, None] * onehot  # (T, n, K)
        present = Wk.sum(axis=1) > 0  # (T, K)
        with np.errstate(invalid="ignore", divide="ignore"):
            cent = (np.einsum("tnk,nh->tkh", Wk, x) / Wk.sum(axis=1)[:, :, None] - mu[:, None]) / sd[:, None]
        for t, (_, te) in enumerate(splits):
            z = (x[te] - mu[t]) / sd[t]  # (n_test, hidden)
            c = np.where(present[t][:, None], cent[t], 0.0)  # (K, hidden)
            dist = (z**2).sum(axis=1)[:, None] - 2 * z @ c.T + (c**2).sum(axis=1)[None]  # (n_test, K)
            dist[:, ~present[t]] = np.inf
            out[t][layer] = classes[dist.argmin(axis=1)]
    return out


def true_score(n: int, proportions, signal: float, rng, *, fit_predict, n_splits: int = 5, hidden: int = 16,
               n_train_sets: int = 200, n_test: int = 4000) -> float:
    """Mean over fresh training sets of size round(n (k-1)/k) of the population balanced accuracy."""
    if signal == 0:
        return 1.0 / len(proportions)
    m = int(round(n * (n_splits - 1) / n_splits))
    K = len(proportions)
    scores = []
    for _ in range(n_train_sets):
        Xtr, ytr = planted(m, proportions, signal, rng, hidden=hidden)
        Xte, yte = planted(n_test, np.full(K, 1 / K), signal, rng, hidden=hidden)  # balanced: per-class recall
        X, y = np.concatenate([Xtr, Xte]), np.concatenate([ytr, yte])
        pred = fit_predict(X, y, [(np.arange(m), m + np.arange(n_test))])[0][0]
        scores.append(np.mean([np.mean(pred[yte == k] == k) for k in range(K)]))
    return float(np.mean(scores))


def coverage(n: int, n_classes: int, signal: float, reps: int, *, fit_predict, n_refits: int = 10,
             n_splits: int = 5, hidden: int = 16, level: float = 0.95, seed: int = 0, old: bool = True,
             truth: float | None = None, scheme: str = "halves") -> dict:
    """Coverage of the refit intervals (and, with ``old``, of the OOF sample-bootstrap intervals of
    :func:`gapcache.analyze.probes.probe_accuracy_ci`, 999 resamples) of accuracy and selectivity.

    Per replication r: fresh planted data (:func:`planted`, class proportions ``PROPORTIONS[n_classes]``,
    data seed ``seed`` + r), :func:`gapcache.analyze.probe_stats.probe_stats` with ``fit_predict``;
    an interval covers when low <= target <= high, target = :func:`true_score` (accuracy) and
    target - 1/K (selectivity).  Returns the 0/1 cover vectors, the estimates and SEs, and the target.
    """
    from gapcache.analyze import probes
    from gapcache.analyze.probe_stats import probe_stats

    props = PROPORTIONS[n_classes]
    if truth is None:
        truth = true_score(n, props, signal, np.random.default_rng(seed + 10**6), fit_predict=fit_predict,
                           n_splits=n_splits, hidden=hidden)
    targets = {"accuracy": truth, "selectivity": truth - 1.0 / n_classes}
    out = {f"{m}_{w}": [] for m in ("new", "old") for w in targets} | {"estimate": [], "se": []}
    for r in range(reps):
        X, y = planted(n, props, signal, np.random.default_rng(seed + r), hidden=hidden)
        st = probe_stats(X, y, n_refits=n_refits, n_splits=n_splits, seed=seed + r, level=level,
                         fit_predict=fit_predict, scheme=scheme)
        out["estimate"].append(st.estimate()[0])
        out["se"].append(st.se()[0])
        for w, target in targets.items():
            out[f"new_{w}"].append(bool(st.ci(w).contains(target)[0]))
            if old:
                ci = probes.probe_accuracy_ci(st.result, which=w, level=level, n_resamples=999, seed=r)
                out[f"old_{w}"].append(bool(ci.contains(target)[0]))
    return {k: np.asarray(v) for k, v in out.items()} | {"truth": truth}
