"""Issue 12: every bad input and fault answered in one line, before the model loads where it can;
no silently wrong store, no leftovers. The table of what a user sees is docs/faults.md."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gapcache.errors import DataError, SampleError
from gapcache.extract.data import load_dataset


# ------------------------------------------------------------------ images (item 1) and manifests (items 9, 11)
def _manifest(tmp_path, rows, name="m.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def _gradient16():
    return (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_a_wide_grayscale_image_is_scaled_to_8_bits_not_clipped_to_white(tmp_path, mode):
    a16 = _gradient16()
    if mode == "I;16":
        im = Image.fromarray(a16)
    elif mode == "I;16B":
        im = Image.frombytes("I;16B", (64, 64), a16.astype(">u2").tobytes())
    elif mode == "I":
        im = Image.fromarray(a16.astype(np.int32))
    else:
        im = Image.fromarray((a16 / 65535.0).astype(np.float32))
    assert im.mode == mode
    path = tmp_path / ("x.png" if mode.startswith("I;16") else "x.tiff")
    im.save(path)
    p = _manifest(tmp_path, [{"id": "g", "image": path.name, "question": "q", "answer": "a"}])
    (s,) = load_dataset("manifest", path=p)
    rgb = np.asarray(s.load_image())
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    want = np.rint(a16 / 257.0).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - want).max() <= 1  # a gradient, not white
    assert rgb.min() == 0 and rgb.max() >= 254 and (rgb == 255).mean() < 0.01


def test_a_16bit_png_hashes_as_its_scaled_image_not_as_white(tmp_path):
    from gapcache.extract.data import pixel_sum

    Image.fromarray(_gradient16()).save(tmp_path / "x.png")
    p = _manifest(tmp_path, [{"id": "g", "image": "x.png", "question": "q", "answer": "a"}])
    (s,) = load_dataset("manifest", path=p)
    total, n = pixel_sum(s.load_image())
    assert n == 64 * 64 and 100 < total[0] / n < 155  # mean of the gradient, not 255


def test_an_image_path_that_is_a_directory_says_so(tmp_path):
    (tmp_path / "d.png").mkdir()
    p = _manifest(tmp_path, [{"id": "d", "image": "d.png", "question": "q", "answer": "a"}])
    (s,) = load_dataset("manifest", path=p)
    with pytest.raises(SampleError, match="is a directory, not an image file"):
        s.load_image()


def test_a_non_utf8_manifest_line_is_named_by_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    good = json.dumps({"id": "0", "image": "a.png", "question": "q", "answer": "a"})
    p.write_bytes(good.encode() + b"\n" + b'{"id": "1", "image": "a.png", "question": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"m.jsonl:2: the manifest must be UTF-8 text. Got byte 0xe9 at column"):
        load_dataset("manifest", path=p)


# ------------------------------------------------------------------ extraction: checks before the model loads
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import yaml  # noqa: E402

from gapcache.cli import main  # noqa: E402
from gapcache.store.verify import verify  # noqa: E402


def _cfg(tmp_path, name="cfg.yaml", **extract):
    cfg = {"name": "t", "model": {"family": "llava", "id": "builtin:tiny-llava", "dtype": "float32"},
           "data": {"dataset": "synthetic", "split": "test", "options": {"n": 8, "image_size": 32, "seed": 1}},
           "extract": {"conditions": ["original", "blind_black"], "batch_size": 4, "samples_per_shard": 4, **extract}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished extraction (run directory, config), shared: the tests copy it before changing it."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = _cfg(tmp)
    assert main(["extract", str(cfg), "--out", str(tmp / "run")]) == 0
    return tmp / "run", cfg


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: each refusal below must come before it."""
    from gapcache.extract.runner import Extraction

    def load(self):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(Extraction, "load", load)


def _one_line(capsys, code, argv, *expect):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert "Traceback" not in err, err
    said = [line for line in err.splitlines() if line.startswith("gapcache ")]  # progress bars aside
    assert len(said) == 1 and err.endswith(said[0]), err
    err = said[0]
    for e in expect:
        assert e in err, err
    return err


