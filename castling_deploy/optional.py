"""The one guard for optional runtimes: import a module or raise MissingDependencyError naming the extra (exit 4)."""
from __future__ import annotations

import builtins
from types import ModuleType

from .errors import MissingDependencyError


def import_optional(module: str, package: str, extra: str, purpose: str = "") -> ModuleType:
    """``import module``; when it is absent (or its native libraries fail to load: OSError), raise an error that
    tells the user ``pip install 'castling-deploy[extra]'``."""
    try:
        # builtins.__import__ (what an import statement calls), so the leaf module comes back
        mod = builtins.__import__(module, fromlist=["__name__"])
    except (ImportError, OSError) as exc:
        raise MissingDependencyError(package, extra, purpose) from exc
    if getattr(mod, "__file__", None) is None:
        # A namespace package with no code: e.g. `tensorrt-stubs` installs a bare tensorrt/ folder of .pyi files,
        # which imports fine but is not the runtime.
        raise MissingDependencyError(package, extra, purpose)
    return mod
