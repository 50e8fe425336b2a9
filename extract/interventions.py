"""The torch side of the intervention registry: one hook class per strategy of ``gapcache.conditions``.

A condition's :class:`gapcache.conditions.Hook` says which strategy acts, on the input of which
decoder layers and at which positions; :func:`install` turns it into forward pre-hooks on a
model's decoder layers. Hooks act on what a layer *receives* and are prepended, so they run
before anything else registered on the layer (a ``Capture`` there sees the intervened input).

* ``zero``: the positions' states are overwritten with zeros (still attended);
* ``drop``: the positions are masked out of attention as keys, for every query outside them
  (positions still attend to each other). In a cached decoding step (generation) the queries are
  the new tokens: they see no masked key either.
* single-layer patching (``conditions.PATCH_RULES``): ``zero``, ``norm_noise``, ``mean`` on either channel
  (visual span or the question's tokens), ``gaussian`` (h + sigma z, sigma fitted per channel and layer),
  ``swap`` (the donor image's visual states, handed in by the runner's donor forward);
* soft truncation (``conditions.SOFT_RULES`` has each formula): ``norm_noise`` (Gaussian noise at each
  state's norm), ``pca_noise`` (noise of the fitted mean and top-k covariance), ``mean`` (the fitted
  mean), ``shuffle`` (the sample's own states, permuted by a random n-cycle). Their randomness is
  seeded per (soft seed, strategy, sample index, layer), never by the batch; their fitted statistics
  (``Fitted``: per layer ``mean``, ``pca_basis``, ``pca_variance``) come from the run's pre-pass over
  ``original`` (``Extraction.fitted``).

Adding a strategy: its ``Strategy`` entry in ``core/conditions.py`` and here a subclass of
:class:`Intervention` with ``@implements(name)`` and a ``hook(module, args, kwargs)`` method; an
``acts_on="states"`` hook returns the new ``(args, kwargs)`` via ``replace_hidden``. The
conformance test (tests/test_interventions.py) checks that every registered strategy has a hook
here and that it touches exactly its declared layers and positions.

Every intervention is a context manager: ``with install(layers, hook, batch): model(...)``.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from gapcache import conditions
from gapcache.errors import UnknownNameError
from gapcache.extract.hooks import Hooks, hidden_of, replace_hidden

#: strategy name -> Intervention subclass
IMPLEMENTATIONS: dict[str, type] = {}

#: position kind (``conditions.POSITIONS``) -> planned sample -> the positions within its prompt
POSITIONS = {
    "visual": lambda p: range(p.visual_start, p.visual_start + p.visual_length),
    "question": lambda p: range(p.sites["question"][0], p.sites["question"][0] + p.sites["question"][1]),
}


def implements(name: str):
    """Class decorator: register the hook class of the strategy ``name`` (which must be in the registry)."""

    def register(cls):
        conditions.strategy(name)  # UnknownNameError unless declared in core/conditions.py
        IMPLEMENTATIONS[name] = cls
        return cls

    return register


class Batch:
    """The positions one forward intervenes on.

    ``index``: (rows, positions) long tensors; ``mask``: (batch, seq) bool, True at those
    positions; ``attention_mask``: the batch's (batch, seq) padding mask."""

    def __init__(self, index, mask, attention_mask, samples=(), spans=()):
        self.index, self.mask, self.attention_mask = index, mask, attention_mask
        self.samples = tuple(samples)  # per row: the planned sample's index (what seeds its randomness)
        self.spans = tuple(spans)  # per row: (start, stop) of its positions within ``index``
        self._on: dict = {}

    def on(self, device) -> tuple:
        """``index`` on ``device``, copied there once per batch: a copy per hooked layer from pageable host
        memory would synchronise the CUDA stream at every layer, and the host could not queue ahead."""
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in self.index)
        return self._on[device]


