"""Fuzzing in CI: every decoder of outside bytes and every stateful core that takes them, from
the tables in ``tests/fuzz_targets.py``, driven by hypothesis. A decoder may only return or
raise its documented errors; a core may not raise at all, must count every input, and must
still serve a valid input after the junk.

The number of examples comes from the hypothesis profile (``tests/conftest.py``): the
default keeps this file's cost in CI under a minute; ``AUTOVN_HYPOTHESIS_PROFILE=fuzz-long``
(or ``pytest --hypothesis-profile=fuzz-long``) runs ``AUTOVN_FUZZ_EXAMPLES`` (default
20,000) per target. ``bench/fuzz_long.py`` runs the same tables for longer still.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline
from pipeline.errors import RemoteProtocolError
from pipeline.wire import stun, tso, vnet
from tests.fuzz_targets import (
    DECODERS,
    GATEWAY,
    NOT_DECODERS,
    STATEFUL,
    STUN_SERVER,
    WALL,
    Decoder,
    Stateful,
)

DECODER_NAME = re.compile(r"^(decode|parse|unpack|open|read)")


def examples(ci: int) -> settings:
    """``ci`` examples in the default profile; the profile's count when that is larger."""
    return settings(
        max_examples=max(ci, settings.default.max_examples),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


# -- the tables are complete ---------------------------------------------------------------------


def discovered_decoders() -> set[str]:
    """Every public function and method in ``pipeline`` whose name says it decodes."""
    found: set[str] = set()
    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) and DECODER_NAME.match(name):
                found.add(f"{module.__name__}.{name}")
            elif inspect.isclass(obj):
                for method in vars(obj):
                    if not method.startswith("_") and DECODER_NAME.match(method):
                        found.add(f"{module.__name__}.{name}.{method}")
    return found


def test_every_decoder_is_fuzzed_or_said_not_to_take_outside_bytes() -> None:
    missing = discovered_decoders() - DECODERS.keys() - NOT_DECODERS.keys()
    assert not missing, f"add these to DECODERS (or NOT_DECODERS, with why): {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(DECODERS.keys() | NOT_DECODERS.keys()))
def test_every_name_in_the_tables_exists(name: str) -> None:
    """No stale entry: each name is a real function, method or field (a renamed decoder would
    otherwise leave the table naming nothing, and the new name unfuzzed)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return
    pytest.fail(f"no module for {name}")


def test_the_discovery_finds_what_it_should() -> None:
    """The check above can fail: it finds known decoders, and only those of ``pipeline``."""
    found = discovered_decoders()
    assert {"pipeline.wire.stun.parse", "pipeline.crypto.datapath.RecvSession.open"} <= found
    assert all(name.startswith("pipeline.") for name in found)
    assert "pipeline.wire.ipv4.build" not in found


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_seeds_are_valid_inputs(name: str) -> None:
    """The mutations start from inputs that decode: they reach past the first check."""
    decoder = DECODERS[name]
    for seed in decoder.seeds:
        for call in decoder.calls:
            call(seed)


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_seeds_are_counted_and_the_core_still_works(name: str) -> None:
    target = STATEFUL[name]
    state = target.make()
    for seed in target.seeds:
        fed(target, state, seed)
    target.works(state)


# -- junk ----------------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, seeds: tuple[bytes, ...]) -> bytes:
    """A seed with a few bytes set, flipped, inserted, deleted, repeated, or its tail cut."""
    buf = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "flip", "insert", "delete", "cut", "repeat"]))
        at = draw(st.integers(0, len(buf)))
        if op == "set" and at < len(buf):
            buf[at] = draw(st.integers(0, 255))
        elif op == "flip" and at < len(buf):
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[at : at + draw(st.integers(1, 8))]
        elif op == "cut":
            del buf[at:]
        elif op == "repeat":
            buf[at:at] = buf[at : at + draw(st.integers(1, 16))]
    return bytes(buf)


def junk(seeds: tuple[bytes, ...], max_size: int) -> st.SearchStrategy[bytes]:
    random_bytes = st.binary(max_size=max_size)
    return st.one_of(random_bytes, mutated(seeds)) if seeds else random_bytes


def decode_or_refuse(decoder: Decoder, data: bytes) -> None:
    """Every call returns or raises one of the decoder's errors (anything else propagates)."""
    for call in decoder.calls:
        try:
            call(data)
        except decoder.errors as exc:
            if isinstance(exc, RemoteProtocolError):  # its reason names a drop counter
                assert exc.reason and exc.reason.isidentifier(), exc


