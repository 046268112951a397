"""The code's layers: the library below, the Flower apps above it, the command line on top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedmask.config import SCHEMA, RunConfig
from fedmask.methods import BUILTIN, get_method

ROOT = Path(__file__).resolve().parents[1]
APP_PACKAGES = ("server", "clients")
WIRING = ("cli.py", "api.py")  # the command line and its Python twin: the top layer, which wires the apps


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "fedmask").glob("*.py")), ids=lambda p: p.name)
def test_library_never_imports_the_apps(path):
    """No fedmask/ module imports server or clients; the command line and the Python API
    (fedmask.simulate), which wire them, are the exception."""
    upward = {m for m in _imported_modules(path) if m.split(".")[0] in APP_PACKAGES}
    if path.name in WIRING:
        assert path.name == "cli.py" or upward, f"{path.name} is expected to wire the apps"
    else:
        assert not upward, f"fedmask/{path.name} imports {sorted(upward)}"


def test_the_plugin_base_and_rules_live_in_the_library():
    """The plug-in API (MaskAggregator) is importable from fedmask, and server/ has no aggregators module."""
    from fedmask.aggregators import MaskAggregator

    assert MaskAggregator.__module__ == "fedmask.aggregators"
    assert not (ROOT / "server" / "aggregators.py").exists()


def test_one_registry_answers_for_every_builtin_method():
    """Every built-in method has one entry: an aggregator unless dense, a mask mode, known keys;
    the config accepts exactly these names."""
    for name, method in BUILTIN.items():
        assert get_method(name) is method and method.name == name
        assert (method.aggregator is None) == (method.mask_mode is None)
        assert set(method.keys) <= set(SCHEMA) and set(method.restrictions) <= set(SCHEMA)
        assert RunConfig(method=name).method_entry is method
    assert set(BUILTIN) == {"fedpm", "edge-popup", "biprop", "slot-machines", "laperm", "fedavg",
                            "signsgd", "ef-signsgd", "qsgd", "topk-ef"}
