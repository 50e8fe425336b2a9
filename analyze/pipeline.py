"""``gapcache analyze``: every metric from the store(s) alone, lazily, with sample-level CIs.

Usage::

    gapcache analyze runs/q3/store.zarr --out runs/q3/analysis [--metrics accuracy,evd,rank,probes,lens]
    from gapcache.analyze.pipeline import AnalysisParams, analyze_store
    summary, results = analyze_store(open_store(path), AnalysisParams(cliff_layer=11))

Writes ``OUT/summary.json`` (per metric: estimates with CIs, n, parameters), ``OUT/results.zarr``
(the labelled curves, an xarray Dataset per store), figures (PNG and PDF) and ``OUT/report.html``.
Every CI resamples samples (paired by sample id between conditions / stores); method, level,
resamples and seed are recorded with each interval.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from gapcache import conditions
from gapcache.analyze import attention as attention_mod
from gapcache.analyze import evd as evd_mod
from gapcache.analyze import generation, report, stats, workers
from gapcache.analyze import metrics as registry
from gapcache.analyze.metrics import Context, Metric, MetricResult
from gapcache.conditions import REFERENCE
from gapcache.errors import ConfigError, DataError, GapcacheError

log = logging.getLogger(__name__)
BLIND = conditions.kinds_in_group(conditions.BLIND)  # the blind kinds (labels = kind names)


def __getattr__(name):
    """``METRICS``: the registered metric names in pipeline order (read from the registry on access)."""
    if name == "METRICS":
        return registry.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass
class AnalysisParams:
    metrics: tuple = dataclasses.field(default_factory=registry.names)  # every registered metric
    tau: float | None = None  # fixed tau; None = adaptive (tau_ratio x max of the pilot mean Delta curve)
    tau_ratio: float = 0.1
    n_pilot: int | None = None
    tau_rule: str = "adaptive"  # adaptive (gapcache's) | seed (evd.seed_tau: the seed's rule and floor)
    tau_floor: float | None = 1e-6  # a tau below it is floored (noted in the summary); None = refuse
    evd_never_reached: str | float = "below_grid"  # evd.evd_gap's rule: below_grid | skip | a number (seed: 0)
    cliff_method: str = "steepest"  # median_evd | steepest | first_crossing
    cliff_layer: int | None = None  # fixes the cliff for every metric and figure
    strategy: str = "zero"  # truncation strategy whose Delta defines EVD and the cliff
    level: float = 0.95
    ci_method: str = stats.DEFAULT_METHOD  # the one default (gapcache.analyze.stats)
    n_resamples: int = 1999
    seed: int = 0
    n_splits: int = 5
    n_refits: int = 10  # probe statistics: refits of the whole cross-validation (gapcache.analyze.probe_stats)
    correction: str = "holm"
    alpha: float = 0.05
    scheduler: str = "threads"
    #: processes for the probe fits and the figures, this one and jobs - 1 workers (gapcache.analyze.workers);
    #: None: the CPUs this process may use; 1: all in this process.  Results are the same for every value.
    jobs: int | None = None
    #: text sites (besides the store's own) every site-taking metric analyses, derived from the token span by
    #: name (gapcache.analyze.textsites.DERIVED: question_mean, question_first, ...; --site)
    sites: tuple = ()
    cka_text: str = "question"  # text tokens the geometry CKA compares with the visual ones (textsites.GROUPS)

    def validate(self):
        """Self, checked: metrics are registered names, cliff_method a known cliff rule."""
        bad = [m for m in self.metrics if m not in registry.REGISTRY]
        if bad:
            raise ConfigError(f"The 'metrics' parameter must be a subset of {list(registry.names())}. "
                              f"Got {bad} instead.")
        if self.tau_rule not in ("adaptive", "seed"):
            raise ConfigError(f"The 'tau_rule' parameter must be one of ['adaptive', 'seed']. Got {self.tau_rule!r} instead.")
        from gapcache.analyze.textsites import DERIVED, GROUPS

        workers.resolve(self.jobs)  # an integer >= 1 or None
        if self.cka_text not in GROUPS:
            raise ConfigError(f"The 'cka_text' parameter must be one of {list(GROUPS)}. Got {self.cka_text!r} instead.")
        if isinstance(self.sites, str):
            raise ConfigError(f"The 'sites' parameter must be a tuple of site names (e.g. {list(DERIVED)[:2]}). "
                              f"Got the string {self.sites!r} instead.")
        if self.cliff_method not in ("median_evd", "steepest", "first_crossing"):
            raise ConfigError("The 'cliff_method' parameter must be one of ['median_evd', 'steepest', "
                              f"'first_crossing']. Got {self.cliff_method!r} instead.")
        return self


def _ci(x, p: AnalysisParams):
    return stats.mean_ci(x, level=p.level, method=p.ci_method, n_resamples=p.n_resamples, seed=p.seed)


def labelled(ds, values, dims, **coords):
    """``values`` as a DataArray over ``dims``; each dim's coordinate is ``coords[dim]`` or, for the
    store's own dims (sample, condition, layer, site, visual_condition), the store's (strings as str)."""
    import xarray as xr

    own = {d: (ds[d].values if ds[d].dtype.kind in "iuf" else strs(ds[d])) for d in dims if d not in coords}
    return xr.DataArray(np.asarray(values), dims=dims, coords={**own, **coords})


def strs(da) -> np.ndarray:
    """A string coordinate/variable as a plain numpy str array (zarr gives numpy StringDType)."""
    return np.array([str(v) for v in np.asarray(da.values, dtype=object).ravel()])


def done_mask(ds, condition) -> np.ndarray:
    return ds.status.sel(condition=condition).values == 1


# ------------------------------------------------------------------------------------- metrics
def accuracy(ds, p: AnalysisParams, ctx: Context) -> MetricResult:
    """Forced-choice accuracy per condition (and per category), and blind minus original, paired.
    Array: forced_choice_correct (condition, sample), 1.0/0.0 (NaN where the sample failed)."""
    from gapcache.analyze.scoring import forced_choice_correct, gold_candidate_index

    gold = gold_candidate_index(ds.answer.values, ds.candidate.values)
    correct = forced_choice_correct(ds.candidate_logprob.values, ds.candidate_mask.values, gold)  # (cond, sample)
    conds = [str(c) for c in ds.condition.values]
    out = {"per_condition": {}, "vs_original": {}, "per_category": {}}
    cats = strs(ds.category)
    for k, c in enumerate(conds):
        ok = np.isfinite(correct[k])
        if ok.sum() < 2:
            continue
        out["per_condition"][c] = _ci(correct[k][ok], p).to_dict()
        for cat in sorted(set(cats[ok]) - {""}):
            sel = ok & (cats == cat)
            if sel.sum() >= 2:
                out["per_category"].setdefault(c, {})[cat] = _ci(correct[k][sel], p).to_dict()
    if REFERENCE in conds:
        o = conds.index(REFERENCE)
        for k, c in enumerate(conds):
            both = np.isfinite(correct[k]) & np.isfinite(correct[o])
            if c != REFERENCE and both.sum() >= 2:
                out["vs_original"][c] = stats.mean_diff_ci(
                    correct[k][both], correct[o][both], level=p.level, method=p.ci_method,
                    n_resamples=p.n_resamples, seed=p.seed).to_dict()
    return MetricResult(out, {"forced_choice_correct": labelled(ds, correct, ("condition", "sample"))})


def truncation(ds, p: AnalysisParams, ctx: Context) -> MetricResult:
    """Per truncation strategy: mean Delta(L) = s_clean - s_trunc(L) with its CI, and the accuracy curve.
    Array: delta (strategy, trunc_layer, sample)."""
    from gapcache.analyze.scoring import gold_candidate_index

    if not any(conditions.in_group(ds.condition_kind.values, conditions.TRUNCATION)):
        return {"skipped": "no truncated condition in the store"}
    gold_idx = gold_candidate_index(ds.answer.values, ds.candidate.values)
    curves = evd_mod.truncation_curves(ds.gold_logprob.load(), ds.candidate_logprob.values,
                                       ds.candidate_mask.values, gold_idx)
    delta = labelled(ds, curves.delta.values, ("strategy", "trunc_layer", "sample"),
                     strategy=curves.strategy.values.tolist(), trunc_layer=curves.layer.values.tolist())
    out = {}
    for s in curves.strategy.values.tolist():
        d = curves.delta.sel(strategy=s).transpose("sample", "layer").values
        keep = np.isfinite(d).all(axis=1)
        entry = {"layers": curves.layer.values.tolist(), "n": int(keep.sum()),
                 "mean_delta": _ci(d[keep], p).to_dict()}
        if "accuracy" in curves:
            entry["accuracy"] = curves.accuracy.sel(strategy=s).values.tolist()
            entry["clean_accuracy"] = float(curves.clean_accuracy)
        out[s] = entry
    return MetricResult(out, {"delta": delta})


def evd(ds, p: AnalysisParams, ctx: Context) -> MetricResult:
    """EVD per sample (strategy p.strategy), tau rule, the three cliffs, hard-vs-easy EVD gap."""
    if not any(conditions.in_group(ds.condition_kind.values, conditions.TRUNCATION)):
        return {"skipped": "no truncated condition in the store"}
    deltas = evd_mod.truncation_deltas(ds.gold_logprob.load())
    if p.strategy not in deltas.strategy.values:
        raise ConfigError(f"The 'strategy' parameter must be one of {deltas.strategy.values.tolist()} (the store's "
                          f"truncation strategies). Got {p.strategy!r} instead.")
    d = deltas.sel(strategy=p.strategy).transpose("sample", "layer")
    try:
        return _evd(ds, d, p)
    except GapcacheError as err:  # e.g. too few truncation layers for any tau or cliff: say why, go on
        return {"skipped": f"{err} (this store truncates at layer(s) {d.layer.values.tolist()})"}


def _cliffs(dv, layers, tau: float) -> dict:
    """Each cliff method's result, or {'skipped': why} for a method the store cannot support."""
    out = {}
    for m in ("median_evd", "steepest", "first_crossing"):
        try:
            out[m] = evd_mod.cliff(dv, layers, tau, method=m)
        except GapcacheError as err:
            out[m] = {"skipped": f"{err} (truncation layers {list(map(int, layers))})", "method": m, "layer": None,
                      "mean_curve": evd_mod.mean_curve(dv).tolist()}
    return out


