"""Figures (PNG + PDF) and a one-page ``report.html`` from an analysis summary. No torch.

Usage::

    from gapcache.analyze.report import write_report
    write_report(summary, out_dir)          # summary = run_analysis(...) / summary.json

Each metric's figure and key-number rows are the ``fig_<metric>`` and ``rows_<metric>`` functions here,
registered with it in :mod:`gapcache.analyze.metrics` (signatures there): ``fig(store_summary, out_dir,
ctx) -> file name or None`` and ``rows(store_summary) -> [(label, value)]``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
from gapcache import conditions
from gapcache.analyze import metrics
from gapcache.analyze.metrics import Context
from gapcache.conditions import REFERENCE


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def warm_up() -> None:
    """Draw and save one small figure as PNG and PDF into memory: matplotlib's backends and fonts loaded (a
    worker process does this before its first figure job, see gapcache.analyze.workers.warm)."""
    import io

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, 1], label="x")
    ax.legend(fontsize=6)
    ax.set(title="t", xlabel="layer")
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(io.BytesIO(), format=ext, dpi=130)
    plt.close(fig)


def band(ax, x, ci, label):
    est, lo, hi = (np.asarray(ci[k], float) for k in ("estimate", "low", "high"))
    line = ax.plot(x, est, marker="o", ms=3, label=label)[0]
    ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())


def save_figure(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}", dpi=130)
    pyplot().close(fig)
    return f"{name}.png"


def bars_ci(ax, per: dict, color: str, ylabel: str) -> None:
    """One bar per condition of ``per`` ({name: interval dict}) with its CI as error bars, on [0, 1]."""
    names = list(per)
    est = np.array([per[n]["estimate"] for n in names])
    err = np.array([[est[i] - per[n]["low"], per[n]["high"] - est[i]] for i, n in enumerate(names)]).T
    ax.bar(range(len(names)), est, yerr=err, capsize=3, color=color, alpha=0.8)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)


def mark_cliff(ax, cliff):
    if cliff is not None and np.isfinite(cliff):
        ax.axvline(cliff, color="k", ls="--", lw=1, label=f"cliff L={cliff:g}")


def shown_apart(label: str) -> bool:
    """Whether a condition's own row / bar is left out of the per-condition tables and figures: the truncation
    and patching groups have curves of their own (truncation, patching metrics) and many entries."""
    return conditions.label_in_group(label, conditions.TRUNCATION) or conditions.label_in_group(label,
                                                                                              conditions.PATCHING)


def fig_accuracy(s, out, ctx: Context):
    """Bar chart of forced-choice accuracy per condition with its CI -> accuracy.png."""
    m = s["metrics"]
    acc = {c: v for c, v in m.get("accuracy", {}).get("per_condition", {}).items()
           if not conditions.label_in_group(c, conditions.PATCHING)}  # patching: its own figure
    if not acc:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bars_ci(ax, acc, "tab:blue", "forced-choice accuracy")
    ax.set_title("Accuracy by condition (95% CI over samples)")
    return save_figure(fig, out, "accuracy")


def fig_truncation(s, out, ctx: Context):
    """Mean Delta(L) with its CI band, and the accuracy curve, per strategy -> truncation.png."""
    m, cliff = s["metrics"], ctx.cliff_layer
    tr = {k: v for k, v in m.get("truncation", {}).items() if isinstance(v, dict) and "layers" in v}
    if not tr:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for s, v in tr.items():
        band(axes[0], v["layers"], v["mean_delta"], s)
        if "accuracy" in v:
            axes[1].plot(v["layers"], v["accuracy"], marker="o", ms=3, label=s)
            axes[1].axhline(v["clean_accuracy"], color="gray", lw=0.8)
    axes[0].set(xlabel="truncation layer L", ylabel="mean Delta (log-prob)", title="Delta(L) = s_clean - s_trunc(L)")
    axes[1].set(xlabel="truncation layer L", ylabel="accuracy", title="Truncation curve (gray: original)")
    for ax in axes:
        mark_cliff(ax, cliff)
        ax.legend(fontsize=7)
    return save_figure(fig, out, "truncation")


def fig_evd(s, out, ctx: Context):
    """Mean Delta with tau and the cliff, the EVD histogram and the Delta histogram -> delta_evd.png
    (needs the arrays ``delta`` and ``evd`` in ``ctx.arrays``: None when drawn from summary.json alone)."""
    m, cliff, results = s["metrics"], ctx.cliff_layer, ctx.arrays
    e = m.get("evd", {})
    if "tau" not in e or "delta" not in results or "evd" not in results:
        return None
    plt = pyplot()
    d = results["delta"].sel(strategy=e["strategy"]).transpose("sample", "trunc_layer").values
    layers = results["delta"]["trunc_layer"].values
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    curve = e["cliffs"]["steepest"]["mean_curve"]
    axes[0].plot(layers, curve, marker="o", ms=3)
    axes[0].axhline(e["tau"]["value"], color="r", lw=1, label=f"tau={e['tau']['value']:.3g} ({e['tau']['rule']})")
    mark_cliff(axes[0], cliff)
    axes[0].set(xlabel="L", ylabel="mean Delta", title=f"Mean Delta ({e['strategy']})")
    axes[0].legend(fontsize=7)
    evd = results["evd"].values
    axes[1].hist(evd[np.isfinite(evd)], bins=np.arange(layers.min() - 0.5, layers.max() + 1.5), rwidth=0.9)
    axes[1].set(xlabel="EVD (layer)", ylabel="samples", title=f"EVD distribution ({e['n_never_reach_tau']} never reach tau)")
    fin = d[np.isfinite(d)]
    axes[2].hist(fin, bins=50)
    axes[2].axvline(e["tau"]["value"], color="r", lw=1)
    axes[2].set(xlabel="Delta", ylabel="count", title="Delta distribution (choose tau)")
    return save_figure(fig, out, "delta_evd")


def fig_rank(s, out, ctx: Context):
    """Visual-span effective rank per layer with its CI band, per visual condition -> effective_rank.png."""
    m, cliff = s["metrics"], ctx.cliff_layer
    vis = m.get("rank", {}).get("visual", {})
    if not vis:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for c, v in vis.items():
        band(ax, v["layers"], v["mean"], c)
    mark_cliff(ax, cliff)
    ax.set(xlabel="layer (stream entering)", ylabel="effective rank", title="Visual-span effective rank (95% CI)")
    ax.legend(fontsize=7)
    return save_figure(fig, out, "effective_rank")


def fig_probes(s, out, ctx: Context):
    """Per probe task: accuracy per layer, and each condition - original (paired) -> probes.png."""
    m, cliff = s["metrics"], ctx.cliff_layer
    pr = {k: v for k, v in m.get("probes", {}).items() if isinstance(v, dict) and REFERENCE in v}
    if not pr:
        return None
    plt = pyplot()
    tasks = list(pr)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3 * len(tasks)), squeeze=False)
    for r, t in enumerate(tasks):
        for c, sites in pr[t].items():
            if c in ("vs_original", "statistics"):
                continue
            for site, v in sites.items():
                band(axes[r, 0], v["layers"], v["accuracy_ci"], f"{c}/{site}")
        for c, sites in pr[t].get("vs_original", {}).items():
            for site, v in sites.items():
                ci = v["interval"]
                band(axes[r, 1], ci["coords"]["layer"], ci, f"{c} - original/{site}")
        axes[r, 0].set(title=f"probe accuracy [{t}]", xlabel="layer", ylabel="balanced accuracy")
        axes[r, 1].set(title="difference from original (paired)", xlabel="layer")
        axes[r, 1].axhline(0, color="k", lw=0.8)
        for ax in axes[r]:
            mark_cliff(ax, cliff)
            ax.legend(fontsize=6)
    return save_figure(fig, out, "probes")


def fig_lens(s, out, ctx: Context):
    """Logit-lens accuracy per layer with its CI band, per condition -> logit_lens.png."""
    m, cliff = s["metrics"], ctx.cliff_layer
    ln = {k: v for k, v in m.get("lens", {}).items() if isinstance(v, dict) and "layers" in v}
    if not ln:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for c, v in ln.items():
        if not shown_apart(c):
            band(ax, v["layers"], v["accuracy"], c)
    mark_cliff(ax, cliff)
    ax.set(xlabel="layer", ylabel="lens accuracy", title="Logit lens at the prediction site")
    ax.legend(fontsize=7)
    return save_figure(fig, out, "logit_lens")


def fmt_ci(ci):
    """'estimate [low, high] (n=...)' of a scalar interval dict, '; degenerate' when it has zero width
    (every resample the same: stats.DEGENERATE_NOTE); '–' for none."""
    if not ci:
        return "–"
    flag = "; degenerate: zero width" if ci.get("degenerate") is True else ""
    return f"{ci['estimate']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] (n={ci['n']}{flag})"


def decodes_from(entry: dict):
    """The first probe layer from which selectivity > 0 at every later layer (None: never): the pipeline's
    FWER-controlled answer (``entry['decodes_from']``, gapcache.analyze.probe_stats.decodes_from) when
    present, else from the selectivity CI's lower bounds."""
    if "decodes_from" in entry:
        return entry["decodes_from"]
    low = np.asarray(entry["selectivity_ci"]["low"], dtype=float)
    above_from = np.logical_and.accumulate((low > 0)[::-1])[::-1]  # True where this and every later layer is > 0
    return entry["layers"][int(np.argmax(above_from))] if above_from.any() else None


