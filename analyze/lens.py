"""Logit lens at the prediction site, from the store alone (no model, no GPU, no torch).

For each recorded layer l, with the final norm and the candidates' unembedding rows that the
extraction tier stored::

    z_l = lens_unembed @ ((offset + w) * h_l / sqrt(mean(h_l**2) + eps))     # (lens_token,)
    choice_l(i) = argmax over sample i's own candidates c of z_l[candidate_lens_token[i, c]]
    correct_l(i) = [choice_l(i) == gold candidate of i]

``w``, ``eps`` and ``offset`` are ``lens_norm_weight`` and its attributes: the family adapter records
the norm's form (offset 0 for Llama/Qwen RMSNorm, 1 for Gemma-style ``(1 + w)`` norms); stores
written before ``offset`` was recorded read as offset 0.

At the last layer (before the final norm, see the store's layer convention) this is exactly the
model's own forced choice. Samples whose candidates share a token prefix (``candidate_prefix_tokens
> 0``) are scored at the prediction site on the distinguishing token anyway: read them as a lens of
the *first* position only. Lazy: one dask task per (condition, layer), memory = one (sample, hidden) slice.

Usage::

    from gapcache.analyze.lens import logit_lens_correct
    correct = logit_lens_correct(open_store(path))        # DataArray (condition, layer, sample), lazy
    correct.mean("sample").compute()
"""

from __future__ import annotations

import numpy as np

from gapcache.analyze.scoring import gold_candidate_index
from gapcache.errors import StoreError


def rmsnorm(h: np.ndarray, weight: np.ndarray, eps: float, offset: float = 0.0) -> np.ndarray:
    """(offset + w) * h / sqrt(mean(h**2, -1) + eps), in float64."""
    h = np.asarray(h, dtype=np.float64)
    scale = weight + offset if offset else weight
    return scale * h / np.sqrt((h**2).mean(-1, keepdims=True) + eps)


def norm_form(ds) -> tuple[np.ndarray, float, float]:
    """(weight float64, eps, offset) of the store's recorded final norm; offset 0.0 when not recorded."""
    attrs = ds.lens_norm_weight.attrs
    return ds.lens_norm_weight.values.astype(np.float64), float(attrs["eps"]), float(attrs.get("offset", 0.0))


def lens_choice_correct(h, weight, eps, unembed, which, gold, offset: float = 0.0) -> np.ndarray:
    """h (sample, hidden) -> 1.0 / 0.0 per sample, NaN where no candidate or no gold candidate."""
    z = rmsnorm(h, weight, eps, offset) @ np.asarray(unembed, np.float64).T  # (sample, lens_token)
    rows = np.where(which >= 0, which, 0)
    scores = np.where(which >= 0, np.take_along_axis(z, rows, axis=1), -np.inf)  # (sample, candidate)
    ok = (which >= 0).any(axis=1) & (gold >= 0) & np.isfinite(h).all(axis=1)
    return np.where(ok, (scores.argmax(axis=1) == gold).astype(np.float64), np.nan)


def logit_lens_correct(ds, site: str = "prediction"):
    """Lazy DataArray (condition, layer, sample) of logit-lens forced-choice correctness."""
    import xarray as xr

    for name in ("lens_norm_weight", "lens_unembed", "candidate_lens_token"):
        if name not in ds:
            raise StoreError(f"The store has no {name!r}: it was written before the logit lens was recorded.")
    if ds.sizes.get("lens_token", 0) == 0 or ds.sizes.get("candidate", 0) == 0:
        raise StoreError("The store has no closed-set candidates, so there is no logit lens to compute.")
    weight, eps, offset = norm_form(ds)
    unembed = ds.lens_unembed.values
    which = ds.candidate_lens_token.values
    gold = gold_candidate_index(ds.answer.values, ds.candidate.values)
    states = ds.text_states.sel(site=site).data  # (condition, sample, layer, hidden), lazy
    out = _per_layer(states, weight, eps, offset, unembed, which, gold)
    return xr.DataArray(out, dims=("condition", "layer", "sample"),
                        coords={"condition": ds.condition.values, "layer": ds.layer.values, "sample": ds.sample.values},
                        name="logit_lens_correct")


def _per_layer(states, weight, eps, offset, unembed, which, gold):
    """(condition, sample, layer, hidden) dask -> (condition, layer, sample) dask, one task per block."""
    import dask.array as da

    t = states.transpose(0, 2, 1, 3).rechunk({0: 1, 1: 1, 2: -1, 3: -1})  # (condition, layer, sample, hidden)
    return da.map_blocks(
        lambda b: lens_choice_correct(b[0, 0], weight, eps, unembed, which, gold, offset)[None, None, :],
        t, drop_axis=3, dtype=np.float64,
    )
