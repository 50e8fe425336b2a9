"""Attention summaries at the query sites, computed inside the forward (issue 14, item 1).

Neither ``output_attentions`` nor a (seq x seq) map: an attention function registered with transformers'
``AttentionInterface`` (names :data:`NAMES`, one per base implementation) computes each layer's output
with the model's own implementation (SDPA, or the family's eager function) on exactly the same
arguments, so outputs and hidden states are unchanged bit for bit, and then, for the few query rows
needed, the softmax rows over every key:

    p[b, h, q, :] = softmax(scaling * q_h . K_(h // groups) + mask[b, q, :])   (float32)

with the query and key states the model passes the kernel (RoPE / M-RoPE applied; GQA: query head h
reads key head h // num_key_value_groups, as ``repeat_kv`` does), and the layer's own
``attention_mask`` (causal + padding, sliding window where the model builds one, and gapcache's
``drop`` masks, which a pre-hook puts into the decoder layer's ``attention_mask`` kwarg). A mask
registered for the same name (the base implementation's mask function) makes the model build the
mask it builds for the base. ``None`` (SDPA's is_causal path, no padding) is the causal mask.
Memory: O(heads x query rows x seq) per layer, query rows = 2 sites + the question's tokens.

Per recorded layer and query head, from each query of :data:`QUERIES` (``question``: the mean of
the rows of every question token, i.e. the attention of the question as a whole):

* ``attn_mass[..., target]`` for :data:`TARGETS`: the attention mass on the visual span, on the
  question's tokens, on every other prompt token (``template``: system prompt, chat template,
  special tokens, answer prefix) and on the first token (position 0, also counted in its group);
* ``attn_visual[..., stat]`` for :data:`STATS`, over the visual keys only (the row renormalised
  on the visual span): entropy (nats), N_eff = exp(entropy), top-k mass for k = 5, 10, 50 (k
  capped at the span's length); NaN where the visual mass is 0 (``drop`` after L).

Layer convention: the store's ``layer`` i is the hidden state entering decoder layer i, so its
attention summaries are decoder layer i's attention (the layer that reads that state); the last
index (the output of the last layer) has none (NaN).

Usage (the runner)::

    with AttentionSummaries(model, adapter, planned_batch, seq, record) as att:
        model(**inputs)
    att.results()   # per row {"attn_mass": (query, layer, head, target), "attn_visual": (...)}
"""

from __future__ import annotations

import sys

import numpy as np
import torch

QUERIES = ("instruction", "prediction", "question")
TARGETS = ("visual", "question", "template", "first")
TOPK = (5, 10, 50)
STATS = ("entropy", "n_eff", *(f"top{k}" for k in TOPK))
ARRAYS = ("attn_mass", "attn_visual")  # the unit arrays it fills (gapcache.store.arrays)
NAMES = {"sdpa": "gapcache_sdpa", "eager": "gapcache_eager"}  # base implementation -> registered name
BASE = {v: k for k, v in NAMES.items()}

_ACTIVE: list = []  # the AttentionSummaries of the forward in progress (one at a time)
_REGISTERED: list = []


def _base_forward(module, base: str):
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    mod = sys.modules[type(module).__module__]  # the family's own eager function
    return mod.eager_attention_forward


def _make(base: str):
    def gapcache_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
        out = _base_forward(module, base)(module, query, key, value, attention_mask, *args, **kwargs)
        if _ACTIVE:
            scaling = kwargs.get("scaling", args[0] if base == "eager" and args else None)
            _ACTIVE[-1].observe(module, query, key, attention_mask, scaling)
        return out

    gapcache_attention_forward.__name__ = f"gapcache_{base}_attention_forward"
    return gapcache_attention_forward


def register():
    """Register :data:`NAMES` with ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    masks = {"sdpa": sdpa_mask, "eager": eager_mask}
    for base, name in NAMES.items():
        AttentionInterface.register(name, _make(base))
        AttentionMaskInterface.register(name, masks[base])
    _REGISTERED.append(True)


def text_config(adapter, model):
    """The config object the decoder's attention layers dispatch on (and the mask is built from)."""
    layers = adapter.decoder_layers(model)
    attn = getattr(layers[0], "self_attn", None)
    return attn.config if attn is not None and hasattr(attn, "config") else model.config.get_text_config()


def n_heads(config) -> int:
    return int(config.num_attention_heads)


