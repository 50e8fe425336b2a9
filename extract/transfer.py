"""Device -> host transfer of the recorded states: pinned host buffers, non-blocking copies, one event.

Usage::

    t = Transfer(model.device)          # once per run: a side CUDA stream (None on CPU)
    t.begin()                           # after the forward's kernels are queued on the compute stream
    t.copy(host_rows, device_rows)      # non-blocking on CUDA (pinned host memory), a plain copy on CPU
    t.end()                             # records the event that marks every copy above done
    ...                                 # the next batch's forward runs while the copies drain
    t.wait()                            # before reading or handing the host rows on (the writer)

On a CUDA device the copies run on a side stream that first waits for the compute stream (so a
copy reads finished states), each source is ``record_stream``-ed (the caching allocator keeps its
memory until the copy stream is past it), and the host buffers are page-locked
(``pin_memory``), without which ``non_blocking=True`` degrades to a synchronous staged copy. On
CPU there is no stream, no event and no pinning (``pin_memory`` needs CUDA): the same calls do
synchronous copies, so the bytes are those of a plain ``.cpu()``.

:class:`HostPool` keeps page-locked shard buffers for reuse: pinning is a slow driver call
(``cudaHostAlloc``), and a buffer handed to the store writer is only reused once the writer has
released it.
"""

from __future__ import annotations

import threading

import numpy as np
import torch


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def host_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised host tensor, page-locked when ``device`` is a CUDA device (else ordinary memory)."""
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=is_cuda(device))


def as_storage(t: torch.Tensor) -> np.ndarray:
    """A host tensor as the store's numpy array, sharing its memory (bf16: its raw bits as uint16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def torch_dtype(storage: np.dtype) -> torch.dtype:
    """The host tensor dtype whose memory is a store buffer of numpy dtype ``storage`` (uint16: bfloat16
    bits, the store's encoding of bf16 states, gapcache.store.codec)."""
    if storage == np.uint16:
        return torch.bfloat16
    return torch.from_numpy(np.empty(0, storage)).dtype


class Transfer:
    """The device -> host copies of one run, batch by batch (see the module docstring)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if is_cuda(self.device) else None
        self.event = None

    def begin(self):
        """Order the copies that follow after everything queued so far on the compute stream."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """dst (host) <- src (device); dtypes may differ (cast as ``Tensor.copy_``). Returns dst."""
        if self.stream is None:
            return dst.copy_(src)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        src.record_stream(self.stream)
        return dst

    def end(self):
        """Mark the copies queued so far; :meth:`wait` waits for them (and every earlier one)."""
        if self.stream is not None:
            self.event = torch.cuda.Event()
            self.event.record(self.stream)

    def wait(self):
        """Block until every copy queued before the last :meth:`end` has landed in host memory."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None


class HostPool:
    """Reusable host buffers (page-locked on CUDA) per (key, dtype); thread-safe.

    ``take`` hands out a view of shape ``shape`` of the smallest free buffer that holds it, or of a new
    one (a too-small free buffer is dropped then, so the pool holds at most as many buffers as were in
    use at once); ``give`` returns it once nothing reads it any more (the store writer, after writing
    the shard). Contents are not cleared.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.made = 0  # buffers allocated (tests and the benchmark read it)

    def take(self, key, shape, dtype: torch.dtype) -> torch.Tensor:
        numel = int(np.prod(shape, dtype=np.int64))
        with self._lock:
            free = self._free.setdefault((key, dtype), [])
            fits = [k for k, buf in enumerate(free) if buf.numel() >= numel]  # (tensors: by position, not ==)
            if fits:
                base = free.pop(min(fits, key=lambda k: free[k].numel()))
            else:
                if free:  # none big enough: drop the largest rather than keep it beside a new one
                    free.pop(max(range(len(free)), key=lambda k: free[k].numel()))
                base = None
                self.made += 1
        if base is None:
            base = host_empty((max(numel, 1),), dtype, self.device)
        return base[:numel].view(tuple(shape))

    def give(self, key, t: torch.Tensor):
        """Return a buffer that :meth:`take` gave out."""
        base = t if t._base is None else t._base
        with self._lock:
            self._free.setdefault((key, base.dtype), []).append(base)