def test_out_pointing_at_an_existing_store_is_refused_before_the_model_loads(run, capsys, no_model):
    out, cfg = run
    _one_line(capsys, 1, ["extract", cfg, "--out", out / "store.zarr"], "must be a run directory",
              f"Got the store '{out / 'store.zarr'}'", f"pass its run directory '{out}'")
    assert not (out / "store.zarr" / "store.zarr").exists() and not (out / "store.zarr" / "locks").exists()


def test_out_inside_a_store_is_refused(run, capsys, no_model):
    out, cfg = run
    _one_line(capsys, 1, ["extract", cfg, "--out", out / "store.zarr" / "status" / "x"],
              f"a path inside the store '{out / 'store.zarr'}'")


def test_out_naming_a_file_or_an_unwritable_directory_is_refused(tmp_path, capsys, no_model, monkeypatch):
    cfg = _cfg(tmp_path)
    (tmp_path / "f").write_text("")
    _one_line(capsys, 1, ["extract", cfg, "--out", tmp_path / "f"], "must be a directory", "Got the file")
    import gapcache.extract.preflight as pre

    real = os.access
    monkeypatch.setattr(pre.os, "access", lambda p, m: False if str(p) == str(tmp_path / "ro") else real(p, m))
    (tmp_path / "ro").mkdir()
    _one_line(capsys, 1, ["extract", cfg, "--out", tmp_path / "ro" / "run"], "must be a directory you can write",
              f"'{tmp_path / 'ro'}' is not writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_in_a_read_only_directory_for_real(tmp_path, capsys, no_model):
    cfg = _cfg(tmp_path)
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        _one_line(capsys, 1, ["extract", cfg, "--out", tmp_path / "ro" / "run"], "is not writable")
    finally:
        os.chmod(tmp_path / "ro", 0o755)


@pytest.mark.parametrize("args, expect", [
    (["--n-tasks", "2"], "must be given with --n-tasks. Got --n-tasks 2 alone instead"),
    (["--task-index", "0"], "'--n-tasks' parameter of gapcache extract must be a positive int"),
    (["--task-index", "5", "--n-tasks", "2"], "must lie in [0, 2) (--n-tasks 2). Got 5 instead"),
    (["--task-index", "-1", "--n-tasks", "2"], "Got -1 instead"),
])
def test_task_index_and_n_tasks_checked_before_the_model_loads(tmp_path, capsys, no_model, args, expect):
    _one_line(capsys, 1, ["extract", _cfg(tmp_path), "--out", tmp_path / "run", *args], expect)
    assert not (tmp_path / "run").exists()


def test_samples_per_shard_is_bounded_by_memory_before_the_model_loads(tmp_path, capsys, no_model):
    err = _one_line(capsys, 1, ["extract", _cfg(tmp_path, samples_per_shard=10**9), "--out", tmp_path / "run"],
                    "The 'extract.samples_per_shard' parameter must keep 3 shards of hidden states within",
                    "Got 1000000000 (")
    assert "lower it" in err


def test_shard_memory_counts_visual_tokens():
    from gapcache.errors import ConfigError
    from gapcache.extract.preflight import check_shard_memory, shard_bytes

    assert shard_bytes(2, 5, 10, "bfloat16", 7) == 5 * 10 * 2 * (2 * 2 + 7)
    check_shard_memory(4, 49, 4096, "bfloat16", 0, available=10**10)
    with pytest.raises(ConfigError, match=r"\+ 100000 visual tokens a shard"):
        check_shard_memory(4, 49, 4096, "bfloat16", 100_000, available=10**10)


def test_a_resume_with_another_batch_size_is_refused_naming_the_field_and_both_values(run, tmp_path, capsys,
                                                                                     no_model):
    out, _ = run
    err = _one_line(capsys, 1, ["extract", _cfg(tmp_path, batch_size=2), "--out", out],
                    "'extract.batch_size' is 4 in the store and 2 in this run")
    assert "config_hash" in err and len(err) < 600


def test_a_changed_config_field_is_named_with_both_values(run, tmp_path, capsys, no_model):
    out, _ = run
    cfg = yaml.safe_load(_cfg(tmp_path).read_text())
    cfg["data"]["options"]["image_size"] = 48
    cfg["extract"]["compression_level"] = 3
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    _one_line(capsys, 1, ["extract", tmp_path / "cfg.yaml", "--out", out],
              "'data.options.image_size' is 32 in the store and 48 in this run",
              "'extract.compression_level' is 1 in the store and 3 in this run")


def test_a_changed_image_under_blind_mean_names_the_sample_and_mean_rgb(tmp_path, capsys):
    for k, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (32, 32), c).save(tmp_path / f"{k}.png")
    rows = [{"id": f"s{k}", "image": f"{k}.png", "question": "Is there a red shape?", "answer": "yes",
             "candidates": ["yes", "no"]} for k in range(3)]
    m = _manifest(tmp_path, rows)
    cfg = yaml.safe_load(_cfg(tmp_path, conditions=["original", "blind_mean"]).read_text())
    cfg["data"] = {"dataset": "manifest", "path": str(m)}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["extract", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "1.png")
    err = _one_line(capsys, 1, ["extract", tmp_path / "cfg.yaml", "--out", tmp_path / "run"],
                    "'image_sha256' of sample 's1'", "'condition_params.blind_mean.mean_rgb' is")
    assert len(err) < 900


