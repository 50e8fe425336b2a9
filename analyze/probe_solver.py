"""Batched linear-probe fits: every split of a layer solved in lockstep, one GEMM per evaluation.

The estimator is exactly :func:`gapcache.analyze.probes.make_probe`'s
``StandardScaler -> LogisticRegression(C, class_weight='balanced', solver='lbfgs', tol, max_iter)``
fitted on each split's training rows (sklearn 1.5+ objective and optimizer), only computed faster.
For one split with training counts c_i (a row listed twice counts twice), labels y_i in K classes:

- scaler: mu = sum c_i x_i / sum c_i, sigma^2 = sum c_i (x_i - mu)^2 / sum c_i (sigma < 10 eps -> 1),
  z_i = (x_i - mu) / sigma;
- weights: s_i = c_i * n / (K n_k) for y_i = k (``class_weight='balanced'``, n = sum c_i), S = sum s_i;
- K = 2: minimise (1/S) sum s_i [log(1 + e^r_i) - [y_i = k_1] r_i] + ||w||^2 / (2 C S), r_i = z_i.w + b
  (intercept not penalised); predict k_1 where r > 0, else k_0;
- K > 2 (multinomial, K weight vectors): minimise (1/S) sum s_i [logsumexp_k r_ik - r_{i y_i}] +
  sum_k ||w_k||^2 / (2 C S), r_ik = z_i.w_k + b_k; predict argmax_k r_ik;
- optimizer: ``scipy.optimize.minimize(method='L-BFGS-B')`` from zeros with sklearn's options
  (maxiter=max_iter, maxls=50, gtol=tol, ftol=64 eps), i.e. the same iterates as sklearn up to
  float rounding; the solution is where sklearn's lbfgs stops, not a tighter optimum (on the
  benchmark data the exact optimum's OOF accuracies differ from sklearn's by up to 0.006).

What is faster: the T fits of a layer (k folds x 2 arms in probe_layers; more for refits) run
scipy's compiled L-BFGS-B step (``scipy.optimize._lbfgsb.setulb``, the routine ``minimize`` itself
drives) side by side by reverse communication, so one evaluation round of all T fits is two
matrix products over the layer's states ((m, d) @ (d, T K') and (T K', m) @ (m, d)) instead of
2 T matrix-vector products plus T sklearn/scipy overheads.  Small layers (``BLOCK_BYTES``) share
the rounds as one block of L T fits.  Where scipy's step has another signature (scipy < 1.15),
threads running the public ``minimize`` are served in the same batches (:class:`_Lockstep`).
The scaler is never applied to the data: with xc = x - mean over all rows (once per layer) and
delta = mu - mean, z.w = xc.(w / sigma) - delta.(w / sigma), so all fits share one copy of the
states.  Every round evaluates all fits (finished ones keep their last point), so a fit's numbers
do not depend on when the others stop or on its block (tested).  Products in the states' dtype
(float32 states: float32 products and scaler sums; sklearn multiplies its float32-scaled states
by float64 coefficients); the parameters, the loss and the gradient's corrections in float64.

Agreement (tests/test_probes.py, benchmarks/bench_probes.py): float64 states give sklearn's
decision values to ~1e-7 and its labels exactly; the 1000 x 49 x 2048 float32 benchmark gives
identical OOF labels in both arms.  Where sklearn's own stopping point is sensitive to rounding
(32-sample permuted-label controls of the demo: sklearn on a float64 copy of the same float32
values moves those controls by up to 3/32), the batched fit can differ from sklearn by as much.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
from scipy import optimize
from scipy.special import expit
from threadpoolctl import ThreadpoolController

from gapcache.errors import DataError

BLOCK_BYTES = 4 * 2**20  # layers solved in one lockstep while their float64 states fit (small probes: all)
LBFGS_OPTIONS = dict(maxls=50, ftol=64 * np.finfo(float).eps)  # sklearn's, beside maxiter and gtol


def fit_predict_layers(X, y, splits, *, C: float = 1.0, tol: float = 1e-4, max_iter: int = 1000,
                       threads: int | None = 1, decision: bool = False) -> list:
    """Fit the probe on each split's training rows at every layer; predict its test rows.

    ``X``: (sample, layer, hidden) or (sample, hidden) array (numpy, or anything whose
    ``X[:, i, :]`` gives a numpy-convertible layer, e.g. dask: one layer is loaded at a time).
    ``y``: (sample,) integer labels (>= 0 on the rows the splits use) shared by all splits, or
    (split, sample) one row per split (e.g. permuted labels).  ``splits``: sequence of
    (train_idx, test_idx) row indices into X; train_idx may repeat rows (a bootstrap resample: a
    row listed j times has weight j in the scaler and the loss, as sklearn fitted on X[train_idx]).
    Rows in no split are never read.  ``threads``: BLAS threads.

    Returns one array per split, in ``splits`` order: (layer, len(test_idx)) predicted labels, or
    with ``decision=True`` sklearn's ``decision_function`` values, (layer, len(test_idx)) for two
    classes, (layer, len(test_idx), K) for K > 2.  Every split's training rows must hold every
    class present in its labels (else DataError).
    """
    X = X if X.ndim == 3 else X[:, None, :]
    task = _Tasks(y, splits, X.shape[0])
    shape = (lambda te: (X.shape[1], len(te))) if not decision or task.k == 1 else \
        (lambda te: (X.shape[1], len(te), task.k))
    out = [np.empty(shape(te), dtype=float if decision else task.classes.dtype) for _, te in task.local]
    T, per = len(task.local), layers_per_block(len(task.rows), X.shape[2])
    with _limits(threads):
        for a in range(0, X.shape[1], per):
            block = task.states(X, slice(a, a + per))  # (L, m, d)
            problem = _Problem(block, task.counts, task.weights, task.Yk, len(task.classes), C)
            raw = problem.solve(tol, max_iter)  # (m, L T, K')
            value = (raw[:, :, 0] if task.k == 1 else raw) if decision else task.classes[problem.predict(raw)]
            for j in range(raw.shape[1]):
                out[j % T][a + j // T] = value[task.local[j % T][1], j]
    return out


def layers_per_block(n_rows: int, hidden: int) -> int:
    """How many layers one lockstep solves together: as many as fit BLOCK_BYTES as float64 (at least 1)."""
    return max(1, BLOCK_BYTES // (n_rows * hidden * 8))


_CONTROLLER: list = []


def _limits(threads):
    """threadpoolctl's limit context, the library scan done once (threadpool_limits rescans every call:
    20 ms, more than a small probe's fit)."""
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=threads)