def _evd(ds, d, p: AnalysisParams) -> MetricResult:
    keep = np.isfinite(d.values).all(axis=1)
    dv, layers = d.values[keep], d.layer.values
    if p.tau is not None:
        tau = evd_mod.fixed_tau(p.tau)
    elif p.tau_rule == "seed":
        tau = evd_mod.seed_tau(dv, strs(ds.category)[keep], p.tau_ratio, floor=p.tau_floor or 1e-6)
    else:
        tau = evd_mod.adaptive_tau(dv, p.tau_ratio, p.n_pilot, p.seed, floor=p.tau_floor)
    e = evd_mod.evd(dv, layers, tau.value)
    cliffs = _cliffs(dv, layers, tau.value)
    method = cliffs[p.cliff_method]
    chosen = p.cliff_layer if p.cliff_layer is not None else None if isinstance(method, dict) else method.layer
    full = np.full(len(d.sample), np.nan)
    full[keep] = e
    out = {"strategy": p.strategy, "tau": stats.jsonable(tau), "n": int(keep.sum()),
           "n_never_reach_tau": int(np.isnan(e).sum()),
           "cliffs": {m: stats.jsonable(c) for m, c in cliffs.items()},
           **({"cliff_skipped": f"--cliff-method {p.cliff_method}: {method['skipped']}; pass --cliff-layer or "
                                "another --cliff-method"} if p.cliff_layer is None and isinstance(method, dict) else {}),
           "cliff_layer": None if chosen is None or not np.isfinite(chosen) else float(chosen),
           "cliff_source": "fixed (--cliff-layer)" if p.cliff_layer is not None else p.cliff_method,
           "area": _ci(evd_mod.evd_area(dv, layers, tau.value), p).to_dict()}
    fin = np.isfinite(e)
    if fin.sum() >= 2:
        out["mean_evd"] = _ci(e[fin], p).to_dict()
    # EVD gap (evd_mod.evd_gap, the one gap function): a sample whose Delta never reaches tau needs no
    # layer's visual states; by default it counts as EVD = min(layers) - 1 instead of being dropped.
    cats = strs(ds.category)[keep]
    a, b = e[cats == "hard"], e[cats == "easy"]
    if len(a) >= 2 and len(b) >= 2:
        g = evd_mod.evd_gap(a, b, "hard", "easy", never_reached=p.evd_never_reached, layers=layers,
                            level=p.level, method=p.ci_method, n_resamples=p.n_resamples, seed=p.seed)
        out["gap_hard_minus_easy"] = {**g.to_dict(), "n_hard": int(len(a)), "n_easy": int(len(b)),
                                      "never_reach_tau_counts_as": g.never_reached_as}
    found = {"cliff_layer": out["cliff_layer"]} if p.cliff_layer is None else {}  # a fixed cliff stays
    evd_da = labelled(ds, full, ("sample",)).assign_attrs(trunc_layers=[int(v) for v in layers])
    return MetricResult(out, {"evd": evd_da}, found)


