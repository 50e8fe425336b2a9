"""Integration: whole runs on the builtin tiny LLaVA through the real loading path and the CLI."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr
import yaml
from PIL import Image

from gapcache.cli import main
from gapcache.conditions import strategies_of
from gapcache.errors import ConfigError, IncompatibleStoreError
from gapcache.store import info, open_store
from helpers import assert_greedy_under_truncation, assert_stores_equal

pytestmark = pytest.mark.integration


def write_config(tmp_path, **extract):
    cfg = {
        "name": "t",
        "model": {"family": "llava", "id": "builtin:tiny-llava", "dtype": "float32"},
        "data": {"dataset": "synthetic", "split": "test", "options": {"n": 24, "image_size": 32, "seed": 1}},
        "extract": {"conditions": ["original", "blind_black", "blind_randomimage"], "batch_size": 4,
                    "samples_per_shard": 4, **extract},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args):
    return subprocess.run([sys.executable, "-m", "gapcache.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    cfg = write_config(tmp_path, samples_per_shard=2, batch_size=2)
    ref = tmp_path / "ref"
    assert main(["extract", str(cfg), "--out", str(ref)]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gapcache.cli", "extract", str(cfg), "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "store.zarr" / "status" / "c" / "0" / "1"  # 2nd shard of the first condition flagged
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = info(killed / "store.zarr")
    assert not partial["complete"], "the run finished before it could be killed; make it longer"
    assert main(["extract", str(cfg), "--out", str(killed)]) == 0
    assert info(killed / "store.zarr")["complete"]
    assert_stores_equal(ref / "store.zarr", killed / "store.zarr")


def test_rerun_of_complete_store_writes_nothing_and_other_config_is_refused(tmp_path):
    cfg = write_config(tmp_path)
    out = tmp_path / "run"
    assert main(["extract", str(cfg), "--out", str(out)]) == 0
    status = out / "store.zarr" / "status" / "c" / "0" / "0"
    mtime = status.stat().st_mtime_ns
    assert main(["extract", str(cfg), "--out", str(out)]) == 0
    assert status.stat().st_mtime_ns == mtime
    other = write_config(tmp_path, seed=7)
    from gapcache.config import load_config
    from gapcache.extract.runner import Extraction

    with pytest.raises(IncompatibleStoreError, match="config_hash"):
        Extraction(load_config(other), out).run(show=False)


def test_bad_images_are_recorded_as_failures_and_the_run_goes_on(tmp_path):
    img = tmp_path / "ok.png"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(img)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rows = [
        {"id": "a", "image": "ok.png", "question": "Is there a red shape?", "answer": "yes", "candidates": ["yes", "no"]},
        {"id": "b", "image": "missing.png", "question": "Is there a red shape?", "answer": "no", "candidates": ["yes", "no"]},
        {"id": "c", "image": "corrupt.png", "question": "Is there a red shape?", "answer": "no", "candidates": ["yes", "no"]},
        {"id": "d", "image": "ok.png", "question": "What colour?", "answer": "red"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = yaml.safe_load(write_config(tmp_path).read_text())
    cfg["data"] = {"dataset": "manifest", "path": str(tmp_path / "m.jsonl")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("extract", tmp_path / "cfg.yaml", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    ds = open_store(tmp_path / "run" / "store.zarr")
    status = ds.status.sel(condition="original").values
    assert status.tolist() == [1, 2, 2, 1]
    errors = ds.error.sel(condition="original").values
    assert "missing.png" in errors[1] and "does not exist" in errors[1]
    assert "corrupt.png" in errors[2] and "cannot be read" in errors[2]
    # sample a's donor must be d (the only other loadable image): never its own, never a failed one
    assert int(ds.donor.values[0]) == 3 and int(ds.donor.values[3]) == 0
    assert np.isnan(ds.candidate_logprob.sel(condition="original").values[3]).all()  # open-ended


def test_resume_refuses_a_dataset_that_changed_under_the_store(tmp_path, capsys):
    """Same config (same manifest path), other data: an image edited on disk, or a question; the rerun
    must not mix the two datasets, and the store is left as it was."""
    for name, colour in (("r.png", (255, 0, 0)), ("g.png", (0, 255, 0))):
        Image.new("RGB", (40, 40), colour).save(tmp_path / name)
    rows = [{"id": i, "image": img, "question": "Is there a red shape?", "answer": a, "candidates": ["yes", "no"]}
            for i, img, a in (("a", "r.png", "yes"), ("b", "g.png", "no"))]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = yaml.safe_load(write_config(tmp_path, conditions=["original"]).read_text())
    cfg["data"] = {"dataset": "manifest", "path": str(manifest)}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["extract", str(tmp_path / "cfg.yaml"), "--out", str(out)]) == 0
    before = open_store(out / "store.zarr").load()
    Image.new("RGB", (40, 40), (0, 0, 255)).save(tmp_path / "g.png")
    assert main(["extract", str(tmp_path / "cfg.yaml"), "--out", str(out)]) == 1
    assert re.search("'image_sha256' of sample 'b' is '[0-9a-f]{64}' in the store", capsys.readouterr().err)
    Image.new("RGB", (40, 40), (0, 255, 0)).save(tmp_path / "g.png")
    rows[0]["question"] = "Is there a blue shape?"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["extract", str(tmp_path / "cfg.yaml"), "--out", str(out)]) == 1
    assert re.search("'question' of sample 'a' is 'Is there a red shape\\?' in the store", capsys.readouterr().err)
    rows[0]["question"] = "Is there a red shape?"
    manifest.write_text("\n".join(json.dumps(r) for r in rows[::-1]))  # same samples, another order
    assert main(["extract", str(tmp_path / "cfg.yaml"), "--out", str(out)]) == 1
    assert re.search(r"differ from position 0 \(store has \['a'\], this run has \['b'\]\)", capsys.readouterr().err)
    xr.testing.assert_identical(open_store(out / "store.zarr").load(), before)


def test_planning_decodes_each_image_once_and_gives_the_exact_mean_rgb(tmp_path, monkeypatch):
    from gapcache.config import load_config
    from gapcache.extract import data
    from gapcache.extract.runner import Extraction

    ex = Extraction(load_config(write_config(tmp_path, conditions=["original", "blind_mean"])), tmp_path / "r").load()
    calls = []
    load = data.Sample.load_image
    monkeypatch.setattr(data.Sample, "load_image", lambda self: calls.append(self.id) or load(self))
    planned = ex.plan(show=False)
    assert sorted(calls) == sorted(p.sample.id for p in planned)  # once each (blind_mean's mean included)
    monkeypatch.undo()
    assert ex.mean_rgb == data.mean_rgb([p.sample for p in planned if p.ok])  # the same floats, exactly


def test_check_prints_sites_and_writes_nothing(tmp_path):
    cfg = write_config(tmp_path)
    r = cli("extract", cfg, "--out", tmp_path / "run", "--check", 2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("visual      [") == 2 and "instruction" in r.stdout and "prediction" in r.stdout
    assert "one forward of a batch" in r.stdout
    assert not (tmp_path / "run").exists()


def test_dry_run_warns_when_disk_is_the_bottleneck(tmp_path):
    cfg = write_config(tmp_path, disk_bandwidth_mb_s=0.001, forward_seconds_per_batch=0.1)
    r = cli("extract", cfg, "--out", tmp_path / "run", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "original" in r.stdout and "WARNING: the store, not the model, is the bottleneck" in r.stdout
    assert not (tmp_path / "run").exists()


def test_info_json_keys_and_errors(tmp_path, capsys):
    cfg = write_config(tmp_path, conditions=["original"])
    out = tmp_path / "run"
    assert main(["extract", str(cfg), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out / "store.zarr"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {"schema_version", "model", "conditions", "n_samples", "complete"} <= set(d)
    assert d["n_samples"] == 24 and d["complete"] is True and d["model"]["family"] == "llava"
    from gapcache.store.codec import AUTO_COMPRESSION

    # the default compression (auto) made concrete for the stored items, shown by the text form too
    assert d["state_compression"] == AUTO_COMPRESSION[np.dtype(d["state_dtype"]).itemsize]
    assert main(["info", str(out / "store.zarr")]) == 0
    assert f"({d['state_encoding']}, {d['state_compression']})" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "nope.zarr")]) == 1
    assert "No gapcache store" in capsys.readouterr().err


def test_unknown_family_and_condition_on_the_command_line(tmp_path):
    cfg = yaml.safe_load(write_config(tmp_path).read_text())
    cfg["model"]["family"] = "blip2"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("extract", tmp_path / "bad.yaml", "--out", tmp_path / "run")
    assert r.returncode == 1 and "qwen3_vl_moe" in r.stderr and "blip2" in r.stderr
    cfg["model"]["family"] = "llava"
    cfg["extract"]["conditions"] = ["original", "blind_white"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("extract", tmp_path / "bad.yaml", "--out", tmp_path / "run")
    assert r.returncode == 1 and "blind_white" in r.stderr


@pytest.mark.parametrize("mode", ["subset", "pool"])
def test_visual_budget_is_recorded_and_matches_the_full_span(tmp_path, mode):
    full_cfg = write_config(tmp_path, conditions=["original"])
    assert main(["extract", str(full_cfg), "--out", str(tmp_path / "full")]) == 0
    cfg = write_config(tmp_path, conditions=["original"], visual={"mode": mode, "k": 5, "seed": 3})
    assert main(["extract", str(cfg), "--out", str(tmp_path / "budget")]) == 0
    from gapcache.store import visual_span

    full, small = open_store(tmp_path / "full" / "store.zarr"), open_store(tmp_path / "budget" / "store.zarr")
    assert small.attrs["visual"] == {"mode": mode, "k": 5, "seed": 3}
    assert (small.visual_length.values == 5).all()
    for i in range(3):
        f = visual_span(full, i).isel(visual_condition=0).values  # (16, layer, hidden)
        s = visual_span(small, i).isel(visual_condition=0)
        pos = s.vtoken_position.values
        if mode == "subset":
            assert len(set(pos)) == 5 and (np.diff(pos) > 0).all()
            np.testing.assert_allclose(s.values, f[pos], rtol=1e-5, atol=1e-6)
        else:
            assert pos.tolist() == [0, 4, 7, 10, 13]  # np.array_split(16, 5) group starts
            bounds = pos.tolist() + [16]
            want = np.stack([f[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])])
            np.testing.assert_allclose(s.values, want, rtol=1e-5, atol=1e-6)


def test_generation_is_recorded_when_enabled(tmp_path):
    cfg = write_config(tmp_path, conditions=["original", "truncated"], truncation_layers=[0],
                       truncation_strategies=["zero"], generate={"enabled": True, "max_new_tokens": 3})
    assert main(["extract", str(cfg), "--out", str(tmp_path / "g")]) == 0
    ds = open_store(tmp_path / "g" / "store.zarr")
    gens = ds.generation.sel(condition="original").values
    assert all(isinstance(g, str) for g in gens) and any(len(g) > 0 for g in gens)
    trunc = ds.generation.sel(condition="truncated_zero_L0").values
    assert any(len(g) > 0 for g in trunc) and (trunc != gens).any()  # generated with the hooks on
    # the pipeline scores them (synthetic: "exact"), per condition, paired vs original, and as a truncation curve
    from gapcache.analyze.generation import rows
    from gapcache.analyze.pipeline import AnalysisParams, analyze_store
    from gapcache.analyze.scoring import score_generation

    summary, results = analyze_store(ds, AnalysisParams(metrics=("accuracy", "generation"), n_resamples=99))
    g = summary["metrics"]["generation"]
    assert g["tasks"] == ["exact"] and set(g["per_condition"]) == {"original", "truncated_zero_L0"}
    golds = [[str(a)] for a in ds.answer.values]
    want = np.mean([score_generation("exact", x, gl) for x, gl in zip(gens, golds)])
    assert g["per_condition"]["original"]["estimate"] == pytest.approx(want)
    assert g["truncation"]["zero"]["layers"] == [0] and g["truncation"]["zero"]["n"] == len(gens)
    assert g["vs_original"]["truncated_zero_L0"]["n"] == len(gens)
    assert results.generation_score.dims == ("condition", "sample")
    assert any(label.startswith("generation score original") for label, _ in rows(summary))


def test_every_gold_answer_is_stored_and_score_store_scores_each_condition(tmp_path):
    """The ragged gold lists round-trip (JSON per sample), the task follows each sample's dataset, and
    score_store equals score_generation on the raw (unstripped) stored generations."""
    from gapcache.analyze.scoring import score_generation, score_store
    from gapcache.store import gold_answers

    img = tmp_path / "ok.png"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(img)
    golds = [["yes"] * 7 + ["no"] * 3, ["John Smith", "J. Smith"], ["12"], ["red", "Red", "rouge, \"pur\""]]
    datasets = ["vqav2", "docvqa", "chartqa", "textvqa"]
    rows = [{"id": f"s{i}", "image": "ok.png", "question": "What is it?", "answer": g, "dataset": d}
            for i, (g, d) in enumerate(zip(golds, datasets))]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = yaml.safe_load(write_config(tmp_path, conditions=["original", "blind_black"],
                                      generate={"enabled": True, "max_new_tokens": 3}).read_text())
    cfg["data"] = {"dataset": "manifest", "path": str(tmp_path / "m.jsonl")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["extract", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 0
    ds = open_store(tmp_path / "run" / "store.zarr")
    assert gold_answers(ds) == golds
    assert [str(a) for a in ds.answer.values] == ["yes", "John Smith", "12", "red"]  # the most common one
    scores = score_store(ds)
    assert scores.dims == ("condition", "sample") and scores.shape == (2, 4)
    gens = np.asarray(ds.generation.values, dtype=object)
    for k in range(2):
        for i in range(4):
            assert scores.values[k, i] == score_generation(datasets[i], gens[k, i], golds[i])
    assert sorted(scores.attrs["tasks"]) == sorted(datasets)
    # a per-dataset override, and an unknown task refused
    forced = score_store(ds, tasks={"chartqa": "exact"})
    assert forced.values[0, 2] == score_generation("exact", gens[0, 2], ["12"])
    with pytest.raises(ConfigError, match="The 'tasks' parameter of score_store"):
        score_store(ds, tasks={"vqav2": "mmmu"})


@pytest.mark.parametrize("strategy", strategies_of("truncated"))
def test_generation_under_truncation_is_the_truncated_models_greedy_continuation(tmp_path, strategy):
    """The hooks act at every decoding step, with left padding (batch of 4) and without (batch of 1, where
    SDPA may pass no mask); the families test runs the same check on every supported architecture."""
    from gapcache.config import load_config
    from gapcache.extract.runner import Extraction

    cfg = write_config(tmp_path, conditions=["truncated"], truncation_layers=[0], truncation_strategies=[strategy],
                       generate={"enabled": True, "max_new_tokens": 4})
    ex = Extraction(load_config(cfg), tmp_path / "r").load()
    ex.plan(show=False)
    cond = next(c for c in ex.conditions if c.kind == "truncated")
    assert_greedy_under_truncation(ex, cond, ([0, 1, 2, 3], [5]))


def test_logit_lens_from_the_store_matches_the_models_own_scores(tmp_path):
    """At the last layer, the CPU lens (stored norm + unembedding rows) reproduces the logits."""
    cfg = write_config(tmp_path, conditions=["original"])
    assert main(["extract", str(cfg), "--out", str(tmp_path / "run")]) == 0
    ds = open_store(tmp_path / "run" / "store.zarr")
    h = ds.text_states.sel(condition="original", site="prediction").isel(layer=-1).values  # (sample, hidden)
    w, eps = ds.lens_norm_weight.values, ds.lens_norm_weight.attrs["eps"]
    normed = w * h / np.sqrt((h.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps)
    logits = normed @ ds.lens_unembed.values.T  # (sample, lens_token)
    which = ds.candidate_lens_token.values
    prefix = ds.candidate_prefix_tokens.values
    cand = ds.candidate_logprob.sel(condition="original").values
    checked = 0
    for i in range(len(h)):
        cols = np.flatnonzero(which[i] >= 0)
        if prefix[i] or len(cols) < 2:
            continue
        lens = logits[i, which[i, cols]]
        # log-probs differ from logits by the log-partition; differences between candidates are equal
        np.testing.assert_allclose(np.diff(lens), np.diff(cand[i, cols]), rtol=1e-3, atol=1e-4)
        checked += 1
    assert checked >= 5


def test_tasks_of_an_array_split_the_units_and_give_the_same_store(tmp_path):
    cfg = write_config(tmp_path)
    assert main(["extract", str(cfg), "--out", str(tmp_path / "one")]) == 0
    procs = [subprocess.Popen([sys.executable, "-m", "gapcache.cli", "extract", str(cfg), "--out", str(tmp_path / "arr"),
                               "--task-index", str(i), "--n-tasks", "3"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err
    assert info(tmp_path / "arr" / "store.zarr")["complete"]
    assert not list((tmp_path / "arr").glob(".store.zarr.*.tmp"))  # losers of the creation race cleaned up
    assert not list((tmp_path / "arr" / "locks").glob("*.lock"))
    assert_stores_equal(tmp_path / "one" / "store.zarr", tmp_path / "arr" / "store.zarr")


def test_second_task_on_the_same_shard_refuses(tmp_path):
    from gapcache.errors import StoreLockedError
    from gapcache.store.locks import ShardLocks

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "locks").mkdir()
        (tmp_path / "locks" / "original.shard00000.lock").write_text(
            json.dumps({"host": os.uname().nodename, "pid": other.pid, "job": "", "array_task": ""}))
        with pytest.raises(StoreLockedError, match="being written by another task.*delete the lock"):
            ShardLocks(tmp_path / "locks").acquire("original.shard00000")
    finally:
        other.kill()
        other.wait()
    with ShardLocks(tmp_path / "locks") as locks:  # the owner is dead now: the stale lock is taken over
        locks.acquire("original.shard00000")
        owner = json.loads((tmp_path / "locks" / "original.shard00000.lock").read_text())
        assert owner["pid"] == os.getpid()
        # an empty lock (a task killed between creating the file and writing its owner, as locks were
        # taken before they were created whole) has no owner to wait for: taken over too
        (tmp_path / "locks" / "original.shard00001.lock").write_text("")
        locks.acquire("original.shard00001")
        assert json.loads((tmp_path / "locks" / "original.shard00001.lock").read_text())["pid"] == os.getpid()
        assert (tmp_path / "locks" / "original.shard00000.lock").is_file()
    assert not list((tmp_path / "locks").iterdir())  # released, and no temporary file left


def test_multi_token_candidates_are_scored_exactly_and_no_sample_fails(tmp_path):
    """Candidates that share tokens or need several ('1' / '10', 'red' / 'red car') are each scored
    by the teacher-forced log-prob of their full continuation: equal to a batch-1 reference forward."""
    import torch

    from gapcache.config import load_config
    from gapcache.extract.runner import Extraction

    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "ok.png")
    cands = ["1", "10", "red", "red car", "yes"]
    rows = [{"id": f"s{i}", "image": "ok.png", "question": "What is it?", "answer": a, "candidates": cands}
            for i, a in enumerate(["1", "10", "red car", "yes", "red"])]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = yaml.safe_load(write_config(tmp_path, conditions=["original", "blind_black"]).read_text())
    cfg["data"] = {"dataset": "manifest", "path": str(tmp_path / "m.jsonl")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    ex = Extraction(load_config(tmp_path / "cfg.yaml"), tmp_path / "run").load()
    ex.plan(show=False)
    assert all(p.ok for p in ex.planned) and any(p.cand_extra for p in ex.planned)
    ex.run(show=False)
    ds = open_store(ex.store_path)
    assert (ds.status.values == 1).all()
    assert "exact" in ds.attrs["candidate_scoring"]
    tok = ex.processor.tokenizer
    for cond in ex.conditions:
        got = ds.candidate_logprob.sel(condition=cond.label).values
        for i, p in enumerate(ex.planned):
            base = ex.processor(text=[p.prompt], images=[ex.condition_image(i, cond)], return_tensors="pt")
            for c, seq in zip(p.cand_columns, p.cand_seqs):
                assert seq == tok(ex.adapter.answer_prefix + str(ds.candidate.values[c]),
                                  add_special_tokens=False)["input_ids"]
                ids = torch.cat([base["input_ids"], torch.tensor([seq])], dim=1)
                inputs = {**base, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
                with torch.no_grad(), ex.intervention([p], cond, inputs, offsets=[0]):
                    logp = torch.log_softmax(ex.model(**inputs).logits[0].float(), -1)
                want = sum(float(logp[p.prediction + t, s]) for t, s in enumerate(seq))
                assert got[i, c] == pytest.approx(want, abs=2e-4), (cond.label, p.sample.id, c)


def _manifest_config(tmp_path, rows, **extract):
    """A config over a JSONL manifest of ``rows`` (every image ok.png, a red 40 px square)."""
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = yaml.safe_load(write_config(tmp_path, conditions=["original"]).read_text())
    cfg["data"] = {"dataset": "manifest", "path": str(tmp_path / "m.jsonl")}
    cfg["extract"].update(extract)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "cfg.yaml"


def test_surface_variants_are_pooled_by_logsumexp_of_exact_logprobs(tmp_path):
    """candidate_variants [case, space]: each candidate's score is the logsumexp of the exact teacher-forced
    log-probs of its distinct variants (yes, Yes, YES, ' yes', ...), each checked against a batch-1 forward;
    the store records the rules and the variants; the gold log-prob stays the as-written answer's."""
    import torch
    from scipy.special import logsumexp

    from gapcache.config import load_config
    from gapcache.extract.runner import Extraction

    cands = ["no", "red car", "yes"]
    rows = [{"id": f"s{i}", "image": "ok.png", "question": "Is it red?", "answer": a, "candidates": cands}
            for i, a in enumerate(["yes", "no", "red car"])]
    ex = Extraction(load_config(_manifest_config(tmp_path, rows, candidate_variants=["case", "space"])),
                    tmp_path / "run").load()
    ex.plan(show=False)
    ex.run(show=False)
    ds = open_store(ex.store_path)
    rec = ds.attrs["candidate_variants"]
    assert rec["rules"] == ["case", "space"] and "logsumexp" in rec["pooling"]
    assert rec["variants"]["yes"][:3] == ["yes", "Yes", "YES"] and rec["variants"]["red car"][0] == "red car"
    tok = ex.processor.tokenizer
    got = ds.candidate_logprob.sel(condition="original").values
    for i, p in enumerate(ex.planned):
        base = ex.processor(text=[p.prompt], images=[ex.condition_image(i, ex.conditions[0])], return_tensors="pt")

        def exact(text):
            seq = tok(ex.adapter.answer_prefix + text, add_special_tokens=False)["input_ids"]
            ids = torch.cat([base["input_ids"], torch.tensor([seq])], dim=1)
            with torch.no_grad():
                logp = torch.log_softmax(ex.model(**{**base, "input_ids": ids,
                                                     "attention_mask": torch.ones_like(ids)}).logits[0].float(), -1)
            return sum(float(logp[p.prediction + t, s]) for t, s in enumerate(seq))

        for c, cand in enumerate(ds.candidate.values):
            variants = rec["variants"][str(cand)]
            assert len(variants) > 1
            assert got[i, c] == pytest.approx(logsumexp([exact(v) for v in variants]), abs=3e-4), (p.sample.id, cand)
        assert float(ds.gold_logprob.sel(condition="original").values[i]) == pytest.approx(
            exact(p.sample.answer), abs=3e-4)


def test_candidates_that_share_a_surface_variant_are_refused(tmp_path):
    """'yes' and 'Yes' under the case rule would pool to the same score: a ConfigError naming both."""
    from gapcache.config import load_config
    from gapcache.extract.runner import Extraction

    rows = [{"id": "s0", "image": "ok.png", "question": "Is it red?", "answer": "yes", "candidates": ["Yes", "yes"]}]
    ex = Extraction(load_config(_manifest_config(tmp_path, rows, candidate_variants=["case"])), tmp_path / "run").load()
    with pytest.raises(ConfigError, match=r"'Yes' and 'yes' share the surface variant"):
        ex.plan(show=False)
    assert not (tmp_path / "run" / "store.zarr").exists()
