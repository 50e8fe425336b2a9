"""Effective rank of hidden-state matrices (Roy & Vetterli 2007). numpy/xarray/dask only, no torch.

For a matrix H (tokens x hidden), centred over tokens (Hc = H - mean over rows), with singular
values s_1 >= s_2 >= ... ::

    p_i = s_i / sum_j s_j            over the nonzero s_i
    ER  = exp(-sum_i p_i log p_i)

"Nonzero" is ``s_i > rtol * s_1`` with ``rtol = sqrt(max(tokens, hidden) * eps)`` by default
(eps = float64 machine epsilon). That is numpy's ``matrix_rank`` rule (tolerance max(shape) * eps)
applied to the eigenvalues of the Gram matrix Hc Hc^T, i.e. the numerical floor of the Gram path;
the SVD path uses the same rule so that both paths count the same singular values. Values below
it change ER by less than about 1e-5 each.

A singular value must also exceed an absolute floor, the rounding residue that centring can leave:
``atol = t * eps * ||H||_F`` (t valid tokens, ||H||_F the Frobenius norm of the *uncentred* valid
rows). Without it a constant span whose value is not exactly representable (0.1, or any real
hidden state repeated) keeps a residue singular value ~1e-14 that the relative cut alone accepts
(it is its own s_1), so ER came out 1.0. The floor is ~1e-13 relative to the data's scale, far
below any real spread (a span constant up to noise 1e-6 keeps its exact ER; ``tests/test_rank.py``).

A matrix with no nonzero singular value (a constant H, hence Hc = 0 up to rounding, or a single
token) has ER = 0.0, its rank; a sample without visual tokens gets NaN.

Usage::

    from gapcache.analyze.rank import effective_rank, visual_effective_rank, text_effective_rank, er_ratio
    er = effective_rank(h)                     # h: (..., tokens, hidden) -> (...)
    ds = open_store("run/store.zarr")
    er_vis = visual_effective_rank(ds)          # (visual_condition, sample, layer), lazy
    er_txt = text_effective_rank(ds.text_states)  # (condition, site, layer): across samples
    er_ratio(er_vis.mean("sample"), cliff=12)   # mean ER after layer 12 / mean ER up to 12

Speed: when tokens < hidden the singular values come from the tokens x tokens Gram matrix,
``s = sqrt(max(eigvalsh(Hc Hc^T), 0))``; ``benchmarks/bench_rank.py`` measures it against
``np.linalg.svd(compute_uv=False)``.
"""

from __future__ import annotations

import numpy as np

from gapcache.errors import ConfigError

METHODS = ("auto", "gram", "svd")


def default_rtol(tokens: int, hidden: int) -> float:
    """rtol = sqrt(max(tokens, hidden) * eps_float64): the relative cut of "nonzero" singular values."""
    return float(np.sqrt(max(tokens, hidden) * np.finfo(np.float64).eps))


def center(h, valid=None) -> np.ndarray:
    """Hc = H - mean over tokens (axis -2), in float64; rows where ``valid`` is False are set to 0.

    With ``valid`` (..., tokens) the mean is over the valid rows only, so a ragged span padded with
    any values has exactly the singular values of its valid rows (plus zeros, which ER ignores).
    """
    h = np.asarray(h, dtype=np.float64)
    if valid is None:
        return h - h.mean(axis=-2, keepdims=True)
    w = np.asarray(valid, dtype=bool)[..., None]
    n = np.maximum(w.sum(axis=-2, keepdims=True), 1)
    mean = np.where(w, h, 0.0).sum(axis=-2, keepdims=True) / n
    return np.where(w, h - mean, 0.0)