def positions(P, which: str, offsets, inputs) -> Batch:
    """The ``which`` positions of planned samples ``P`` in the processed batch ``inputs``; row r's prompt
    starts at ``offsets[r]`` (0 right padded; left padded: the padding before it)."""
    if which not in POSITIONS:
        raise UnknownNameError("intervention position kind", which, POSITIONS)
    found = [list(POSITIONS[which](p)) for p in P]
    rows = torch.tensor([r for r, pos in enumerate(found) for _ in pos], dtype=torch.long)
    pos = torch.tensor([o + t for o, ts in zip(offsets, found) for t in ts], dtype=torch.long)
    mask = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)  # (batch, seq)
    mask[rows, pos] = True
    bounds = np.cumsum([0] + [len(f) for f in found])
    return Batch((rows, pos), mask, inputs["attention_mask"], [p.index for p in P],
                 list(zip(bounds[:-1].tolist(), bounds[1:].tolist())))


class Intervention(Hooks):
    """Forward pre-hooks of one strategy on the input of decoder layers ``act_on`` (indices into ``layers``).

    ``set_batch(batch)`` before each forward. With no layers it installs nothing (a condition
    without a hook). Subclasses implement ``hook(module, args, kwargs)``."""

    def __init__(self, layers, act_on=(), fitted=None, seed: int = 0, positions: str = "visual", **params):
        self.act_on, self.params, self.positions = tuple(act_on), params, positions
        self.fitted, self.seed = fitted, seed  # the run's fitted statistics (Fitted) and soft seed
        self.batch: Batch | None = None
        self.index_of = {id(layers[i]): i for i in self.act_on}
        self._handles = [layers[i].register_forward_pre_hook(self.hook, with_kwargs=True, prepend=True)
                         for i in self.act_on]

    def set_batch(self, batch: Batch):
        self.batch = batch

    def hook(self, module, args, kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not implement hook()")


@implements("zero")
class ZeroStates(Intervention):
    """The positions' states are overwritten with zeros at the input of each hooked layer."""

    def hook(self, module, args, kwargs):
        h = hidden_of(args, kwargs)  # (batch, seq, hidden)
        if h.shape[1] < self.batch.mask.shape[1]:  # a cached decoding step: the positions' K/V already intervened
            return None
        rows, pos = self.batch.on(h.device)
        h = h.clone()
        h[rows, pos] = 0
        return replace_hidden(args, kwargs, h)


@implements("drop")
class DropKeys(Intervention):
    """The positions are hidden as keys from every query outside them, in each hooked layer."""

    def set_batch(self, batch: Batch):
        super().set_batch(batch)
        self._mask_cache: dict = {}
        self._seen: dict = {}  # id(layer) -> tokens it has been called on since set_batch

    def hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        h = hidden_of(args, kwargs)
        # keys = what this layer saw before (cached, while generating) + this call's queries
        kv = self._seen[id(module)] = self._seen.get(id(module), 0) + h.shape[1]
        if mask is not None:
            kv = int(mask.shape[-1])
        key = (None if mask is None else (mask.dtype, mask.device, tuple(mask.shape)), h.device, h.shape[1], kv)
        if key not in self._mask_cache:
            self._mask_cache[key] = self._dropped_mask(mask, h, kv)
        return args, {**kwargs, "attention_mask": self._mask_cache[key]}

    def _dropped_mask(self, mask, h, kv: int):
        """The layer's 4D mask with the positions' keys hidden from every query outside them.

        In a cached decoding step (generation) the queries are the new tokens and the keys the prompt plus
        the tokens generated so far: those are never intervened positions, so they see no such key either."""
        hidden_pos = _fit(self.batch.mask.to(h.device), kv, False)  # (batch, kv)
        b, q_len = hidden_pos.shape[0], h.shape[1]
        if mask is None:
            keep = torch.ones(q_len, kv, dtype=torch.bool, device=h.device).tril(kv - q_len)
            attn = _fit(self.batch.attention_mask.to(h.device).bool(), kv, True)
            keep = keep[None, None] & attn[:, None, None, :]  # (b, 1, q, kv)
        elif mask.dtype == torch.bool:
            keep = mask.clone()
        else:
            keep = mask == 0
        keep = keep.expand(b, 1, q_len, kv).clone()
        query_in = hidden_pos[:, -q_len:]  # (b, q)
        hide = (~query_in)[:, None, :, None] & hidden_pos[:, None, None, :]  # (b, 1, q, kv)
        keep &= ~hide
        if mask is None or mask.dtype == torch.bool:
            return keep
        return torch.zeros_like(mask).masked_fill(~keep, torch.finfo(mask.dtype).min)


class Substitute(Intervention):
    """A ``states`` strategy that replaces each row's positions by ``substitute(h, row, layer)`` (its states in,
    (n, hidden) float32 out) at the input of each hooked layer; a cached decoding step is left alone (the
    positions' K/V were computed from the substitutes)."""

    strategy = ""

    def hook(self, module, args, kwargs):
        h = hidden_of(args, kwargs)  # (batch, seq, hidden)
        if h.shape[1] < self.batch.mask.shape[1]:
            return None
        layer = self.index_of[id(module)]
        rows, pos = self.batch.on(h.device)
        h = h.clone()
        for r, (a, b) in enumerate(self.batch.spans):
            if b > a:
                rr, pp = rows[a:b], pos[a:b]
                h[rr, pp] = self.substitute(h[rr, pp], r, layer).to(h.dtype)
        return replace_hidden(args, kwargs, h)

    def substitute(self, h, row: int, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def generator(self, row: int, layer: int, device) -> torch.Generator:
        """The seeded generator of this row's sample at ``layer`` (conditions.SEED_RULE)."""
        state = np.random.SeedSequence([self.seed, zlib.crc32(self.strategy.encode()), self.batch.samples[row],
                                        layer + 1]).generate_state(2, np.uint32)
        g = torch.Generator(device=device)
        g.manual_seed(int(state[0]) << 32 | int(state[1]))
        return g

    def noise(self, shape, row: int, layer: int, device) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator(row, layer, device), device=device, dtype=torch.float32)

    def stat(self, name: str, layer: int, device) -> torch.Tensor:
        """The fitted statistic ``name`` over this hook's positions (``conditions.fit_key``) at ``layer``."""
        key = conditions.fit_key(name, self.positions)
        if self.fitted is None or layer not in self.fitted.layers or key not in self.fitted.values:
            raise RuntimeError(f"{self.strategy} needs the fitted '{key}' at layer {layer}; the run's statistics "
                               "were not fitted (Extraction.fitted_statistics / run() fits them from original)")
        return self.fitted.get(key, layer, device)


@implements("norm_noise")
class NormNoise(Substitute):
    """h' = z * ||h|| / ||z||, z ~ N(0, I): each state's norm kept, its direction random."""

    strategy = "norm_noise"

    def substitute(self, h, row, layer):
        z = self.noise(h.shape, row, layer, h.device)
        return z * (h.float().norm(dim=-1, keepdim=True) / z.norm(dim=-1, keepdim=True))


@implements("pca_noise")
class PcaNoise(Substitute):
    """h' = mean_l + (z * sqrt(var_l)) @ basis_l, z ~ N(0, I_k): the clean states' Gaussian in its top k directions."""

    strategy = "pca_noise"

    def substitute(self, h, row, layer):
        mean, basis, var = (self.stat(n, layer, h.device) for n in ("mean", "pca_basis", "pca_variance"))
        z = self.noise((h.shape[0], basis.shape[0]), row, layer, h.device)
        return mean + (z * var.clamp_min(0).sqrt()) @ basis


@implements("mean")
class MeanStates(Substitute):
    """h' = mean_l: the mean visual state of original over the run at this layer, at every position."""

    strategy = "mean"

    def substitute(self, h, row, layer):
        return self.stat("mean", layer, h.device).expand(h.shape[0], -1)


@implements("gaussian")
class GaussianNoise(Substitute):
    """h' = h + sigma_l * z, z ~ N(0, I): the clean states' std of this channel at this layer (fitted), added."""

    strategy = "gaussian"

    def substitute(self, h, row, layer):
        return h.float() + self.stat("sigma", layer, h.device) * self.noise(h.shape, row, layer, h.device)


@implements("swap")
class SwapStates(Substitute):
    """h'[t] = donor[t]: the states the donor's image produces at this layer under this row's prompt, given as
    ``donor_states`` (per row: (n, hidden), from ``Extraction.donor_states``)."""

    strategy = "swap"

    def substitute(self, h, row, layer):
        donor = self.params.get("donor_states")
        if donor is None or donor[row] is None:
            raise RuntimeError("swap needs the donor's states of each row (install(..., donor_states=...))")
        if donor[row].shape != h.shape:
            raise RuntimeError(f"swap: the donor's states of row {row} have shape {tuple(donor[row].shape)}, the "
                               f"patched positions {tuple(h.shape)}; the donor image must give the same layout")
        return donor[row].to(h.device).float()


@implements("shuffle")
class ShuffleStates(Substitute):
    """h'[t] = h[perm[t]]: the sample's own states permuted over its positions (one random n-cycle per sample,
    Sattolo's algorithm, the same at every layer)."""

    strategy = "shuffle"

    def substitute(self, h, row, layer):
        return h[torch.as_tensor(self.permutation(row, h.shape[0]), device=h.device)].float()

    def permutation(self, row: int, n: int) -> np.ndarray:
        seq = np.random.SeedSequence([self.seed, zlib.crc32(self.strategy.encode()), self.batch.samples[row], 0])
        return n_cycle(n, np.random.default_rng(seq))


def n_cycle(n: int, rng) -> np.ndarray:
    """A uniformly random n-cycle (Sattolo): perm[t] != t for every t when n > 1."""
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


class Fitted:
    """Statistics fitted on original: ``values[name]`` (fit layer, ...) float32 arrays at decoder ``layers``."""

    def __init__(self, layers, values: dict):
        self.layers = {int(l): k for k, l in enumerate(layers)}
        self.values = values
        self._on: dict = {}

    def get(self, name: str, layer: int, device) -> torch.Tensor:
        key = (name, layer, str(device))
        if key not in self._on:
            self._on[key] = torch.as_tensor(np.asarray(self.values[name][self.layers[layer]]), device=device)
        return self._on[key]


def _fit(x: torch.Tensor, length: int, fill: bool) -> torch.Tensor:
    """(batch, n) bool cut or extended with ``fill`` to (batch, length): the prompt's per-position flags
    for a key range that also holds generated tokens."""
    if x.shape[1] >= length:
        return x[:, :length]
    return torch.cat([x, x.new_full((x.shape[0], length - x.shape[1]), fill)], dim=1)


def install(layers, hook: conditions.Hook | None, P=(), offsets=(), inputs=None, fitted: Fitted | None = None,
            seed: int = 0, **extra) -> Intervention:
    """The hooks of ``hook`` on decoder ``layers`` for the batch of planned samples ``P`` (``inputs``: the
    processed batch, for its shape and padding mask); ``hook`` None installs nothing. A context manager.
    ``fitted``, ``seed``: the run's fitted statistics and soft seed (strategies that use neither ignore them);
    ``extra``: further keyword arguments of the hook (swap: ``donor_states``)."""
    if hook is None:
        return Intervention(layers)
    if hook.strategy not in IMPLEMENTATIONS:
        raise UnknownNameError("intervention hook", hook.strategy, IMPLEMENTATIONS)
    iv = IMPLEMENTATIONS[hook.strategy](layers, hook.layers, fitted=fitted, seed=seed, positions=hook.positions,
                                        **dict(hook.params), **extra)
    iv.set_batch(positions(P, hook.positions, offsets, inputs))
    return iv
