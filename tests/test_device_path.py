"""The device side of extraction (issue 15): states gathered, pooled and stacked on the model's device and
copied to the host once (page-locked and non-blocking on CUDA; on CPU the same calls make plain copies),
scores gathered on the device, shard buffers reused from a pool that the writer gives back to.

On CPU these check, byte for byte, that the results are those of the former host-side path: every
layer's states moved to the host, pooled there group by group, the full log-softmax read on the host."""

import numpy as np
import pytest
import torch
import yaml

from gapcache.conditions import Condition
from gapcache.config import load_config
from gapcache.extract.hooks import Capture
from gapcache.extract.runner import Extraction
from gapcache.extract.shardbuf import ShardBuffers
from gapcache.extract.transfer import HostPool, Transfer, as_storage, host_empty
from gapcache.sites import POSITION_SITES
from gapcache.store import Layout, ShardPayload, StoreWriter, codec, create, open_store, visual_span
from gapcache.store.schema import SITES


def config(tmp_path, dtype="float32", **extract):
    return load_config(yaml.safe_load(yaml.safe_dump({
        "name": "t",
        "model": {"family": "llava", "id": "builtin:tiny-llava", "dtype": dtype},
        "data": {"dataset": "synthetic", "split": "test", "options": {"n": 10, "image_size": 32, "seed": 1}},
        "extract": {"conditions": ["original", "truncated"], "truncation_layers": [0], "batch_size": 3,
                    "samples_per_shard": 2, **extract},
    })))


def old_storage(t):
    """The former ``Extraction.to_storage``."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@torch.inference_mode()
def former_forward(ex, indices, cond):
    """Today's results by the former host-side path (per layer .cpu(), pooling group by group on the host)."""
    P = [ex.planned[i] for i in indices]
    inputs = ex.batch_inputs(indices, cond)
    text_idx, vis_idx = ex.site_indices(indices)
    keep = sorted({p.prediction + t for p in P for t in range(len(p.answer_ids))})
    with Capture(ex.adapter.decoder_layers(ex.model), ex.adapter.final_norm(ex.model), ex.record) as cap, \
            ex.intervention(P, cond, inputs, offsets=[0] * len(P)):
        cap.set_groups({"text": text_idx, "visual": vis_idx if cond.records_visual else None})
        out = ex.model(**inputs, use_cache=False, logits_to_keep=torch.tensor(keep))
        got = {name: torch.stack([seen[i].cpu() for i in cap.record], dim=1) for name, seen in cap._seen.items()}
    logp = torch.log_softmax(out.logits.float(), dim=-1).cpu()
    col = {pos: c for c, pos in enumerate(keep)}
    results, off, n_sites = [], 0, len(SITES)
    for r, (i, p) in enumerate(zip(indices, P)):
        gold = sum(float(logp[r, col[p.prediction + t], tok]) for t, tok in enumerate(p.answer_ids))
        cand = np.full(len(ex.candidates), np.nan, np.float32)
        for c, seq in zip(p.cand_columns, p.cand_seqs):
            head = len(seq) - 1
            prefix = sum(float(logp[r, col[p.prediction + t], p.answer_ids[t]]) for t in range(head))
            cand[c] = prefix + logp[r, col[p.prediction + head], seq[head]].numpy()
        res = {"text_states": old_storage(got["text"][r * n_sites : (r + 1) * n_sites]), "gold_logprob": gold,
               "candidate_logprob": cand}
        if "visual" in got:
            sel = ex.visual_select[i]
            n = sum(len(g) for g in sel) if isinstance(sel, list) else len(sel)
            chunk = got["visual"][off : off + n]
            off += n
            if isinstance(sel, list):
                bounds = np.cumsum([0] + [len(g) for g in sel])
                chunk = torch.stack([chunk[a:b].float().mean(0).to(chunk.dtype) for a, b in zip(bounds[:-1], bounds[1:])])
            res["visual_states"] = old_storage(chunk)
        results.append(res)
    return results