def singular_values(h, method: str = "auto") -> np.ndarray:
    """Singular values of the last two axes of ``h`` (not centred), descending, shape (..., min(t, d)).

    ``gram``: s = sqrt(max(eigvalsh(G), 0)) with G = H H^T (t <= d) or H^T H (t > d).
    ``svd``: ``np.linalg.svd(H, compute_uv=False)``. ``auto``: gram when tokens < hidden, else svd.
    """
    if method not in METHODS:
        raise ConfigError(
            f"The 'method' parameter of singular_values must be one of {list(METHODS)}. Got {method!r} instead."
        )
    h = np.asarray(h, dtype=np.float64)
    if h.ndim < 2:
        raise ConfigError(
            "The 'h' parameter of singular_values must have at least 2 dimensions (..., tokens, hidden). "
            f"Got shape {h.shape} instead."
        )
    t, d = h.shape[-2:]
    if method == "svd" or (method == "auto" and t >= d):
        return np.linalg.svd(h, compute_uv=False)
    ht = np.swapaxes(h, -1, -2)
    gram = h @ ht if t <= d else ht @ h
    eig = np.linalg.eigvalsh(gram)[..., ::-1]
    return np.sqrt(np.maximum(eig, 0.0))


def entropy_rank(s, rtol: float, atol=0.0) -> np.ndarray:
    """ER = exp(-sum p_i log p_i), p_i = s_i / sum_j s_j over s_i > max(rtol * max(s), atol); 0.0 if none.

    ``atol`` broadcasts against ``s.shape[:-1]`` (one floor per matrix)."""
    s = np.asarray(s, dtype=np.float64)
    top = s.max(axis=-1, keepdims=True) if s.shape[-1] else np.zeros(s.shape[:-1] + (1,))
    atol = np.asarray(atol, dtype=np.float64)[..., None]
    keep = (s > rtol * top) & (s > atol) & (s > 0)
    total = np.where(keep, s, 0.0).sum(axis=-1, keepdims=True)
    p = np.where(keep, s / np.where(total > 0, total, 1.0), 1.0)
    ent = -(np.where(keep, p * np.log(p), 0.0)).sum(axis=-1)
    return np.where(keep.any(axis=-1), np.exp(ent), 0.0)


def effective_rank(h, *, valid=None, method: str = "auto", rtol: float | None = None,
                   centered: bool = False) -> np.ndarray:
    """Effective rank of each (tokens, hidden) matrix in the stack ``h`` (..., tokens, hidden) -> (...).

    ER = exp(-sum p_i log p_i), p_i = s_i / sum_j s_j over the nonzero singular values of
    Hc = H - mean over tokens (skipped when ``centered``). ``valid`` (..., tokens) marks real
    rows of padded ragged spans. Pure and batched: a dask ``map_blocks`` over (sample, layer)
    chunks can call it on each block (see :func:`effective_rank_dask`).
    """
    h = np.asarray(h)
    if h.ndim < 2:
        raise ConfigError(
            "The 'h' parameter of effective_rank must have at least 2 dimensions (..., tokens, hidden). "
            f"Got shape {h.shape} instead."
        )
    hc = np.asarray(h, dtype=np.float64) if centered and valid is None else center(h, valid)
    if rtol is None:
        rtol = default_rtol(*h.shape[-2:])
    if rtol < 0:
        raise ConfigError(f"The 'rtol' parameter of effective_rank must be >= 0. Got {rtol} instead.")
    return entropy_rank(singular_values(hc, method), rtol, centring_floor(h, valid))


def centring_floor(h, valid=None) -> np.ndarray:
    """atol = t * eps * ||H||_F per matrix of ``h`` (..., tokens, hidden), over the valid rows, uncentred:
    a bound on the rounding residue that subtracting the token mean leaves (see the module docstring)."""
    h = np.asarray(h, dtype=np.float64)
    if valid is None:
        t = np.full(h.shape[:-2], h.shape[-2], dtype=np.float64)
        sq = np.einsum("...ij,...ij->...", h, h)
    else:
        w = np.asarray(valid, dtype=bool)
        t = w.sum(axis=-1).astype(np.float64)
        hv = np.where(w[..., None], h, 0.0)
        sq = np.einsum("...ij,...ij->...", hv, hv)
    return floor_of(t, sq)


def floor_of(tokens, sq_norm) -> np.ndarray:
    """:func:`centring_floor` from each matrix's token count and squared Frobenius norm: t * eps * ||H||_F."""
    return np.asarray(tokens, dtype=np.float64) * np.finfo(np.float64).eps * np.sqrt(sq_norm)


