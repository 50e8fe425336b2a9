"""Configs are validated in one place, with errors that name the key and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gapcache.conditions import expand
from gapcache.config import DEMO, load_config
from gapcache.errors import ConfigError, UnknownNameError

ROOT = Path(__file__).resolve().parents[1]


def test_demo_yaml_is_the_embedded_default():
    assert yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()) == DEMO


def test_gapcache_demo_adds_attention_and_every_text_token_unless_plain():
    from gapcache.config import demo_config

    d = demo_config()
    from gapcache.config import DEMO_SUITE

    assert d["extract"] == {**DEMO["extract"], "attention": True, "text": "all", **DEMO_SUITE}
    assert d["data"] == DEMO["data"]
    assert {"window", "patched"} <= set(d["extract"]["conditions"])
    assert demo_config(plain=True) == DEMO and "text" not in DEMO["extract"]  # DEMO itself is untouched
    cfg = load_config(d)
    assert cfg.extract.attention is True and cfg.extract.text == "all"
    assert cfg.hash() != load_config(DEMO).hash()


def test_gapcache_demo_runs_every_strategy_of_the_suite():
    """Issue 13 item 9: the demo runs every soft-truncation strategy at DEMO's truncation layers, both windows
    with every window strategy and every patching strategy on both channels (swap: visual only), at layers 0..3;
    one shard per condition (DEMO's own shards, and so its hash, untouched)."""
    from gapcache.conditions import STRATEGIES, expand_config, strategies_of
    from gapcache.config import DEMO_SUITE, demo_config

    e = load_config(demo_config()).extract
    assert set(e.truncation_strategies) == set(strategies_of("truncated"))
    assert {s for s in e.truncation_strategies if STRATEGIES[s].soft} == {"norm_noise", "pca_noise", "mean", "shuffle"}
    assert e.truncation_layers == DEMO["extract"]["truncation_layers"] == [-1, 0, 1, 2, 3]
    assert set(e.window_strategies) == set(strategies_of("window")) and e.truncation_windows == [[0, 1], [2, 3]]
    assert set(e.patch_strategies) == set(strategies_of("patched")) and e.patch_channels == ["visual", "text"]
    labels = [c.label for c in expand_config(e, n_layers=4)]
    assert len(labels) == 4 + 6 * 5 + 2 * 2 + (5 + 4) * 4 == 74
    assert "patched_visual_swap_L3" in labels and not any(x.startswith("patched_text_swap") for x in labels)
    n = DEMO["data"]["options"]["n"]
    assert e.samples_per_shard == n and "samples_per_shard" in DEMO_SUITE  # one shard per condition
    assert load_config(DEMO).extract.samples_per_shard == 32 and load_config(DEMO).hash() == "6626e1676c66d8f9"


@pytest.mark.parametrize("name", ["demo", "llava-1.5-7b", "qwen2.5-vl-7b", "qwen3-vl-30b-a3b"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.extract.batch_size > 0 and cfg.extract.max_length > 0


def test_qwen3_30b_config_fits_the_disk():
    cfg = load_config(ROOT / "configs" / "qwen3-vl-30b-a3b.yaml")
    assert cfg.model.family == "qwen3_vl_moe" and cfg.model.dtype == "bfloat16" and cfg.model.device_map == "auto"
    assert cfg.extract.visual.mode in ("pool", "subset") and max(cfg.extract.layers) == 48
    per_sample = (2 + cfg.extract.visual.k) * len(cfg.extract.layers) * 2048 * 2
    need = per_sample * cfg.extract.batch_size / cfg.extract.forward_seconds_per_batch / 1e6
    assert need < cfg.extract.disk_bandwidth_mb_s


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) \['batchsize'\] in 'config.extract'"):
        load_config({"extract": {"batchsize": 4}, "model": {"id": "x"}})


@pytest.mark.parametrize("patch, match", [
    ({"model": {"family": "blip", "id": "x"}}, "must be one of .*'llava'.*Got 'blip'"),
    ({"model": {"id": "x", "dtype": "int8"}}, "model.dtype"),
    ({"model": {"id": "x"}, "extract": {"conditions": ["original", "blind_white"]}}, "blind_white"),
    ({"model": {"id": "x"}, "extract": {"batch_size": 0}}, "extract.batch_size"),
    ({"model": {"id": "x"}, "extract": {"visual": {"mode": "subset"}}}, "extract.visual.k"),
    ({"model": {"id": "x"}, "extract": {"conditions": ["truncated"], "truncation_layers": []}}, "truncation_layers"),
    ({"model": {"id": ""}}, "model.id"),
])
def test_bad_values(patch, match):
    with pytest.raises(ConfigError, match=match):
        load_config(patch)


def test_unknown_family_lists_supported():
    from gapcache.extract.models import get_adapter

    with pytest.raises(UnknownNameError) as err:
        get_adapter("blip2")
    msg = str(err.value)
    for fam in ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        assert fam in msg


def test_condition_expansion_and_labels():
    labels = [c.label for c in expand(["original", "truncated"], [-1, 2], ["zero", "drop"], n_layers=4)]
    assert labels == ["original", "truncated_zero_Lm1", "truncated_zero_L2", "truncated_drop_Lm1", "truncated_drop_L2"]
    with pytest.raises(ConfigError, match=r"\[-1, 3\]. Got 4"):
        expand(["truncated"], [4], ["zero"], n_layers=4)
    with pytest.raises(UnknownNameError, match="Supported conditions"):
        expand(["blind_white"])


def test_store_and_analysis_tiers_do_not_import_torch():
    code = ("import sys, gapcache, gapcache.store, gapcache.analyze, gapcache.config, gapcache.cli, "
            "gapcache.conditions, gapcache.extract.models, gapcache.extract.data; "
            "bad = [m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