class _Tasks:
    """The splits on the rows they use: local indices, training counts, labels, class weights."""

    def __init__(self, y, splits, n: int):
        splits = [(np.asarray(tr, dtype=np.intp), np.asarray(te, dtype=np.intp)) for tr, te in splits]
        self.rows = np.unique(np.concatenate([np.concatenate(s) for s in splits]))  # (m,)
        self.n = n
        Y = _split_labels(y, len(splits), n, self.rows)  # (T, m)
        where = np.full(n, -1, dtype=np.intp)
        where[self.rows] = np.arange(len(self.rows))
        self.local = [(where[tr], where[te]) for tr, te in splits]
        self.classes = np.unique(np.concatenate([Y[t, np.concatenate(s)] for t, s in enumerate(self.local)]))
        self.k = 1 if len(self.classes) == 2 else len(self.classes)
        m = len(self.rows)
        self.counts = np.stack([np.bincount(tr, minlength=m) for tr, _ in self.local], axis=1).astype(float)  # (m, T)
        self.Yk = np.searchsorted(self.classes, Y).T  # (m, T) class index
        self.weights = _balanced_weights(self.counts, self.Yk, len(self.classes), self.classes)

    def states(self, X, layers: slice) -> np.ndarray:
        """(L, m, d) states of the used rows at a block of layers, float32 or float64 (sklearn's precisions)."""
        states = np.asarray(X[:, layers, :] if len(self.rows) == self.n else X[self.rows, layers, :])
        dtype = states.dtype if states.dtype in (np.float32, np.float64) else np.float64
        return np.ascontiguousarray(states.transpose(1, 0, 2), dtype=dtype)


