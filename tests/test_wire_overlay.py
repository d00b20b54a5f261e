"""The overlay wire header: exact bytes, and junk only ever raises RemoteProtocolError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import RemoteProtocolError
from pipeline.wire.overlay import (
    HEADER_LEN,
    DatagramType,
    OverlayHeader,
    build_header,
    parse_header,
)


def test_header_bytes_are_exact() -> None:
    raw = build_header(DatagramType.DATA, flags=0x0102, session=0x03040506, counter=7)
    assert raw == bytes.fromhex("01 01 0102 03040506 0000000000000007")
    assert HEADER_LEN == 16


@given(
    st.sampled_from(list(DatagramType)),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
)
def test_round_trip(dtype: DatagramType, flags: int, session: int, counter: int) -> None:
    raw = build_header(dtype, flags=flags, session=session, counter=counter)
    assert parse_header(raw + b"payload") == OverlayHeader(dtype, flags, session, counter)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "short_datagram"),
        (b"\x01" * 15, "short_datagram"),
        (b"\x02\x01" + bytes(14), "bad_version"),
        (b"\x01\x09" + bytes(14), "bad_type"),
    ],
)
def test_bad_headers_name_their_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_header(raw)
    assert info.value.reason == reason


@given(st.binary(max_size=64))
def test_junk_raises_only_remote_protocol_error(raw: bytes) -> None:
    try:
        parse_header(raw)
    except RemoteProtocolError:
        pass
