"""Store bytes per sample that ``extract.attention``, ``extract.routing`` and ``extract.text: all`` add to a
config (issue 14), without the model's files.

Usage::

    python benchmarks/bench_option_bytes.py [configs/qwen3-vl-30b-a3b.yaml] [--mean-span 1000]
        [--text-tokens 25] [--json out.json]

``gapcache extract CONFIG --out DIR --dry-run`` sizes the store from the model's config and processor (from
the Hub) and a few planned samples. Offline, this script feeds the same functions
(``extract/estimate.py::record_sizes`` and ``condition_bytes``, i.e. ``store.arrays.bytes_per_sample``) with
a transformers config of the model's shape instead (:data:`SHAPES`, by ``model.family``; the shipped
config's family ``qwen3_vl_moe`` = Qwen3-VL-30B-A3B: 48 layers, hidden 2048, 32 query / 4 KV heads, 128
experts top-8) and the two values planning would measure, given on the command line: the mean visual span
(``--mean-span``; only ``min(k, span)`` matters when the config pools or subsets) and the mean number of prompt
tokens outside the visual span (``--text-tokens``, used by ``text: all`` only). Candidates: 0 (ChartQA is
open-ended; ``--candidates``).

Prints, per condition kind, the bytes one sample adds under the config as shipped, and how many more each
option adds alone (every condition writes the attention, routing and token arrays, so the added bytes are
the same under every condition); then the sums over the whole suite. Uncompressed, as the dry run.

Figures (``python benchmarks/bench_option_bytes.py``: ``configs/qwen3-vl-30b-a3b.yaml``, bf16, 25 recorded
layers, visual pooled to 32, 196 conditions, 2500 samples; ``--mean-span 1000 --text-tokens 25``;
arithmetic only), bytes per (condition, sample), uncompressed::

    conditions                                 n     shipped   +attention   +routing   +text: all
    image (original, blind_black/mean/random)   4   3,481,605       86,400     53,760    2,560,000
    intervened (truncated, window, patched)   192     204,805       86,400     53,760    2,560,000
    whole suite (sum over the conditions)     196  53,248,980   16,934,400 10,536,960  501,760,000
    store, 2500 samples: shipped 133.1 GB; +attention 42.3 GB; +routing 26.3 GB; +text: all 1254.4 GB

attention: attn_mass (3 queries x 25 layers x 32 heads x 4 targets) + attn_visual (x 5 stats), float32;
routing: route_expert int16 + route_weight float32 (2 sites x 48 routers x top-8) + route_load int32
(48 x 2 modalities x 128 experts); text: all: 102,400 B per text token (25 x 2048 x 2 B) under every condition,
so its figure scales with ``--text-tokens`` (Qwen3-VL's chat template adds about 10 tokens to the question's;
~15 question tokens is an assumption: no ChartQA or Qwen tokenizer offline).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

#: model shapes by family (the transformers config the dry run would load): model class, text_config
SHAPES = {
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", dict(num_hidden_layers=48, hidden_size=2048, num_attention_heads=32,
                                              num_key_value_heads=4, head_dim=128, num_experts=128,
                                              num_experts_per_tok=8, moe_intermediate_size=768,
                                              decoder_sparse_step=1, mlp_only_layers=[])),
}
OPTIONS = {"attention": {"attention": True}, "routing": {"routing": True}, "text: all": {"text": "all"}}


def model_config(family: str):
    if family not in SHAPES:
        raise SystemExit(f"The 'model.family' parameter of bench_option_bytes must be one of {sorted(SHAPES)}. "
                         f"Got {family!r} instead.")
    import transformers

    cls, text = SHAPES[family]
    return getattr(transformers, cls)(text_config=text)


def option_bytes(cfg_dict: dict, mconf, mean_span: float, text_tokens: float, n_candidates: int = 0) -> dict:
    """Per option (``shipped``, then each of :data:`OPTIONS` added alone): per condition kind, its number of
    conditions and the bytes one sample adds under one condition of it, and the sum over the suite."""
    from gapcache.conditions import expand_config
    from gapcache.config import load_config
    from gapcache.extract.estimate import condition_bytes, record_sizes
    from gapcache.extract.models import get_adapter

    out = {}
    for name, extra in {"shipped": {}, **OPTIONS}.items():
        d = copy.deepcopy(cfg_dict)
        d["extract"].update(extra)
        cfg = load_config(d)
        adapter = get_adapter(cfg.model.family)
        sizes, recorded = record_sizes(cfg, adapter, mconf, mean_span, text_tokens, n_candidates)
        conds = expand_config(cfg.extract, int(mconf.get_text_config().num_hidden_layers))
        kinds: dict = {}
        for c, per in condition_bytes(cfg, conds, sizes, recorded):
            row = kinds.setdefault(c.kind, {"conditions": 0, "per_condition": set()})
            row["conditions"] += 1
            row["per_condition"].add(per)
        for row in kinds.values():  # one figure per kind (the conditions of a kind record the same arrays)
            assert len(row["per_condition"]) == 1, row
            row["per_condition"] = row["per_condition"].pop()
        out[name] = {"kinds": kinds, "suite": sum(r["conditions"] * r["per_condition"] for r in kinds.values())}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", type=Path,
                    default=Path(__file__).resolve().parents[1] / "configs" / "qwen3-vl-30b-a3b.yaml")
    ap.add_argument("--mean-span", type=float, default=1000.0, help="mean visual tokens per sample (ChartQA ~1000)")
    ap.add_argument("--text-tokens", type=float, default=25.0,
                    help="mean prompt tokens outside the visual span, text: all only (Qwen3-VL's template adds 10 "
                    "to the question's tokens; ChartQA questions: ~15 assumed)")
    ap.add_argument("--candidates", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    import yaml

    cfg_dict = yaml.safe_load(a.config.read_text())
    mconf = model_config(cfg_dict["model"]["family"])
    res = option_bytes(cfg_dict, mconf, a.mean_span, a.text_tokens, a.candidates)
    base = res["shipped"]
    n = int(cfg_dict["data"].get("limit") or 0)
    print(f"{a.config.name}: {cfg_dict['model']['family']} shape {SHAPES[cfg_dict['model']['family']][1]}; "
          f"mean visual span {a.mean_span:g}, {a.text_tokens:g} text tokens/sample (text: all), "
          f"{a.candidates} candidates")
    print(f"{'condition kind':<18} {'n':>4} {'shipped B':>12}" + "".join(f" {'+' + o + ' B':>14}" for o in OPTIONS))
    for kind, row in base["kinds"].items():
        added = [res[o]["kinds"][kind]["per_condition"] - row["per_condition"] for o in OPTIONS]
        print(f"{kind:<18} {row['conditions']:>4} {row['per_condition']:>12,.0f}" + "".join(f" {x:>14,.0f}" for x in added))
    print(f"{'whole suite':<18} {sum(r['conditions'] for r in base['kinds'].values()):>4} {base['suite']:>12,.0f}"
          + "".join(f" {res[o]['suite'] - base['suite']:>14,.0f}" for o in OPTIONS))
    if n:
        print(f"store for {n} samples (uncompressed): shipped {base['suite'] * n / 1e9:.1f} GB"
              + "".join(f"; +{o} {(res[o]['suite'] - base['suite']) * n / 1e9:.1f} GB" for o in OPTIONS))
    if a.json:
        a.json.write_text(json.dumps({"config": str(a.config), "mean_span": a.mean_span, "text_tokens": a.text_tokens,
                                      "options": res}, indent=1))
    return res


if __name__ == "__main__":
    main()
