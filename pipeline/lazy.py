"""Modules that third-party packages import eagerly but a node never uses, loaded only on use.

``import structlog`` imports ``structlog.stdlib``, which imports ``asyncio`` for its async
logging methods; with it come ``ssl``, ``subprocess``, ``concurrent.futures`` and some sixty
modules: about 4 MiB of objects in every process of a node (the supervisor, the worker
template and so each worker), for code no stage runs. :func:`defer_unused` puts a stand-in
in their place in ``sys.modules`` before anything imports them: ``import asyncio`` then
succeeds at once, and the first attribute looked up on the stand-in imports the real module
and copies its namespace over, so code that does use it behaves as before.
``pipeline/__init__.py`` calls it, so it runs before any of our modules (and so before
structlog) is imported.

(``importlib.util.LazyLoader`` does not do here: on Python 3.11 an ``import`` statement of a
module already in ``sys.modules`` reads its ``__spec__``, which makes a lazy module load.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

#: imported by dependencies at import time, used only by code paths a node does not take
UNUSED = ("asyncio",)
#: never loaded: ``_hashlib`` is OpenSSL's hashes, which ``hashlib`` and ``hmac`` load when
#: imported (OpenSSL's libcrypto and its start-up allocations: about 0.5 MiB of heap and 3 MiB
#: of mapped library per process); we only use BLAKE2, which Python builds in, and without
#: ``_hashlib`` both modules use their built-in implementations
BLOCKED = ("_hashlib",)


class Deferred(types.ModuleType):
    """A stand-in for a module not imported yet: the first missing attribute imports it."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def defer(name: str) -> None:
    """Put a :class:`Deferred` stand-in for ``name`` in ``sys.modules`` unless the module is
    already imported (or cannot be found)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    stand_in = Deferred(name)
    stand_in.__spec__ = None  # not initializing: `import name` returns the stand-in as it is
    sys.modules[name] = stand_in


def defer_unused() -> None:
    for name in UNUSED:
        defer(name)
    for name in BLOCKED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type] # None: "import fails"
