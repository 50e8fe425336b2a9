"""Shared test helpers: a roundtrip() for every writer (xarray backends style), store equality, free ports."""

from __future__ import annotations

import socket

import numpy as np

from gapcache.conditions import expand
from gapcache.store import Layout, ShardPayload, StoreWriter, create, open_store
from gapcache.store import codec


def small_layout(dtype="float32", lengths=(3, 4, 0, 2, 5), spc=2, candidates=("no", "yes")):
    return Layout(
        sample_ids=tuple(f"s{i}" for i in range(len(lengths))),
        conditions=tuple(expand(["original", "blind_black", "truncated"], [0], ["zero"])),
        layers=(0, 1, 2), hidden=4, model_dtype=dtype, candidates=candidates,
        visual_lengths=tuple(lengths), samples_per_shard=spc, visual_chunk_tokens=4,
    )


def random_payloads(layout: Layout, seed=0, scale=1.0):
    """One payload per (condition, shard) with random values, in storage dtype; and the truth."""
    rng = np.random.default_rng(seed)
    dtype, enc = codec.storage_for(layout.model_dtype)
    nl, h, k = len(layout.layers), layout.hidden, len(layout.candidates)
    out = []
    for ci, cond in enumerate(layout.conditions):
        for shard in range(layout.n_shards):
            idx = list(layout.shard_samples(shard))
            ntok = sum(layout.visual_lengths[i] for i in idx)
            text = (rng.standard_normal((len(idx), 2, nl, h)) * scale).astype(np.float32)
            vis = (rng.standard_normal((ntok, nl, h)) * scale).astype(np.float32) if cond.records_visual else None
            enc_fn = codec.encode_bf16 if enc == "bfloat16" else (lambda a: a.astype(dtype))
            out.append(ShardPayload(
                ci, shard, enc_fn(text), None if vis is None else enc_fn(vis),
                rng.standard_normal(len(idx)).astype(np.float32),
                rng.standard_normal((len(idx), k)).astype(np.float32),
                np.ones(len(idx), np.uint8), np.array([""] * len(idx), dtype=object),
            ))
    return out


def roundtrip(path, layout: Layout, payloads, meta=None):
    """Create, write every payload through the background writer, reopen decoded."""
    meta = meta or {"question": np.array([f"q{i}" for i in range(layout.n_samples)], dtype=object)}
    create(path, layout, {"model": {"id": "test"}}, meta)
    with StoreWriter(path) as w:
        for p in payloads:
            w.submit(p)
    return open_store(path)


def assert_stores_equal(a, b):
    """Every array of the two stores, value by value (raw storage values, read with zarr: fast)."""
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = sorted(n for n, _ in ga.arrays())
    assert names == sorted(n for n, _ in gb.arrays())
    for name in names:
        va, vb = ga[name][...], gb[name][...]
        if va.dtype.kind == "f":
            np.testing.assert_array_equal(va, vb, err_msg=name)
        else:
            assert va.shape == vb.shape and (va == vb).all(), name


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on 127.0.0.1 right now (all held open together while choosing)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def assert_greedy_under_truncation(ex, cond, batches):
    """Each token ``ex.generate_ids`` generates under the truncated ``cond`` is the argmax of a teacher-forced
    forward (no cache, one unpadded row) of prompt + the tokens before it under the same intervention."""
    import torch

    eos = ex.processor.tokenizer.eos_token_id
    image_token = ex.planner.image_token_id
    for batch in batches:
        gen = ex.generate_ids(batch, cond)  # (batch, new tokens)
        for row, i in enumerate(batch):
            p = ex.planned[i]
            ids = gen[row].tolist()
            ids = ids[: ids.index(eos) + 1] if eos in ids else ids
            # random weights can emit the image placeholder: a prompt holding it would need another image
            ids = ids[: ids.index(image_token) + 1] if image_token in ids else ids
            with torch.inference_mode():
                inputs = ex.processor(text=[p.prompt], images=[ex.condition_image(i, cond)], return_tensors="pt")
                n = inputs["input_ids"].shape[1]
                for key in [k for k, v in inputs.items() if torch.is_tensor(v) and v.shape[:2] == (1, n)]:
                    extra = torch.tensor([ids[:-1]]) if key == "input_ids" else \
                        torch.full((1, len(ids) - 1), int(key == "attention_mask"), dtype=inputs[key].dtype)
                    inputs[key] = torch.cat([inputs[key], extra], dim=1)  # text positions (token type 0)
                with ex.intervention([p], cond, inputs, offsets=[0]):
                    logits = ex.model(**inputs, use_cache=False).logits[0]  # (seq, vocab)
            want = logits[p.prediction : p.prediction + len(ids)].argmax(-1).tolist()
            assert ids == want, (cond.label, batch, i, ids, want)
