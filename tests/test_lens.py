"""The CPU logit lens applies the final-norm form recorded in the store: ``(offset + w) * h / rms``.

Synthetic stores (no torch): a Gemma-style ``(1 + w)`` norm must be applied as such, a store
without an ``offset`` attribute (written before it was recorded) reads as a plain ``w * h / rms``.
"""

from __future__ import annotations

import numpy as np
import pytest

from gapcache.analyze.lens import lens_choice_correct, logit_lens_correct, norm_form, rmsnorm

xr = pytest.importorskip("xarray")
da = pytest.importorskip("dask.array")

# hidden 2, candidates "a" (lens row 0 = e0) and "b" (row 1 = e1); gold "a".
# h = [2, 1], w = [-0.4, 0]:   w * h       = [-0.8, 0] -> picks "b" (wrong)
#                          (1 + w) * h       = [ 1.2, 1] -> picks "a" (right)
H = np.array([2.0, 1.0])
W = np.array([-0.4, 0.0], np.float32)
EPS = 1e-6


def lens_store(attrs: dict, n_samples: int = 3):
    """A minimal store view with what ``logit_lens_correct`` reads: one condition, two layers."""
    states = np.broadcast_to(H, (1, n_samples, 1, 2, 2)).astype(np.float32)  # (condition, sample, site, layer, hidden)
    return xr.Dataset(
        {
            "text_states": (("condition", "sample", "site", "layer", "hidden"), da.from_array(states, chunks=1)),
            "lens_norm_weight": ("hidden", W, attrs),
            "lens_unembed": (("lens_token", "hidden"), np.eye(2, dtype=np.float32)),
            "candidate_lens_token": (("sample", "candidate"), np.tile(np.array([0, 1], np.int32), (n_samples, 1))),
            "answer": ("sample", np.array(["a"] * n_samples, dtype=object)),
        },
        coords={"condition": ["original"], "sample": [f"s{i}" for i in range(n_samples)], "site": ["prediction"],
                "layer": [0, 1], "candidate": ["a", "b"]},
    )


def test_rmsnorm_with_offset_is_the_gemma_form():
    h = np.random.default_rng(0).normal(size=(4, 6))
    w = np.random.default_rng(1).normal(size=6)
    rms = np.sqrt((h**2).mean(-1, keepdims=True) + EPS)
    np.testing.assert_allclose(rmsnorm(h, w, EPS, 1.0), (1.0 + w) * h / rms)
    np.testing.assert_array_equal(rmsnorm(h, w, EPS), rmsnorm(h, w, EPS, 0.0))
    np.testing.assert_allclose(rmsnorm(h, w, EPS), w * h / rms)


def test_lens_uses_the_recorded_one_plus_w_norm():
    gemma = logit_lens_correct(lens_store({"eps": EPS, "offset": 1.0, "norm_class": "GemmaRMSNorm"})).compute()
    assert (gemma.values == 1.0).all()
    plain = logit_lens_correct(lens_store({"eps": EPS, "offset": 0.0, "norm_class": "LlamaRMSNorm"})).compute()
    assert (plain.values == 0.0).all()


def test_store_without_offset_reads_as_plain_rmsnorm():
    ds = lens_store({"eps": EPS, "norm_class": "LlamaRMSNorm"})  # as written before the offset was recorded
    weight, eps, offset = norm_form(ds)
    assert (eps, offset) == (EPS, 0.0) and weight.dtype == np.float64
    assert (logit_lens_correct(ds).compute().values == 0.0).all()


def test_lens_choice_correct_offset_keyword():
    h = np.stack([H, H])
    which, gold = np.array([[0, 1], [0, 1]]), np.array([0, 0])
    assert lens_choice_correct(h, W, EPS, np.eye(2), which, gold, offset=1.0).tolist() == [1.0, 1.0]
    assert lens_choice_correct(h, W, EPS, np.eye(2), which, gold).tolist() == [0.0, 0.0]
