"""Exact probe fits for many small splits at once: Newton's method in each split's training-row span.

The estimator is :func:`gapcache.analyze.probes.make_probe`'s (``StandardScaler ->
LogisticRegression(C, class_weight='balanced')``) solved **to its optimum** instead of to lbfgs's
stopping point (sklearn stops at max |gradient| <= tol = 1e-4; here the Newton decrement is
driven to ~1e-12). Used for the probe statistics' refits (``probe_stats``: 2R x k x 2 fits per layer
on halves of the data), where the fits are many and tiny and lbfgs's hundreds of rounds dominate.

Per split t (training counts c_i, z_i = (x_i - mu_t) / sigma_t with the scaler fitted on the
training rows as :mod:`gapcache.analyze.probe_solver` documents):

- the optimum's weight vectors lie in the span of the training rows' z_i (representer theorem:
  the loss sees w only through z_i.w, the L2 penalty only grows outside the span), so with
  G = Z_tr Z_tr' = U diag(lam) U' (m_tr x m_tr), the features f_i = Z_tr z_i . U lam^(-1/2)
  (f_i = coordinates of z_i in an orthonormal basis of that span) give the same problem in
  r <= m_tr dimensions: ||w||^2 = ||beta||^2 and z_i.w = f_i.beta exactly;
- minimise sum_i s_i loss_i + ||beta||^2 / (2C) (sklearn's objective times S = sum s_i: the same
  argmin), s_i = c_i n / (K n_k) (``class_weight='balanced'``); binary: log(1 + e^r) - y r,
  multinomial: logsumexp_k r_k - r_y, r = f.beta + b (intercept not penalised);
- Newton steps H d = -g for all fits at once (``numpy.linalg.solve`` on (fits, p, p)), backtracking
  (Armijo, 1e-4) on the objective. Binary: one weight vector, p = r + 1. Multinomial: the K logits are
  written z = u A' with A an orthonormal basis of the vectors summing to zero (Helmert), p = (K - 1)(r + 1):
  the loss ignores a shift common to the K logits and the penalty is least without one, so the optimum
  (and every iterate from zero) lies in that subspace, and the systems are ((K - 1) / K)^3 as costly
  as the K (r + 1) ones; the intercepts get a 1e-10 ridge (kept from the K-logit form, where it held
  the common shift). Stop when every fit's decrement g.H^-1.g / 2 < 1e-12 (or 50 steps).

Cost: one eigendecomposition of (m_tr x m_tr) per fit and layer, then ~10-20 Newton steps with
p x p systems; it is the fast path only while the span is small (:func:`suits`: at most MAX_SPAN training rows, as for
the refits of a few dozen samples per task), else lbfgs's lockstep is cheaper.

Agreement (tests/test_probe_newton.py): decision values equal sklearn's LogisticRegression fitted
with tol 1e-10 to ~1e-6, on binary and 4-class data, with bootstrap counts; lbfgs at sklearn's
default tol stops short of this optimum, so its labels can differ on a test row that sits near the
boundary (measured on the demo's refits: see probe_stats' docstring).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from gapcache.analyze.probe_solver import _limits, _Tasks

MAX_SPAN = 20  # training rows (span dimension r) up to which Newton beats the lbfgs lockstep (see suits)
MAX_STEPS = 50
DECREMENT = 1e-12
RIDGE = 1e-10


def suits(n_train: int, hidden: int) -> bool:
    """Whether Newton in the training span is the cheaper path: r = min(n_train, hidden) <= MAX_SPAN.

    Measured side by side (``benchmarks/bench_probe_refits.py``, planted signal 1.0, hidden 128, 5 layers,
    R = 10, load 0.1): exact / lbfgs time 0.38 (4 classes, n = 32: r = 13), 0.49 (4, 48: r = 19), 1.0 (4, 64:
    r = 25), 2.7 (4, 100: r = 40); 0.37 (2, 32), 0.64 (2, 48), 1.1 (2, 64), 1.5 (2, 100). On separable states
    lbfgs needs far more rounds (demo store, 4 classes, original: 13x); the crossover stays near r = 25 on
    this data, whatever the number of classes K, so K is not a parameter."""
    return min(n_train, hidden) <= MAX_SPAN


def fit_predict_exact(X, y, splits, *, C: float = 1.0, threads: int | None = 1, decision: bool = False, **_) -> list:
    """:func:`gapcache.analyze.probe_solver.fit_predict_layers`'s interface, every fit solved to its optimum.

    ``X``: (sample, layer, hidden) or (sample, hidden); ``y``: (sample,) or (split, sample) labels;
    ``splits``: (train_idx, test_idx) pairs (repeated training rows are counts). Returns one (layer,
    n_test) array of predicted labels per split (``decision=True``: decision values as sklearn's
    ``decision_function``). Every split's training rows must hold every class of its labels.
    """
    X = X if X.ndim == 3 else X[:, None, :]
    task = _Tasks(y, splits, X.shape[0])
    k = task.k
    out = [np.empty((X.shape[1], len(te)) + ((task.k,) if decision and k > 1 else ()),
                    dtype=float if decision else task.classes.dtype) for _, te in task.local]
    train = _train_index(task)  # (T, R) local rows, -1 = padding
    with _limits(threads):
        for layer in range(X.shape[1]):
            states = task.states(X, slice(layer, layer + 1))[0].astype(np.float64)  # (m, d)
            F = _span_features(states, task.counts, train)  # (T, m, R)
            raw = _newton(F, task.weights.T, task.Yk.T, train, len(task.classes), C)  # (T, m, k)
            for t, (_, te) in enumerate(task.local):
                r = raw[t, te]  # (n_test, k)
                if decision:
                    out[t][layer] = r[:, 0] if k == 1 else r
                else:
                    out[t][layer] = task.classes[(r[:, 0] > 0).astype(np.intp) if k == 1 else r.argmax(axis=1)]
    return out


def _train_index(task) -> np.ndarray:
    """(T, R): each split's distinct training rows (local indices), padded with -1 to the longest."""
    rows = [np.flatnonzero(task.counts[:, t] > 0) for t in range(task.counts.shape[1])]
    R = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, R - len(r)), constant_values=-1) for r in rows])


