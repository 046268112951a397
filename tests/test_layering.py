"""The code's layers: the library below, the Flower apps above it, the command line on top.

Read from the source (every import, at the top, inside functions or under TYPE_CHECKING),
so a layer broken anywhere fails here, not at some later import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fedmask.config import SCHEMA, RunConfig
from fedmask.methods import BUILTIN, MODES, get_method
from fedmask.names import MASK_MODES

ROOT = Path(__file__).resolve().parents[1]
APP_PACKAGES = ("server", "clients", "engines")
WIRING = ("fedmask/cli.py", "fedmask/api.py")  # the command line and its Python twin wire the apps
LIBRARY = sorted((ROOT / "fedmask").rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports; ``from package import module`` counts as the module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (ROOT / sub.replace(".", "/") / "__init__.py").exists()
                names.add(sub if is_module else node.module)
    return names


def _graph() -> dict[str, set[str]]:
    """fedmask's modules and the fedmask modules each imports."""
    modules = {_module_name(p): p for p in LIBRARY}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_library_has_no_import_cycle_type_checking_imports_included():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_below_the_config_imports_it():
    """The methods, the wire formats, the core and the names take their own parameters:
    none of them imports fedmask.config (which imports the method registry)."""
    graph = _graph()
    below = [m for m in graph if m.startswith(("fedmask.methods", "fedmask.wire", "fedmask.core", "fedmask.names"))]
    assert below, "the layers moved: update this test"
    assert not [m for m in below if "fedmask.config" in graph[m]]
    assert graph["fedmask.names"] == set(), "fedmask.names is a leaf"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_never_imports_the_apps(path):
    """No fedmask/ module imports server, clients or engines; the command line and the Python
    API (fedmask.simulate), which wire them, are the exception."""
    upward = {m for m in _imports(path) if m.split(".")[0] in APP_PACKAGES}
    if str(path.relative_to(ROOT)) in WIRING:
        assert path.name == "cli.py" or upward, f"{path.name} is expected to wire the apps"
    else:
        assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}"


@pytest.mark.parametrize("path", sorted((ROOT / "server").glob("*.py")), ids=lambda p: p.name)
def test_the_server_never_imports_the_clients_or_engines(path):
    assert not {m for m in _imports(path) if m.split(".")[0] in ("clients", "engines")}


_MODE_LITERAL = re.compile(r"""["'](""" + "|".join(MASK_MODES) + r""")["']""")


@pytest.mark.parametrize("path", [p for p in sorted(ROOT.glob("*/**/*.py"))
                                  if p.relative_to(ROOT).parts[0] in ("fedmask", "server", "clients", "engines")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_mask_mode_string_outside_the_methods(path):
    """What a mode does lives in its module under fedmask/methods/; nothing else names a
    mode (fedmask/names.py lists them; compressors share the word 'topk')."""
    relative = str(path.relative_to(ROOT))
    if relative.startswith("fedmask/methods/") or relative == "fedmask/names.py":
        return
    found = [line.strip() for line in path.read_text().splitlines()
             if _MODE_LITERAL.search(line) and not line.strip().startswith("#")]
    assert not found, f"{relative} names a mask mode: {found[:3]}"


def test_every_mask_mode_has_its_module_and_the_registry_lists_them():
    assert set(MODES) == set(MASK_MODES)
    for name, mode in MODES.items():
        assert mode.__module__.startswith("fedmask.methods.") and mode.name == name


def test_the_plugin_base_and_rules_live_in_the_methods():
    """The plug-in API (MaskAggregator) is fedmask.methods.base's, exported as fedmask.MaskAggregator;
    the old fedmask.aggregators says where it went."""
    import fedmask
    from fedmask.methods.base import MaskAggregator

    assert fedmask.MaskAggregator is MaskAggregator
    with pytest.raises(ImportError, match="fedmask.methods"):
        import fedmask.aggregators


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
