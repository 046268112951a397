"""Plug-ins named ``"module:attribute"``: a method's aggregation rule (a class), a model or a
dataset (a function), from the user's own code.

The module is imported from the working directory or the Python path. A run imports its
plug-ins when its config is checked, before anything starts; reading a finished run never
does (:func:`fedmask.load_run`). This module only imports: what each kind of plug-in must
be is checked where it is used (:func:`fedmask.methods.load_plugin`,
:func:`fedmask.core.models.build_model`, :func:`fedmask.core.data.load_dataset`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class PluginError(ValueError):
    """A ``module:attribute`` plug-in that cannot be used; the message names it."""


def is_plugin_name(name: str) -> bool:
    """``module:attribute`` with both parts non-empty."""
    module, sep, attribute = name.partition(":")
    return bool(sep and module and attribute)


def import_object(name: str) -> Any:
    """The attribute ``name`` names; PluginError (naming it and why) if it cannot be had."""
    module_name, _, attribute = name.partition(":")
    if os.getcwd() not in sys.path:  # plug-ins live in the user's project, beside the config
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a plug-in may fail to import in any way
        raise PluginError(f"cannot load plug-in {name!r}: {type(err).__name__}: {err}") from None
    found = getattr(module, attribute, None)
    if found is None:
        raise PluginError(f"cannot load plug-in {name!r}: module {module_name!r} has no {attribute!r}")
    return found


def search_paths(names: Iterable[str]) -> list[str]:
    """The folders to put on another process's Python path so that it imports the plug-ins
    ``names`` (already imported here) as this process did: each top-level package's parent."""
    paths: list[str] = []
    for name in names:
        if not is_plugin_name(name):
            continue
        top = name.partition(":")[0].split(".")[0]
        module = sys.modules.get(top)
        spec = getattr(module, "__spec__", None) or importlib.util.find_spec(top)
        origin = getattr(spec, "origin", None)
        if not origin or not os.path.isabs(origin):
            continue
        folder = Path(origin).parent
        if getattr(spec, "submodule_search_locations", None):  # a package: its folder's parent
            folder = folder.parent
        if str(folder) not in paths:
            paths.append(str(folder))
    return paths
