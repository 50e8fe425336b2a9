"""Checks that need no model, run before it is loaded (a wasted GPU allocation costs more than a
message): the run directory, the task of an array, an existing store's config, the shard size
against memory. Each failure is one :class:`~gapcache.errors.GapcacheError` line naming the thing,
what was expected, what was found and the fix (the table of them: docs/faults.md).

Usage::

    preflight(cfg, out_dir, task_index=None, n_tasks=None)   # Extraction.run and the CLI call it first
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gapcache.errors import ConfigError, IncompatibleStoreError, StoreError
from gapcache.store.schema import SITES, STORE_NAME

log = logging.getLogger(__name__)
STATE_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
#: payloads in memory at once: the one being filled, and the writer's queue (StoreWriter max_pending=2)
SHARDS_IN_FLIGHT = 3


def check_task(task_index, n_tasks) -> None:
    if task_index is None and n_tasks is None:
        return
    if task_index is None:
        raise ConfigError(f"The '--task-index' parameter of gapcache extract must be given with --n-tasks. Got "
                          f"--n-tasks {n_tasks} alone instead; pass --task-index (0..{n_tasks - 1}) too, or neither.")
    if n_tasks is None or n_tasks < 1:
        raise ConfigError(f"The '--n-tasks' parameter of gapcache extract must be a positive int with --task-index. "
                          f"Got {n_tasks} instead.")
    if not 0 <= task_index < n_tasks:
        raise ConfigError(f"The '--task-index' parameter of gapcache extract must lie in [0, {n_tasks}) "
                          f"(--n-tasks {n_tasks}). Got {task_index} instead.")


def _enclosing_store(path: Path) -> Path | None:
    """The outermost Zarr node holding ``path`` (its arrays have a zarr.json too), or None."""
    for p in reversed((path, *path.parents)):
        if (p / "zarr.json").is_file():
            return p
    return None


def check_out_dir(out, what: str = "gapcache extract") -> None:
    """``out`` must be a writable run directory (created if missing), never a store or a path inside one."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise StoreError(f"The '--out' parameter of {what} must be a directory. Got the file '{out}' instead; "
                         "pass a new directory.")
    store = _enclosing_store(out)
    if store is not None:
        where = "the store" if store == out else f"a path inside the store '{store}'"
        raise StoreError(f"The '--out' parameter of {what} must be a run directory (the store goes into "
                         f"OUT/{STORE_NAME}). Got {where} '{out}' instead; to resume that store pass its run "
                         f"directory '{store.parent}', or pass a new directory.")
    base = next(p for p in (out, *out.parents) if p.exists())
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise StoreError(f"The '--out' parameter of {what} must be a directory you can write. Got '{out}' instead "
                         f"('{base}' is not writable); pass a writable directory.")
    sp = out / STORE_NAME
    if sp.exists() and not sp.is_dir():
        raise StoreError(f"'{sp}' must be a store directory. Got a file instead; move it away or pass another --out.")
    if sp.is_dir() and not os.access(sp, os.W_OK | os.X_OK):
        raise StoreError(f"The store '{sp}' must be writable to resume it. Got a read-only directory instead "
                         "(frozen by hand?); extract into a new --out directory.")


def check_existing_store(store_path, config: dict) -> None:
    """A store already at ``store_path``: not frozen, a schema this gapcache reads, made by this config
    (every content field, the batch size included, named with both values when it differs)."""
    from gapcache.store.reader import root_attrs
    from gapcache.store.writer import config_differences, describe_differences, refuse_frozen

    sp = Path(store_path)
    if not sp.is_dir():
        return
    if not (sp / "zarr.json").is_file():
        if any(sp.iterdir()):
            raise StoreError(f"'{sp}' must be a gapcache store. Got a directory without its root metadata "
                             f"'{sp / 'zarr.json'}' instead (not written by gapcache, whose creation is atomic); "
                             "move it away or pass another --out.")
        return
    refuse_frozen(sp)
    attrs = root_attrs(sp)
    diffs = config_differences(attrs.get("config"), config)
    if diffs:
        raise IncompatibleStoreError(
            f"The store at {sp} was created with a different 'config_hash' (config): {describe_differences(diffs)}. "
            "A resume must use the store's own config (the batch size included: padding changes the stored "
            "values); use a new --out directory, or rerun with the store's config.")


def available_memory() -> int | None:
    """Bytes of memory available now (MemAvailable; the physical size where that is unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def shard_bytes(samples_per_shard: int, n_layers: int, hidden: int, dtype: str, visual_tokens: int = 0) -> int:
    """Bytes of one (condition, shard) payload's hidden states: text sites of every sample plus the
    shard's visual tokens, at every recorded layer."""
    per_row = n_layers * hidden * STATE_ITEMSIZE.get(dtype, 4)
    return per_row * (samples_per_shard * len(SITES) + visual_tokens)


def check_shard_memory(samples_per_shard: int, n_layers: int, hidden: int, dtype: str, visual_tokens: int = 0,
                       available: int | None = None) -> None:
    """Refuse a ``samples_per_shard`` whose payloads (``SHARDS_IN_FLIGHT`` at once) cannot fit in memory."""
    available = available_memory() if available is None else available
    if not available:
        return
    need = SHARDS_IN_FLIGHT * shard_bytes(samples_per_shard, n_layers, hidden, dtype, visual_tokens)
    if need <= available:
        return
    per_sample = SHARDS_IN_FLIGHT * shard_bytes(1, n_layers, hidden, dtype,
                                                -(-visual_tokens // max(samples_per_shard, 1)))
    fit = max(1, available // max(per_sample, 1))
    raise ConfigError(
        f"The 'extract.samples_per_shard' parameter must keep {SHARDS_IN_FLIGHT} shards of hidden states within "
        f"the {available / 1e9:.1f} GB of memory available ({n_layers} layers x {hidden} hidden x {dtype}, "
        f"{len(SITES)} text sites a sample{f' + {visual_tokens} visual tokens a shard' if visual_tokens else ''}: "
        f"at most about {fit} samples). Got {samples_per_shard} ({need / 1e9:.1f} GB) instead; lower it.")


def model_shape(cfg) -> tuple[int, int] | None:
    """(recorded layers, hidden) from the model's config file alone (no weights); None if it cannot be read."""
    try:
        from transformers import AutoConfig

        from gapcache.extract.models import resolve_model_path

        path = resolve_model_path(cfg.model.id, cfg.model.family)
        text = AutoConfig.from_pretrained(path, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code).get_text_config()
        n_layers, hidden = int(text.num_hidden_layers), int(text.hidden_size)
    except Exception as err:  # the model load reports it properly
        log.info("shard-size check before the model loads skipped: %s", err)
        return None
    layers = cfg.extract.layers
    return (n_layers + 1 if layers == "all" else len(layers)), hidden


def preflight(cfg, out, task_index=None, n_tasks=None) -> None:
    """Every check of an extraction that needs no model weights."""
    check_task(task_index, n_tasks)
    if cfg.extract.routing:  # a family without MoE routers: refused before the model loads
        from gapcache.extract.models import get_adapter
        from gapcache.extract.routing import check_routing

        check_routing(get_adapter(cfg.model.family))
    check_out_dir(out)
    check_existing_store(Path(out) / STORE_NAME, cfg.to_dict())
    shape = model_shape(cfg)
    if shape is not None:
        check_shard_memory(cfg.extract.samples_per_shard, shape[0], shape[1], cfg.model.dtype)