def _er_ratio_entry(x, cliff: int, p: AnalysisParams) -> dict:
    """ER ratio (after / up to the cliff) per sample of ``x`` (sample, layer), with its CI; a cliff that
    leaves no stored layer on one side (e.g. -1: the image is read in layer 0) gives a note, not an error."""
    from gapcache.analyze.rank import er_ratio

    layers = x.layer.values
    out = {"er_ratio_cliff_layer": cliff}
    if not (layers <= cliff).any() or not (layers > cliff).any():
        out["er_ratio_note"] = (f"undefined: cliff layer {cliff} leaves no stored layer on one side "
                                f"(layers {layers.min()}..{layers.max()}); pass --cliff-layer to choose one")
        return out
    per_sample = np.asarray(er_ratio(x.transpose("sample", "layer"), cliff).values, dtype=float)  # (sample,)
    fin = np.isfinite(per_sample)
    if fin.sum() >= 2:
        out["er_ratio"] = _ci(per_sample[fin], p).to_dict()
    return out


def rank(ds, p: AnalysisParams, ctx: Context) -> MetricResult:
    """Effective rank of the visual span per (visual condition, sample, layer) with CIs, the ER ratio
    after / up to ``ctx.cliff_layer`` when a cliff is known, and the text-site ER across samples.
    Arrays: visual_er (visual_condition, sample, layer), text_er (condition, site, layer)."""
    from gapcache.analyze.rank import text_effective_rank, visual_effective_rank

    cliff_layer = ctx.cliff_layer
    er = visual_effective_rank(ds).compute()  # (visual_condition, sample, layer); lazy until here
    arrays = {"visual_er": labelled(ds, er.values, ("visual_condition", "sample", "layer"))}
    out = {"visual": {}, "text": {}}
    for vc in er.visual_condition.values.tolist():
        x = er.sel(visual_condition=vc).transpose("sample", "layer")
        ok = np.isfinite(x.values).all(axis=1)
        if ok.sum() < 2:
            continue
        entry = {"layers": x.layer.values.tolist(), "mean": _ci(x.values[ok], p).to_dict()}
        if cliff_layer is not None:
            entry.update(_er_ratio_entry(x.isel(sample=np.flatnonzero(ok)), int(np.floor(cliff_layer)), p))
        out["visual"][vc] = entry
    done = ds.status.values.min(axis=0) == 1
    text = text_effective_rank(ds.text_states.isel(sample=np.flatnonzero(done))).compute()
    dims = ("condition", "site", "layer")
    arrays["text_er"] = labelled(ds, text.transpose(*dims).values, dims)
    out["text"] = {"note": "ER across samples (one value per condition, site, layer; no CI)",
                   "values": {str(c): {str(s): text.sel(condition=c, site=s).values.tolist() for s in text.site.values}
                              for c in text.condition.values}}
    return MetricResult(out, arrays)


