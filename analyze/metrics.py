"""The analysis metric registry: one entry per metric, in pipeline order. No torch, no xarray import.

Usage::

    from gapcache.analyze import metrics
    metrics.names()                    # ('accuracy', 'generation', 'truncation', 'evd', 'rank', 'probes', 'lens')
    entry = metrics.get("evd")
    result = entry.compute(ds, AnalysisParams(), metrics.Context())   # -> MetricResult
    metrics.register(metrics.Metric("my_metric", compute, figure, rows, "one line for --help"))

An entry (:class:`Metric`) is everything gapcache knows about a metric; the built-in ones are
registered by :mod:`gapcache.analyze.pipeline` (importing ``gapcache.analyze`` registers them):

* ``compute(ds, params, ctx) -> MetricResult``: ``ds`` the store's xarray view (``open_store``),
  ``params`` the AnalysisParams, ``ctx`` a :class:`Context` with what earlier metrics found
  (``ctx.cliff_layer``: ``--cliff-layer`` or the cliff ``evd`` chose; ``ctx.arrays``: their labelled
  results). ``MetricResult.summary`` becomes ``summary["stores"][store]["metrics"][name]``,
  ``MetricResult.arrays`` (DataArrays carrying their own coords) variables of ``results_<store>.zarr``,
  ``MetricResult.context`` updates ``ctx`` for the metrics after it. A :class:`Pending` instead: the work
  goes on in worker processes while the metrics after it run, and is finished after the last of them.
* ``figure(store_summary, out_dir, ctx) -> file name or None``: ``store_summary`` is
  ``summary["stores"][store]``, ``ctx`` holds the store's cliff and results arrays (empty when the
  report is drawn from summary.json alone); writes ``out_dir/<name>.png`` (and .pdf).
* ``rows(store_summary) -> [(label, value), ...]``: the metric's key numbers (report table, CLI).
* ``section(store_summary) -> str`` (optional): an HTML block of its own in report.html, after the key
  numbers (the checkpoint table).

The registry's order is the pipeline order: a metric reading ``ctx.cliff_layer`` (rank) comes after
the one that finds it (evd). ``AnalysisParams.metrics``, its validation, the CLI's ``--metrics``,
the summary keys and the report sections are all read from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from gapcache.errors import ConfigError, UnknownNameError


@dataclasses.dataclass(frozen=True)
class MetricResult:
    """What one metric computed for one store.

    ``summary``: JSON-ready dict (numpy values are converted when the summary is written).
    ``arrays``: {variable name: xarray.DataArray}, each with a coordinate for every dim.
    ``context``: {Context field: value} for the metrics after this one, e.g. {"cliff_layer": 11.0}.
    A compute function may return a bare summary dict instead (a metric, or a skip, with no arrays:
    ``{"skipped": reason}``); :func:`as_result` reads both.
    """

    summary: dict
    arrays: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    context: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Pending:
    """A result still being computed elsewhere (worker processes: :func:`gapcache.analyze.workers.submit_jobs`).
    A compute function may return one: the metrics after it run meanwhile, and the pipeline calls ``finish()``
    (-> MetricResult or summary dict) after the last of them. So its result must not set ``context`` (the
    metrics after it ran without it: refused) and no metric may read its ``arrays`` from ``ctx``. ``cancel()``
    (optional) is called instead of ``finish()`` when an earlier error ends the analysis."""

    finish: Callable[[], Any]
    cancel: Callable[[], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Context:
    """What earlier metrics found, passed to each compute and figure function.

    ``cliff_layer``: the cliff layer (fixed by ``--cliff-layer``, else chosen by ``evd``; None: unknown).
    ``arrays``: {name: DataArray} of the results so far (in figures: every array of the store's results).
    """

    cliff_layer: float | None = None
    arrays: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def updated(self, result: MetricResult, metric: str) -> "Context":
        """This context with ``result.context`` applied and ``result.arrays`` added; an array name that
        an earlier metric already produced is refused (it would overwrite that metric's result)."""
        settable = {f.name for f in dataclasses.fields(self)} - {"arrays"}
        bad = sorted(set(result.context) - settable)
        if bad:
            raise ConfigError(f"The 'context' of the result of metric {metric!r} must only set {sorted(settable)}. "
                              f"Got {bad} instead.")
        clash = sorted(set(result.arrays) & set(self.arrays))
        if clash:
            raise ConfigError(f"The 'arrays' of the result of metric {metric!r} must have names no earlier "
                              f"metric used. Got {clash} instead.")
        return dataclasses.replace(self, **result.context, arrays={**self.arrays, **result.arrays})


@dataclasses.dataclass(frozen=True)
class Metric:
    """One registered metric: its name (the summary key and the ``--metrics`` value), its compute,
    figure and report-rows functions (signatures in the module docstring), and one line of help.
    ``lead``: when it ran (not skipped), its figure and rows come first in the report (the headline result,
    e.g. the transfer window); the others keep registry order. ``starts_first``: its compute reads nothing
    from ``ctx`` but the fixed ``--cliff-layer`` and returns a :class:`Pending` (work in worker processes):
    the pipeline calls it before every other metric, so its workers run beside all of them (its place in
    the summary and the report stays its registry place)."""

    name: str
    compute: Callable[..., MetricResult | dict]
    figure: Callable[..., str | None]
    rows: Callable[[dict], list]
    description: str = ""
    lead: bool = False
    starts_first: bool = False
    #: optional ``section(store_summary) -> html`` : a block of report.html of its own (e.g. the checkpoint table)
    section: Callable[[dict], str] | None = None


REGISTRY: dict[str, Metric] = {}  # name -> entry; insertion order = pipeline order


def register(metric: Metric) -> Metric:
    """Append ``metric`` to the registry (it runs after every metric registered before it)."""
    if not isinstance(metric, Metric):
        raise ConfigError(f"The 'metric' parameter of register must be a Metric. Got {type(metric).__name__} instead.")
    if not metric.name.isidentifier():
        raise ConfigError(f"The 'name' of a Metric must be an identifier (a summary key and a --metrics value). "
                          f"Got {metric.name!r} instead.")
    if metric.name in REGISTRY:
        raise ConfigError(f"The 'name' of a Metric must not be registered already. Got {metric.name!r} instead.")
    if metric.section is not None and not callable(metric.section):
        raise ConfigError(f"The 'section' of Metric {metric.name!r} must be callable or None. "
                          f"Got {metric.section!r} instead.")
    for field in ("compute", "figure", "rows"):
        if not callable(getattr(metric, field)):
            raise ConfigError(f"The '{field}' of Metric {metric.name!r} must be callable. "
                              f"Got {getattr(metric, field)!r} instead.")
    REGISTRY[metric.name] = metric
    return metric


def names() -> tuple[str, ...]:
    """The registered metric names, in pipeline order."""
    return tuple(REGISTRY)


def get(name: str) -> Metric:
    """The entry registered as ``name``; UnknownNameError lists the known ones."""
    if name not in REGISTRY:
        raise UnknownNameError("metric", name, REGISTRY)
    return REGISTRY[name]


def registered(selected=None) -> list[Metric]:
    """The entries in pipeline order; only those named in ``selected`` when given (its order is ignored)."""
    return [m for m in REGISTRY.values() if selected is None or m.name in selected]


def report_order(summaries: dict) -> list[Metric]:
    """The entries of the metrics in ``summaries`` ({name: summary}) in report order: those marked ``lead`` that
    ran (no ``skipped``) first, then the rest, each part in registry order."""
    ran = registered(summaries)
    first = [m for m in ran if m.lead and "skipped" not in summaries[m.name]]
    return first + [m for m in ran if m not in first]


def as_result(value, metric: str) -> MetricResult:
    """A compute function's return value as a MetricResult (a bare dict is a summary with no arrays)."""
    if isinstance(value, MetricResult):
        return value
    if isinstance(value, dict):
        return MetricResult(value)
    raise ConfigError(f"The compute function of metric {metric!r} must return a MetricResult or a summary dict. "
                      f"Got {type(value).__name__} instead.")
