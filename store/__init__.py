"""The store contract between the tiers (Zarr v3). Never imports torch."""

from gapcache.store.reader import gold_answers, info, open_store, root_attrs, visual_span
from gapcache.store.schema import SCHEMA_VERSION, SITES, Layout
from gapcache.store.writer import ShardPayload, StoreWriter, create

__all__ = ["SCHEMA_VERSION", "SITES", "Layout", "ShardPayload", "StoreWriter", "create", "gold_answers", "info",
           "open_store", "root_attrs", "visual_span"]
