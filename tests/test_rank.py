"""Effective rank: planted spectra give the exact ER; Gram and SVD paths agree; edge cases."""

import numpy as np
import pytest
import xarray as xr

from gapcache.analyze.rank import (
    effective_rank, effective_rank_dask, er_ratio, singular_values, text_effective_rank, visual_effective_rank,
)
from gapcache.errors import ConfigError


def planted(s, t, d, seed=0):
    """H = U diag(s) V^T, centred: U's columns orthonormal and orthogonal to the ones vector."""
    rng = np.random.default_rng(seed)
    k = len(s)
    a = np.concatenate([np.ones((t, 1)), rng.standard_normal((t, k))], axis=1)
    u = np.linalg.qr(a)[0][:, 1:]  # orthogonal to ones -> column means of H are 0
    v = np.linalg.qr(rng.standard_normal((d, k)))[0]
    return u @ np.diag(s) @ v.T


def exact_er(s):
    p = np.asarray(s, float) / np.sum(s)
    return float(np.exp(-np.sum(p * np.log(p))))


@pytest.mark.parametrize("method", ["gram", "svd", "auto"])
@pytest.mark.parametrize("shape", [(40, 100), (100, 40)])
def test_planted_spectrum_exact(method, shape):
    s = np.array([10.0, 5.0, 2.5, 1.0, 0.5, 0.1])
    h = planted(s, *shape)
    assert abs(h.mean(axis=0)).max() < 1e-12
    assert effective_rank(h, method=method) == pytest.approx(exact_er(s), abs=1e-10)


def test_equal_singular_values_give_the_rank():
    for k in (1, 3, 7):
        assert effective_rank(planted(np.full(k, 3.0), 30, 50)) == pytest.approx(k, abs=1e-10)


def test_gram_and_svd_agree_on_random_stack():
    h = np.random.default_rng(1).standard_normal((3, 2, 24, 64)) * np.array([1.0, 1e3])[None, :, None, None]
    g, s = effective_rank(h, method="gram"), effective_rank(h, method="svd")
    assert g.shape == (3, 2)
    np.testing.assert_allclose(g, s, atol=1e-10)
    np.testing.assert_allclose(singular_values(h[0, 0], "gram")[:23], singular_values(h[0, 0], "svd")[:23], rtol=1e-9)


def test_rank_deficient_counts_only_nonzero_values():
    s = np.array([4.0, 3.0, 1.0])  # rank 3 in a 50 x 200 matrix: 47 zero singular values ignored
    h = planted(s, 50, 200) * 1e4 + 0.0
    for m in ("gram", "svd"):
        assert effective_rank(h, method=m) == pytest.approx(exact_er(s), abs=1e-10)


def test_centering_removes_the_mean_row():
    s = np.array([3.0, 1.0])
    h = planted(s, 20, 30) + np.random.default_rng(2).standard_normal(30) * 100  # same offset on every token
    assert effective_rank(h) == pytest.approx(exact_er(s), abs=1e-10)


def test_constant_and_single_token_matrices_have_er_zero():
    assert effective_rank(np.full((10, 16), 7.5)) == 0.0
    assert effective_rank(np.ones((1, 16))) == 0.0
    assert effective_rank(np.zeros((4, 5, 8)), method="svd").tolist() == [0.0] * 4