def test_every_sample_failing_planning_is_an_error_not_an_empty_store(tmp_path, capsys):
    _one_line(capsys, 1, ["extract", _cfg(tmp_path, max_length=8), "--out", tmp_path / "run"],
              "and so did every one of the 8 samples", "extract.max_length")
    assert not (tmp_path / "run" / "store.zarr").exists()


def test_disk_full_while_creating_the_store_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno

    import gapcache.extract.runner as runner

    def full(path, *a, **k):
        os.makedirs(path, exist_ok=True)
        (Path(path) / "partial").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "text_states"))

    monkeypatch.setattr(runner, "create", full)
    _one_line(capsys, 1, ["extract", _cfg(tmp_path), "--out", tmp_path / "run"],
              "Could not create the store in", "No space left on device")
    assert [p.name for p in (tmp_path / "run").iterdir()] == []


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    from gapcache.extract.runner import Extraction

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Extraction, "load", interrupted)
    _one_line(capsys, 130, ["extract", _cfg(tmp_path), "--out", tmp_path / "run"], "interrupted (Ctrl-C)")


def test_an_os_error_is_one_line(tmp_path, capsys, monkeypatch):
    import gapcache.extract.runner as runner

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", "/somewhere/zarr.json")

    monkeypatch.setattr(runner.Extraction, "load", denied)
    _one_line(capsys, 1, ["extract", _cfg(tmp_path), "--out", tmp_path / "run"],
              "Permission denied ('/somewhere/zarr.json')")


def test_a_store_directory_without_zarr_json_says_what_is_missing(tmp_path, capsys, no_model):
    (tmp_path / "run" / "store.zarr" / "status").mkdir(parents=True)
    _one_line(capsys, 1, ["extract", _cfg(tmp_path), "--out", tmp_path / "run"],
              f"without its root metadata '{tmp_path / 'run' / 'store.zarr' / 'zarr.json'}'")
    _one_line(capsys, 1, ["info", tmp_path / "run" / "store.zarr"], "zarr.json")