def probe_rows(probes: dict, site: str = "prediction") -> list[tuple[str, str]]:
    """Per probe task: where the answer becomes decodable at ``site``, per condition, beside the cliff
    (probe layer i = the stream entering decoder layer i, so i = L + 1 is the stream leaving layer L)."""
    rows = []
    for task, per_cond in sorted(probes.items(), key=lambda kv: (not kv[0].endswith("[hard]"), kv[0])):
        if not isinstance(per_cond, dict):
            continue
        found = {c: decodes_from(v[site]) for c, v in per_cond.items()
                 if c not in ("vs_original", "statistics") and isinstance(v, dict) and site in v}
        if found:
            what = "selectivity > 0 (FWER-controlled) from layer" if "statistics" in per_cond else \
                "selectivity CI > 0 from layer"
            rows.append((f"probe {task} at {site}: {what}",
                         ", ".join(f"{c} {'never' if L is None else L}" for c, L in found.items())))
    return rows


def rows_accuracy(s) -> list[tuple[str, str]]:
    """Accuracy per condition and each condition - original (paired), with CIs."""
    m = s["metrics"]
    rows = []
    for c, ci in m.get("accuracy", {}).get("per_condition", {}).items():
        if not shown_apart(c):
            rows.append((f"accuracy {c}", fmt_ci(ci)))
    for c, ci in m.get("accuracy", {}).get("vs_original", {}).items():
        if not shown_apart(c):
            rows.append((f"accuracy {c} - original (paired)", fmt_ci(ci)))
    return rows