def effective_rank_dask(h, *, method: str = "auto", rtol: float | None = None):
    """Lazy :func:`effective_rank` of a dask array (..., tokens, hidden) -> (...), one task per block.

    The tokens and hidden axes are merged into single chunks; leading axes keep their chunks.
    """
    import dask.array as da

    h = da.asarray(h)
    h = h.rechunk(h.chunks[:-2] + (-1, -1))
    return da.map_blocks(
        lambda b: effective_rank(b, method=method, rtol=rtol), h,
        drop_axis=[h.ndim - 2, h.ndim - 1], dtype=np.float64,
    )


def text_effective_rank(states, *, sample_dim: str = "sample", hidden_dim: str = "hidden",
                        method: str = "auto", rtol=None):
    """ER across samples at a text site: H = (sample x hidden) per remaining coordinate.

    ``states`` is a DataArray like the store's ``text_states`` (condition, sample, site, layer,
    hidden); the result has dims (condition, site, layer). Select done samples first.
    """
    import xarray as xr

    for dim in (sample_dim, hidden_dim):
        if dim not in states.dims:
            raise ConfigError(
                f"The 'states' parameter of text_effective_rank must have a {dim!r} dimension. "
                f"Got dims {states.dims} instead."
            )
    return xr.apply_ufunc(
        lambda a: effective_rank(a, method=method, rtol=rtol), states,
        input_core_dims=[[sample_dim, hidden_dim]], dask="parallelized", output_dtypes=[np.float64],
        dask_gufunc_kwargs={"allow_rechunk": True},
    ).rename("effective_rank")


def _visual_block(block, offsets, lengths, start, method, rtol):
    """ER of each sample whose rows lie in ``block`` (cond, vtoken, layer, hidden) -> (cond, n, layer): the samples
    of one span length in one batched call (every sample its own matrix, no padding: a VLM's image spans
    mostly share one length)."""
    offsets, lengths = np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)
    out = np.full((block.shape[0], len(offsets), block.shape[2]), np.nan)
    for n in np.unique(lengths[lengths > 0]):
        idx = np.flatnonzero(lengths == n)
        rows = (offsets[idx] - start)[:, None] + np.arange(n)  # (k, n) rows of the block
        h = np.moveaxis(block[:, rows], 3, 1)  # (cond, layer, k, n, hidden)
        out[:, idx] = np.moveaxis(effective_rank(h, method=method, rtol=rtol), 1, 2)  # (cond, k, layer)
    return out


def _groups(offsets, lengths, group_size: int):
    """Sample groups of ``group_size`` (in order of offset) and the vtoken chunk boundaries holding them."""
    offsets, lengths = np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)
    if len(offsets) > 1 and np.any(np.diff(offsets) < 0):
        raise ConfigError(
            "The 'visual_offset' values must be non-decreasing (the store's layout). Got unsorted offsets instead."
        )
    starts = list(range(0, len(offsets), group_size))
    bounds = [int(offsets[s]) for s in starts]
    bounds[0] = 0
    return starts, bounds


def block_samples(ds) -> int:
    """Samples per visual-ER task, from the store's chunking: its shard group (``samples_per_shard``: the rows
    of one shard, which :func:`gapcache.store.reader.state_chunks` reads as one block per layer), else the
    sample chunk of a dask-backed ``visual_offset`` (a store opened without its attributes), else every
    sample (an in-memory dataset)."""
    spc = ds.attrs.get("samples_per_shard")
    if spc:
        return int(spc)
    off = ds["visual_offset"].data
    return int(off.chunks[0][0]) if hasattr(off, "chunks") and off.chunks and off.chunks[0] else max(1, len(off))