class AttentionSummaries:
    """Context manager: for one forward of a batch, switch the decoder's attention to the gapcache function,
    record the summaries of the decoder layers behind the ``record`` hidden-state indices, switch back.

    ``P``: the batch's planned samples (right padded: row r's prompt starts at 0); ``seq``: the batch's
    sequence length (prompt + appended answer + padding)."""

    def __init__(self, model, adapter, P, seq: int, record):
        self.model, self.adapter, self.P, self.seq, self.record = model, adapter, list(P), int(seq), list(record)
        self.config = text_config(adapter, model)
        self.n_heads = n_heads(self.config)
        self.layer_of = {}  # decoder layer module id -> decoder layer index
        for j, layer in enumerate(adapter.decoder_layers(model)):
            self.layer_of[id(getattr(layer, "self_attn", layer))] = j
        self.out: dict[int, tuple] = {}  # decoder layer index -> (mass (b, Q, H, T), vis (b, Q, H, S))
        self._build()

    # -------------------------------------------------------------- the batch's positions
    def _build(self):
        b, seq = len(self.P), self.seq
        n_q = max(len(range(*p.question_span)) for p in self.P)
        rows = 2 + max(n_q, 1)
        pos = torch.zeros(b, rows, dtype=torch.long)
        valid = torch.zeros(b, rows, dtype=torch.bool)
        targets = torch.zeros(b, len(TARGETS), seq, dtype=torch.bool)
        for r, p in enumerate(self.P):
            q = list(range(*p.question_span))
            pos[r, 0], pos[r, 1] = p.instruction, p.prediction
            pos[r, 2 : 2 + len(q)] = torch.tensor(q, dtype=torch.long)
            valid[r, : 2 + len(q)] = True
            n = len(p.prompt_ids)
            vis = torch.zeros(seq, dtype=torch.bool)
            vis[p.visual_start : p.visual_start + p.visual_length] = True
            ques = torch.zeros(seq, dtype=torch.bool)
            ques[q] = True
            prompt = torch.zeros(seq, dtype=torch.bool)
            prompt[:n] = True
            targets[r, 0], targets[r, 1] = vis, ques
            targets[r, 2] = prompt & ~vis & ~ques
            targets[r, 3, 0] = True
        self._cpu = (pos, valid, targets, valid[:, 2:].sum(1))
        self._dev: dict = {}  # device -> those tensors there (a model split over devices: per layer's device)
        want = {i for i in self.record}
        self.layers = {j for j in range(self.adapter.n_layers(self.model)) if j in want}

    # -------------------------------------------------------------- install / remove
    def __enter__(self):
        register()
        self.base = self.config._attn_implementation
        if self.base not in NAMES:
            from gapcache.errors import ConfigError

            raise ConfigError(f"extract.attention needs model.attn_implementation 'sdpa' or 'eager'. Got "
                              f"{self.base!r} instead.")
        self.config._attn_implementation = NAMES[self.base]
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        self.config._attn_implementation = self.base
        return False

    # -------------------------------------------------------------- inside the forward
    @torch.no_grad()
    def observe(self, module, query, key, attention_mask, scaling):
        j = self.layer_of.get(id(module), getattr(module, "layer_idx", None))
        if j not in self.layers or query.shape[2] != self.seq:  # not recorded, or a cached decoding step
            return
        b, h, _, d = query.shape
        kv_heads, kv = key.shape[1], key.shape[2]
        groups = h // kv_heads
        scaling = d**-0.5 if scaling is None else scaling
        if query.device not in self._dev:
            self._dev[query.device] = tuple(t.to(query.device) for t in self._cpu)
        pos, valid, targets, n_question = self._dev[query.device]  # (b, R), (b, R), (b, T, seq), (b,)
        R = pos.shape[1]
        q = query[torch.arange(b, device=query.device)[:, None], :, pos]  # (b, R, h, d)
        q = q.permute(0, 2, 1, 3).float().reshape(b, kv_heads, groups * R, d)  # head h = kv head h // groups
        scores = torch.matmul(q, key.float().transpose(2, 3)).reshape(b, h, R, kv) * scaling
        scores += self._mask_rows(attention_mask, pos, kv, scores.device)[:, None]  # (b, h, R, kv), in place
        p = torch.softmax(scores, dim=-1)
        del scores
        # the question as a whole: the mean of its tokens' rows
        qmask = valid[:, 2:].to(p.dtype)  # (b, R-2)
        qmean = torch.einsum("bhrk,br->bhk", p[:, :, 2:], qmask) / n_question.clamp(min=1).to(p.dtype)[:, None, None]
        qmean = torch.where((n_question > 0)[:, None, None], qmean, torch.nan)
        rows = torch.stack([p[:, :, 0], p[:, :, 1], qmean], dim=2)  # (b, h, Q, kv)
        self.out[j] = summarise(rows, targets[..., :kv])

    def _mask_rows(self, mask, pos, kv, device):
        """(b, R, kv) additive float32 mask rows of the query positions ``pos`` (-inf where a key is hidden)."""
        b = pos.shape[0]
        if mask is None:  # SDPA's is_causal path: no padding, the causal mask
            keys = torch.arange(kv, device=device)
            keep = keys[None, None, :] <= pos[:, :, None]
        else:
            m = mask if mask.dim() == 4 else mask[:, None]
            m = m[:, 0].expand(b, m.shape[-2], kv)  # (b, q, kv): one mask for every head (the families' masks)
            m = m[torch.arange(b, device=m.device)[:, None], pos.to(m.device)]  # (b, R, kv)
            if m.dtype == torch.bool:
                keep = m
            else:
                return m.float().clamp(min=torch.finfo(torch.float32).min).to(device)
        return torch.zeros(keep.shape, dtype=torch.float32, device=device).masked_fill(~keep, float("-inf"))

    # -------------------------------------------------------------- after the forward
    def results(self) -> list[dict]:
        """Per batch row: ``attn_mass`` (query, layer, head, target) and ``attn_visual`` (query, layer, head,
        stat), float32, on the ``record`` layer axis (NaN where a layer has no attention)."""
        b, H = len(self.P), self.n_heads
        mass = np.full((b, len(QUERIES), len(self.record), H, len(TARGETS)), np.nan, np.float32)
        vis = np.full((b, len(QUERIES), len(self.record), H, len(STATS)), np.nan, np.float32)
        for li, i in enumerate(self.record):
            if i in self.out:
                m, v = self.out[i]
                mass[:, :, li] = m.cpu().numpy()
                vis[:, :, li] = v.cpu().numpy()
        return [{"attn_mass": mass[r], "attn_visual": vis[r]} for r in range(b)]


