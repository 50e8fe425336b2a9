"""Shared test helpers: a roundtrip() for every writer (xarray backends style), store equality, free ports."""

from __future__ import annotations

import socket

import numpy as np

from gapcache.conditions import expand
from gapcache.store import Layout, ShardPayload, StoreWriter, create, open_store
from gapcache.store import arrays, codec


def small_layout(dtype="float32", lengths=(3, 4, 0, 2, 5), spc=2, candidates=("no", "yes"), routing=()):
    """``routing=(router layers, experts, top-k)`` adds the optional MoE routing arrays."""
    return Layout(
        sample_ids=tuple(f"s{i}" for i in range(len(lengths))),
        conditions=tuple(expand(["original", "blind_black", "truncated"], [0], ["zero"])),
        layers=(0, 1, 2), hidden=4, model_dtype=dtype, candidates=candidates,
        visual_lengths=tuple(lengths), samples_per_shard=spc, visual_chunk_tokens=4, routing=tuple(routing),
    )


def random_values(spec, shape, rng, model_dtype, scale=1.0):
    """Random values of a declared array in its storage dtype (states: encoded as the store encodes them)."""
    if spec.is_state:
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        dtype, enc = codec.storage_for(model_dtype)
        return codec.encode_bf16(x) if enc == "bfloat16" else x.astype(dtype)
    dtype = spec.numpy_dtype(model_dtype)
    if dtype == object:
        return rng.choice(np.array(["", "a", "yes", "no"], dtype=object), size=shape)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    return rng.integers(0, 3, size=shape).astype(dtype)


def random_payloads(layout: Layout, seed=0, scale=1.0):
    """One payload per (condition, shard) with random values of every declared unit array that every unit writes
    (status: all done, error: ''), in storage dtype."""
    rng = np.random.default_rng(seed)
    sizes = layout.sizes()
    for spec in arrays.specs((arrays.UNIT, arrays.VUNIT)):  # optional arrays' own dims: 2, as creation_values
        for d in spec.dims:
            sizes.setdefault(d, 2)
    out = []
    for ci, cond in enumerate(layout.conditions):
        for shard in range(layout.n_shards):
            idx = list(layout.shard_samples(shard))
            values = {}
            for spec in arrays.specs((arrays.UNIT, arrays.VUNIT)):
                if (spec.along == arrays.VUNIT and not arrays.SPANS[spec.span].recorded_by(cond)) or not spec.every_unit:
                    continue
                if not spec.required and not set(spec.dims) <= set(sizes):  # an optional array the layout lacks
                    continue
                lead = len(idx) if spec.along == arrays.UNIT else sum(layout.spans[spec.span].lengths[i] for i in idx)
                values[spec.name] = random_values(spec, (lead, *arrays.unit_row_shape(spec, sizes)), rng,
                                                  layout.model_dtype, scale)
            values["status"] = np.ones(len(idx), np.uint8)
            values["error"] = np.array([""] * len(idx), dtype=object)
            out.append(ShardPayload(ci, shard, values))
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


def ragged_samples(n: int, wide=(96, 64)):
    """n synthetic samples; every odd one's image resized to ``wide`` (ragged Qwen visual spans)."""
    import dataclasses

    from PIL import Image

    from gapcache.extract.data import load_dataset

    samples = load_dataset("synthetic", n=n, image_size=64)
    return [s if i % 2 == 0 else dataclasses.replace(s, image=s.load_image().resize(wide, Image.Resampling.BICUBIC))
            for i, s in enumerate(samples)]


def allowed_keys(mask, q_len, attn_2d):
    """(batch, q, kv) bool: which keys each query may attend to, from a layer's attention_mask kwarg."""
    import torch

    if mask is None:
        causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
        return causal[None] & attn_2d.bool()[:, None, :]
    keep = mask if mask.dtype == torch.bool else mask == 0
    return keep[:, 0] if keep.dim() == 4 else keep


#: summary keys that hold wall times or where the analysis ran, not results
WALL_CLOCK_KEYS = ("timing_s", "seconds")


def comparable_summary(summary) -> str:
    """``summary`` (a summary dict) as canonical JSON (sorted keys, NaN written as NaN so that two NaNs compare
    equal), without its wall times (``timing_s``, the probes' per-layer ``seconds``) and the ``scheduler`` and
    ``jobs`` parameters: what two runs of one analysis on different schedulers or workers must share exactly."""
    import json

    from gapcache.analyze.stats import jsonable

    def strip(v):
        if isinstance(v, dict):
            return {k: ("" if k in ("scheduler", "jobs") else strip(x)) for k, x in v.items() if k not in WALL_CLOCK_KEYS}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return json.dumps(strip(jsonable(summary)), sort_keys=True, allow_nan=True, indent=1)