def same_bytes(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("visual", [{"mode": "all"}, {"mode": "subset", "k": 5, "seed": 2}, {"mode": "pool", "k": 5}])
def test_forward_and_store_hold_the_former_bytes(tmp_path, dtype, visual):
    ex = Extraction(config(tmp_path, dtype, visual=visual), tmp_path / "out").load()
    ex.plan(show=False)
    assert all(p.ok and not p.cand_extra for p in ex.planned) and ex.model.dtype == getattr(torch, dtype)
    ex.run(show=False)
    ds = open_store(ex.store_path)
    enc = "bfloat16" if dtype == "bfloat16" else "none"
    for cond, batch in [(c, list(ex.layout().shard_samples(k))) for c in ex.conditions for k in (0, 3)]:
        want, got = former_forward(ex, batch, cond), ex.forward(batch, cond)  # the run's batches (same padding)
        assert [sorted(g) for g in got] == [sorted(w) for w in want]
        for i, w, g in zip(batch, want, got):
            for name in w:
                assert same_bytes(g[name], w[name]), (cond.label, name)
            stored = ds.text_states.sel(condition=cond.label).values[i]  # decoded: exact for bf16
            assert same_bytes(stored, codec.decode(w["text_states"], enc))
            assert ds.gold_logprob.sel(condition=cond.label).values[i] == np.float32(w["gold_logprob"])
            if "visual_states" in w:
                v = visual_span(ds, i).sel(visual_condition=cond.label).values
                assert same_bytes(v, codec.decode(w["visual_states"], enc))


def test_the_pool_reuses_shard_buffers_once_the_writer_releases_them(tmp_path):
    ex = Extraction(config(tmp_path), tmp_path / "out").load()
    ex.plan(show=False)
    ex.run(show=False)
    n_units = len(ex.conditions) * ex.layout().n_shards
    assert n_units == 15  # original, truncated zero and drop at L 0; 5 shards
    # two state arrays (text, visual); the writer holds at most 5 payloads at once (2 queued, 1 taken and waiting
    # for a slot, 1 staged, 1 committing) and one more is being filled
    assert 2 <= ex.host_pool.made <= 2 * 6 < 2 * n_units
    assert (open_store(ex.store_path).status.values == 1).all()


def test_undone_rows_of_a_reused_buffer_are_filled_not_left_from_the_last_shard(tmp_path):
    layout = Layout(sample_ids=("a", "b", "c", "d"), conditions=(Condition("original"),), layers=(0, 1), hidden=3,
                    model_dtype="bfloat16", candidates=("yes", "no"), visual_lengths=(2, 3, 1, 4),
                    samples_per_shard=2, visual_chunk_tokens=2)
    pool = HostPool("cpu")
    names = ["text_states", "visual_states", "gold_logprob", "candidate_logprob", "status", "error"]
    sizes = layout.sizes()
    first = ShardBuffers(pool, names, sizes, layout, [0, 1], "bfloat16")
    for name in ("text_states", "visual_states"):
        first.tensors[name].fill_(7.0)
    first.release()
    assert pool.made == 2
    second = ShardBuffers(pool, names, sizes, layout, [2, 3], "bfloat16")  # 5 visual rows fit in the 5 freed ones
    assert pool.made == 2
    second.rows("visual_states", 3, 4).copy_(torch.full((4, 2, 3), 2.0))
    second.rows("text_states", 3, len(POSITION_SITES)).copy_(torch.full((len(SITES), 2, 3), 2.0))
    p = second.payload(0, 1, np.array([False, True]))  # sample c failed
    text, vis = codec.decode_bf16(p.values["text_states"]), codec.decode_bf16(p.values["visual_states"])
    assert (text[0] == 0).all() and (text[1] == 2).all()
    assert (vis[:1] == 0).all() and (vis[1:] == 2).all() and vis.shape == (5, 2, 3)
    third = ShardBuffers(pool, names, sizes, layout, [0, 1], "bfloat16")  # second not released yet: a new one
    assert pool.made == 4 and third.values["visual_states"].shape == (5, 2, 3)


def test_the_writer_releases_each_payload_once_after_writing_it_or_on_error(tmp_path):
    layout = Layout(sample_ids=("a", "b"), conditions=(Condition("original"),), layers=(0,), hidden=4,
                    model_dtype="float32", candidates=("yes", "no"), visual_lengths=(1, 1), samples_per_shard=2,
                    visual_chunk_tokens=2)
    create(tmp_path / "s.zarr", layout, {}, {"label": np.zeros(2, np.int32)})
    seen = []

    def payload(vis_rows):
        return ShardPayload(0, 0, {"text_states": np.ones((2, 2, 1, 4), np.float32),
                                   "visual_states": np.ones((vis_rows, 1, 4), np.float32),
                                   "status": np.ones(2, np.uint8)},
                            on_release=lambda: seen.append(open_store(tmp_path / "s.zarr").status.values.tolist()))

    with StoreWriter(tmp_path / "s.zarr") as w:
        w.submit(payload(2))
    assert seen == [[[1, 1]]]  # once, after the flags were written
    w = StoreWriter(tmp_path / "s.zarr")
    w.submit(payload(9))  # too many visual rows: staging fails
    with pytest.raises(Exception, match="visual_states"):
        w.close()
    assert len(seen) == 2


def test_transfer_on_cpu_is_a_plain_copy_into_ordinary_memory():
    t = Transfer("cpu")
    assert t.stream is None
    src = torch.randn(4, 3).to(torch.bfloat16)
    dst = host_empty(src.shape, src.dtype, "cpu")
    assert not dst.is_pinned()
    t.begin()
    t.copy(dst, src)
    t.end()
    t.wait()
    assert t.event is None and same_bytes(as_storage(dst), old_storage(src))


def test_pooling_on_the_device_equals_the_former_group_by_group_mean(tmp_path):
    ex = Extraction(config(tmp_path, visual={"mode": "pool", "k": 5}), tmp_path / "out").load()
    ex.plan(show=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, k in [(16, 5), (16, 16), (7, 3), (5, 5)]:
            sel = np.array_split(np.arange(n), k)
            ex.visual_select = [sel, sel[:1]]  # a second sample with one group
            vis = (torch.randn(n + len(sel[0]), 3, 8) * 50).to(dtype)
            rows, counts = ex.pool_visual([0, 1], vis)
            want = []
            for chunk, groups in ((vis[:n], sel), (vis[n:], sel[:1])):
                bounds = np.cumsum([0] + [len(g) for g in groups])
                want += [chunk[a:b].float().mean(0).to(dtype) for a, b in zip(bounds[:-1], bounds[1:])]
            assert counts == [k, 1] and same_bytes(rows.float().numpy(), torch.stack(want).float().numpy())


class _Add(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, hidden_states):
        return hidden_states + self.k


def test_capture_gathers_h_rows_pos_exactly_and_reuses_its_cpu_stacks():
    """The hook's index_select on the flattened stream is ``h[rows, pos]`` bit for bit; with ``buffers`` the
    CPU stack of a group is written into one tensor batch after batch (no fresh tens-of-MB allocation and its
    page faults), a new shape gets its own; without ``buffers`` every stack is new."""
    layers = [_Add(k) for k in range(3)]
    norm = _Add(10)
    rows, pos = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 3, 0, 4])
    buffers, got = {}, []
    for seed in (0, 1):
        h = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(seed))  # (batch, seq, hidden)
        with Capture(layers, norm, [0, 1, 3], buffers) as cap:
            cap.set_groups({"visual": (rows, pos)})
            x = h
            for m in layers + [norm]:
                x = m(x)
            st = cap.stacked()["visual"]  # (n, layer, hidden)
        expect = torch.stack([h[rows, pos], (h + 0)[rows, pos], (h + 0 + 1 + 2)[rows, pos]], dim=1)  # inputs of 0, 1, norm
        assert torch.equal(st, expect)
        got.append(st.data_ptr())
    assert got[0] == got[1] and len(buffers) == 1  # the same memory for both batches
    with Capture(layers, norm, [0, 1], buffers) as cap:  # two layers: another shape, another buffer
        cap.set_groups({"visual": (rows, pos)})
        x = torch.zeros(3, 5, 4)
        for m in layers + [norm]:
            x = m(x)
        assert cap.stacked()["visual"].data_ptr() not in got and len(buffers) == 2
    with Capture(layers, norm, [0], None) as cap:
        cap.set_groups({"visual": (rows, pos)})
        layers[0](torch.zeros(3, 5, 4))
        a = cap.stacked()["visual"]
        b = cap.stacked()["visual"]
        assert a.data_ptr() != b.data_ptr()


def test_loading_an_extraction_keeps_freed_activations_for_reuse(tmp_path, monkeypatch):
    """Extraction.load tunes glibc's malloc (gapcache.malloc: a CPU forward's activations are not faulted in again
    each batch); the settings themselves are tested in tests/test_workers.py."""
    from gapcache.extract import runner

    calls = []
    monkeypatch.setattr(runner, "tune_malloc", lambda: calls.append(1) or True)
    Extraction(config(tmp_path), tmp_path / "out").load()
    assert calls == [1]
