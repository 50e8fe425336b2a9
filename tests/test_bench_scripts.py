"""The issue-14 benchmark scripts measure what they say (no timing assertions).

* ``bench_attention``: the CPU memory helpers read ``/proc/self/status`` in bytes and see a known allocation;
* ``bench_routing --attention``: the on arm really records both the routing and the attention summaries;
* ``bench_option_bytes``: the bytes each option adds to the Qwen3-VL-30B-A3B config equal the array shapes
  worked out by hand;
* ``bench_extract`` (issue 15): runs end to end at toy sizes, and ``--compression`` reaches the run's store.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"bench_{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


STATUS = """Name:\tpython
Umask:\t0022
VmPeak:\t 4968032 kB
VmHWM:\t  906236 kB
VmRSS:\t  800000 kB
RssAnon:\t  700000 kB
Threads:\t4
"""


def test_proc_status_reads_the_vm_lines_in_bytes():
    ba = bench("attention")
    got = ba.proc_status(STATUS)
    assert got == {"VmPeak": 4968032 * 1024, "VmHWM": 906236 * 1024, "VmRSS": 800000 * 1024}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_cpu_peak_sees_an_allocation_freed_before_it_returns():
    ba = bench("attention")
    now = ba.proc_status()
    assert now["VmHWM"] >= now["VmRSS"] > 0
    n = 64 * 2**20

    def touch():
        a = np.ones(n // 8)  # 64 MiB, every page written
        del a

    got = ba.cpu_peak(touch)
    assert got["extra"] >= n * 0.95, got  # the peak, though freed before the reading
    assert got["rss_after"] < got["rss_before"] + n / 2, got
    if got["hwm_reset"]:  # after the reset a no-op adds (almost) nothing
        assert ba.cpu_peak(lambda: None)["extra"] < 8 * 2**20


def test_routing_bench_options():
    br = bench("routing")
    assert br.extract_options(False, True) == {"routing": False, "attention": False}
    assert br.extract_options(True, False) == {"routing": True, "attention": False}
    assert br.extract_options(True, True) == {"routing": True, "attention": True}
    assert br.extract_options(True, True, control=True) == {"routing": False, "attention": False}


@pytest.mark.integration
def test_routing_bench_with_attention_records_both(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GAPCACHE_CACHE", str(tmp_path / "cache"))
    small = ["--hidden", "32", "--layers", "2", "--experts", "4", "--top-k", "2", "--batch-size", "2",
             "--batches", "1", "--repeats", "1"]
    out = bench("routing").main([*small, "--attention"])
    assert out["on_records"] == ["attn_mass", "attn_visual", "route_expert", "route_load", "route_weight"]
    assert out["off_s"]["best"] > 0 and out["on_s"]["best"] > 0
    assert bench("routing").main(small)["on_records"] == ["route_expert", "route_load", "route_weight"]


def test_option_bytes_of_the_qwen3_moe_config():
    pytest.importorskip("transformers")
    bo = bench("option_bytes")
    res = bo.main(["--mean-span", "1000", "--text-tokens", "25"])
    base = res["shipped"]["kinds"]
    layers, hidden, heads, experts, top_k, n_layers = 25, 2048, 32, 128, 8, 48
    assert base["original"]["per_condition"] == (2 + 32) * layers * hidden * 2 + 5  # bf16 sites + pooled visual
    assert base["truncated"]["per_condition"] == 2 * layers * hidden * 2 + 5
    added = {o: {k: res[o]["kinds"][k]["per_condition"] - base[k]["per_condition"] for k in base} for o in bo.OPTIONS}
    # attn_mass (3 queries, 4 targets) + attn_visual (3 queries, 5 stats), float32, per recorded layer and query head
    assert set(added["attention"].values()) == {3 * layers * heads * (4 + 5) * 4}
    # route_expert int16 + route_weight float32 at 2 sites x 48 routers x top-8; route_load int32 (2 modalities)
    assert set(added["routing"].values()) == {2 * n_layers * top_k * (2 + 4) + n_layers * 2 * experts * 4}
    assert set(added["text: all"].values()) == {25 * layers * hidden * 2}  # every text token, every condition
    n_conds = sum(r["conditions"] for r in base.values())
    assert n_conds == 196
    assert res["routing"]["suite"] - res["shipped"]["suite"] == n_conds * added["routing"]["original"]


def test_option_bytes_refuses_a_family_without_a_shape():
    with pytest.raises(SystemExit, match="The 'model.family' parameter of bench_option_bytes must be one of"):
        bench("option_bytes").model_config("llava")


def test_read_bench_blocks_tile_each_state_array_and_both_readers_agree(tmp_path, capsys, monkeypatch):
    """bench_read: its (condition, shard rows, layer) selections cover every element once; it prints identical."""
    import zarr

    from helpers import random_payloads, roundtrip, small_layout

    layout = small_layout("bfloat16")
    path = tmp_path / "s.zarr"
    roundtrip(path, layout, random_payloads(layout, seed=4))
    mod = bench("read")
    for name in ("text_states", "visual_states"):
        arr = zarr.open_array(path / name, mode="r")
        seen = np.zeros(arr.shape, dtype=int)
        for key in mod.blocks(arr):
            seen[key] += 1
        assert (seen == 1).all(), name
    monkeypatch.setattr("sys.argv", ["bench_read.py", str(path), "--repeats", "1"])
    mod.main()
    out = capsys.readouterr().out
    assert out.count("identical True") == 2 and "token_states" in out and "not in the store" in out


@pytest.mark.slow
@pytest.mark.integration
def test_analysis_phases_bench_runs_both_malloc_settings_side_by_side(tmp_path, capsys):
    """bench_analysis_phases: one child analysis per setting (gapcache's malloc settings, glibc's own), the best of
    each and their ratio; a missing store is refused with the way to make one."""
    from gapcache.cli import main
    from test_extract_run import write_config

    mod = bench("analysis_phases")
    with pytest.raises(SystemExit, match="must be a store path.*gapcache demo --out DIR"):
        mod.main([str(tmp_path / "nope.zarr")])
    cfg = write_config(tmp_path, conditions=["original", "blind_black"])
    assert main(["extract", str(cfg), "--out", str(tmp_path / "run")]) == 0
    store = str(tmp_path / "run" / "store.zarr")
    assert mod.main([store, "--repeats", "1", "--metrics", "accuracy", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "gapcache  run 0" in out and "glibc     run 0" in out and "best of 1" in out
    table = out.split("best of 1")[1].splitlines()[1:]
    assert [line.split()[0] for line in table][:4] == ["wall", "user", "sys", "accuracy"]


def test_extract_bench_runs_small_and_its_store_has_the_asked_compression(tmp_path, monkeypatch, one_thread):
    """bench_extract's compute part end to end at toy sizes: every phase timed, the ratios computed from them,
    and ``--compression`` reaching the run's store (the codec in its state arrays' metadata)."""
    import zarr

    from gapcache.store.codec import array_compression

    monkeypatch.syspath_prepend(str(BENCH))
    be = bench("extract")
    res = be.main(["--skip-io", "--device", "cpu", "--hidden", "32", "--layers", "2", "--image-size", "32",
                   "--batch-size", "2", "--batches", "2", "--samples-per-shard", "2", "--repeats", "1",
                   "--threads", "1", "--compression", "zstd:3", "--workdir", str(tmp_path), "--keep"])
    c = res["compute"]
    assert c["config"]["compression"] == "zstd:3" and c["samples_done"] == 4
    assert c["ratio"] == pytest.approx(c["run_s"] / c["bare_s"])
    store = zarr.open_group(tmp_path / "compute" / "run0" / "store.zarr", mode="r")
    assert array_compression(store["visual_states"]) == "zstd:3"


@pytest.mark.parametrize("dtype, auto", [("bfloat16", "zstd:1"), ("float32", "blosc:lz4:5:shuffle")])
def test_codec_bench_measures_a_stores_own_chunks(tmp_path, dtype, auto):
    """bench_codecs reads whole inner chunks of a store's state array back and measures each setting on them:
    auto resolved for the stored item size, none keeps every byte, the compressed settings round-trip."""
    from gapcache.store import StoreWriter, create
    from helpers import random_payloads, small_layout

    layout = small_layout(dtype)
    create(tmp_path / "s.zarr", layout, {"model": {"id": "test"}}, {"question": np.array(["q"] * 5, dtype=object)})
    with StoreWriter(tmp_path / "s.zarr") as w:
        for p in random_payloads(layout, seed=3):
            w.submit(p)
    rows = bench("codecs").main([str(tmp_path / "s.zarr"), "--array", "text_states", "--chunks", "50",
                                 "--settings", "auto,none,blosc:lz4:9:bitshuffle", "--repeats", "1"])
    got = {r["setting"]: r for r in rows}
    assert got["auto"]["codec"] == auto and got["none"]["kept"] == 1.0
    assert all(r["kept"] > 0 and r["encode_s_per_gb"] >= 0 for r in rows)  # (tiny chunks: headers outweigh)
    import zarr

    chunks, itemsize = bench("codecs").store_chunks(tmp_path / "s.zarr", "text_states", 10**6)
    arr = zarr.open_array(tmp_path / "s.zarr" / "text_states", mode="r")
    assert itemsize == arr.dtype.itemsize and len(chunks) == np.prod(
        [n // c for n, c in zip(arr.shape, arr.chunks)])  # every whole chunk (edge chunks left out), once
    np.testing.assert_array_equal(chunks[0], arr[tuple(slice(0, c) for c in arr.chunks)])


def test_preload_bench_writes_a_small_store_and_both_readers_agree(tmp_path, capsys):
    """bench_preload: the synthetic store it writes is preloaded identically by the direct reader and by zarr,
    and ``through_zarr`` really takes the direct chunk reader out (and puts it back)."""
    from gapcache.store import reader
    from gapcache.store.shardread import ChunkReader

    mod = bench("preload")
    assert mod.main(["--samples", "40", "--repeats", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "identical: True" in out and "22 variables preloaded" in out
    import zarr

    arr = zarr.open_array(tmp_path / "store.zarr" / "status", mode="r")
    with mod.through_zarr():
        assert reader._direct_reader(arr) is None and reader.read_whole(np.zeros(2)) is None
    assert isinstance(reader._direct_reader(arr), ChunkReader)
