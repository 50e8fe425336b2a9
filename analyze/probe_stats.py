"""Honest probe statistics: intervals and tests that refit the whole cross-validation.

Why the sample bootstrap of out-of-fold (OOF) correctness is not enough: the OOF predictions of a
k-fold cross-validation are dependent (every test sample of a fold shares one fitted model, and
sample i trains the model that predicts sample j while j trains the one that predicts i), so the
variance of a cross-validated accuracy is larger than a bootstrap of the n correctness indicators
assumes (measured 1.45-1.9x, issue 11; ``benchmarks/bench_probe_coverage.py`` measures it again),
and there is no unbiased estimator of that variance from one cross-validation run (Bengio &
Grandvalet 2004, "No unbiased estimator of the variance of K-fold cross-validation", JMLR 5).
Nominal 95% intervals then cover 0.82-0.91, and per-layer tests reject a true null too often.

Method (**refits of the whole cross-validation on random disjoint halves**, paired): the target is
the expected score of the probing *procedure* at this sample size (the expected accuracy of a probe
fitted on n (k-1)/k samples, which k-fold CV estimates; Bates, Hastie & Tibshirani 2023,
"Cross-validation: what does it estimate and how well does it do it?", JASA).

1. R times (``numpy.random.default_rng(seed)``; R = ``DEFAULT_REFITS``): split the samples into two
   disjoint halves A_r, B_r, stratified (floor(n_k / 2) of each class in each); the same halves for
   every layer, condition and the control arm (paired);
2. rerun the whole k-fold cross-validation inside each half (stratified folds, the probe refitted on
   each training part at every layer), score its OOF predictions -> T_rA,l, T_rB,l; the control arm
   (the shuffled labels carried with their samples) the same way; selectivity and any difference of
   two conditions are formed half by half;
3. SE_l^2 = mean_r (T_rA,l - T_rB,l)^2 / 4.  The two halves are independent samples of n/2 from the
   population, so E (T_A - T_B)^2 / 2 = Var(T_{n/2}) exactly, and Var(T_n) = Var(T_{n/2}) / 2 when the
   variance scales as 1/n (the classical half-sample variance, e.g. McCarthy 1969; the same halving
   as Dietterich's 5x2cv test, 1998, Neural Computation 10);
4. interval = estimate_l +- t_{df, (1+level)/2} SE_l around the estimate of the full cross-validation,
   1/df = 1/R + 1/nu (:func:`refit_df`).  SE^2 errs in two ways: the R random splits (a mean of R squared
   differences: chi^2_R / R) and the one data set all splits are cut from (with R -> inf the half-sample
   variance of a mean is its sample variance, chi^2_nu / nu); their squared coefficients of variation add
   (Satterthwaite 1946).  nu = Welch's df of the class counts (:func:`welch_df`: 46 for 24 + 24 samples,
   26 for 20/12/9/7, where the small classes dominate the balanced accuracy's variance), so df = 8.2 and
   7.2 there, 9.5 at n = 200 (R = 10).  With df = R the data's share was missing: the |t| tail was
   1.6-1.9x too heavy at Holm's alpha / 75 (an extreme estimate comes with a ~9% smaller SE^2: the
   Wald effect of a proportion) and the 4-class cells at n = 48 covered 0.930-0.940.

Why not the bootstrap of the cross-validation (``scheme='bootstrap'``, kept for comparison): a
resample with duplicated samples (or a subsample of the same data) inflates the pairwise terms of
the CV accuracy (sample i training the model that predicts j and back) -- a weight w_i enters them
as w_i w_j with E[w_i^2 w_j^2] = 4 -- so its SE comes out 1.15-1.3x too large (measured: logistic
probe, n = 100: 0.078 vs a true sd 0.063 at chance, 0.069 vs 0.060 with a signal) and 95% intervals
cover 0.98-0.99.  Disjoint halves have no shared sample, so that term is estimated at its size:
measured 0.0633 vs 0.0633 at chance and 0.0567 vs 0.0564 with a signal (centroid learner, n = 100,
150 replications).

Measured coverage of the 95% intervals (``benchmarks/bench_probe_coverage.py coverage --reps 1000 --seed
300000``, centroid learner, 1000 replications per cell, binomial SE ~0.007; old = OOF sample bootstrap; new =
halves with the df of step 4; load 2.3-3.5 while it ran, which changes only the seconds):

=============================  ===========  ===========  ============  ============
n, classes                     old acc      old sel      new acc       new sel
=============================  ===========  ===========  ============  ============
48/100/200, 2, chance          0.863-0.890  0.862-0.886  0.936-0.954   0.943-0.954
48/100/200, 2, signal          0.902-0.907  0.877-0.892  0.951-0.968   0.942-0.964
200, 4 imbalanced, both        0.883-0.923  0.871-0.909  0.950-0.956   0.938-0.963
48/100, 4 imbalanced, both     0.871-0.906  0.871-0.896  0.937-0.954   0.943-0.957
=============================  ===========  ===========  ============  ============

df = R (before step 4's nu) on other data (a scratch collection of the refit differences, not in the repo;
3000 replications a cell at n = 48 and 100, 1000 at 200, the same
refit SEs, the quantile alone changed): 4 classes at n = 48 covered 0.930-0.940 (Welch df: 0.940-0.950), every
other cell 0.000-0.008 lower than with the Welch df.  The df costs width where it buys coverage: t_{0.975} grows
by 0.7% (n = 200) to 5.4% (4 classes, n = 48).  Width: the mean half-width is 1.05-1.20x the oracle 1.96
sd(estimate) with df = R and 1.10-1.22x with the Welch df; the widest are 2 classes with a signal, whose
accuracy SE^2 is 1.13-1.17x Var(T_n) (a half learns less, so its score varies more than the 1/n scaling says).
Below 0.94 remain 2 classes at chance, n = 100 (0.936 +- 0.008), 4 classes with a signal, n = 48 (0.937) and
4 classes at chance, n = 200, selectivity (0.938): 4 classes at n = 48 still have SE^2 0.89-0.93x Var(T_n) (the
idea of an SE scaled by the halves' and the full data's binomial variances of the class recalls did not help:
0.923 vs 0.930 at chance, 300 replications).

Family-wise error under the global null (``fwer``, 25 layers, original + 3 conditions, centroid learner,
hidden 16): n = 48, 2 classes, 500 replications (``--reps 500 --n 48 --seed 400000``): condition -
original 0.032 +- 0.008 (old sign-flip + Holm per condition: 0.41), "from layer X" 0.034 +- 0.008 (old:
0.23); 4 imbalanced classes (``--classes 4``, same run): 0.018 +- 0.006 and 0.036 +- 0.008 (old: 0.31,
0.19).  ``tests/test_probe_stats.py``'s seeds (hidden 8, 200 replications): 0.06 and 0.075.  With df = R the
same statistics on other data (hidden 8, 300 replications) made 0.077 +- 0.015 and 0.057 +- 0.013 (0.050 and
0.047 with df = 8.2 on the same data); the 0.15 / 0.10 once recorded at n = 48 came from 40 replications.
n = 100, 2 classes (150 replications, df = R): 0.053 +- 0.018 and 0.027 +- 0.013.

Tests (family-wise error control):

- **condition - reference at every layer** (:func:`compare_conditions`): t_l = D_l / SE_l, two-sided
  p_l = 2 P(T_df > |t_l|) (df of step 4); Holm's step-down over *all* (condition, layer) pairs reported together
  (Holm 1979: FWER <= alpha under any dependence, given valid p-values);
- **"selectivity > 0 from layer X"** (:func:`decodes_from`): one-sided tests of S_l > 0 at level
  alpha / m (Bonferroni over the m conditions reported together), taken in a fixed sequence from
  the deepest layer down, stopping at the first layer that fails (fixed-sequence testing: Maurer,
  Hothorn & Lehmacher 1995; FWER <= alpha over layers with no further split); X = the last layer
  reached.  The claim "from layer X" is then wrong anywhere with probability <= alpha.

Cost: 2R x k x 2 probe fits (each on n/2 samples) per layer and condition on top of the 2k of the
estimate (R = 10 by default: ``DEFAULT_REFITS``), i.e. ~20x the fits of probe_layers at half the
size.  Every fit goes through one ``fit_predict(X, y, splits)`` callable (:func:`sklearn_fit_predict`,
the same estimator as :func:`gapcache.analyze.probes.make_probe`; :func:`batched_fit_predict`, its lbfgs
iterates in lockstep, for the estimate; :func:`exact_fit_predict`, the same objective solved to its optimum
by batched Newton steps, for the refits).  Demo store (32 samples per task, hidden 128, 5 layers, 48
(task, condition, site) probes): the lbfgs refits took 118 s of a 158 s analysis at load ~0.5; the exact
refits: see ``benchmarks/bench_probe_refits.py`` and the README's demo timing.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from gapcache.analyze import probes, stats
from gapcache.errors import ConfigError, DataError

DEFAULT_REFITS = 10
DEFAULT_SCHEME = "halves"
SCHEMES = ("halves", "bootstrap")
ARMS = ("accuracy", "control", "selectivity")


# --------------------------------------------------------------------------- the fit interface


def sklearn_fit_predict(X, y, splits, *, C: float = 1.0, solver: str = "lbfgs", max_iter: int = 1000,
                        tol: float = 1e-4, threads: int | None = 1) -> list:
    """Fit :func:`probes.make_probe` on each split's training rows at every layer; predict its test rows.

    ``X``: (sample, layer, hidden) array (or anything whose ``X[:, i, :]`` is one layer: loaded once
    per layer); ``y``: (sample,) labels shared by every split, or (split, sample) one row per split;
    ``splits``: (train_idx, test_idx) row indices into X (repeats allowed: a bootstrap resample).
    Returns one (layer, len(test_idx)) array of predicted labels per split.  The signature of a
    batched solver (``fit_predict_layers``) that can replace this one.  A training part with a single
    class (a small class of the shuffled control labels can miss a half's training fold) predicts
    that class (the constant a fit would give; sklearn refuses to fit one class).
    """
    X = X if X.ndim == 3 else X[:, None, :]
    Y = np.broadcast_to(np.asarray(y), (len(splits), X.shape[0])) if np.ndim(y) == 1 else np.asarray(y)
    probe = probes.make_probe(C=C, solver=solver, max_iter=max_iter, tol=tol)
    out = [np.empty((X.shape[1], len(te)), dtype=Y.dtype) for _, te in splits]
    with warnings.catch_warnings(), threadpool_limits(limits=threads):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for layer in range(X.shape[1]):
            Xl = np.asarray(X[:, layer, :])  # (sample, hidden)
            for t, (tr, te) in enumerate(splits):
                if len(np.unique(Y[t, tr])) < 2:
                    out[t][layer] = Y[t, tr[0]]
                else:
                    out[t][layer] = probe.fit(Xl[tr], Y[t, tr]).predict(Xl[te])
    return out


def batched_fit_predict(X, y, splits, *, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4,
                        threads: int | None = 1) -> list:
    """:func:`sklearn_fit_predict`'s results from the batched solver
    (:func:`gapcache.analyze.probe_solver.fit_predict_layers`: every split of a layer in one call, the same
    L-BFGS iterations as sklearn's).  Splits whose training part lacks a class (a small class of a half's shuffled
    control labels can miss a fold's training rows) are fitted on the classes they hold, in one call per class
    set, as sklearn fits them (:func:`_routed`)."""
    from gapcache.analyze.probe_solver import fit_predict_layers

    return _routed(X, y, splits, fit_predict_layers, dict(C=C, max_iter=max_iter, tol=tol, threads=threads))


def exact_fit_predict(X, y, splits, *, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4,
                      threads: int | None = 1) -> list:
    """The refits' default: every fit solved to the optimum of the same objective
    (:func:`gapcache.analyze.probe_newton.fit_predict_exact`, Newton in the training rows' span) while that is
    the cheap path (``probe_newton.suits``: few training rows or hidden units, as for halves of a few dozen
    samples per task), else :func:`batched_fit_predict`'s lbfgs lockstep.  Splits lacking a class: fitted on the
    classes they hold, as there.

    Why the refits may use the optimum while the estimate uses lbfgs's stopping point (sklearn's, tol 1e-4):
    the refits only give the spread of the procedure's score, and the two solvers differ on a test row only
    when it sits on the decision boundary (demo store, 6 tasks x 4 conditions x 2 sites: the refit SEs agree
    to the 4th decimal on most layers); the exact path is several times faster there (``benchmarks/bench_probe_refits.py``)."""
    from gapcache.analyze.probe_newton import fit_predict_exact, suits
    from gapcache.analyze.probe_solver import fit_predict_layers

    Y = _split_labels(y, splits, np.shape(X)[0])
    n_train = max(len(np.unique(tr)) for tr, _ in splits)
    exact = suits(n_train, np.shape(X)[-1])
    fit, kw = (fit_predict_exact, dict(C=C, threads=threads)) if exact else \
        (fit_predict_layers, dict(C=C, max_iter=max_iter, tol=tol, threads=threads))
    return _routed(X, Y, splits, fit, kw)


def _split_labels(y, splits, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(y), (len(splits), n)) if np.ndim(y) == 1 else np.asarray(y)


def _routed(X, y, splits, fit, kw: dict) -> list:
    """``fit`` on the splits grouped by the classes their training rows hold (a batched solver fits one class set
    per call). Within a group, a row (test or unused) of a class the training rows lack is given one of theirs
    for that call: only training labels enter a fit, and the fit predicts only the classes it saw, as sklearn
    fitted on those rows does. A training part of a single class predicts that class (sklearn refuses to fit one)."""
    Y = _split_labels(y, splits, np.shape(X)[0])
    n_layers = np.shape(X)[1] if np.ndim(X) == 3 else 1
    groups: dict = {}
    for t, (tr, _) in enumerate(splits):
        groups.setdefault(tuple(np.unique(Y[t, tr]).tolist()), []).append(t)
    out = [None] * len(splits)
    for classes, idx in groups.items():
        if len(classes) < 2:
            for t in idx:
                out[t] = np.full((n_layers, len(splits[t][1])), classes[0], dtype=Y.dtype)
            continue
        Yg = np.array(Y[idx])  # (group, sample), writable
        Yg[~np.isin(Yg, classes)] = classes[0]  # only rows outside each split's training rows carry other classes
        for t, pred in zip(idx, fit(X, Yg, [splits[t] for t in idx], **kw)):
            out[t] = pred
    return out


# --------------------------------------------------------------------------- the resampling design


@dataclasses.dataclass(frozen=True, eq=False)
class RefitDesign:
    """The refit data sets and, on each, the stratified folds of both arms.

    ``scheme`` 'halves': ``index`` (2R, m) holds R random stratified splits of the samples into two
    disjoint halves (rows 2r and 2r + 1); 'bootstrap': ``index`` (B, n) holds B stratified bootstrap
    resamples.  ``folds``/``folds_control``: per row of ``index``, the list of (train, test)
    positions *within* it; ``y``/``y_control``: (n,) true and shuffled labels.
    """

    y: np.ndarray
    y_control: np.ndarray | None
    index: np.ndarray
    folds: list
    folds_control: list | None
    n_splits: int
    seed: int
    scheme: str = "halves"

    @property
    def n_refits(self) -> int:
        """R half-splits ('halves') or B resamples ('bootstrap')."""
        return int(self.index.shape[0] // 2 if self.scheme == "halves" else self.index.shape[0])

    def splits(self, control: bool = False) -> list:
        """(train, test) row indices of every (refit set, fold), set-major, as fit_predict takes them."""
        folds = self.folds_control if control else self.folds
        return [(idx[tr], idx[te]) for idx, fs in zip(self.index, folds) for tr, te in fs]


def make_design(y, y_control=None, *, n_refits: int = DEFAULT_REFITS, n_splits: int = 5, seed: int = 0,
                scheme: str = DEFAULT_SCHEME) -> RefitDesign:
    """The refit data sets of :func:`refit_scores` (``numpy.random.default_rng(seed)``).

    'halves': R = n_refits times, each class's samples shuffled and cut into two halves of
    floor(n_k / 2) (an odd one out sits in neither).  'bootstrap': B = n_refits times, within each
    class n_k rows drawn with replacement (a class drawn as copies of fewer than 2 distinct samples
    is drawn again).  Folds on each set: the distinct samples of each class (of the arm's labels)
    shuffled and dealt to the k folds in turn, every copy following its sample (stratified k-fold;
    for the bootstrap a stratified *group* k-fold with groups = sample, so no sample sits on both
    sides; sklearn's StratifiedGroupKFold gives the same guarantee at ~0.1 s per split, n = 200).
    """
    stats._check_choice(scheme, "scheme", SCHEMES, "make_design")
    if not isinstance(n_refits, (int, np.integer)) or isinstance(n_refits, bool) or n_refits < 2:
        raise ConfigError(f"The 'n_refits' parameter of make_design must be an int >= 2. Got {n_refits!r} instead.")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    if scheme == "halves":
        index = np.concatenate([_halves(y, rng) for _ in range(n_refits)])  # (2R, m)
    else:
        index = np.stack([_resample(y, rng) for _ in range(n_refits)])  # (B, n)
    folds = [_grouped_folds(y, idx, n_splits, rng) for idx in index]
    folds_c = None
    if y_control is not None:
        y_control = np.asarray(y_control)
        folds_c = [_grouped_folds(y_control, idx, n_splits, rng) for idx in index]
    return RefitDesign(y=y, y_control=y_control, index=index, folds=folds, folds_control=folds_c,
                       n_splits=int(n_splits), seed=int(seed), scheme=scheme)


def _halves(y, rng) -> np.ndarray:
    """(2, m): two disjoint stratified halves, floor(n_k / 2) rows of each class in each."""
    parts = []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        h = len(rows) // 2
        parts.append((rows[:h], rows[h:2 * h]))
    return np.stack([np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])])


def _resample(y, rng) -> np.ndarray:
    parts = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        draw = rng.choice(rows, size=len(rows))
        while len(rows) > 1 and len(np.unique(draw)) < 2:
            draw = rng.choice(rows, size=len(rows))
        parts.append(draw)
    return np.concatenate(parts)


def _grouped_folds(y, idx, n_splits, rng) -> list:
    """(train, test) positions within ``idx``: each class's distinct samples shuffled and dealt to the
    folds in turn, the count running on from one class to the next (so small classes do not all
    start at fold 0); a fold left without a test sample is dropped."""
    fold_of, start = {}, 0
    for c in np.unique(y[idx]):
        distinct = rng.permutation(np.unique(idx[y[idx] == c]))
        fold_of.update(zip(distinct.tolist(), ((start + np.arange(len(distinct))) % n_splits).tolist()))
        start += len(distinct)
    fold = np.array([fold_of[i] for i in idx.tolist()])
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(n_splits) if (fold == f).any()]


def refit_scores(X, design: RefitDesign, *, metric: str = "balanced_accuracy", fit_predict=batched_fit_predict,
                 control: bool = True) -> dict:
    """{'accuracy': (B, layer)[, 'control': (B, layer)]}: the cross-validated score of every resample.

    ``X``: (sample, layer, hidden) with rows in the order of ``design.y``.  Each resample's OOF
    predictions are scored against its own labels (``probes.score``).
    """
    out = {"accuracy": _scores(X, design, design.y, False, metric, fit_predict)}
    if control and design.y_control is not None:
        out["control"] = _scores(X, design, design.y_control, True, metric, fit_predict)
    return out


def _scores(X, design, y, control, metric, fit_predict):
    splits = design.splits(control)
    preds = iter(fit_predict(X, y, splits))  # one (layer, n_test) per split, resample-major
    folds = design.folds_control if control else design.folds
    scores = []
    for idx, fs in zip(design.index, folds):
        oof = None
        for _, te in fs:
            p = next(preds)  # (layer, n_test)
            oof = np.empty((p.shape[0], len(idx)), dtype=p.dtype) if oof is None else oof
            oof[:, te] = p
        scores.append(probes.score_layers(y[idx], oof, metric))
    return np.asarray(scores, dtype=float)  # (B, layer)


# --------------------------------------------------------------------------- intervals


def standard_error(replicates, scheme: str = DEFAULT_SCHEME, data_df: float = np.inf) -> tuple:
    """(SE per layer, degrees of freedom) from the refit scores (module docstring, steps 3-4).

    'halves': replicates (2R, layer), rows 2r and 2r + 1 the two halves of split r:
    SE^2 = mean_r (T_r,A - T_r,B)^2 / 4, 1/df = 1/R + 1/data_df (:func:`refit_df`; data_df = inf: df = R).
    'bootstrap': SE = sd_b (ddof 1), df = B - 1.
    """
    rep = np.asarray(replicates, dtype=float)
    if scheme == "halves":
        d = rep[0::2] - rep[1::2]  # (R, layer)
        return np.sqrt(np.mean(d**2, axis=0) / 4), refit_df(d.shape[0], data_df)
    return rep.std(axis=0, ddof=1), int(rep.shape[0] - 1)


def welch_df(class_counts, metric: str = "balanced_accuracy") -> float:
    """Welch-Satterthwaite degrees of freedom of a class-weighted mean of per-sample scores.

    score = sum_k w_k mean_{i in k} h_i, w_k = 1/K ('balanced_accuracy') or n_k / n ('accuracy'); with equal
    per-class variances of h, v_k = w_k^2 / n_k and nu = (sum_k v_k)^2 / sum_k v_k^2 / (n_k - 1)
    (Welch 1947; n_k - 1 floored at 1).  2 classes of 24: nu = 46; 20/12/9/7: nu = 26.3 (the small classes).
    """
    c = np.asarray(list(class_counts.values()) if isinstance(class_counts, dict) else class_counts, dtype=float)
    if c.ndim != 1 or c.size < 1 or np.any(c < 1):
        raise ConfigError(f"The 'class_counts' parameter of welch_df must be counts >= 1. "
                          f"Got {class_counts!r} instead.")
    w = c / c.sum() if metric == "accuracy" else np.full(c.size, 1.0 / c.size)
    v = w**2 / c
    return float(v.sum() ** 2 / np.sum(v**2 / np.maximum(c - 1, 1)))


def refit_df(n_refits: int, data_df: float = np.inf) -> float:
    """df of the halves' t: 1/df = 1/R + 1/data_df (module docstring, step 4).

    SE^2 has two independent sources of error: the R random half-splits (each (T_A - T_B)^2 / 4 ~ sigma^2
    chi^2_1, so chi^2_R / R) and the data it is computed from (the half-sample variance of a mean over R -> inf
    splits is its sample variance: chi^2_nu / nu, nu = :func:`welch_df`); squared coefficients of variation add
    (2/R + 2/nu), which is a chi^2 of df = 1 / (1/R + 1/nu) (Satterthwaite 1946).
    """
    return float(1.0 / (1.0 / n_refits + 1.0 / data_df))


def t_quantile(p: float, df: int) -> float:
    """Quantile p of Student's t with df degrees of freedom (``scipy.stats.t.ppf``)."""
    import scipy.stats

    return float(scipy.stats.t.ppf(p, df))


def interval(estimate, replicates, *, scheme: str = DEFAULT_SCHEME, level: float = 0.95, name: str = "probe",
             layers=None, seed=None, data_df: float = np.inf) -> stats.Interval:
    """estimate_l +- t_{df, (1+level)/2} SE_l (:func:`standard_error`): the refit interval.

    ``estimate``: (layer,); ``replicates``: the refit scores (or paired differences) of ``scheme``;
    ``data_df``: :func:`welch_df` of the class counts (halves only; inf: df = R).
    Zero SE (every refit scored the same, e.g. perfect separation) is flagged ``degenerate``.
    """
    level = stats.check_level(level, "probe_stats.interval")
    est = np.asarray(estimate, dtype=float)
    se, df = standard_error(replicates, scheme, data_df)
    half = t_quantile((1 + level) / 2, df) * se
    layers = list(range(est.shape[-1])) if layers is None else list(layers)
    return stats.Interval(statistic=name, estimate=est.tolist(), low=(est - half).tolist(),
                          high=(est + half).tolist(), n=0, level=level, method=f"refit-{scheme}-t",
                          n_resamples=int(np.shape(replicates)[0]), seed=seed, paired=True, dims=("layer",),
                          coords={"layer": layers}, **stats.degeneracy(est - half, est + half))


@dataclasses.dataclass(frozen=True, eq=False)
class ProbeStats:
    """Refit-based statistics of one probe (condition, site): estimates, refit scores, intervals."""

    result: probes.ProbeResult
    replicates: dict  # arm -> refit scores (rows of the design's index, layer)
    level: float
    seed: int
    scheme: str = DEFAULT_SCHEME

    def estimate(self, which: str = "accuracy") -> np.ndarray:
        _check_arm(which, self.replicates)
        return np.asarray(getattr(self.result, which), dtype=float)

    def rep(self, which: str = "accuracy") -> np.ndarray:
        """Refit scores of an arm; selectivity = accuracy - control, refit by refit."""
        _check_arm(which, self.replicates)
        if which == "selectivity":
            return self.replicates["accuracy"] - self.replicates["control"]
        return self.replicates[which]

    def se(self, which: str = "accuracy") -> np.ndarray:
        return standard_error(self.rep(which), self.scheme)[0]

    @property
    def data_df(self) -> float:
        """:func:`welch_df` of the labelled samples' class counts (the data's share of the t's df)."""
        return welch_df(self.result.class_counts, self.result.metric)

    @property
    def df(self) -> float:
        return standard_error(self.replicates["accuracy"][:, :1], self.scheme, self.data_df)[1]

    def ci(self, which: str = "accuracy", level: float | None = None) -> stats.Interval:
        iv = interval(self.estimate(which), self.rep(which), scheme=self.scheme,
                      level=self.level if level is None else level, name=f"probe_{which}",
                      layers=self.result.layers, seed=self.seed, data_df=self.data_df)
        return dataclasses.replace(iv, n=int(len(self.result.y)))

    def lower_bound(self, which: str = "selectivity", alpha: float = 0.05) -> np.ndarray:
        """One-sided (1 - alpha) lower bound estimate_l - t_{df, 1-alpha} SE_l, per layer."""
        return self.estimate(which) - t_quantile(1 - alpha, self.df) * self.se(which)


def _check_arm(which, replicates):
    if which not in ARMS:
        raise ConfigError(f"The 'which' parameter of ProbeStats must be one of {list(ARMS)}. Got {which!r} instead.")
    if which != "accuracy" and "control" not in replicates:
        raise ConfigError(f"ProbeStats({which!r}) needs the control arm (control=True).")


def cross_validate(X, y, *, n_splits: int = 5, seed: int = 0, control: bool = True,
                   metric: str = "balanced_accuracy", fit_predict=batched_fit_predict) -> probes.ProbeResult:
    """:func:`probes.probe_layers`'s procedure (same folds, same control permutation, same scores) with
    every fit done by ``fit_predict``: with :func:`sklearn_fit_predict` the result equals probe_layers'.

    ``X``: (sample, layer, hidden) or (sample, hidden) numpy, or a DataArray (sample, layer, hidden);
    ``y``: (sample,) integer labels, -1 = none (excluded, as in probe_layers).
    """
    import time

    probes._check_params(n_splits, metric, "cross_validate")
    n_all, layers, ids, _ = probes._layer_source(X, "sample", "layer", "hidden")
    mask, yk, excluded, counts = probes.clean_labels(probes._labels_for(y, ids, n_all, "sample"), n_splits,
                                                     "cross_validate")
    Xs = _states(X)
    rows = np.flatnonzero(mask)
    t0 = time.perf_counter()
    oof = _oof(Xs, yk, rows, probes._folds(yk, n_splits, seed), fit_predict)
    y_ctrl = np.random.default_rng(seed).permutation(yk) if control else None
    oof_c = _oof(Xs, y_ctrl, rows, probes._folds(y_ctrl, n_splits, seed), fit_predict) if control else []
    secs = np.full(len(layers), (time.perf_counter() - t0) / len(layers))
    params = dict(fit_predict=getattr(fit_predict, "__name__", str(fit_predict)), class_weight="balanced",
                  scaler="standard")
    return probes._result(layers, ids, mask, yk, y_ctrl, list(oof), list(oof_c), metric, n_splits, seed, excluded,
                          counts, params, secs)


def _oof(X, y, rows, folds, fit_predict) -> np.ndarray:
    """(layer, n) out-of-fold predictions; ``rows`` maps the labelled samples to rows of X."""
    full = np.zeros(int(rows.max()) + 1, dtype=y.dtype)
    full[rows] = y
    preds = fit_predict(X, full, [(rows[tr], rows[te]) for tr, te in folds])
    oof = np.empty((preds[0].shape[0], len(y)), dtype=y.dtype)
    for (_, te), p in zip(folds, preds):
        oof[:, te] = p
    return oof


def probe_stats(X, y, *, n_refits: int = DEFAULT_REFITS, n_splits: int = 5, seed: int = 0, level: float = 0.95,
                scheme: str = DEFAULT_SCHEME,
                metric: str = "balanced_accuracy", control: bool = True, design: RefitDesign | None = None,
                fit_predict=batched_fit_predict, refit_predict=None) -> ProbeStats:
    """:func:`cross_validate` (the estimate: probe_layers' numbers) plus the refit replicates of its score.

    ``X``: (sample, layer, hidden) numpy or DataArray; ``y``: (sample,) labels without -1 (the design
    indexes rows).  ``design``: a shared :class:`RefitDesign` (pass the same one to every condition
    of a comparison: that is the pairing); default ``make_design(y, result.y_control, ...)``.
    ``fit_predict`` fits the estimate's cross-validation; ``refit_predict`` the refits' (default: with the default
    ``fit_predict``, :func:`exact_fit_predict`; with any other learner, that learner).
    """
    X = _load_small(X)  # one read for the estimate and every refit
    res = cross_validate(X, y, n_splits=n_splits, seed=seed, control=control, metric=metric, fit_predict=fit_predict)
    if res.n_excluded:
        raise DataError(f"The 'y' parameter of probe_stats must have no unlabelled (-1) sample. Got "
                        f"{res.n_excluded} instead; select the labelled samples first.")
    if design is None:
        design = make_design(res.y, res.y_control, n_refits=n_refits, n_splits=n_splits, seed=seed, scheme=scheme)
    _check_design(design, res)
    if refit_predict is None:  # the default estimate's refits: exact (fast) fits; any other learner refits itself
        refit_predict = exact_fit_predict if fit_predict is batched_fit_predict else fit_predict
    reps = refit_scores(_states(X), design, metric=metric, fit_predict=refit_predict, control=control)
    return ProbeStats(result=res, replicates=reps, level=stats.check_level(level, "probe_stats"), seed=int(seed),
                      scheme=design.scheme)


def _load_small(X):
    """A lazy X (dask-backed DataArray or dask array) of at most ``probes.LOAD_WHOLE_BYTES``, loaded once (the
    folds and refits read every layer many times); anything else as given."""
    lazy = X.chunks is not None if stats.is_dataarray(X) else hasattr(X, "compute")
    return X.compute() if lazy and X.nbytes <= probes.LOAD_WHOLE_BYTES else X


def _states(X):
    """(sample, layer, hidden) array-like whose X[:, i, :] loads one layer (a small lazy X loaded once)."""
    if stats.is_dataarray(X):
        X = X.transpose("sample", "layer", "hidden").data
    X = _load_small(X)
    X = np.asarray(X) if not hasattr(X, "compute") else X
    return X[:, None, :] if X.ndim == 2 else X


def _check_design(design: RefitDesign, res: probes.ProbeResult):
    same = np.array_equal(design.y, res.y) and (
        res.y_control is None or (design.y_control is not None and np.array_equal(design.y_control, res.y_control)))
    if not same:
        raise DataError("The 'design' parameter of probe_stats must be made for these labels (and the control "
                        "permutation of probe_layers with the same seed). Got a design for other labels instead.")


# --------------------------------------------------------------------------- tests with FWER control


def t_pvalue(t, df: int):
    """Two-sided p = 2 P(T_df > |t|) (``scipy.stats.t.sf``); t = +-inf (zero SE, nonzero difference) -> 0,
    t = NaN (zero SE, zero difference) -> 1."""
    import scipy.stats

    t = np.asarray(t, dtype=float)
    return np.where(np.isnan(t), 1.0, 2 * scipy.stats.t.sf(np.abs(np.nan_to_num(t, nan=0.0)), df))


def compare_conditions(pairs: dict, *, alpha: float = 0.05, level: float = 0.95, correction: str = "holm") -> dict:
    """Condition - reference probe accuracy at every layer, for every pair, Holm over all (pair, layer).

    ``pairs``: {label: (ProbeStats of the condition, ProbeStats of the reference)}, each pair made on one
    :class:`RefitDesign` (same samples in the same order, same resamples).  D_l = A_l(cond) - A_l(ref),
    SE_l and df from the paired refit differences A*_bl(cond) - A*_bl(ref) (:func:`standard_error`, data_df of
    the reference's class counts), t_l = D_l / SE_l, p_l two-sided from t_df (:func:`t_pvalue`);
    the p-values of every pair and layer adjusted as one family
    (``stats.adjust_pvalues``, Holm by default); reject = p_adj <= alpha.
    Returns {label: dict in the shape of ``stats.Comparison.to_dict()``, plus 'family'}.
    """
    if not pairs:
        return {}
    diffs, reps = {}, {}
    for label, (cond, ref) in pairs.items():
        _check_paired(cond, ref, label)
        diffs[label] = cond.estimate() - ref.estimate()
        reps[label] = cond.replicates["accuracy"] - ref.replicates["accuracy"]
    with np.errstate(divide="ignore", invalid="ignore"):
        se = {k: standard_error(reps[k], pairs[k][1].scheme, pairs[k][1].data_df) for k in pairs}
        p = {k: t_pvalue(diffs[k] / se[k][0], se[k][1]) for k in pairs}
    flat = np.concatenate([p[k] for k in pairs])
    adj_flat = stats.adjust_pvalues(flat, correction)
    family = f"{len(pairs)} comparisons x layers = {flat.size} tests"
    out, start = {}, 0
    for label, (cond, ref) in pairs.items():
        adj = adj_flat[start:start + len(p[label])]
        start += len(p[label])
        iv = dataclasses.replace(interval(diffs[label], reps[label], scheme=ref.scheme, level=level,
                                          name="probe_accuracy_difference", layers=ref.result.layers, seed=ref.seed,
                                          data_df=ref.data_df),
                                 n=int(len(ref.result.y)))
        reject = adj <= alpha
        out[label] = stats.jsonable({
            "interval": iv.to_dict(), "pvalue": p[label], "p_adjusted": adj, "reject": reject, "alpha": float(alpha),
            "test": f"refit-{ref.scheme}-t", "correction": correction, "n_tests": int(flat.size), "family": family,
            "survivors": [ref.result.layers[i] for i in np.flatnonzero(reject)]})
    return out


def _check_paired(a: ProbeStats, b: ProbeStats, label):
    if (a.replicates["accuracy"].shape != b.replicates["accuracy"].shape or a.scheme != b.scheme
            or not np.array_equal(a.result.y, b.result.y)):
        raise DataError(f"The 'pairs' parameter of compare_conditions must pair ProbeStats made on the same samples "
                        f"with one RefitDesign. Got different labels or refit counts for {label!r} instead.")


def decodes_from(by_condition: dict, *, alpha: float = 0.05) -> dict:
    """{condition: first layer X from which selectivity > 0 at every later layer, or None}, FWER <= alpha.

    Per condition: one-sided lower bounds S_l - t_{df, 1 - alpha/m} SE_l (m = len(by_condition), df of
    :attr:`ProbeStats.df`,
    Bonferroni over the conditions reported together); layers tested from the deepest one down
    while the bound is > 0 (fixed sequence); X = the last layer that passed (None if the deepest fails).
    """
    m = len(by_condition)
    return {c: first_of_run(s.lower_bound("selectivity", alpha / m) > 0, s.result.layers)
            for c, s in by_condition.items()}


def first_of_run(passed, layers):
    """The first layer of the run of True that ends at the deepest layer (None if the deepest is False)."""
    passed = np.asarray(passed, dtype=bool)
    from_here = np.logical_and.accumulate(passed[::-1])[::-1]
    return layers[int(np.argmax(from_here))] if from_here.any() else None


def rule(alpha: float, n_conditions: int, n_refits: int, n_splits: int, scheme: str = DEFAULT_SCHEME) -> str:
    """The report's sentence for the rules used."""
    how = (f"{n_refits} random splits into two disjoint stratified halves, SE^2 = mean (T_A - T_B)^2 / 4"
           if scheme == "halves" else f"{n_refits} stratified bootstrap resamples, SE = their sd")
    df = (f"t_df, 1/df = 1/{n_refits} + 1/nu (nu: Welch df of the class counts)" if scheme == "halves"
          else f"t_{n_refits - 1}")
    return (f"probe intervals: the whole {n_splits}-fold cross-validation refitted on {how}; estimate +- {df} x SE; "
            f"'from layer X': one-sided selectivity > 0 at alpha/{n_conditions} (Bonferroni over the conditions of a "
            f"row), fixed sequence from the deepest layer; condition - original: refit t-test, Holm over every "
            f"condition x site x layer of a task (FWER <= {alpha})")
