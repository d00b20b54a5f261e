"""What a node's processes leave out of memory (``pipeline/lazy.py``): asyncio, which
structlog imports, is a stand-in until something uses it, and then the real module; OpenSSL's
hashes are never loaded, and BLAKE2 and HMAC give the same digests without them. Each check
runs in a fresh interpreter (pytest itself may have imported these modules already)."""

from __future__ import annotations

import hashlib
import hmac
import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.lazy import Deferred, defer

REPO = Path(__file__).resolve().parent.parent


def _run(code: str) -> list[str]:
    argv = [sys.executable, "-c", textwrap.dedent(code)]
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_the_template_imports_every_stage_without_loading_asyncio() -> None:
    out = _run(
        """
        import sys
        from supervisor import cli, template
        template.preload()
        print("asyncio.base_events" in sys.modules, "ssl" in sys.modules)
        print(type(sys.modules["asyncio"]).__name__)
        """
    )
    assert out == ["False", "False", "Deferred"]


def test_asyncio_works_once_used_through_any_reference() -> None:
    out = _run(
        """
        import sys
        import pipeline, structlog.stdlib
        import asyncio
        async def answer():
            return structlog.stdlib.asyncio.get_running_loop() is not None
        print(asyncio.run(answer()), "asyncio.base_events" in sys.modules)
        from asyncio import subprocess
        print(sys.modules["asyncio"].Queue is asyncio.Queue, subprocess.__name__)
        """
    )
    assert out == ["True", "True", "True", "asyncio.subprocess"]


def test_openssl_hashes_are_not_loaded_and_digests_are_the_same() -> None:
    key, data = b"k" * 32, b"the data" * 9
    out = _run(
        f"""
        import sys
        import pipeline
        import hashlib, hmac
        print(sys.modules.get("_hashlib", "absent"))
        print(hashlib.blake2b({data!r}, digest_size=20).hexdigest())
        print(hmac.digest({key!r}, {data!r}, "blake2s").hex())
        """
    )
    assert out == [
        "None",
        hashlib.blake2b(data, digest_size=20).hexdigest(),
        hmac.digest(key, data, "blake2s").hex(),
    ]


def test_defer_leaves_imported_and_unknown_modules_alone() -> None:
    before = sys.modules["json"]
    defer("json")
    defer("no_such_module_here")
    assert sys.modules["json"] is before
    assert "no_such_module_here" not in sys.modules


def test_a_stand_in_imports_its_module_on_first_use() -> None:
    name = "colorsys"  # a small module pytest does not import
    saved = sys.modules.pop(name, None)
    try:
        defer(name)
        stand_in = sys.modules[name]
        assert isinstance(stand_in, Deferred)
        assert stand_in.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
        assert sys.modules[name] is not stand_in  # the real module took its place
        assert stand_in.hsv_to_rgb is sys.modules[name].hsv_to_rgb
    finally:
        sys.modules.pop(name, None)
        if saved is not None:
            sys.modules[name] = saved