def rows_truncation(s) -> list[tuple[str, str]]:
    """Per strategy: mean Delta at the first and the last truncation layer, and the accuracy there."""
    rows = []
    for strategy, v in s["metrics"].get("truncation", {}).items():
        if not isinstance(v, dict) or "layers" not in v:
            continue
        first, last = v["layers"][0], v["layers"][-1]
        d = np.asarray(v["mean_delta"]["estimate"], dtype=float)
        rows.append((f"truncation {strategy}: mean Delta at L={first} -> L={last}",
                     f"{d[0]:.3f} -> {d[-1]:.3f} (n={v['n']})"))
        if "accuracy" in v:
            acc = v["accuracy"]
            rows.append((f"truncation {strategy}: accuracy at L={first} -> L={last}",
                         f"{acc[0]:.3f} -> {acc[-1]:.3f} (original {v['clean_accuracy']:.3f})"))
    return rows


def rows_evd(s) -> list[tuple[str, str]]:
    """tau and its rule, the cliff layer (chosen, and by each method), mean EVD, the hard - easy gap."""
    m = s["metrics"]
    rows = []
    e = m.get("evd", {})
    if "tau" in e:
        rows.append(("tau", f"{e['tau']['value']:.4g} ({e['tau']['rule']})"))
        rows.append(("cliff layer", f"{s.get('cliff_layer')} ({e['cliff_source']}); "
                     + ", ".join(f"{k}={v['layer']}" for k, v in e["cliffs"].items())))
        rows.append(("mean EVD", fmt_ci(e.get("mean_evd"))))
        rows.append(("EVD gap hard - easy", fmt_ci(e.get("gap_hard_minus_easy"))))
    return rows


def rows_probes(s) -> list[tuple[str, str]]:
    """Per probe task, where the answer becomes decodable at the prediction site (probe_rows), and the
    statistical rule behind the probe intervals and claims (once)."""
    pr = s["metrics"].get("probes", {})
    rules = [v["statistics"]["rule"] for v in pr.values() if isinstance(v, dict) and "statistics" in v]
    return probe_rows(pr) + ([("probe statistics", rules[0])] if rules else [])


def rows_rank(s) -> list[tuple[str, str]]:
    """Visual effective rank at the first and the last layer, and the ER ratio at the cliff (or why not)."""
    rows = []
    visual = s["metrics"].get("rank", {}).get("visual", {})
    for c, v in visual.items():
        est = np.asarray(v["mean"]["estimate"], dtype=float)
        rows.append((f"visual ER {c} at layer {v['layers'][0]} -> {v['layers'][-1]}",
                     f"{est[0]:.2f} -> {est[-1]:.2f} (n={v['mean']['n']})"))
    for c, v in visual.items():
        if "er_ratio" in v:
            rows.append((f"ER ratio {c} (after/before L={v['er_ratio_cliff_layer']})", fmt_ci(v["er_ratio"])))
    notes = {(v["er_ratio_cliff_layer"], v["er_ratio_note"]): None for v in visual.values() if "er_ratio_note" in v}
    for cliff, note in notes:  # the same reason for every condition: one row
        rows.append((f"ER ratio (after/before L={cliff})", note))
    return rows