def visual_effective_rank(ds, *, method: str = "auto", rtol: float | None = None, group_size: int | None = None):
    """ER per (visual_condition, sample, layer) of each sample's visual span, lazily (dask).

    ``ds`` is the Dataset of ``gapcache.store.open_store`` (``visual_states`` (visual_condition,
    vtoken, layer, hidden); ``visual_offset``/``visual_length`` (sample,)). Each task reads the
    vtoken rows of ``group_size`` consecutive samples and one layer; by default (None) the store's
    shard group (:func:`block_samples`), so a task reads one layer of one shard and memory per task
    is that block, whatever the store's size. Samples with no visual tokens (failed) get NaN.
    """
    import dask.array as da
    import xarray as xr

    vs = ds["visual_states"]
    offsets, lengths = np.asarray(ds["visual_offset"].values), np.asarray(ds["visual_length"].values)
    group_size = block_samples(ds) if group_size is None else int(group_size)
    starts, bounds = _groups(offsets, lengths, group_size)
    sizes = tuple(np.diff(bounds + [vs.sizes["vtoken"]]).tolist())
    arr = da.asarray(vs.data).rechunk((1, sizes, 1, -1))
    n_per = tuple(min(group_size, len(offsets) - s) for s in starts)

    def block_fn(block, block_info=None):
        g = block_info[0]["chunk-location"][1]
        sl = slice(starts[g], starts[g] + n_per[g])
        return _visual_block(block, offsets[sl], lengths[sl], bounds[g], method, rtol)

    out = da.map_blocks(
        block_fn, arr, drop_axis=3, chunks=(arr.chunks[0], n_per, arr.chunks[2]), dtype=np.float64,
    )
    dims = ("visual_condition", "sample", "layer")
    coords = {d: ds[d] for d in dims if d in ds.coords}
    return xr.DataArray(out, dims=dims, coords=coords, name="effective_rank")


ER_RATIO_WINDOWS = ("gapcache", "seed")


def er_ratio(er, cliff: int, *, layer_dim: str = "layer", window: str = "gapcache"):
    """ER ratio = mean ER over the "after" layers / mean ER over the "before" layers (along ``layer_dim``).

    ``er`` is a DataArray with a ``layer`` coordinate (one sample's curve, or the sample-mean of
    :func:`visual_effective_rank`). ``window='gapcache'``: before = layers <= cliff, after = layers >
    cliff (the cliff layer itself counts as "before": it is the last layer that still reads the
    image's states in the truncation convention). ``window='seed'``: the seed's windows, before =
    layers < cliff, after = layers >= cliff (see :func:`seed_er_ratio`).
    """
    if layer_dim not in er.dims:
        raise ConfigError(
            f"The 'er' parameter of er_ratio must have a {layer_dim!r} dimension. Got dims {er.dims} instead."
        )
    if window not in ER_RATIO_WINDOWS:
        raise ConfigError(f"The 'window' parameter of er_ratio must be one of {list(ER_RATIO_WINDOWS)}. "
                          f"Got {window!r} instead.")
    layer = er[layer_dim]
    is_after = layer > cliff if window == "gapcache" else layer >= cliff
    before, after = er.where(~is_after, drop=True), er.where(is_after, drop=True)
    if before.sizes[layer_dim] == 0 or after.sizes[layer_dim] == 0:
        raise ConfigError(
            f"The 'cliff' parameter of er_ratio must leave layers on both sides of it. Got {cliff} with "
            f"layers {layer.values.min()}..{layer.values.max()} instead."
        )
    return (after.mean(layer_dim) / before.mean(layer_dim)).rename("er_ratio")


def seed_er_ratio(er, cliff: int, *, sample_dim: str = "sample", layer_dim: str = "layer"):
    """The seed's ER ratio: a ratio of means on the sample-mean curve, with the seed's windows,
    ``mean_l>=cliff mean_i ER_il / mean_l<cliff mean_i ER_il`` (``er``: (sample, layer) DataArray).

    The pipeline's ``er_ratio`` is the mean over samples of per-sample ratios with before = layers <=
    cliff; the two differ whenever samples differ in scale. For the seed's number in its own layer
    labels, relabel first: ``er.assign_coords(layer=evd.layer_labels(er.layer, 'output'))``.
    """
    if sample_dim not in er.dims:
        raise ConfigError(f"The 'er' parameter of seed_er_ratio must have a {sample_dim!r} dimension. "
                          f"Got dims {er.dims} instead.")
    return er_ratio(er.mean(sample_dim), cliff, layer_dim=layer_dim, window="seed")
