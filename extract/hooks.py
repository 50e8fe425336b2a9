"""Forward pre-hooks: read the residual stream at the token sites, and intervene on it.

Both act on what a decoder layer *receives* (``register_forward_pre_hook``), so

* ``Capture`` at layer i records the stream entering layer i (deepstack features included for
  Qwen3-VL), and at the final norm the output of the last layer before the norm;
* ``Truncation(L)`` changes the input of every layer with index > L: ``zero`` overwrites the
  visual positions with zeros, ``drop`` masks the visual positions out of attention (as keys,
  for every non-visual query). L = -1 intervenes from layer 0 on.

Intervention hooks are prepended so they run before anything else registered on the layer.
"""

from __future__ import annotations

import torch


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden(args, kwargs, new):
    if args:
        return (new,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


class Capture:
    """Gathers site states at selected layers during one forward pass.

    ``layers``: decoder layer modules; ``norm``: the final norm; ``record``: hidden-state indices
    (0..n_layers) to keep. Call ``set_batch`` before each forward, ``collect`` after.
    """

    def __init__(self, layers, norm, record):
        self.n_layers = len(layers)
        self.record = sorted(record)
        self._handles = []
        self._text_idx = self._vis_idx = None
        self._text: dict[int, torch.Tensor] = {}
        self._vis: dict[int, torch.Tensor] = {}
        modules = list(layers) + [norm]
        for i in self.record:
            self._handles.append(modules[i].register_forward_pre_hook(self._hook(i), with_kwargs=True))

    def set_batch(self, text_idx, vis_idx):
        """text_idx, vis_idx: (rows, positions) long tensors; gathered in that order."""
        self._text_idx, self._vis_idx = text_idx, vis_idx
        self._text, self._vis = {}, {}

    def _hook(self, i):
        def hook(module, args, kwargs):
            h = _hidden(args, kwargs)  # (batch, seq, hidden)
            rows, pos = self._text_idx
            self._text[i] = h[rows.to(h.device), pos.to(h.device)].detach()  # (n_text, hidden)
            if self._vis_idx is not None and self._vis_idx[0].numel():
                rows, pos = self._vis_idx
                self._vis[i] = h[rows.to(h.device), pos.to(h.device)].detach()  # (n_vis, hidden)
            return None

        return hook

    def collect(self):
        """-> text (n_text, layer, hidden), visual (n_vis, layer, hidden) or None, on CPU."""
        missing = [i for i in self.record if i not in self._text]
        if missing:
            raise RuntimeError(f"layers {missing} were never reached by the forward pass")
        text = torch.stack([self._text[i].cpu() for i in self.record], dim=1)
        vis = torch.stack([self._vis[i].cpu() for i in self.record], dim=1) if self._vis else None
        return text, vis

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


class Truncation:
    """Intervene on the visual positions at the input of every decoder layer with index > L."""

    def __init__(self, layers, layer: int, strategy: str):
        if strategy not in ("zero", "drop"):
            raise ValueError(f"unknown truncation strategy {strategy!r}")
        self.layer, self.strategy = layer, strategy
        self._vis_idx = self._vis_mask = self._attn_2d = None
        self._mask_cache: dict = {}
        self._seen: dict = {}  # id(layer) -> tokens it has been called on since set_batch
        self._handles = [
            module.register_forward_pre_hook(self._zero if strategy == "zero" else self._drop, with_kwargs=True,
                                             prepend=True)
            for i, module in enumerate(layers)
            if i > layer
        ]

    def set_batch(self, vis_idx, vis_mask, attention_mask_2d):
        """vis_idx: (rows, positions); vis_mask: (batch, seq) bool; attention_mask_2d: (batch, seq)."""
        self._vis_idx, self._vis_mask, self._attn_2d = vis_idx, vis_mask, attention_mask_2d
        self._mask_cache, self._seen = {}, {}

    def _zero(self, module, args, kwargs):
        h = _hidden(args, kwargs)  # (batch, seq, hidden)
        if h.shape[1] < self._vis_mask.shape[1]:  # a cached decoding step: visual K/V already intervened
            return None
        rows, pos = self._vis_idx
        h = h.clone()
        h[rows.to(h.device), pos.to(h.device)] = 0
        return _replace_hidden(args, kwargs, h)

    def _drop(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        h = _hidden(args, kwargs)
        # keys = what this layer saw before (cached, while generating) + this call's queries
        kv = self._seen[id(module)] = self._seen.get(id(module), 0) + h.shape[1]
        if mask is not None:
            kv = int(mask.shape[-1])
        key = (None if mask is None else (mask.dtype, mask.device, tuple(mask.shape)), h.device, h.shape[1], kv)
        if key not in self._mask_cache:
            self._mask_cache[key] = self._dropped_mask(mask, h, kv)
        return args, {**kwargs, "attention_mask": self._mask_cache[key]}

    def _dropped_mask(self, mask, h, kv: int):
        """The layer's 4D mask with visual keys hidden from every non-visual query.

        In a cached decoding step (generation) the queries are the new tokens and the keys the prompt plus
        the tokens generated so far: those are never visual, so they see no visual key either."""
        vis = _fit(self._vis_mask.to(h.device), kv, False)  # (batch, kv)
        b, q_len = vis.shape[0], h.shape[1]
        if mask is None:
            keep = torch.ones(q_len, kv, dtype=torch.bool, device=h.device).tril(kv - q_len)
            attn = _fit(self._attn_2d.to(h.device).bool(), kv, True)
            keep = keep[None, None] & attn[:, None, None, :]  # (b, 1, q, kv)
        elif mask.dtype == torch.bool:
            keep = mask.clone()
        else:
            keep = mask == 0
        keep = keep.expand(b, 1, q_len, kv).clone()
        query_vis = vis[:, -q_len:]  # (b, q)
        hide = (~query_vis)[:, None, :, None] & vis[:, None, None, :]  # (b, 1, q, kv)
        keep &= ~hide
        if mask is None or mask.dtype == torch.bool:
            return keep
        return torch.zeros_like(mask).masked_fill(~keep, torch.finfo(mask.dtype).min)

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def _fit(x: torch.Tensor, length: int, fill: bool) -> torch.Tensor:
    """(batch, n) bool cut or extended with ``fill`` to (batch, length): the prompt's per-position flags
    for a key range that also holds generated tokens."""
    if x.shape[1] >= length:
        return x[:, :length]
    return torch.cat([x, x.new_full((x.shape[0], length - x.shape[1]), fill)], dim=1)
