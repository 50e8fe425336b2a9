"""extract.text: all records every prompt text token (the store's optional token span), on every family."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("torchvision")

from gapcache.config import load_config  # noqa: E402
from gapcache.errors import ConfigError  # noqa: E402
from gapcache.extract.models import ADAPTERS, get_adapter  # noqa: E402
from gapcache.extract.runner import Extraction  # noqa: E402
from gapcache.extract.tiny import build_tiny_checkpoint  # noqa: E402
from gapcache.sites import TOKEN_ROLES  # noqa: E402
from gapcache.store import open_store  # noqa: E402
from gapcache.store.reader import span_rows  # noqa: E402
from gapcache.store.verify import verify  # noqa: E402
from helpers import ragged_samples  # noqa: E402

pytestmark = pytest.mark.integration
N = 4


def _config(family, path, text="all"):
    return load_config({
        "model": {"family": family, "id": str(path), "dtype": "float32"},
        "data": {"dataset": "synthetic", "options": {"n": N, "image_size": 64}},
        "extract": {"conditions": ["original", "truncated"], "truncation_layers": [0], "truncation_strategies": ["drop"],
                    "batch_size": N, "samples_per_shard": 2, "max_length": 512, "text": text},
    })


def test_the_option_is_validated_and_left_out_of_the_hash_at_its_default(tmp_path):
    base = {"model": {"family": "llava", "id": "x"}, "data": {"dataset": "synthetic"}}
    assert load_config(base).hash() == load_config({**base, "extract": {"text": "sites"}}).hash()
    assert load_config(base).hash() != load_config({**base, "extract": {"text": "all"}}).hash()
    with pytest.raises(ConfigError, match=r"The 'extract.text' parameter must be 'sites' .* Got 'every' instead"):
        load_config({**base, "extract": {"text": "every"}})


@pytest.mark.parametrize("family", list(ADAPTERS))
def test_every_text_token_is_recorded_bit_for_bit(tmp_path, family, one_thread):
    path = build_tiny_checkpoint(family, tmp_path / "ckpt", seed=0, num_layers=2)
    cfg = _config(family, path)
    model, processor = get_adapter(family).load(cfg.model)
    ex = Extraction(cfg, tmp_path / "run", model=model, processor=processor).load()
    ex.plan(ragged_samples(N), show=False)
    store = ex.run(show=False)
    rep = verify(store)
    assert rep.ok, rep.problems
    ds = open_store(store)
    assert list(ds.token_condition.values) == list(ds.condition.values)  # recorded under every condition
    roles = list(ds.ttoken_role.attrs["roles"])
    assert roles == list(TOKEN_ROLES)
    for i, p in enumerate(ex.planned):
        rows = span_rows(ds, i, "token")  # (token_condition, ttoken, layer, hidden)
        want = [t for t in range(len(p.prompt_ids)) if not p.visual_start <= t < p.visual_start + p.visual_length]
        assert rows.sizes["ttoken"] == len(want) == int(ds.seq_len[i]) - p.visual_length
        off = int(ds.token_offset[i])
        ids = ds.ttoken_id.values[off : off + len(want)]
        assert ids.tolist() == [p.prompt_ids[t] for t in want]
        role = ds.ttoken_role.values[off : off + len(want)]
        for s, site in enumerate(ds.site.values):  # each text site's row is that site's state exactly
            pos = int(ds.site_position[i, s])
            row = want.index(pos)
            np.testing.assert_array_equal(rows.values[:, row], ds.text_states.values[:, i, s])
            if str(site) == "instruction":
                assert roles[role[row]] == "question"
        q0, qn = p.sites["question"]
        assert all(roles[role[want.index(t)]] in ("question", "special") for t in range(q0, q0 + qn))