def fed(target: Stateful, state: object, data: bytes) -> None:
    before = target.tally(state)
    target.feed(state, data)
    grown = target.tally(state) - before
    assert grown >= target.per_input, f"an input left no count ({grown}): {data.hex()}"


# -- the fuzzing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DECODERS))
@examples(100)
@given(data=st.data())
def test_decoder_returns_or_raises_only_its_errors(name: str, data: st.DataObject) -> None:
    decoder = DECODERS[name]
    decode_or_refuse(decoder, data.draw(junk(decoder.seeds, decoder.max_size), label="input"))


@pytest.mark.parametrize("name", sorted(STATEFUL))
@examples(50)
@given(data=st.data())
def test_core_counts_junk_and_keeps_working(name: str, data: st.DataObject) -> None:
    target = STATEFUL[name]
    state = target.make()
    inputs = data.draw(st.lists(junk(target.seeds, target.max_size), max_size=8), label="inputs")
    for item in inputs:
        fed(target, state, item)
    target.works(state)


# -- what it found -------------------------------------------------------------------------------


def test_malformed_stun_and_port_mapping_answers_are_counted_drops() -> None:
    """Found by this fuzzing: a datagram that overlay_io passes to control as STUN (``is_stun``:
    the magic cookie, the length field right) but that does not parse, while the node's
    STUN probe is out, and junk from the gateway on the port mapping socket, raised
    RemoteProtocolError out of ``ControlCore``: one datagram to the node's port stopped the
    control process."""
    duo = STATEFUL["control.core"].make()
    a, now, wall = duo.cores[0], duo.now, WALL + duo.now
    head = bytes.fromhex("2112a442") + bytes(12)  # cookie, transaction id
    bad_length = b"\x01\x01\x00\x05" + head + bytes(5)  # not a multiple of 4
    bad_attribute = b"\x01\x01\x00\x04" + head + b"\x00\x20\x00\x08"  # runs past the end
    for datagram in (bad_length, bad_attribute):
        assert stun.is_stun(datagram)
        a.receive_stun(datagram, STUN_SERVER, now, wall)
    a.receive_portmap(b"", (GATEWAY, 5351), now, wall)
    a.receive_portmap(b"\x07\x00", (GATEWAY, 5351), now, wall)
    drops = a.status(now)["drops"]
    assert (drops["stun_bad_length"], drops["stun_bad_attribute"]) == (1, 1)
    assert (drops["portmap_empty"], drops["portmap_bad_version"]) == (1, 1)
    STATEFUL["control.core"].works(duo)


@pytest.mark.parametrize(
    "frame",
    [
        # GSO_TCPV4 headers, then IPv4 TCP whose data offset is 0 (a 0-byte TCP header)...
        "0101 0000 3b00 0000 1000 458c 0100 ff01 40dd 0006 ffff eb45 0000 00ff 0140 dd00"
        " 06ff ffeb 4500 0000 0100" + " 0000" * 60,
        # ...or whose TCP header is cut short (28 bytes of IPv4 and TCP)
        "0101 0000 3b00 0000 1000 458c 0100 ff01 40dd 0006 ffff eb45 0000 0001 0000 008c"
        " 0000 ffff 8001",
    ],
)
def test_a_super_frame_with_truncated_headers_is_refused(frame: str) -> None:
    """Found by bench/fuzz_long.py (atheris): ``tso.segment`` (and ``split``) indexed past the
    end of a GSO packet whose TCP header does not fit: IndexError, where its callers expect
    the documented ValueError."""
    data = bytes.fromhex(frame)
    with pytest.raises(ValueError, match="headers of"):
        tso.segment(vnet.parse(data), data[vnet.LEN :])