def summarise(rows: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` (b, h, Q, kv) attention rows, ``targets`` (b, T, kv) bool key groups (TARGETS order, visual
    first) -> mass (b, Q, h, T) and visual-key statistics (b, Q, h, S) (STATS order)."""
    t = targets.to(rows.dtype)
    mass = torch.einsum("bhqk,btk->bqht", rows, t)
    v = rows * t[:, None, None, 0]  # visual keys only
    mv = v.sum(-1, keepdim=True)
    pn = v / mv  # NaN where no visual mass
    ent = -torch.special.xlogy(pn, pn).sum(-1)
    ent = torch.where(mv[..., 0] > 0, ent, torch.nan)
    stats = [ent, ent.exp()]
    kv = rows.shape[-1]
    srt = None
    if kv:
        srt = torch.topk(pn.nan_to_num(0.0), min(max(TOPK), kv), dim=-1).values.cumsum(-1)
    for k in TOPK:
        top = srt[..., min(k, kv) - 1] if srt is not None else torch.zeros_like(ent)
        stats.append(torch.where(mv[..., 0] > 0, top, torch.nan))
    return mass, torch.stack(stats, dim=-1).permute(0, 2, 1, 3)


def reference(attn: np.ndarray, P, seq: int, record, n_layers: int) -> list[dict]:
    """The same summaries from full attention maps (eager ``output_attentions``): ``attn`` (layer, b, h, seq, seq)
    float. For tests: a second, plain implementation of the definitions above."""
    out = []
    H = attn.shape[2]
    for r, p in enumerate(P):
        q = list(range(*p.question_span))
        vis = np.zeros(seq, bool)
        vis[p.visual_start : p.visual_start + p.visual_length] = True
        ques = np.zeros(seq, bool)
        ques[q] = True
        prompt = np.arange(seq) < len(p.prompt_ids)
        groups = [vis, ques, prompt & ~vis & ~ques, np.arange(seq) == 0]
        mass = np.full((len(QUERIES), len(record), H, len(TARGETS)), np.nan)
        stats = np.full((len(QUERIES), len(record), H, len(STATS)), np.nan)
        for li, i in enumerate(record):
            if i >= n_layers:
                continue
            A = attn[i, r].astype(np.float64)  # (h, seq, seq)
            rows = [A[:, p.instruction], A[:, p.prediction], A[:, q].mean(1) if q else np.full((H, seq), np.nan)]
            for qi, row in enumerate(rows):
                for hh in range(H):
                    x = row[hh]
                    mass[qi, li, hh] = [x[g].sum() for g in groups]
                    xv = x[vis]
                    if xv.sum() <= 0:
                        continue
                    pn = xv / xv.sum()
                    nz = pn[pn > 0]
                    ent = -(nz * np.log(nz)).sum()
                    srt = np.sort(pn)[::-1]
                    stats[qi, li, hh] = [ent, np.exp(ent), *(srt[:k].sum() for k in TOPK)]
        out.append({"attn_mass": mass, "attn_visual": stats})
    return out
