"""gapcache verify / freeze: checksums recorded at write time find flipped bytes, truncation, missing shards."""

import json
import os

import numpy as np
import pytest

from gapcache.store import StoreWriter, open_store
from gapcache.store.cli import cmd_freeze, cmd_verify, register
from gapcache.store.verify import unfreeze_permissions, verify
from gapcache.store.writer import StoreFrozenError, create
from helpers import random_payloads, roundtrip, small_layout


def _args(argv):
    import argparse

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    return p.parse_args(argv)


@pytest.fixture
def store(tmp_path):
    layout = small_layout("bfloat16")
    roundtrip(tmp_path / "s.zarr", layout, random_payloads(layout))
    return tmp_path / "s.zarr"


def test_good_store_exits_zero(store, capsys):
    assert verify(store).ok
    args = _args(["verify", str(store), "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_flipped_byte_truncated_and_missing_shards_are_named(store, capsys):
    flipped = store / "text_states" / "c" / "1" / "1" / "0" / "0" / "0"
    b = bytearray(flipped.read_bytes())
    b[len(b) // 3] ^= 0x10
    flipped.write_bytes(bytes(b))
    truncated = store / "visual_states" / "c" / "0" / "2" / "0" / "0"
    truncated.write_bytes(truncated.read_bytes()[:-7])
    (store / "text_states" / "c" / "2" / "0" / "0" / "0" / "0").unlink()
    rep = verify(store)
    text = "\n".join(rep.problems)
    assert len(rep.problems) == 3, text
    assert "text_states shard c/1/1/0/0/0 (condition 'blind_black', samples 2..3): checksum mismatch" in text
    assert "visual_states shard c/0/2/0/0 (condition 'original', samples 4..4): shard file truncated" in text
    assert "text_states shard c/2/0/0/0/0 (condition 'truncated_zero_L0', samples 0..1): shard file missing" in text
    assert cmd_verify(_args(["verify", str(store)])) == 1
    assert "FAILED: 3 problem(s)" in capsys.readouterr().out


def test_score_chunk_corruption_and_missing_record(store):
    g = store / "gold_logprob" / "c" / "0" / "1"
    b = bytearray(g.read_bytes())
    b[-1] ^= 1
    g.write_bytes(bytes(b))
    (store / "error" / "checksums" / "c.1.0.json").unlink()
    text = "\n".join(verify(store).problems)
    assert "gold_logprob shard c/0/1" in text and "checksum mismatch" in text
    assert "error shard c/1/0" in text and "no checksum record" in text


def test_incomplete_store_is_a_problem_unless_allowed(tmp_path):
    layout = small_layout()
    payloads = [p for p in random_payloads(layout) if not (p.condition == 1 and p.shard == 2)]
    roundtrip(tmp_path / "s.zarr", layout, payloads)
    rep = verify(tmp_path / "s.zarr")
    assert rep.problems == ["incomplete: condition 'blind_black' has 1 pending sample(s)"]
    assert verify(tmp_path / "s.zarr", allow_incomplete=True).ok


def test_symlink_inside_store_is_a_problem(store, tmp_path):
    os.symlink(tmp_path, store / "escape")
    assert any("symlink inside the store" in p for p in verify(store).problems)


def test_legacy_store_without_records_is_decoded(store):
    import shutil

    import zarr

    for d in store.glob("*/checksums"):
        shutil.rmtree(d)
    g = zarr.open_group(store, mode="r+")
    del g.attrs["checksums"]
    rep = verify(store)
    assert rep.ok, rep.problems
    assert "decoded instead" in rep.checked["checksums"]


def test_freeze_makes_store_read_only_and_writers_refuse(store, tmp_path):
    assert cmd_freeze(_args(["freeze", str(store)])) == 0
    ds = open_store(store)
    assert ds.attrs["frozen"]["complete"] is True
    meta = json.loads((store / "zarr.json").read_text())
    assert meta["consolidated_metadata"] is not None and meta["attributes"]["frozen"]
    assert not os.access(store / "text_states" / "zarr.json", os.W_OK) or os.geteuid() == 0
    assert not (os.stat(store).st_mode & 0o222)
    with pytest.raises(StoreFrozenError, match="frozen read-only"):
        StoreWriter(store)
    with pytest.raises(StoreFrozenError, match="frozen read-only"):
        create(store, small_layout(), {}, {}, overwrite=True)
    assert verify(store).ok
    unfreeze_permissions(store)


def test_freeze_refuses_a_store_that_does_not_verify(tmp_path):
    from gapcache.errors import StoreError

    layout = small_layout()
    roundtrip(tmp_path / "s.zarr", layout, random_payloads(layout)[:-1])
    with pytest.raises(StoreError, match="allow-incomplete"):
        cmd_freeze(_args(["freeze", str(tmp_path / "s.zarr")]))
    assert cmd_freeze(_args(["freeze", str(tmp_path / "s.zarr"), "--allow-incomplete"])) == 0
    assert open_store(tmp_path / "s.zarr").attrs["frozen"]["complete"] is False
    unfreeze_permissions(tmp_path / "s.zarr")


def test_zarr_fallback_path_records_checksums_too(tmp_path):
    layout = small_layout("float16")
    create(tmp_path / "s.zarr", layout, {}, {})
    with StoreWriter(tmp_path / "s.zarr", direct=False) as w:
        for p in random_payloads(layout):
            w.submit(p)
    rep = verify(tmp_path / "s.zarr")
    assert rep.ok, rep.problems
    assert rep.checked["checksums"].startswith("51 of 51")  # 42 state/score records + 9 status chunks (schema 2)
    np.testing.assert_array_equal(open_store(tmp_path / "s.zarr").status.values, 1)