def probe_groups(ds, min_per_class: int):
    """Samples grouped by candidate set and, when the store has several, category (one probe task each):
    {name: (indices, labels)}, e.g. "no/yes [hard]". Answers that the text gives away ("easy") are
    decodable without the image, so they are probed apart from the image-dependent ones."""
    mask, labels = ds.candidate_mask.values, ds.label.values
    cands, cats = ds.candidate.values, strs(ds.category)
    split = len({str(cats[i]) for i in np.flatnonzero(labels >= 0)}) > 1
    groups: dict = {}
    for i, row in enumerate(mask):
        if labels[i] >= 0 and row.any():
            name = "/".join(str(c) for c in cands[row]) + (f" [{cats[i]}]" if split else "")
            groups.setdefault(name, []).append(i)
    out = {}
    for name, idx in groups.items():
        y = labels[idx]
        counts = np.bincount(y)
        counts = counts[counts > 0]
        if len(counts) >= 2 and counts.min() >= min_per_class:
            out[name] = (np.array(idx), y)
    return out


def probes(ds, p: AnalysisParams, ctx: Context) -> MetricResult:
    """Linear probes per task (probe_groups), condition (original, blind) and site: accuracy and
    selectivity per layer with refit intervals, "selectivity > 0 from layer X" and each condition -
    original, with family-wise error control over the conditions (and layers) reported together
    (gapcache.analyze.probe_stats: rules in its docstring and in each task's 'statistics')."""
    from gapcache.analyze import probe_stats as ps

    groups = probe_groups(ds, p.n_splits)
    if not groups:
        return {"skipped": f"no candidate set with >= 2 classes and >= {p.n_splits} samples per class"}
    conds = [c for c in ds.condition.values.tolist() if c == REFERENCE or c in BLIND]
    sites = ds.site.values.tolist()
    probed = _probed_states(ds, conds)
    n_jobs = workers.resolve(p.jobs) if probed.chunks is None else 1  # lazy (too big to load): one layer at a time here
    out, plans = {}, {}
    for task, (idx, y) in groups.items():
        ok = np.logical_and.reduce([done_mask(ds, c)[idx] for c in conds])  # paired: done in every condition
        counts = np.bincount(y[ok])
        if len(np.unique(y[ok])) < 2 or counts[counts > 0].min() < p.n_splits:  # each class fills every fold
            out[task] = {"skipped": "too few samples done in every probed condition"}
            continue
        design = ps.make_design(y[ok], np.random.default_rng(p.seed).permutation(y[ok]), n_refits=p.n_refits,
                                n_splits=p.n_splits, seed=p.seed)
        plans[task] = (design, probed.isel(sample=idx[ok]), y[ok], int((~ok).sum()))
    jobs = [(task, c, site) for task in plans for c in conds for site in sites]
    running = workers.submit_jobs(_probe_job, [(plans[t][1].sel(condition=c, site=s), plans[t][2], plans[t][0], p)
                                               for t, c, s in jobs], n_jobs, desc=f"probes ({n_jobs} processes)")

    def finish():
        return _probe_summary(out, plans, dict(zip(jobs, running.result())), conds, sites, p)

    # in worker processes: the metrics after this one run here meanwhile (one process: all here, now)
    return finish() if n_jobs <= 1 else registry.Pending(finish, running.cancel)