def _split_labels(y, n_splits: int, n: int, rows) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 1:
        y = np.broadcast_to(y, (n_splits, len(y)))
    if y.shape != (n_splits, n):
        raise DataError(f"The 'y' parameter of fit_predict_layers must be (sample,) = ({n},) or (split, sample) = "
                        f"({n_splits}, {n}). Got shape {y.shape} instead.")
    y = y[:, rows]
    if not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise DataError(f"The 'y' parameter of fit_predict_layers must hold integer labels >= 0 on the rows the "
                        f"splits use (leave unlabelled rows out of the splits). Got dtype {y.dtype}, min {y.min()} "
                        f"instead.")
    return y


def _balanced_weights(counts, Yk, n_classes: int, classes) -> np.ndarray:
    """s_it = c_it * n_t / (K n_tk), k = class of row i in split t: sklearn's 'balanced' class weight."""
    per_class = np.stack([(counts * (Yk == k)).sum(axis=0) for k in range(n_classes)])  # (K, T)
    if (per_class == 0).any():
        t, k = np.argwhere(per_class.T == 0)[0]
        raise DataError(f"Split {t} of fit_predict_layers must have every class in its training rows. Got no "
                        f"row of class {classes[k]!r} (training class counts {per_class[:, t].tolist()}) instead.")
    cw = counts.sum(axis=0) / (n_classes * per_class)  # (K, T)
    return counts * cw[Yk, np.arange(Yk.shape[1])]


class _Problem:
    """A block of L layers x T splits = L T fits (fit j = layer j // T, split j % T): the scaler
    statistics and the batched loss and gradient.  Layers of a block share nothing but the rounds;
    their products are separate BLAS calls of the same shapes as for a block of one."""

    def __init__(self, states, counts, weights, Yk, n_classes: int, C: float):
        L, m, d = states.shape
        xc = states - states.mean(axis=1, keepdims=True)  # (L, m, d) centred once (any centre will do: delta absorbs it)
        frac = np.ascontiguousarray((counts / counts.sum(axis=0)).T, dtype=states.dtype)  # (T, m) row weights
        self.delta = (frac @ xc).reshape(-1, d).astype(np.float64)  # (L T, d) = mu_j - mean
        var = (frac @ np.square(xc)).reshape(-1, d) - np.square(self.delta)  # (L T, d)
        sigma = np.sqrt(np.maximum(var, 0.0))
        self.sigma = np.where(sigma < 10 * np.finfo(float).eps, 1.0, sigma)
        self.xc = xc
        self.S = np.tile(weights.sum(axis=0), L)  # (L T,)
        self.sn = np.tile(weights / weights.sum(axis=0), (1, L))  # (m, L T) s_i / S
        self.K, self.C = n_classes, C
        self.k = 1 if n_classes == 2 else n_classes  # weight vectors per fit
        onehot = (Yk == 1).astype(float)[:, :, None] if self.k == 1 else np.eye(n_classes)[Yk]  # (m, T, k)
        self.onehot = np.tile(onehot, (1, L, 1))  # (m, L T, k)

    def _raw(self, P):
        """P: (L T, k, d + 1) -> raw scores (m, L T, k) = z.w + b with z the fit's standardised states."""
        (L, m, d), J, k = self.xc.shape, P.shape[0], P.shape[1]
        if not P.any():  # the start point: every score is 0
            return np.zeros((m, J, k))
        A = P[:, :, :-1] / self.sigma[:, None, :]  # (L T, k, d) weights on the centred states
        offset = P[:, :, -1] - np.einsum("jkd,jd->jk", A, self.delta)  # (L T, k)
        A = np.ascontiguousarray(A.reshape(L, -1, d).transpose(0, 2, 1), dtype=self.xc.dtype)  # (L, d, T k)
        raw = np.matmul(self.xc, A)  # (L, m, T k)
        return raw.transpose(1, 0, 2).reshape(m, J, k) + offset

    def loss_grad(self, P):
        """(loss (L T,), gradient (L T, k, d + 1)) of every fit's objective at P (L T, k, d + 1)."""
        raw = self._raw(P)  # (m, L T, k)
        self.last = (P.copy(), raw)
        if self.k == 1:  # HalfBinomialLoss: log(1 + e^r) - y r, gradient sigmoid(r) - y
            r = raw[:, :, 0]
            point = np.logaddexp(0.0, r) - self.onehot[:, :, 0] * r
            R = expit(r)[:, :, None]
        else:  # HalfMultinomialLoss: logsumexp_k r_k - r_y, gradient softmax(r) - onehot(y)
            top = raw.max(axis=2, keepdims=True)  # scipy.special.logsumexp: the same, 10x the overhead here
            lse = top + np.log(np.exp(raw - top).sum(axis=2, keepdims=True))
            point = lse[:, :, 0] - (raw * self.onehot).sum(axis=2)
            R = np.exp(raw - lse)
        R -= self.onehot
        R *= self.sn[:, :, None]  # s_i / S
        W = P[:, :, :-1]
        loss = (self.sn * point).sum(axis=0) + 0.5 * np.square(W).sum(axis=(1, 2)) / (self.C * self.S)
        (L, m, d), J, k = self.xc.shape, R.shape[1], R.shape[2]
        Rt = np.ascontiguousarray(R.reshape(m, L, -1).transpose(1, 2, 0), dtype=self.xc.dtype)  # (L, T k, m)
        XtR = np.matmul(Rt, self.xc).reshape(J, k, d)  # (L T, k, d)
        colsum = R.sum(axis=0)  # (L T, k)
        grad = np.empty_like(P)
        grad[:, :, :-1] = (XtR - colsum[:, :, None] * self.delta[:, None, :]) / self.sigma[:, None, :]
        grad[:, :, :-1] += W / (self.C * self.S)[:, None, None]
        grad[:, :, -1] = colsum
        return loss, grad

    def solve(self, tol: float, max_iter: int):
        """Run T L-BFGS-B minimisations in lockstep; raw scores (m, T, k) at the solutions."""
        T, d = self.delta.shape
        shape = (T, self.k, d + 1)
        if _reverse_lbfgsb():
            solutions = _lockstep_setulb(self.loss_grad, shape, tol, max_iter)
        else:
            options = dict(LBFGS_OPTIONS, maxiter=max_iter, gtol=tol)
            solutions = _Lockstep(T, np.zeros(shape)).run(self.loss_grad, lambda fun: optimize.minimize(
                fun, np.zeros(self.k * (d + 1)), method="L-BFGS-B", jac=True, options=options).x, shape[1:])
        P, raw = self.last  # the solutions are the last points evaluated (checked, else recomputed)
        return raw if np.array_equal(P, solutions) else self._raw(solutions)

    def predict(self, raw) -> np.ndarray:
        """Class index (m, T): r > 0 -> 1 (binary); argmax_k r_k (multinomial, first on ties)."""
        return (raw[:, :, 0] > 0).astype(np.intp) if self.k == 1 else raw.argmax(axis=2)


