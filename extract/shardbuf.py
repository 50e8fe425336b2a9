"""The host buffers of one (condition, shard) payload, the hidden states' ones reused across shards.

Usage (``Extraction.shard_payload``)::

    sb = ShardBuffers(pool, names, sizes, layout, idx, model_dtype)
    dst = sb.rows("visual_states", i, n)    # host tensor rows of sample i: the device copy lands there
    sb.put(j, res)                          # the other values of shard row j (scores, flags, ...)
    payload = sb.payload(ci, shard, done)   # failed rows filled; buffers back to the pool once written

The hidden-state buffers (by far the largest: a shard's visual span) come from a
:class:`~gapcache.extract.transfer.HostPool` (page-locked on CUDA) uninitialised: each done row is
written by its device copy and every other row is filled with the array's fill value before the
payload is handed on, so a reused buffer never leaks an earlier shard's rows. The pool gets a
buffer back only when the writer releases the payload (``ShardPayload.on_release``), so no
buffer is overwritten before it is written. The small arrays are made fill-valued per shard.
"""

from __future__ import annotations

import numpy as np
import torch

from gapcache.extract.transfer import HostPool, as_storage, torch_dtype
from gapcache.store import ShardPayload, arrays


class ShardBuffers:
    """Buffers of one payload: ``values`` (name -> numpy, storage dtype), states also as host tensors."""

    def __init__(self, pool: HostPool, names, sizes: dict, layout, idx, model_dtype: str):
        self.pool, self.n = pool, len(idx)
        self.row_of = {i: j for j, i in enumerate(idx)}  # sample index -> shard row
        self.values, self.tensors, self.offs, self.lengths = {}, {}, {}, {}
        for name in names:
            spec = arrays.get(name)
            span = layout.spans.get(spec.span)
            n_tok = sum(span.lengths[i] for i in idx) if span else 0
            if span:
                self.offs[name] = [span.offsets[i] - span.offsets[idx[0]] for i in idx]
                self.lengths[name] = [span.lengths[i] for i in idx]
            if not spec.is_state:
                self.values.update(arrays.unit_buffers([name], sizes, self.n, n_tok, model_dtype))
                continue
            lead = self.n if spec.along == arrays.UNIT else n_tok
            shape = (lead, *arrays.unit_row_shape(spec, sizes))
            t = pool.take(name, shape, torch_dtype(spec.numpy_dtype(model_dtype)))
            self.tensors[name], self.values[name] = t, as_storage(t)

    def rows(self, name: str, i: int, n: int) -> torch.Tensor:
        """The host rows that sample ``i``'s ``n`` rows of state array ``name`` go to."""
        t, j = self.tensors[name], self.row_of[i]
        if name not in self.offs:
            return t[j]
        a = self.offs[name][j]
        return t[a : a + n]

    def put(self, j: int, res: dict):
        """Row j's values other than the states (those came through :meth:`rows`)."""
        for name, value in res.items():
            if name in self.tensors:
                continue
            if name in self.offs:
                self.values[name][self.offs[name][j] : self.offs[name][j] + value.shape[0]] = value
            elif name in self.values:
                self.values[name][j] = value

    def fill_undone(self, done: np.ndarray):
        """Fill the state rows of every row not done (failed, or never reached) with the fill value."""
        for name, arr in self.values.items():
            if name not in self.tensors:
                continue
            fill = arrays.get(name).fill_value()
            for j in np.flatnonzero(~done):
                if name in self.offs:
                    a = self.offs[name][j]
                    arr[a : a + self.lengths[name][j]] = fill
                else:
                    arr[j] = fill

    def payload(self, ci: int, shard: int, done: np.ndarray) -> ShardPayload:
        """The payload (call after every device copy has landed): undone rows filled, buffers pooled on release."""
        self.fill_undone(done)
        return ShardPayload(ci, shard, self.values, on_release=self.release)

    def release(self):
        for name, t in self.tensors.items():
            self.pool.give(name, t)
        self.tensors = {}
