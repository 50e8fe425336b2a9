"""MoE routing at the text sites and expert-load histograms, from forward hooks on the routers.

``Routing`` hooks the router module of every sparse decoder layer (the family adapter's ``routers``;
the choice the model applies read by its ``router_choice``) and, during one forward, keeps only:

* at each text site (``instruction``, ``prediction``): the top-k expert ids (descending weight) and
  their weights as the model applies them (``route_expert``, ``route_weight``);
* per sample and layer: how many top-k assignments each expert received over the visual span and
  over the other prompt positions (``route_load``, modality ``visual`` / ``text``); the
  teacher-forced answer tokens and padding are not counted.

Per-token router logits are never kept: the histograms are one ``scatter_add`` on the device per layer,
and nothing in the hooks synchronizes with the device (one copy to the host after the forward).
Dense layers (no router) keep the fill values (-1 ids, NaN weights, -1 loads).

Usage (inside ``Extraction.forward``)::

    with Routing(adapter, model) as routing:
        routing.set_batch(text_idx, modality)   # modality (batch, seq): 0 visual, 1 text, -1 not counted
        model(**inputs)
        per_sample = routing.collect(n_sites)   # [{route_expert, route_weight, route_load}, ...]
"""

from __future__ import annotations

import numpy as np
import torch

from gapcache.errors import ConfigError
from gapcache.extract.hooks import Hooks
from gapcache.store.arrays import MODALITIES

VISUAL, TEXT = MODALITIES.index("visual"), MODALITIES.index("text")


def check_routing(adapter, model=None) -> None:
    """Refuse ``extract.routing: true`` for a family (or a model) without MoE routers."""
    if not adapter.routing_rule:
        raise ConfigError(f"The 'extract.routing' parameter needs a mixture-of-experts family (one whose adapter "
                          f"has routers, e.g. qwen3_vl_moe). Got model.family {adapter.family!r}, which has none; "
                          "set extract.routing to false.")
    if model is not None and not any(r is not None for r in adapter.routers(model)):
        raise ConfigError(f"The 'extract.routing' parameter needs a model with sparse MoE layers. The "
                          f"{adapter.family} model loaded has none (every layer dense); set extract.routing to false.")


def modality_map(rows, seq: int) -> torch.Tensor:
    """(batch, seq) long: VISUAL on each row's visual span, TEXT on its other prompt positions, -1 elsewhere
    (teacher-forced answer, padding). ``rows``: (prompt length, visual start, visual length) per row."""
    out = torch.full((len(rows), seq), -1, dtype=torch.long)
    for r, (n_prompt, v0, nv) in enumerate(rows):
        out[r, :n_prompt] = TEXT
        out[r, v0 : v0 + nv] = VISUAL
    return out


class Routing(Hooks):
    """Forward hooks on the routers of one model; ``set_batch`` before each forward, ``collect`` after."""

    def __init__(self, adapter, model):
        self.adapter = adapter
        self.routers = adapter.routers(model)
        self.n_layers, self.n_experts, self.top_k = adapter.routing_shape(model.config)
        self._handles = []  # installed on entering the ``with`` block, removed on leaving it
        self._ids: dict[int, torch.Tensor] = {}
        self._w: dict[int, torch.Tensor] = {}
        self._load: dict[int, torch.Tensor] = {}

    def __enter__(self):
        for li, module in enumerate(self.routers):
            if module is not None:
                self._handles.append(module.register_forward_hook(self._hook(li)))
        return self

    def set_batch(self, text_idx, modality):
        """text_idx: (rows, positions) long tensors of the text sites (site-major per row, as Capture);
        modality: (batch, seq) from :func:`modality_map`."""
        self._text_idx, self._modality = text_idx, modality
        self._dev = None
        self._ids, self._w, self._load = {}, {}, {}

    def _hook(self, li):
        def hook(module, args, output):
            ids, w = self.adapter.router_choice(output)  # (batch*seq, k)
            b, s = self._modality.shape
            ids, w = ids.reshape(b, s, -1), w.reshape(b, s, -1)
            if self._dev is None or self._dev[0] != ids.device:  # the batch's index tensors, once per device
                self._dev = (ids.device, self._text_idx[0].to(ids.device), self._text_idx[1].to(ids.device),
                             self._modality.to(ids.device))
            _, rows, pos, mod = self._dev
            self._ids[li] = ids[rows, pos].detach()
            self._w[li] = w[rows, pos].detach()
            # key = (row * n_modalities + modality) * n_experts + expert; positions not counted go to one extra
            # bin (no boolean indexing, no bincount: nothing here waits for the device)
            n_bins = b * len(MODALITIES) * self.n_experts
            key = (torch.arange(b, device=ids.device)[:, None] * len(MODALITIES) + mod)[:, :, None] * self.n_experts
            key = torch.where((mod >= 0)[:, :, None], key + ids, n_bins).reshape(-1)
            load = torch.zeros(n_bins + 1, dtype=torch.int32, device=ids.device)
            self._load[li] = load.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))[:n_bins]
            return None

        return hook

    def collect(self, n_sites: int) -> list[dict]:
        """Per batch row: ``route_expert`` (site, route_layer, k) int16, ``route_weight`` (same) float32,
        ``route_load`` (route_layer, modality, expert) int32, on CPU."""
        b = self._modality.shape[0]
        L, E, K, M = self.n_layers, self.n_experts, self.top_k, len(MODALITIES)
        ids = np.full((b * n_sites, L, K), -1, np.int16)
        w = np.full((b * n_sites, L, K), np.nan, np.float32)
        load = np.full((b, L, M, E), -1, np.int32)
        for li in self._ids:
            ids[:, li] = self._ids[li].cpu().numpy()
            w[:, li] = self._w[li].float().cpu().numpy()
            load[:, li] = self._load[li].reshape(b, M, E).cpu().numpy()
        return [{"route_expert": ids[r * n_sites : (r + 1) * n_sites], "route_weight": w[r * n_sites : (r + 1) * n_sites],
                 "route_load": load[r]} for r in range(b)]


class NoRouting:
    """The stand-in when routing is off: installs nothing, collects nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_batch(self, text_idx, modality):
        pass

    def collect(self, n_sites: int) -> list[dict]:
        return []