def _probe_summary(out: dict, plans: dict, fitted_all: dict, conds, sites, p: AnalysisParams) -> MetricResult:
    """The probes' summary from every (task, condition, site) fit: intervals, decodes-from, each condition -
    original (the tasks skipped already in ``out``)."""
    from gapcache.analyze import probe_stats as ps

    for task, (design, _, _, n_excluded) in plans.items():
        out[task], fitted = {}, {}
        for c in conds:
            for site in sites:
                st = fitted[(c, site)] = fitted_all[(task, c, site)]
                out[task].setdefault(c, {})[site] = {**st.result.to_dict(), "accuracy_ci": st.ci("accuracy").to_dict(),
                                                     "selectivity_ci": st.ci("selectivity").to_dict()}
        for site in sites:
            found = ps.decodes_from({c: fitted[(c, site)] for c in conds}, alpha=p.alpha)
            for c, layer in found.items():
                out[task][c][site]["decodes_from"] = layer
        pairs = {(c, site): (fitted[(c, site)], fitted[(REFERENCE, site)])
                 for c in conds if c != REFERENCE for site in sites}
        cmp = ps.compare_conditions(pairs, alpha=p.alpha, level=p.level, correction=p.correction)
        out[task]["vs_original"] = {}
        for (c, site), v in cmp.items():
            out[task]["vs_original"].setdefault(c, {})[site] = v
        out[task]["statistics"] = {"rule": ps.rule(p.alpha, len(conds), design.n_refits, p.n_splits, design.scheme),
                                   "n_refits": design.n_refits, "scheme": design.scheme,
                                   "n_excluded_not_done": n_excluded}
    return MetricResult(out)


def _probe_job(X, y, design, p: AnalysisParams):
    """One (task, condition, site) probe: X (sample, layer, hidden), labels y, the task's shared design."""
    from gapcache.analyze import probe_stats as ps

    return ps.probe_stats(X, y, n_splits=p.n_splits, seed=p.seed, level=p.level, design=design)


