"""Forward pre-hooks that read the residual stream at the token sites.

``Capture`` acts on what a decoder layer *receives* (``register_forward_pre_hook``): at layer i it
records the stream entering layer i (deepstack features included for Qwen3-VL), and at the final
norm the output of the last layer before the norm. The hooks that *change* the stream (the
registered intervention strategies) live in ``gapcache.extract.interventions``; they are
prepended, so a Capture at the same layer sees the intervened input.

Every hook object is a context manager (``with Capture(...) as cap:``): its hooks are installed
when it is made and removed on exit, or by ``remove()``.
"""

from __future__ import annotations

import torch


def hidden_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def replace_hidden(args, kwargs, new):
    if args:
        return (new,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


class Hooks:
    """Forward hook handles removed together: on ``remove()`` or when a ``with`` block exits."""

    _handles: list

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


class Capture(Hooks):
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
            h = hidden_of(args, kwargs)  # (batch, seq, hidden)
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