# ------------------------------------------------------------------ leftovers (item 7)
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_writers_are_reported_then_removed_on_resume_but_a_live_ones_kept(run, tmp_path, capsys):
    import shutil
    import socket

    from gapcache.store.locks import tmp_name

    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    cfg = run[1]
    host, dead = socket.gethostname(), _dead_pid()
    shard_dir = out / "store.zarr" / "text_states" / "c" / "0"
    stale = shard_dir / f".0.{dead}@{host}.{'a' * 32}.tmp"
    stale.write_bytes(b"x" * 1000)
    live = shard_dir / tmp_name("0")  # this process: alive
    live.write_bytes(b"y" * 10)
    other_host = shard_dir / f".1.{dead}@not-{host}.{'b' * 32}.tmp"
    other_host.write_bytes(b"z")
    creation = out / f".store.zarr.{dead}@{host}.tmp"
    (creation / "status").mkdir(parents=True)
    (out / "locks").mkdir(exist_ok=True)
    lock = out / "locks" / "original.shard00000.lock"
    lock.write_text(json.dumps({"host": host, "pid": dead, "job": "", "array_task": ""}))
    rep = verify(out / "store.zarr")
    assert rep.ok, rep.problems
    text = "\n".join(rep.warnings)
    assert "1 leftover staged file(s) (0.0 MB) of dead writers" in text
    assert "of a writer running now on this host" in text and "of writers on another host" in text
    assert "leftover creation directory(s)" in text and "leftover lock(s)" in text
    assert main(["extract", str(cfg), "--out", str(out)]) == 0  # resume: everything done, leftovers cleaned
    assert not stale.exists() and not creation.exists() and not lock.exists()
    assert live.exists() and other_host.exists()
    left = "\n".join(verify(out / "store.zarr").warnings)
    assert "dead writers" not in left and "running now on this host" in left


def test_a_killed_writer_leaves_staged_files_that_the_resume_removes(tmp_path):
    """A real SIGKILL between staging and committing a shard: its .tmp file is named with the dead pid."""
    import shutil

    from gapcache.store.locks import leftovers

    cfg = _cfg(tmp_path)
    child = tmp_path / "child.py"
    child.write_text(
        "import os, signal, sys\n"
        "from gapcache.store.shardio import StagedShard\n"
        "StagedShard.commit = lambda self: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from gapcache.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(child), "extract", str(cfg), "--out", str(out)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    found = leftovers(out)
    assert any(f.kind == "staged file" and f.state == "dead" for f in found), found
    assert main(["extract", str(cfg), "--out", str(out)]) == 0
    assert not [f for f in leftovers(out) if f.state == "dead"]
    rep = verify(out / "store.zarr")
    assert rep.ok and not rep.warnings, (rep.problems, rep.warnings)
    shutil.rmtree(out)


# ------------------------------------------------------------------ analyze (items 5, 6, 9)
@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """A store with a single truncation layer."""
    tmp = tmp_path_factory.mktemp("one")
    cfg = _cfg(tmp, conditions=["original", "truncated"], truncation_layers=[1], truncation_strategies=["zero"])
    assert main(["extract", str(cfg), "--out", str(tmp / "run")]) == 0
    return tmp / "run" / "store.zarr"


def test_analyze_cliff_layer_out_of_the_store_range_is_refused(one_layer, tmp_path, capsys):
    _one_line(capsys, 1, ["analyze", one_layer, "--out", tmp_path / "a", "--cliff-layer", "999"],
              "The 'cliff_layer' parameter (--cliff-layer) of analyze must be a layer of the store, in [-1, ",
              "Got 999 instead.")
    assert not (tmp_path / "a" / "summary.json").exists()


def test_analyze_out_naming_a_file_is_one_line(one_layer, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    _one_line(capsys, 1, ["analyze", one_layer, "--out", tmp_path / "f"], "must be a directory. Got the file")


def test_a_single_truncation_layer_store_runs_every_metric_that_can_and_says_why_not_for_the_others(
        one_layer, tmp_path, capsys):
    rc = main(["analyze", str(one_layer), "--out", str(tmp_path / "a"), "--n-resamples", "99"])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    m = summary["stores"]["store"]["metrics"]
    assert set(m) >= {"accuracy", "truncation", "evd", "rank"}
    assert "skipped" not in m["accuracy"] and "skipped" not in m["truncation"]
    evd = m["evd"]
    if "skipped" in evd:
        assert "truncates at layer(s) [1]" in evd["skipped"]
    else:
        assert "at least 2 layers" in evd["cliffs"]["steepest"]["skipped"]
        assert "cliff_skipped" in evd and "pass --cliff-layer" in evd["cliff_skipped"]
    assert "steepest_decline needs at least 2 layers" in out or "skipped" in out