def _probed_states(ds, conds):
    """text_states under the probed conditions (condition, sample, site, layer, hidden): loaded in one read
    when it fits ``probes.LOAD_WHOLE_BYTES`` (every refit reads each layer again), else left lazy."""
    from gapcache.analyze.probes import LOAD_WHOLE_BYTES

    X = ds.text_states.sel(condition=conds)
    return X.load() if X.nbytes <= LOAD_WHOLE_BYTES else X


def lens(ds, p: AnalysisParams, ctx: Context) -> MetricResult:
    """Logit-lens forced-choice accuracy per condition and layer at the prediction site, with CIs.
    Array: lens_correct (condition, layer, sample)."""
    from gapcache.analyze.lens import logit_lens_correct

    try:
        correct = logit_lens_correct(ds).compute()  # (condition, layer, sample)
    except GapcacheError as err:
        return {"skipped": str(err)}
    lens_correct = labelled(ds, correct.values, ("condition", "layer", "sample"))
    out = {}
    for c in correct.condition.values.tolist():
        x = correct.sel(condition=c).transpose("sample", "layer").values
        ok = np.isfinite(x).all(axis=1)
        if ok.sum() >= 2:
            out[c] = {"layers": correct.layer.values.tolist(), "accuracy": _ci(x[ok], p).to_dict()}
    return MetricResult(out, {"lens_correct": lens_correct})


# ------------------------------------------------------------------------------------- registry
# One entry per metric, in pipeline order (evd before rank: rank reads the cliff evd finds).
registry.register(Metric("accuracy", accuracy, report.fig_accuracy, report.rows_accuracy,
                         "forced-choice accuracy per condition, and each condition - original (paired)"))
registry.register(Metric("generation", generation.compute, generation.figure, generation.rows,
                         "scored generations (lmms-eval rules) per condition, - original (paired), truncation curves"))
registry.register(Metric("truncation", truncation, report.fig_truncation, report.rows_truncation,
                         "Delta(L) and accuracy per truncation layer and strategy"))
registry.register(Metric("evd", evd, report.fig_evd, report.rows_evd,
                         "EVD per sample, tau, the cliff layer, hard - easy EVD gap"))
registry.register(Metric("rank", rank, report.fig_rank, report.rows_rank,
                         "effective rank of the visual span per layer, ER ratio at the cliff"))
registry.register(Metric("probes", probes, report.fig_probes, report.rows_probes,
                         "linear probes per task, condition, site and layer", starts_first=True))
registry.register(Metric("lens", lens, report.fig_lens, report.rows_lens,
                         "logit-lens accuracy per condition and layer"))
# attention flow and sparsity (issue 14): skipped unless the store holds attention summaries
registry.register(Metric("attention", attention_mod.compute, attention_mod.figure, attention_mod.rows,
                         "attention mass on image/question/template and visual sparsity per layer, - original"))
from gapcache.analyze import soft as _soft  # noqa: E402,F401  (registers soft_truncation and window)
from gapcache.analyze import patching as _patching  # noqa: E402,F401  (registers patching and swap)
from gapcache.analyze import checkpoint as _checkpoint  # noqa: E402
from gapcache.analyze import geometry_metric as _geometry  # noqa: E402

# cross-modal geometry (issue 14, item 6): ICC always, CKA and the text-token ER with the token span
registry.register(Metric("geometry", _geometry.compute, _geometry.figure, _geometry.rows,
                         "ICC among visual tokens, CKA visual vs text tokens, text-token ER per layer, change at the cliff"))
# the seed's checkpoints with CIs and verdicts (reads the arrays of evd, rank and geometry)
registry.register(Metric("checkpoint", _checkpoint.compute, _checkpoint.figure, _checkpoint.rows,
                         "the seed's three go/no-go checkpoints: estimate, CI, verdict", section=_checkpoint.section))


