"""The torch side of the intervention registry: one hook class per strategy of ``gapcache.conditions``.

A condition's :class:`gapcache.conditions.Hook` says which strategy acts, on the input of which
decoder layers and at which positions; :func:`install` turns it into forward pre-hooks on a
model's decoder layers. Hooks act on what a layer *receives* and are prepended, so they run
before anything else registered on the layer (a ``Capture`` there sees the intervened input).

* ``zero``: the positions' states are overwritten with zeros (still attended);
* ``drop``: the positions are masked out of attention as keys, for every query outside them
  (positions still attend to each other). In a cached decoding step (generation) the queries are
  the new tokens: they see no masked key either.

Adding a strategy: its ``Strategy`` entry in ``core/conditions.py`` and here a subclass of
:class:`Intervention` with ``@implements(name)`` and a ``hook(module, args, kwargs)`` method; an
``acts_on="states"`` hook returns the new ``(args, kwargs)`` via ``replace_hidden``. The
conformance test (tests/test_interventions.py) checks that every registered strategy has a hook
here and that it touches exactly its declared layers and positions.

Every intervention is a context manager: ``with install(layers, hook, batch): model(...)``.
"""

from __future__ import annotations

import torch

from gapcache import conditions
from gapcache.errors import UnknownNameError
from gapcache.extract.hooks import Hooks, hidden_of, replace_hidden

#: strategy name -> Intervention subclass
IMPLEMENTATIONS: dict[str, type] = {}

#: position kind (``conditions.POSITIONS``) -> planned sample -> the positions within its prompt
POSITIONS = {
    "visual": lambda p: range(p.visual_start, p.visual_start + p.visual_length),
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

    def __init__(self, index, mask, attention_mask):
        self.index, self.mask, self.attention_mask = index, mask, attention_mask


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
    return Batch((rows, pos), mask, inputs["attention_mask"])


class Intervention(Hooks):
    """Forward pre-hooks of one strategy on the input of decoder layers ``act_on`` (indices into ``layers``).

    ``set_batch(batch)`` before each forward. With no layers it installs nothing (a condition
    without a hook). Subclasses implement ``hook(module, args, kwargs)``."""

    def __init__(self, layers, act_on=(), **params):
        self.act_on, self.params = tuple(act_on), params
        self.batch: Batch | None = None
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
        rows, pos = self.batch.index
        h = h.clone()
        h[rows.to(h.device), pos.to(h.device)] = 0
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


def _fit(x: torch.Tensor, length: int, fill: bool) -> torch.Tensor:
    """(batch, n) bool cut or extended with ``fill`` to (batch, length): the prompt's per-position flags
    for a key range that also holds generated tokens."""
    if x.shape[1] >= length:
        return x[:, :length]
    return torch.cat([x, x.new_full((x.shape[0], length - x.shape[1]), fill)], dim=1)


def install(layers, hook: conditions.Hook | None, P=(), offsets=(), inputs=None) -> Intervention:
    """The hooks of ``hook`` on decoder ``layers`` for the batch of planned samples ``P`` (``inputs``: the
    processed batch, for its shape and padding mask); ``hook`` None installs nothing. A context manager."""
    if hook is None:
        return Intervention(layers)
    if hook.strategy not in IMPLEMENTATIONS:
        raise UnknownNameError("intervention hook", hook.strategy, IMPLEMENTATIONS)
    iv = IMPLEMENTATIONS[hook.strategy](layers, hook.layers, **dict(hook.params))
    iv.set_batch(positions(P, hook.positions, offsets, inputs))
    return iv