def _span_features(states, counts, train) -> np.ndarray:
    """(T, m, R) coordinates of every row's standardised state in an orthonormal basis of the split's
    standardised training rows (columns beyond the span's rank are zero)."""
    frac = counts / counts.sum(axis=0)  # (m, T)
    mu = frac.T @ states  # (T, d)
    var = frac.T @ np.square(states) - np.square(mu)
    sigma = np.sqrt(np.maximum(var, 0.0))
    sigma = np.where(sigma < 10 * np.finfo(float).eps, 1.0, sigma)  # as StandardScaler
    Z = (states[None] - mu[:, None]) / sigma[:, None]  # (T, m, d)
    pad = train < 0
    Ztr = np.take_along_axis(Z, np.where(pad, 0, train)[:, :, None], axis=1)  # (T, R, d)
    Ztr[pad] = 0.0
    lam, U = np.linalg.eigh(Ztr @ Ztr.transpose(0, 2, 1))  # (T, R), (T, R, R)
    keep = lam > lam[:, -1:] * 1e-10
    scale = np.where(keep, 1.0 / np.sqrt(np.where(keep, lam, 1.0)), 0.0)  # (T, R)
    return (Z @ Ztr.transpose(0, 2, 1)) @ (U * scale[:, None, :])  # (T, m, R)


def _newton(F, s, Yk, train, n_classes: int, C: float) -> np.ndarray:
    """Raw scores (T, m, k) at the optimum of every fit (k = 1 binary, else the K logits). F (T, m, R) features,
    s (T, m) weights (0 off the training rows), Yk (T, m) class indices, train (T, R) the training rows (-1:
    padding, weight 0): the iterations only see those. Multinomial fits are solved in the K - 1 coordinates
    of the logits that sum to zero (:func:`_sum_zero_basis`): the optimum lies there (the loss ignores a
    shift common to the K logits, the penalty is least without one), so the (K - 1)(R + 1) systems give
    its iterates exactly and cost ((K - 1) / K)^3 of the K (R + 1) ones."""
    T, m, R = F.shape
    A = None if n_classes == 2 else _sum_zero_basis(n_classes)  # (K, K - 1)
    k = 1 if A is None else n_classes - 1  # free coordinate vectors per fit
    rows = np.where(train < 0, 0, train)
    s = np.where(train < 0, 0.0, np.take_along_axis(s, rows, axis=1))  # (T, R)
    Yk = np.take_along_axis(Yk, rows, axis=1)
    Fa = np.concatenate([np.take_along_axis(F, rows[:, :, None], axis=1), np.ones((T, R, 1))], axis=2)  # (T, R, R + 1)
    Y = (Yk == 1).astype(float)[:, :, None] if A is None else np.eye(n_classes)[Yk]  # (T, R, 1 or K)
    pen = np.tile(np.r_[np.full(R, 1.0 / C), RIDGE if A is not None else 0.0], k)  # (p,) penalty diagonal
    theta = np.zeros((T, k * (R + 1)))
    f = _objective(theta, Fa, s, Y, pen, A)
    active = np.ones(T, dtype=bool)
    for _ in range(MAX_STEPS):
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        g, H = _grad_hess(theta[idx], Fa[idx], s[idx], Y[idx], pen, A)
        step = -np.linalg.solve(H, g[:, :, None])[:, :, 0]  # (a, p)
        dec = -(g * step).sum(axis=1)  # g' H^-1 g
        done = dec / 2 < DECREMENT  # converged: no step (a zero gradient, e.g. constant states, stays exactly put)
        active[idx[done]] = False
        idx, step, dec = idx[~done], step[~done], dec[~done]
        slope, t = -dec, np.ones(len(idx))
        pending = np.ones(len(idx), dtype=bool)
        for _ in range(40):  # backtracking: halve t where Armijo fails
            trial = theta[idx] + t[:, None] * step
            ft = _objective(trial, Fa[idx], s[idx], Y[idx], pen, A)
            ok = pending & (ft <= f[idx] + 1e-4 * t * slope)
            theta[idx[ok]], f[idx[ok]] = trial[ok], ft[ok]
            pending &= ~ok
            if not pending.any():
                break
            t = np.where(pending, t / 2, t)
        active[idx[pending]] = False  # no decrease found along the Newton direction: at the optimum to rounding
    raw = _raw(theta, np.concatenate([F, np.ones((T, m, 1))], axis=2), k)
    return raw if A is None else raw @ A.T