# ------------------------------------------------------------------------------------- driver
def analyze_store(ds, p: AnalysisParams) -> tuple[dict, "object"]:
    """(summary dict, results xarray.Dataset) of one store: every registered metric named in p.metrics,
    in registry order, each given the Context (cliff layer, arrays) that the metrics before it left; those
    marked ``starts_first`` before the rest, and those returning a ``Pending`` finished after the last."""
    import xarray as xr

    p.validate()
    _check_cliff_layer(ds, p)
    if p.sites:
        from gapcache.analyze.textsites import with_sites

        ds = with_sites(ds, p.sites)  # derived text sites appended to the site axis (lazy)
    ds = preload_small(ds)
    entries = registry.registered(p.metrics)
    summary = {"store": {k: ds.attrs.get(k) for k in ("model", "dataset", "provenance", "config_hash")},
               "params": dataclasses.asdict(p),
               "metrics": {e.name: None for e in entries}, "timing_s": {e.name: 0.0 for e in entries}}  # registry order
    ctx = Context(cliff_layer=p.cliff_layer)
    pending = {}  # name -> Pending: finished after the last metric (its workers ran meanwhile)
    try:
        for entry in sorted(entries, key=lambda e: not e.starts_first):  # stable: registry order otherwise
            t0 = time.perf_counter()
            value = entry.compute(ds, p, ctx)
            if isinstance(value, registry.Pending):
                pending[entry.name] = value
            else:
                ctx = _record(summary, ctx, entry.name, registry.as_result(value, entry.name))
            _timed(summary, entry.name, t0)
        while pending:
            name, value = next(iter(pending.items()))
            t0 = time.perf_counter()
            result = registry.as_result(value.finish(), name)
            del pending[name]
            if result.context:
                raise ConfigError(f"The result of metric {name!r} finished after the metrics after it, so its "
                                  f"'context' must be empty. Got {sorted(result.context)} instead.")
            ctx = _record(summary, ctx, name, result)
            _timed(summary, name, t0)
    finally:
        for value in pending.values():  # an error ended the analysis first: stop their workers taking more
            if value.cancel is not None:
                value.cancel()
    summary["cliff_layer"] = ctx.cliff_layer
    return summary, xr.Dataset(dict(ctx.arrays))


def _record(summary, ctx: Context, name: str, result: MetricResult) -> Context:
    summary["metrics"][name] = result.summary
    return ctx.updated(result, name)


def _timed(summary, name: str, t0: float) -> None:
    """Add the seconds since t0 to the metric's timing (a Pending metric: its compute and its finish)."""
    summary["timing_s"][name] = round(summary["timing_s"][name] + time.perf_counter() - t0, 3)
    log.info("%s done in %.1f s", name, summary["timing_s"][name])


#: a store's lazy variables and coordinates up to this size each (bytes) are read once, before the metrics
PRELOAD_VARIABLE_BYTES = 16 << 20
#: ... smallest first, up to this much in all (the rest, the hidden states first, stay lazy)
PRELOAD_TOTAL_BYTES = 64 << 20


def preload_small(ds):
    """``ds`` with its small lazy variables and coordinates in memory, the hidden states aside (each at most
    PRELOAD_VARIABLE_BYTES, smallest first until PRELOAD_TOTAL_BYTES), still as dask arrays with the store's
    chunks: the metrics read status, log-probs, labels, offsets and the attention summaries again and again,
    each read a zarr round trip per chunk.  Values and chunking are unchanged; memory stays bounded whatever
    the store's size."""
    from gapcache.store import arrays

    states = {s.name for s in arrays.specs(state=True)}  # hidden states: each metric reads them its own way, lazily
    names = [k for k in list(ds.data_vars) + [c for c in ds.coords if c not in ds.indexes]
             if k not in states and ds[k].chunks is not None and ds[k].nbytes <= PRELOAD_VARIABLE_BYTES]
    chosen, total = {}, 0
    for k in sorted(names, key=lambda k: ds[k].nbytes):
        if total + ds[k].nbytes > PRELOAD_TOTAL_BYTES:
            break
        chosen[k], total = ds[k].variable, total + ds[k].nbytes
    if not chosen:
        return ds
    import dask
    import dask.array as da

    from gapcache.store.reader import read_whole

    loaded = {k: read_whole(v.data) for k, v in chosen.items()}  # a plain store variable: one read, no task per chunk
    lazy = [k for k, v in loaded.items() if v is None]
    loaded.update(zip(lazy, dask.compute(*[chosen[k].data for k in lazy])))  # the rest: one graph, read in parallel
    # still dask, chunked as in the store (code that reads the chunking sees the same); assigned at once (one merge)
    new = {k: v.copy(data=da.from_array(loaded[k], chunks=v.data.chunks)) for k, v in chosen.items()}
    return ds.assign_coords({k: v for k, v in new.items() if k in ds.coords}).assign(
        {k: v for k, v in new.items() if k not in ds.coords})