def _reverse_lbfgsb() -> bool:
    """Whether scipy's compiled L-BFGS-B step has the reverse-communication signature of scipy >= 1.15
    (the routine ``scipy.optimize.minimize(method='L-BFGS-B')`` itself calls, one step per call).
    Where it has not (older or newer scipy), the thread lockstep below runs the public
    ``minimize`` instead: the same iterates, slower under load (thread hand-offs)."""
    if FORCE_THREADS:
        return False
    try:
        from scipy.optimize import _lbfgsb
    except ImportError:
        return False
    doc = (getattr(_lbfgsb.setulb, "__doc__", "") or "").replace(" ", "")
    return doc.startswith(SETULB_SIGNATURE)


FORCE_THREADS = False  # tests set it to run the fallback driver
SETULB_SIGNATURE = "setulb(m,x,l,u,nbd,f,g,factr,pgtol,wa,iwa,task,lsave,isave,dsave,maxls,ln_task)"
FACTR = LBFGS_OPTIONS["ftol"] / np.finfo(float).eps  # as scipy converts ftol
MAXCOR = 10  # scipy's default history length, as sklearn uses it


class _Lbfgsb:
    """One L-BFGS-B minimisation (no bounds) driven step by step, as ``scipy.optimize._minimize_lbfgsb``
    drives it: the same work arrays, options and stopping rules (maxiter counted on new iterations)."""

    def __init__(self, n: int, tol: float, max_iter: int):
        from scipy.optimize import _lbfgsb

        self.setulb, self.tol, self.max_iter, self.n_iter = _lbfgsb.setulb, tol, max_iter, 0
        self.x, self.f, self.g = np.zeros(n), np.array(0.0), np.zeros(n)
        self.bounds = (np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int32))  # l, u, nbd = 0: unbounded
        m = MAXCOR
        self.wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m)
        self.iwa, self.task, self.ln_task = np.zeros(3 * n, np.int32), np.zeros(2, np.int32), np.zeros(2, np.int32)
        self.lsave, self.isave, self.dsave = np.zeros(4, np.int32), np.zeros(44, np.int32), np.zeros(29)

    def step(self) -> bool:
        """Advance until the routine asks for f and g at ``self.x`` (True) or stops (False)."""
        while True:
            self.setulb(MAXCOR, self.x, *self.bounds[:2], self.bounds[2], self.f, self.g, FACTR, self.tol, self.wa,
                        self.iwa, self.task, self.lsave, self.isave, self.dsave, LBFGS_OPTIONS["maxls"], self.ln_task)
            if self.task[0] == 3:
                return True
            if self.task[0] != 1:
                return False
            self.n_iter += 1
            if self.n_iter >= self.max_iter:
                self.task[0], self.task[1] = 5, 504  # scipy's "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT"