def _sum_zero_basis(n_classes: int) -> np.ndarray:
    """(K, K - 1) orthonormal basis of the logit vectors summing to zero (Helmert's contrasts): W = A V keeps
    ||W||_F = ||V||_F, so the penalty reads the same in V."""
    A = np.zeros((n_classes, n_classes - 1))
    for j in range(1, n_classes):
        A[:j, j - 1], A[j, j - 1] = 1.0, -float(j)
        A[:, j - 1] /= np.sqrt(j * (j + 1.0))
    return A


def _raw(theta, Fa, k) -> np.ndarray:
    T, m, q = Fa.shape
    return Fa @ theta.reshape(T, k, q).transpose(0, 2, 1)  # (T, m, k)


def _objective(theta, Fa, s, Y, pen, A=None) -> np.ndarray:
    if A is None:
        raw = _raw(theta, Fa, 1)
        point = np.logaddexp(0.0, raw[:, :, 0]) - Y[:, :, 0] * raw[:, :, 0]
    else:
        raw = _raw(theta, Fa, A.shape[1]) @ A.T  # (T, m, K) logits
        top = raw.max(axis=2, keepdims=True)
        point = (top + np.log(np.exp(raw - top).sum(axis=2, keepdims=True)))[:, :, 0] - (raw * Y).sum(axis=2)
    return (s * point).sum(axis=1) + 0.5 * (pen * np.square(theta)).sum(axis=1)


def _grad_hess(theta, Fa, s, Y, pen, A=None):
    """Gradient (a, p) and Hessian (a, p, p) of the objective, p = k (R + 1) in coordinate-major order (k = 1
    binary; multinomial: the K - 1 sum-zero coordinates of basis A, logits z = u A')."""
    a, m, q = Fa.shape
    if A is None:
        k = 1
        P = expit(_raw(theta, Fa, 1))
        G = s[:, :, None] * (P - Y)  # (a, m, 1)
        W = (s * (P * (1 - P))[:, :, 0])[:, :, None, None]  # (a, m, 1, 1)
    else:
        k = A.shape[1]
        z = _raw(theta, Fa, k) @ A.T  # (a, m, K)
        P = np.exp(z - z.max(axis=2, keepdims=True))
        P /= P.sum(axis=2, keepdims=True)
        G = s[:, :, None] * ((P - Y) @ A)  # (a, m, K - 1)
        PA = P @ A  # (a, m, K - 1)
        W = s[:, :, None, None] * (np.einsum("amk,kq,kr->amqr", P, A, A) - PA[:, :, :, None] * PA[:, :, None, :])
    g = np.einsum("amk,amq->akq", G, Fa).reshape(a, -1) + pen * theta
    WF = W.reshape(a, m, k * k)[:, :, :, None] * Fa[:, :, None, :]  # (a, m, k k, q)
    H = (WF.reshape(a, m, -1).transpose(0, 2, 1) @ Fa).reshape(a, k, k, q, q)  # (a, k, l, q, q')
    H = H.transpose(0, 1, 3, 2, 4).reshape(a, k * q, k * q)
    H[:, np.arange(k * q), np.arange(k * q)] += pen
    return g, H
