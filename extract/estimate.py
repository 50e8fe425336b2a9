"""``gapcache extract --check`` and ``--dry-run``: look before spending GPU hours.

``check`` plans N samples with the loaded model's processor and prints every site with the
decoded tokens around it, then times one batched forward. ``dry_run`` loads only the model's
config and processor (no weights), plans a few samples to learn the visual-token count, and
prints the store size per condition and the write bandwidth needed at a forward speed.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from gapcache.conditions import expand_config, fitted_layers
from gapcache.conditions import strategy as strategy_entry
from gapcache.store import arrays
from gapcache.store.schema import SITES
DEFAULT_SECONDS_PER_BATCH = 0.1  # ~ Qwen3-VL-30B-A3B batch of 8 on an H100


def _around(tok, ids, pos, width=2) -> str:
    lo, hi = max(0, pos - width), min(len(ids), pos + width + 1)
    pieces = [repr(tok.decode([t])) for t in ids[lo:hi]]
    pieces[pos - lo] = f"[{pieces[pos - lo]}]"
    return " ".join(pieces)


def check(ex, n: int) -> str:
    samples = ex.samples()[:n]
    planned = ex.plan(samples, show=False)
    tok = ex.processor.tokenizer
    lines = []
    for p in planned:
        lines.append(f"{p.sample.id}: question={p.sample.question!r} answer={p.sample.answer!r}")
        if not p.ok:
            lines.append(f"  FAILED: {p.failure}")
            continue
        ids = p.prompt_ids
        end = p.visual_start + p.visual_length - 1
        lines += [
            f"  seq_len {len(ids)} (+{len(p.answer_ids)} answer tokens), image {p.image_size[0]}x{p.image_size[1]}",
            f"  visual      [{p.visual_start}, {end}] ({p.visual_length} tokens): "
            f"{_around(tok, ids, p.visual_start)} ... {_around(tok, ids, end)}",
            f"  instruction {p.instruction}: {_around(tok, ids, p.instruction)}",
            f"  prediction  {p.prediction}: {_around(tok, ids, p.prediction)} -> answer "
            f"{[tok.decode([t]) for t in p.answer_ids]}",
        ]
    ok = [p.index for p in planned if p.ok][: ex.cfg.extract.batch_size]
    if ok:
        ex.forward(ok, ex.conditions[0])  # warm-up
        t0 = time.perf_counter()
        ex.forward(ok, ex.conditions[0])
        lines.append(f"one forward of a batch of {len(ok)}: {time.perf_counter() - t0:.3f} s "
                     "(set extract.forward_seconds_per_batch to this for --dry-run)")
    return "\n".join(lines)


def forward_passes(cond, n_layers: int, extra: float = 0.0, generate: bool = False) -> tuple[float, float]:
    """(forward passes, full-forward equivalents) one sample costs under ``cond``: the gold answer's forward,
    ``extra`` candidate forwards (the mean number the gold's forward cannot score) and the generation's prompt
    forward (decoding steps not counted); a donor strategy (swap) adds, per forward it serves in a batch, one donor
    forward stopped at the input of its layer l: the vision tower and l of the ``n_layers`` decoder layers
    (counted as l / n_layers of a forward; the vision tower not counted)."""
    main = 1.0 + extra + (1.0 if generate else 0.0)
    hook = cond.hook(n_layers)
    if hook is None or not strategy_entry(hook.strategy).donor:
        return main, main
    donors = 1.0 + (1.0 if extra else 0.0) + (1.0 if generate else 0.0)  # gold + candidates share one (cache)
    return main + donors, main + donors * hook.layers[0] / n_layers


def suite_passes(conds, n_layers: int, extra: float = 0.0, generate: bool = False) -> dict:
    """Per condition kind (in order): conditions, forward passes and full-forward equivalents per sample; the
    fit pre-pass (one forward of original per sample) under ``"fit pre-pass"`` when some condition needs it."""
    out: dict = {}
    for c in conds:
        passes, equiv = forward_passes(c, n_layers, extra, generate)
        row = out.setdefault(c.kind, {"conditions": 0, "passes": 0.0, "equivalents": 0.0})
        row["conditions"] += 1
        row["passes"] += passes
        row["equivalents"] += equiv
    if fitted_layers(conds, n_layers):
        out["fit pre-pass"] = {"conditions": 0, "passes": 1.0, "equivalents": 1.0}
    return out


def passes_lines(conds, n_layers: int, n: int, batch_size: int, sec: float, extra: float = 0.0,
                 generate: bool = False, gb: dict | None = None) -> list[str]:
    """The dry run's forward-pass table: per condition family, and the whole suite in GPU-hours at ``sec``."""
    table = suite_passes(conds, n_layers, extra, generate)
    lines = [f"forward passes per sample, by condition family (full-forward equivalents; {extra:.2f} extra "
             f"candidate forwards per condition{', generation prompt forward' if generate else ''}):"]
    for kind, row in table.items():
        size = f"  {gb[kind]:9.3f} GB" if gb and kind in gb else ""
        lines.append(f"  {kind:<18} {row['conditions']:4d} conditions  {row['passes']:8.2f} passes  "
                     f"({row['equivalents']:.2f} equivalents){size}")
    equiv = sum(r["equivalents"] for r in table.values())
    hours = equiv * n / batch_size * sec / 3600
    lines.append(f"whole suite: {sum(r['passes'] for r in table.values()):.2f} passes ({equiv:.2f} equivalents) "
                 f"per sample; {n} samples at {sec:g} s per batch of {batch_size}: {hours:.2f} GPU-hours of forwards")
    return lines


def record_sizes(cfg, adapter, mconf, mean_span: float, text_tokens: float, n_candidates: int) -> tuple[dict, dict]:
    """What one (condition, sample) of a run of ``cfg`` records, as the dry run sizes it: the dimension sizes of
    the unit arrays (``layer``, ``hidden``, ``candidate``; the routing and attention dimensions when those options
    are on) and the rows per sample of each ragged span (``visual``: the visual budget given a mean span of
    ``mean_span`` tokens; ``token``: ``text_tokens`` when ``extract.text: all``). ``mconf``: the model's
    (transformers) config; ``adapter``: its family's."""
    text = mconf.get_text_config()
    n_layers, hidden = int(text.num_hidden_layers), int(text.hidden_size)
    e = cfg.extract
    vis = float(mean_span) if e.visual.mode == "all" else float(min(e.visual.k, mean_span))
    n_rec = n_layers + 1 if e.layers == "all" else len(e.layers)
    sizes = {"site": len(SITES), "layer": n_rec, "hidden": hidden, "candidate": n_candidates}
    if e.routing and adapter.routing_shape(mconf):  # MoE routing arrays (a few KB per sample)
        n_route, n_experts, top_k = adapter.routing_shape(mconf)
        sizes.update(route_layer=n_route, expert=n_experts, k=top_k, modality=len(arrays.MODALITIES))
    if e.attention:  # attention summaries (issue 14)
        from gapcache.extract import attention as att

        sizes.update(attn_query=len(att.QUERIES), attn_head=int(text.num_attention_heads), attn_target=len(att.TARGETS),
                     attn_stat=len(att.STATS))
    recorded = {"visual": vis, **({"token": float(text_tokens)} if e.text == "all" else {})}  # rows per sample
    return sizes, recorded


def condition_bytes(cfg, conds, sizes: dict, recorded: dict) -> list[tuple]:
    """(condition, uncompressed bytes one sample adds under it) for each of ``conds``: the unit arrays, and the
    rows of the spans the condition records (:func:`gapcache.store.arrays.bytes_per_sample`)."""
    return [(c, arrays.bytes_per_sample(sizes, cfg.model.dtype,
                                        {k: v for k, v in recorded.items() if arrays.SPANS[k].recorded_by(c)}))
            for c in conds]


def dry_run(cfg, n_probe: int = 32) -> str:
    from transformers import AutoConfig, AutoProcessor

    from gapcache.extract import data as data_mod
    from gapcache.extract.models import get_adapter, resolve_model_path
    from gapcache.extract.plan import Planner

    adapter = get_adapter(cfg.model.family)
    path = resolve_model_path(cfg.model.id, cfg.model.family)
    kw = dict(revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    mconf = AutoConfig.from_pretrained(path, **kw)
    processor = AutoProcessor.from_pretrained(path, **kw)
    n_layers = int(mconf.get_text_config().num_hidden_layers)
    e, d = cfg.extract, cfg.data
    samples = data_mod.load_dataset(d.dataset, split=d.split, limit=d.limit, path=d.path, **d.options)
    planner = Planner(adapter, SimpleNamespace(config=mconf), processor, e.max_length)
    probe = [planner.plan(i, s) for i, s in enumerate(samples[:n_probe])]
    spans = [p.visual_length for p in probe if p.ok] or [0]
    tokens = float(np.mean([len(p.prompt_ids) - p.visual_length for p in probe if p.ok] or [0]))
    n_cand = len({c for s in samples for c in s.candidates})
    sizes, recorded = record_sizes(cfg, adapter, mconf, float(np.mean(spans)), tokens, n_cand)
    vis, n_rec = recorded["visual"], sizes["layer"]
    conds = expand_config(e, n_layers)
    n = len(samples)
    lines = [f"model {cfg.model.id}: {n_layers} layers, hidden {sizes['hidden']}, {cfg.model.dtype}; {n} samples; "
             f"{n_rec} recorded layers; visual tokens/sample {vis:.0f} (mode {e.visual.mode}, "
             f"mean span {np.mean(spans):.0f} over {len(probe)} probed)"
             + (f"; every text token recorded: {tokens:.0f}/sample" if e.text == "all" else ""),
             "per condition (before compression):"]
    total, by_kind = 0.0, {}
    for c, per in condition_bytes(cfg, conds, sizes, recorded):
        total += per * n
        by_kind[c.kind] = by_kind.get(c.kind, 0.0) + per * n / 1e9
        lines.append(f"  {c.label:<24} {per * n / 1e9:9.3f} GB  ({per / 1e6:.2f} MB/sample)")
    sec = e.forward_seconds_per_batch or DEFAULT_SECONDS_PER_BATCH
    extra = float(np.mean([len(p.cand_extra) for p in probe if p.ok] or [0]))
    lines += passes_lines(conds, n_layers, n, e.batch_size, sec, extra, e.generate.enabled, by_kind)
    widest = arrays.bytes_per_sample(sizes, cfg.model.dtype, recorded)  # a condition recording every span
    need = widest * e.batch_size / sec / 1e6
    shard = widest * e.samples_per_shard / 1e6
    fit = fitted_layers(conds, n_layers)
    if fit:
        lines.append(f"  fit pre-pass (soft truncation statistics {sorted(fit)} at {len(set().union(*fit.values()))} "
                     f"layers): 1 forward of original per sample, once per run")
    lines += [f"total {total / 1e9:.2f} GB; writer buffers one shard per condition: ~{shard:.0f} MB",
              f"write bandwidth needed at {sec:g} s per batch of {e.batch_size}: {need:.0f} MB/s "
              f"(disk: {e.disk_bandwidth_mb_s:g} MB/s)"]
    if need > e.disk_bandwidth_mb_s:
        lines.append(f"WARNING: the store, not the model, is the bottleneck ({need:.0f} > {e.disk_bandwidth_mb_s:g} "
                     "MB/s). Set extract.visual (mode subset/pool, k) and/or extract.layers to cache less.")
    return "\n".join(lines)