def _lockstep_setulb(loss_grad, shape, tol: float, max_iter: int):
    """T minimisations of loss_grad(P (T, ...)) -> (f (T,), g (T, ...)), one batched evaluation per round.
    Finished runs keep their last point in P (its column is computed and ignored)."""
    T = shape[0]
    runs = [_Lbfgsb(int(np.prod(shape[1:])), tol, max_iter) for _ in range(T)]
    P = np.zeros(shape)
    waiting = [r.step() for r in runs]
    while any(waiting):
        for t in np.flatnonzero(waiting):
            P[t] = runs[t].x.reshape(shape[1:])
        f, g = loss_grad(P)
        for t in np.flatnonzero(waiting):
            runs[t].f = np.array(f[t])
            runs[t].g = np.ascontiguousarray(g[t].ravel())
            waiting[t] = runs[t].step()
    return np.stack([r.x.reshape(shape[1:]) for r in runs])


class _Lockstep:
    """Threads that each run one minimisation; their objective calls are served in batches.

    A worker's ``fun(x)`` posts x and blocks; when every unfinished worker has posted, the
    coordinator evaluates all T points at once (finished workers' columns hold their last point)
    and hands each worker its (f, g).  The sequence of points a worker sees is that of a plain
    sequential run: the batch only changes who computes the objective.  One queue carries the
    posts to the coordinator, one queue per worker its answer (no broadcast wake-ups).
    """

    def __init__(self, n: int, start):
        self.points = start  # (T, ...) last point of every worker
        self.posts: queue.SimpleQueue = queue.SimpleQueue()  # (t, x) or (t, None) = finished
        self.answers = [queue.SimpleQueue() for _ in range(n)]  # (f, g) or an exception

    def run(self, evaluate, minimize, shape):
        """minimize(fun) -> x in each of T threads; evaluate(points) -> (f (T,), g (T, ...)). Returns (T, ...) solutions."""
        n = len(self.points)
        results: list = [None] * n
        workers = [threading.Thread(target=self._work, args=(t, minimize, shape, results), daemon=True)
                   for t in range(n)]
        for w in workers:
            w.start()
        error = self._serve(evaluate, n)
        for w in workers:
            w.join()
        if error is not None:
            raise error
        return np.stack([np.reshape(r, shape) for r in results])

    def _work(self, t, minimize, shape, results):
        def fun(x):
            self.posts.put((t, np.reshape(x, shape)))
            answer = self.answers[t].get()
            if isinstance(answer, BaseException):
                raise RuntimeError("probe batch evaluation failed") from answer
            return answer

        try:
            results[t] = minimize(fun)
            self.posts.put((t, None))
        except BaseException as e:  # noqa: BLE001 - handed to the coordinator, re-raised there
            self.posts.put((t, e))

    def _serve(self, evaluate, running: int):
        error = None
        while running:
            batch = []
            while len(batch) < running:
                t, x = self.posts.get()
                if x is None or isinstance(x, BaseException):
                    running -= 1
                    error = error or (x if isinstance(x, BaseException) else None)
                else:
                    batch.append(t)
                    self.points[t] = x
            if not batch:
                break
            try:
                f, g = evaluate(self.points) if error is None else (None, None)
            except BaseException as e:  # noqa: BLE001
                error = e
            for t in batch:
                self.answers[t].put(error or (float(f[t]), g[t].ravel()))
        return error