@pytest.mark.parametrize("method", ["gram", "svd", "auto"])
@pytest.mark.parametrize("shape", [(20, 64), (64, 20)])
def test_exactly_constant_span_with_unrepresentable_values_has_er_zero(method, shape):
    """A real hidden state repeated over the span (0.1 and random floats are not exact in binary):
    centring leaves a ~1e-14 residue that the relative cut alone kept (ER 1.0); the docstring says 0."""
    t, d = shape
    row = np.random.default_rng(5).normal(size=d) * 37.0
    assert effective_rank(np.tile(row, (t, 1)), method=method) == 0.0
    assert effective_rank(np.full((t, d), 0.1), method=method) == 0.0
    stack = np.stack([np.tile(row, (t, 1)), np.tile(row[::-1] + 1e3, (t, 1))])
    assert effective_rank(stack, method=method).tolist() == [0.0, 0.0]
    valid = np.ones(t, bool)
    valid[t // 2:] = False
    padded = np.tile(row, (t, 1))
    padded[~valid] = 1e6  # padding rows never count, whatever their value
    assert effective_rank(padded, valid=valid, method=method) == 0.0


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("scale", [1e-3, 1e-6])
def test_nearly_constant_span_keeps_its_exact_er(method, scale):
    """A large constant offset plus a tiny planted spread: the floor (~1e-13 of the data's scale) keeps
    every planted singular value, so ER is the planted one."""
    s = np.array([3.0, 2.0, 1.0, 0.5])
    row = np.random.default_rng(6).normal(size=64) * 100.0
    h = np.tile(row, (30, 1)) + scale * planted(s, 30, 64)
    assert effective_rank(h, method=method) == pytest.approx(exact_er(s), abs=1e-6)


def test_valid_mask_pads_ragged_spans():
    s = np.array([2.0, 1.0, 0.5])
    h = np.zeros((2, 30, 40))
    h[0, :20], h[1] = planted(s, 20, 40), planted(s, 30, 40, seed=3)
    h[0, 20:] = 99.0  # padding rows with junk
    valid = np.ones((2, 30), bool)
    valid[0, 20:] = False
    np.testing.assert_allclose(effective_rank(h, valid=valid), [exact_er(s)] * 2, atol=1e-10)


def test_errors_follow_the_template():
    with pytest.raises(ConfigError, match="The 'method' parameter of singular_values must be one of"):
        effective_rank(np.ones((3, 3)), method="qr")
    with pytest.raises(ConfigError, match="at least 2 dimensions"):
        effective_rank(np.ones(3))


def test_dask_map_blocks_matches_numpy():
    import dask.array as da

    h = np.random.default_rng(4).standard_normal((4, 3, 12, 20))
    lazy = effective_rank_dask(da.from_array(h, chunks=(2, 1, 5, 20)))
    np.testing.assert_allclose(lazy.compute(), effective_rank(h), atol=1e-12)


def test_text_and_visual_wrappers_on_store_shaped_data():
    import dask.array as da

    s1, s2 = np.array([3.0, 1.0]), np.array([1.0, 1.0, 1.0])
    # text: (condition, sample, site, layer, hidden), ER across samples
    text = np.stack([planted(s1, 12, 16), planted(s2, 12, 16)])  # two layers
    text = np.broadcast_to(text.transpose(1, 0, 2)[None, :, None], (2, 12, 1, 2, 16))
    ts = xr.DataArray(da.from_array(np.ascontiguousarray(text), chunks=(1, 4, 1, 1, 16)),
                      dims=("condition", "sample", "site", "layer", "hidden"), coords={"layer": [0, 5]})
    er = text_effective_rank(ts).compute()
    assert er.dims == ("condition", "site", "layer")
    np.testing.assert_allclose(er.values[:, 0], [[exact_er(s1), 3.0]] * 2, atol=1e-10)
    # visual: (visual_condition, vtoken, layer, hidden) with ragged spans and padding rows
    lengths, offsets, n_vt = [5, 0, 7, 6], [0, 5, 5, 16], 24
    vs = np.full((1, n_vt, 2, 16), 123.0)
    for i, (o, n) in enumerate(zip(offsets, lengths)):
        for layer, s in enumerate((s1, s2)):
            if n:
                vs[0, o : o + n, layer] = planted(s, n, 16, seed=i)
    states = da.from_array(vs, chunks=(1, 4, 1, 16))
    ds = xr.Dataset({"visual_states": (("visual_condition", "vtoken", "layer", "hidden"), states),
                     "visual_offset": ("sample", offsets), "visual_length": ("sample", lengths)},
                    coords={"sample": ["a", "b", "c", "d"], "layer": [0, 5], "visual_condition": ["original"]})
    out = visual_effective_rank(ds, group_size=2).compute()
    assert out.dims == ("visual_condition", "sample", "layer")
    want = np.array([[exact_er(s1), 3.0], [np.nan, np.nan], [exact_er(s1), 3.0], [exact_er(s1), 3.0]])
    np.testing.assert_allclose(out.values[0], want, atol=1e-10)


def test_er_ratio():
    er = xr.DataArray([10.0, 10.0, 4.0, 2.0, 0.0], dims="layer", coords={"layer": [0, 4, 8, 12, 16]})
    assert float(er_ratio(er, cliff=4)) == pytest.approx(2.0 / 10.0)
    with pytest.raises(ConfigError, match="layers on both sides"):
        er_ratio(er, cliff=16)


def test_seed_er_ratio_windows_and_ratio_of_means():
    from gapcache.analyze.rank import seed_er_ratio

    er = xr.DataArray([[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]], dims=("sample", "layer"), coords={"layer": range(6)})
    assert float(er_ratio(er.isel(sample=0), 2)) == pytest.approx(2.0)  # before 0..2, after 3..5
    assert float(er_ratio(er.isel(sample=0), 2, window="seed")) == pytest.approx(1.75)  # before 0..1, after 2..5
    assert float(seed_er_ratio(er, 2)) == pytest.approx(1.75)
    two = xr.DataArray([[1.0, 1.0, 2.0, 2.0], [4.0, 4.0, 4.0, 4.0]], dims=("sample", "layer"),
                       coords={"layer": range(4)})
    per_sample = [float(er_ratio(two.isel(sample=i), 2, window="seed")) for i in range(2)]
    assert np.mean(per_sample) == pytest.approx(1.5) and float(seed_er_ratio(two, 2)) == pytest.approx(1.2)
    with pytest.raises(ConfigError, match="'window'"):
        er_ratio(er.isel(sample=0), 2, window="both")


def test_visual_effective_rank_on_a_real_store(tmp_path):
    from helpers import random_payloads, roundtrip, small_layout

    from gapcache.store.reader import visual_span

    layout = small_layout(lengths=(3, 4, 0, 2, 5), spc=2)
    ds = roundtrip(tmp_path / "s.zarr", layout, random_payloads(layout))
    er = visual_effective_rank(ds, group_size=2).compute()
    assert er.dims == ("visual_condition", "sample", "layer") and er.shape == (2, 5, 3)
    for i, n in enumerate(layout.visual_lengths):
        if n == 0:
            assert np.isnan(er.values[:, i]).all()
            continue
        span = visual_span(ds, i).values.transpose(0, 2, 1, 3)  # (visual_condition, layer, vtoken, hidden)
        np.testing.assert_allclose(er.values[:, i], effective_rank(span), atol=1e-12)


def test_visual_effective_rank_blocks_follow_the_store_shards_and_change_no_value(tmp_path):
    """The default block is the store's shard group (samples_per_shard), one task per (condition, shard, layer);
    every ER equals, bit for bit, the one-sample-a-task result and the per-sample effective_rank."""
    from helpers import random_payloads, roundtrip, small_layout

    from gapcache.analyze.rank import block_samples
    from gapcache.store.reader import visual_span

    layout = small_layout(dtype="bfloat16", lengths=(3, 4, 0, 2, 5, 6, 1), spc=3)
    ds = roundtrip(tmp_path / "s.zarr", layout, random_payloads(layout))
    assert block_samples(ds) == 3
    lazy = visual_effective_rank(ds)
    assert lazy.data.numblocks == (2, layout.n_shards, 3)
    er = lazy.compute().values
    np.testing.assert_array_equal(er, visual_effective_rank(ds, group_size=1).compute().values)
    for i, n in enumerate(layout.visual_lengths):
        if n:
            span = visual_span(ds, i).values.transpose(0, 2, 1, 3)  # (visual_condition, layer, vtoken, hidden)
            np.testing.assert_array_equal(er[:, i], effective_rank(span))