def _check_cliff_layer(ds, p: AnalysisParams) -> None:
    """A fixed cliff layer must lie within the store's recorded layers."""
    if p.cliff_layer is None or "layer" not in ds.coords:
        return
    layers = [int(x) for x in ds.layer.values]
    lo = min(layers) - 1  # one below the first layer: no layer reads the image (L = -1)
    if layers and not (lo <= p.cliff_layer <= max(layers)):
        raise ConfigError(f"The 'cliff_layer' parameter (--cliff-layer) of analyze must be a layer of the store, in "
                          f"[{lo}, {max(layers)}] ({lo}: no layer reads the image). Got {p.cliff_layer} instead.")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"The 'out' parameter (--out) of analyze must be a directory. Got the file '{out}' "
                          "instead; pass a new directory.")
    base = next(q for q in (out.absolute(), *out.absolute().parents) if q.exists())
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"The 'out' parameter (--out) of analyze must be a directory you can write. Got '{out}' "
                          f"instead ('{base}' is not writable).")


def run_analysis(paths, out, p: AnalysisParams) -> dict:
    """Analyse each store, compare stores pairwise (EVD gap, paired by sample id), write everything."""
    from gapcache.analyze.scheduler import scheduler
    from gapcache.store import open_store

    out = Path(out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"stores": {}, "comparisons": {}}
    evds, all_results = {}, {}
    workers.tune_malloc()  # before the workers start: they inherit it
    workers.warm(workers.resolve(p.jobs))  # the probe / figure workers start while the first metrics run
    with scheduler(p.scheduler, slurm=_slurm_section(paths[0]) if p.scheduler == "slurm" else None):
        for k, path in enumerate(paths):
            name = f"store{k}" if len(paths) > 1 else "store"
            ds = open_store(path)
            s, res = analyze_store(ds, p)
            s["path"] = str(path)
            summary["stores"][name] = s
            res.attrs = {"source": str(path)}
            all_results[name] = res
            if "evd" in res:
                evds[name] = res.evd
    for a, b in _pairs(list(evds)):
        x, y = evds[a], evds[b]
        try:
            al = stats.align_samples(x, y)
            g = evd_mod.evd_gap(al.a.values, al.b.values, a, b, paired=True, never_reached=p.evd_never_reached,
                                layers=x.attrs.get("trunc_layers"), layers_b=y.attrs.get("trunc_layers"),
                                level=p.level, method=p.ci_method, n_resamples=p.n_resamples, seed=p.seed)
            summary["comparisons"][f"evd_gap_{a}_minus_{b}"] = {**g.to_dict(), "paired_by": "sample id",
                                                                "n_dropped_unmatched": int(al.dropped_a + al.dropped_b)}
        except (DataError, GapcacheError) as err:
            summary["comparisons"][f"evd_gap_{a}_minus_{b}"] = {"skipped": str(err)}
    summary = stats.jsonable(summary)
    from gapcache.analyze.report import draw_figures, write_report

    figures = draw_figures(summary, out, all_results, workers.resolve(p.jobs))  # the workers draw meanwhile:
    try:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True))
        for name, res in all_results.items():
            _write_results(res, out / f"results_{name}.zarr")
    except BaseException:
        figures.cancel()  # nothing goes on drawing behind the error
        raise
    write_report(summary, out, figures=figures)
    return summary


def _write_results(res, path):
    """Results store (Zarr): string coordinates as variable-length strings, the portable kind."""
    import warnings

    res = res.assign_coords({k: np.array([str(x) for x in v.values], dtype=object)
                             for k, v in res.coords.items() if v.dtype.kind in "UOT"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: consolidated metadata is not in the v3 spec
        res.to_zarr(path, mode="w", consolidated=True)


def _slurm_section(path):
    """The slurm section of the config snapshot the store carries (for --scheduler slurm)."""
    from gapcache.config import SlurmConfig
    from gapcache.store import root_attrs

    snap = (root_attrs(path).get("config") or {}).get("slurm") or {}
    known = {f.name for f in dataclasses.fields(SlurmConfig)}
    return SlurmConfig(**{k: v for k, v in snap.items() if k in known})


def _pairs(names):
    return [(names[0], n) for n in names[1:]]
