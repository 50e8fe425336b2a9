"""The family registry: one adapter per model family, owning all of that family's knowledge.

Usage::

    from gapcache.extract.families import get_adapter
    adapter = get_adapter("qwen3_vl_moe")
    model, processor = adapter.load(cfg.model)         # AutoModelForImageTextToText / AutoProcessor
    layers = adapter.decoder_layers(model)             # model.model.language_model.layers

Adding a family: one module with an ``Adapter`` subclass (see ``base.Adapter`` for what it must
define) and one line in ``gapcache.plugins.BUILTIN[FAMILIES]`` (a plugin package can declare its own as
an entry point of the ``gapcache.families`` group). Torch-free to import. The names are read from the
registry (:func:`gapcache.plugins.names`), so the config can validate a family without importing this.
"""

from __future__ import annotations

from gapcache import plugins
from gapcache.errors import UnknownNameError
from gapcache.extract.families.base import Adapter
from gapcache.extract.families.llava import LlavaAdapter
from gapcache.extract.families.qwen2_5_vl import Qwen2_5_VLAdapter
from gapcache.extract.families.qwen2_vl import Qwen2VLAdapter
from gapcache.extract.families.qwen3_vl import Qwen3VLAdapter
from gapcache.extract.families.qwen3_vl_moe import Qwen3VLMoeAdapter

ADAPTERS: dict[str, Adapter] = {name: cls() for name, cls in plugins.load(plugins.FAMILIES).items()}
_ADAPTER_CLASSES = tuple(type(a) for a in ADAPTERS.values())
for _name, _adapter in ADAPTERS.items():
    if _adapter.family != _name:
        raise plugins.PluginError(f"The {plugins.FAMILIES!r} entry point {_name!r} names the adapter of family "
                                  f"{_adapter.family!r}; an entry point's name must be its family.")


def get_adapter(family: str) -> Adapter:
    """The adapter of ``family``; UnknownNameError listing the registered families otherwise."""
    if family not in ADAPTERS:
        raise UnknownNameError("model family", family, ADAPTERS)
    return ADAPTERS[family]


__all__ = ["ADAPTERS", "Adapter", "get_adapter", "LlavaAdapter", "Qwen2VLAdapter", "Qwen2_5_VLAdapter",
           "Qwen3VLAdapter", "Qwen3VLMoeAdapter"]
