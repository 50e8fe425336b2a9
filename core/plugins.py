"""Registries whose entries live in other tiers, named here by import path so that core/ imports
nothing from extract/ (the names are known without importing torch or transformers).

Usage::

    from gapcache import plugins
    plugins.names(plugins.FAMILIES)          # ('llava', 'qwen2_vl', ...): nothing imported
    plugins.load(plugins.COMMANDS)           # {'extract': register, ...}: the objects, imported now

Another installed package can add entries to a group through entry points of the same group name
(``[project.entry-points."gapcache.families"]`` in its pyproject.toml); gapcache's own are listed here.
"""

from __future__ import annotations

import importlib

from gapcache.errors import PluginError

FAMILIES = "gapcache.families"  # model family -> its Adapter class
COMMANDS = "gapcache.commands"  # CLI section -> register(subparsers)

BUILTIN = {
    FAMILIES: {
        "llava": "gapcache.extract.families.llava:LlavaAdapter",
        "qwen2_vl": "gapcache.extract.families.qwen2_vl:Qwen2VLAdapter",
        "qwen2_5_vl": "gapcache.extract.families.qwen2_5_vl:Qwen2_5_VLAdapter",
        "qwen3_vl": "gapcache.extract.families.qwen3_vl:Qwen3VLAdapter",
        "qwen3_vl_moe": "gapcache.extract.families.qwen3_vl_moe:Qwen3VLMoeAdapter",
    },
    COMMANDS: {
        "extract": "gapcache.extract.cli:register",  # extract, demo
        "store": "gapcache.store.cli:register",  # verify, merge, freeze, migrate
        "slurm": "gapcache.slurm.cli:register",  # slurm plan|submit|status
    },
}


def entries(group: str) -> dict[str, str]:
    """name -> "module:attribute" of every entry of ``group``: gapcache's own, then installed plugins'."""
    from importlib.metadata import entry_points

    out = dict(BUILTIN[group])
    for e in entry_points(group=group):
        out.setdefault(e.name, e.value)
    return out


def names(group: str) -> tuple[str, ...]:
    """Registered names of ``group``, without importing anything."""
    return tuple(entries(group))


def load(group: str) -> dict:
    """name -> the loaded object of every entry of ``group``."""
    out = {}
    for name, value in entries(group).items():
        module, _, attr = value.partition(":")
        try:
            out[name] = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise PluginError(f"The {group!r} entry {name!r} ({value}) cannot be loaded: {err}.") from None
    return out