def rows_lens(s) -> list[tuple[str, str]]:
    """Logit-lens accuracy at the last layer, every condition in one row."""
    ln = {c: v for c, v in s["metrics"].get("lens", {}).items() if isinstance(v, dict) and "layers" in v}
    by_layer: dict = {}
    for c, v in ln.items():
        last = np.asarray(v["accuracy"]["estimate"], dtype=float)[-1]
        by_layer.setdefault(v["layers"][-1], []).append(f"{c} {last:.3f}")
    return [(f"logit lens accuracy at layer {layer}", ", ".join(found)) for layer, found in by_layer.items()]


def key_numbers(s) -> list[tuple[str, str]]:
    """Every metric's report rows in report order (metrics.report_order: the lead ones that ran first, then
    registry order; a metric the run skipped: one row with the reason)."""
    rows = []
    for entry in metrics.report_order(s["metrics"]):
        m = s["metrics"][entry.name]
        rows += [(entry.name, f"skipped: {m['skipped']}")] if "skipped" in m else entry.rows(s)
    return rows


def sections(s) -> list[str]:
    """The HTML blocks of the metrics that have one (``Metric.section``), in registry order."""
    return [entry.section(s) for entry in metrics.registered(s["metrics"])
            if entry.section is not None and "skipped" not in s["metrics"][entry.name]]


def _figure(entry, s, fig_dir, ctx):
    return entry.figure(s, fig_dir, ctx)


def draw_figures(summary: dict, out, results: dict | None = None, n_jobs: int = 1):
    """Start drawing the figures of every store in ``summary`` into ``out/<store>/`` (:func:`write_report` takes
    them): in ``n_jobs - 1`` worker processes from now, the rest here once ``.result()`` is called
    (:func:`gapcache.analyze.workers.submit_jobs`); ``.result()`` -> the file names, per store in report order."""
    from gapcache.analyze import workers

    out = Path(out)
    jobs = []
    for name, s in summary["stores"].items():
        fig_dir = out / name
        fig_dir.mkdir(parents=True, exist_ok=True)
        res = (results or {}).get(name)
        ctx = Context(cliff_layer=s.get("cliff_layer"), arrays={} if res is None else res)
        jobs += [(e, s, fig_dir, ctx) for e in metrics.report_order(s["metrics"])]
    return workers.submit_jobs(_figure, jobs, n_jobs)


def write_report(summary: dict, out, results: dict | None = None, n_jobs: int = 1, figures=None) -> Path:
    """Figures for every store in ``summary`` and one report.html beside them: per store, the key numbers
    and the figures of each metric it ran, in registry order. ``results``: {store: results Dataset}
    (figures that need arrays, e.g. delta_evd, are left out without it).  ``n_jobs``: processes drawing the
    figures (:func:`gapcache.analyze.workers.map_jobs`; the files are the same). ``figures``: what
    :func:`draw_figures` started for this summary, if it did (then ``results`` and ``n_jobs`` are not read)."""
    out = Path(out)
    drawn = iter((figures or draw_figures(summary, out, results, n_jobs)).result())  # per store, in report order
    parts = ["<html><head><meta charset='utf-8'><title>gapcache report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td{padding:2px 8px}"
             "img{max-width:100%}</style></head><body><h1>gapcache analysis</h1>"]
    for name, s in summary["stores"].items():
        figs = [next(drawn) for _ in metrics.report_order(s["metrics"])]
        model = s["store"].get("model") or {}
        parts.append(f"<h2>{html.escape(name)}: {html.escape(str(model.get('id')))} "
                     f"on {html.escape(str((s['store'].get('dataset') or {}).get('name')))}</h2>")
        parts.append("<table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                                         for k, v in key_numbers(s)) + "</table>")
        parts += sections(s)
        parts += [f"<img src='{name}/{f}'>" for f in figs if f]
        prov = {"path": s.get("path"), "model": model, "provenance": s["store"].get("provenance"),
                "config_hash": s["store"].get("config_hash"), "params": s["params"], "timing_s": s["timing_s"]}
        parts.append("<h3>Provenance</h3><pre>" + html.escape(json.dumps(prov, indent=1, default=str)) + "</pre>")
    if summary.get("comparisons"):
        parts.append("<h2>Between stores</h2><pre>" + html.escape(json.dumps(summary["comparisons"], indent=1)) + "</pre>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path
