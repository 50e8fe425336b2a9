"""core/ names the registries that live in other tiers by import path and imports nothing from extract/."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gapcache import plugins

ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_nothing_from_extract():
    pattern = re.compile(r"^\s*(from gapcache\.extract|import gapcache\.extract)", re.M)
    offenders = [p.name for p in (ROOT / "core").glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_the_cli_and_config_validation_load_neither_torch_nor_transformers():
    code = ("import sys; from gapcache.cli import build_parser; build_parser(); "
            "from gapcache.config import DEMO, load_config; load_config(DEMO); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.integration
def test_family_names_are_the_adapters_registry():
    from gapcache.extract.families import ADAPTERS

    assert plugins.names(plugins.FAMILIES) == tuple(ADAPTERS)
    assert all(a.family == name for name, a in ADAPTERS.items())


def test_a_broken_entry_is_named(monkeypatch):
    monkeypatch.setitem(plugins.BUILTIN, plugins.COMMANDS, {"nope": "gapcache.no_such_module:register"})
    with pytest.raises(plugins.PluginError, match=r"'gapcache.commands' entry 'nope' \(gapcache.no_such_module:register\)"):
        plugins.load(plugins.COMMANDS)


def test_a_registered_command_appears_in_the_cli(monkeypatch, capsys):
    from gapcache.cli import main

    def register(sub):
        p = sub.add_parser("hello", help="a test-only subcommand")
        p.set_defaults(func=lambda args: print("hello from a plugin") or 0)

    import types

    mod = types.ModuleType("gapcache_test_plugin")
    mod.register = register
    monkeypatch.setitem(sys.modules, "gapcache_test_plugin", mod)
    monkeypatch.setitem(plugins.BUILTIN, plugins.COMMANDS,
                        {**plugins.BUILTIN[plugins.COMMANDS], "hello": "gapcache_test_plugin:register"})
    assert main(["hello"]) == 0
    assert "hello from a plugin" in capsys.readouterr().out


def test_every_error_class_is_defined_in_core_errors():
    pattern = re.compile(r"^class \w+\((\w+\.)?\w*(Error|Exception)\w*\)", re.M)
    where = {p.relative_to(ROOT).as_posix() for d in ("core", "extract", "store", "analyze", "slurm")
             for p in (ROOT / d).rglob("*.py") if pattern.search(p.read_text())}
    assert where == {"core/errors.py"}


def test_the_analysis_names_no_condition_outside_the_registry():
    """Condition names live in core/conditions.py: the analysis asks the registry (REFERENCE, groups)."""
    names = re.compile(r'"(original|blind_black|blind_mean|blind_randomimage|truncated)"')
    offenders = []
    for p in (ROOT / "analyze").glob("*.py"):
        for n, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if names.search(code) and not code.strip().startswith(('"""', ">>>")) and "sel(condition=" not in code:
                offenders.append(f"{p.name}:{n}: {line.strip()}")
    assert offenders == []
