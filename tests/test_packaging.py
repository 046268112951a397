"""What a wheel of fedmask holds: every library folder is a package that setuptools finds."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_every_folder_of_python_modules_is_found_as_a_package():
    """A folder without __init__.py works from the checkout and in an editable install but is left
    out of a wheel (`pip install .`), whose imports then fail: fedmask/wire was such a folder."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(where=str(ROOT), include=include))
    for top in ("fedmask", "clients", "server", "engines"):
        folders = {p.parent for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts}
        expected = {".".join(f.relative_to(ROOT).parts) for f in folders}
        assert expected <= found, f"not packages (add an __init__.py): {sorted(expected - found)}"
