"""The encrypted data path: seal/open, header authentication, the replay window, key limits."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import (
    crypto_aead_aes256gcm_encrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
)

from pipeline.crypto.ciphers import DataCipher
from pipeline.crypto.datapath import (
    MIN_DATAGRAM,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_SECONDS,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_SECONDS,
    TAG_LEN,
    WINDOW_SIZE,
    KeyExhausted,
    RecvSession,
    ReplayWindow,
    SendSession,
)
from pipeline.errors import RemoteProtocolError
from pipeline.wire.overlay import HEADER, HEADER_LEN, VERSION, DatagramType, parse_header

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
INDEX = 0xA1B2C3D4
SIZES = [0, 1, 64, 1400, 9000, 65535]
NO_DEADLINE = settings(deadline=None)
CIPHERS = list(DataCipher)


def pair(
    *,
    cipher: DataCipher = DataCipher.CHACHA20_POLY1305,
    rekey_after_messages: int = REKEY_AFTER_MESSAGES,
    rekey_after_bytes: int | None = None,
    reject_after_messages: int = REJECT_AFTER_MESSAGES,
) -> tuple[SendSession, RecvSession]:
    send = SendSession(
        KEY,
        index=INDEX,
        created=0.0,
        cipher=cipher,
        rekey_after_messages=rekey_after_messages,
        rekey_after_bytes=rekey_after_bytes,
        reject_after_messages=reject_after_messages,
    )
    return send, RecvSession(KEY, index=INDEX, created=0.0, cipher=cipher)


def seal(send: SendSession, payload: bytes, dtype: int = DatagramType.DATA) -> bytes:
    return b"".join(send.seal(dtype, payload))


def reason_of(recv: RecvSession, datagram: bytes) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        recv.open(datagram)
    return info.value.reason


# --- the module stays pure -------------------------------------------------------------------

ALLOWED_IMPORTS = {
    "__future__",
    "struct",
    "dataclasses",
    "typing",
    "collections.abc",
    "cryptography.exceptions",
    "cryptography.hazmat.primitives.ciphers.aead",
    "pipeline.crypto.ciphers",
    "pipeline.errors",
    "pipeline.wire.overlay",
}


def test_datapath_imports_only_pure_modules() -> None:
    tree = ast.parse((ROOT / "pipeline/crypto/datapath.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module
            found.add(node.module)
    assert found <= ALLOWED_IMPORTS, found - ALLOWED_IMPORTS


# --- seal and open ---------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_every_size(size: int, cipher: DataCipher) -> None:
    send, recv = pair(cipher=cipher)
    payload = random.Random(size).randbytes(size)
    for counter in range(3):
        header, ciphertext = send.seal(DatagramType.DATA, memoryview(payload))
        assert len(header) == HEADER_LEN and len(ciphertext) == size + TAG_LEN
        parsed = parse_header(header)
        assert (parsed.type, parsed.flags, parsed.session, parsed.counter) == (
            DatagramType.DATA,
            0,
            INDEX,
            counter,
        )
        datagram = header + ciphertext
        inputs: list[bytes | bytearray | memoryview] = [
            datagram,
            memoryview(datagram),
            bytearray(datagram),
        ]
        assert bytes(recv.open(inputs[counter])) == payload
    assert send.messages == 3 and recv.window.top == 2
    assert send.bytes == 3 * size


def test_ciphertext_matches_an_independent_implementation() -> None:
    """Nonce = 4 zero bytes + counter LE, AD = the header: checked against libsodium."""
    send, _ = pair()
    for counter in range(3):
        header, ciphertext = send.seal(DatagramType.OVERLAY, b"ping", flags=0x0102)
        assert header == HEADER.pack(VERSION, DatagramType.OVERLAY, 0x0102, INDEX, counter)
        nonce = b"\x00" * 4 + counter.to_bytes(8, "little")
        assert ciphertext == crypto_aead_chacha20poly1305_ietf_encrypt(b"ping", header, nonce, KEY)


def test_aes_ciphertext_matches_an_independent_implementation() -> None:
    """AES-256-GCM: the same nonce and AD as ChaCha20-Poly1305, checked against libsodium's
    AES-256-GCM (not OpenSSL's, which the data path uses)."""
    send, _ = pair(cipher=DataCipher.AES_256_GCM)
    assert send.cipher is DataCipher.AES_256_GCM
    for counter in range(3):
        header, ciphertext = send.seal(DatagramType.DATA, b"x" * 1348, flags=0x0001)
        assert header == HEADER.pack(VERSION, DatagramType.DATA, 0x0001, INDEX, counter)
        nonce = b"\x00" * 4 + counter.to_bytes(8, "little")
        assert ciphertext == crypto_aead_aes256gcm_encrypt(b"x" * 1348, header, nonce, KEY)


def test_a_session_opens_only_its_own_cipher() -> None:
    """The same key and counter under the other AEAD is a forgery: ``bad_tag``, counted."""
    for sealer, opener in [CIPHERS, CIPHERS[::-1]]:
        send, _ = pair(cipher=sealer)
        _, recv = pair(cipher=opener)
        assert reason_of(recv, seal(send, b"hello")) == "bad_tag"
        assert recv.window.top == 0 and recv.window.check(0)


@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("position", range(HEADER_LEN))
@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_header_is_authenticated(position: int, mask: int, cipher: DataCipher) -> None:
    send, recv = pair(cipher=cipher)
    datagram = bytearray(seal(send, b"x" * 100))
    datagram[position] ^= mask
    expected = "wrong_session" if 4 <= position < 8 else "bad_tag"
    assert reason_of(recv, bytes(datagram)) == expected
    assert recv.window.top == 0 and recv.window.check(0)


@NO_DEADLINE
@given(data=st.data(), size=st.sampled_from([0, 64, 1400]), cipher=st.sampled_from(CIPHERS))
def test_flipped_ciphertext_byte_is_bad_tag(
    data: st.DataObject, size: int, cipher: DataCipher
) -> None:
    send, recv = pair(cipher=cipher)
    for _ in range(5):  # the forgery may carry any counter the window would take
        seal(send, b"")
    datagram = seal(send, bytes(size))
    position = data.draw(st.integers(HEADER_LEN, len(datagram) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    forged = bytearray(datagram)
    forged[position] ^= mask
    assert reason_of(recv, bytes(forged)) == "bad_tag"
    assert recv.window.top == 0  # a forgery never moves the window
    assert recv.open(datagram) == bytes(size)


@pytest.mark.parametrize("cipher", CIPHERS)
def test_wrong_key_is_bad_tag_and_wrong_index_is_wrong_session(cipher: DataCipher) -> None:
    send, _ = pair(cipher=cipher)
    datagram = seal(send, b"hello")
    other = RecvSession(OTHER_KEY, index=INDEX, created=0.0, cipher=cipher)
    assert reason_of(other, datagram) == "bad_tag"
    assert reason_of(RecvSession(KEY, index=INDEX + 1, created=0.0), datagram) == "wrong_session"


@pytest.mark.parametrize("length", range(MIN_DATAGRAM))
def test_short_datagram(length: int) -> None:
    _, recv = pair()
    assert reason_of(recv, bytes(length)) == "short_datagram"


def test_empty_payload_is_a_valid_datagram() -> None:
    send, recv = pair()
    datagram = seal(send, b"")
    assert len(datagram) == MIN_DATAGRAM
    assert recv.open(datagram) == b""


# --- replay ----------------------------------------------------------------------------------


def test_replay_of_an_accepted_datagram() -> None:
    send, recv = pair()
    first, second = seal(send, b"one"), seal(send, b"two")
    assert recv.open(first) == b"one"
    assert reason_of(recv, first) == "replayed"
    assert recv.open(second) == b"two"
    assert reason_of(recv, second) == "replayed"
    assert reason_of(recv, first) == "replayed"
    assert recv.window.top == 1


@pytest.mark.parametrize("seed", range(5))
def test_out_of_order_within_the_window_accepted_once_each(seed: int) -> None:
    send, recv = pair()
    datagrams = [seal(send, i.to_bytes(4, "big")) for i in range(WINDOW_SIZE)]
    order = list(range(WINDOW_SIZE))
    random.Random(seed).shuffle(order)
    # the newest goes first, so every other one arrives up to WINDOW_SIZE - 1 behind it
    order.remove(WINDOW_SIZE - 1)
    order.insert(0, WINDOW_SIZE - 1)
    for i in order:
        assert recv.open(datagrams[i]) == i.to_bytes(4, "big")
    for i in order:
        assert reason_of(recv, datagrams[i]) == "replayed"


def test_too_old_is_replayed_at_the_exact_boundary() -> None:
    send, recv = pair()
    datagrams = [seal(send, b"") for _ in range(WINDOW_SIZE + 2)]
    top = WINDOW_SIZE + 1
    recv.open(datagrams[top])
    assert reason_of(recv, datagrams[top - WINDOW_SIZE]) == "replayed"  # width behind
    assert reason_of(recv, datagrams[0]) == "replayed"
    assert recv.open(datagrams[top - WINDOW_SIZE + 1]) == b""  # width - 1 behind


# --- the replay window against a reference model ----------------------------------------------


class ModelWindow:
    """A set of seen counters and the max: what ReplayWindow must agree with."""

    def __init__(self, width: int, limit: int) -> None:
        self.width, self.limit = width, limit
        self.seen: set[int] = set()
        self.top = 0

    def check(self, counter: int) -> bool:
        if counter < 0 or counter >= self.limit or counter in self.seen:
            return False
        return counter > self.top or self.top - counter < self.width

    def update(self, counter: int) -> None:
        self.seen.add(counter)
        self.top = max(self.top, counter)


@st.composite
def counter_walks(draw: st.DrawFn) -> tuple[int, list[int]]:
    """Counters that mostly move near the newest one, with jumps, repeats and far-away ones."""
    width = draw(st.sampled_from([8, 16, 64, 72, 2048]))
    top = draw(st.sampled_from([0, 1, 7, 1000, 2**63, REJECT_AFTER_MESSAGES - 3 * width]))
    counters: list[int] = []
    for _ in range(draw(st.integers(1, 120))):
        step = draw(
            st.one_of(
                st.integers(-2 * width - 9, 2 * width + 9),
                st.integers(-9, 9),
                st.integers(-(2**64), 2**64),
                st.sampled_from([-width, 1 - width, width, width + 1, 8, -8]),
            )
        )
        counter = top + step
        if draw(st.booleans()) and counters:
            counter = draw(st.sampled_from(counters))  # an exact repeat
        counter = max(0, min(counter, 2**64 - 1))
        counters.append(counter)
        top = max(top, counter) if counter < REJECT_AFTER_MESSAGES else top
    return width, counters


@NO_DEADLINE
@given(counter_walks(), st.booleans())
def test_replay_window_matches_the_model(walk: tuple[int, list[int]], careless: bool) -> None:
    """``careless``: update() is also called on counters that check() refused: a no-op."""
    width, counters = walk
    window = ReplayWindow(width)
    model = ModelWindow(width, REJECT_AFTER_MESSAGES)
    for counter in counters:
        accepted = model.check(counter)
        assert window.check(counter) is accepted, (counter, model.top)
        if accepted:
            model.update(counter)
        if accepted or careless:
            window.update(counter)
        assert window.top == model.top


@NO_DEADLINE
@given(st.lists(st.integers(0, 300), max_size=300), st.sampled_from([8, 24, 64]))
def test_replay_window_matches_the_model_on_small_counters(counters: list[int], width: int) -> None:
    window = ReplayWindow(width, limit=250)
    model = ModelWindow(width, 250)
    for counter in counters:
        accepted = model.check(counter)
        assert window.check(counter) is accepted
        if accepted:
            model.update(counter)
            window.update(counter)


def test_replay_window_reset_and_width() -> None:
    window = ReplayWindow(64)
    window.update(5)
    window.update(1000)
    assert not window.check(1000) and window.top == 1000
    window.reset()
    assert window.top == 0 and window.check(5) and window.check(1000)
    assert window.width == 64
    assert not window.check(-1)
    for bad in (0, 7, 12, -8):
        with pytest.raises(ValueError):
            ReplayWindow(bad)


# --- fuzz ------------------------------------------------------------------------------------


ALL_REASONS = {"short_datagram", "wrong_session", "replayed", "bad_tag"}


@NO_DEADLINE
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_only_raise_remote_protocol_error(datagram: bytes) -> None:
    _, recv = pair()
    try:
        recv.open(datagram)
    except RemoteProtocolError as exc:
        assert exc.reason in ALL_REASONS
    else:  # pragma: no cover - would be a forgery
        pytest.fail("random bytes were accepted")


@NO_DEADLINE
@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=200),
)
def test_fuzz_right_index_reaches_the_aead_and_fails_cleanly(
    version: int, kind: int, flags: int, counter: int, body: bytes
) -> None:
    _, recv = pair()
    datagram = HEADER.pack(version, kind, flags, INDEX, counter) + body
    try:
        recv.open(datagram)
    except RemoteProtocolError as exc:
        expected = "short_datagram" if len(body) < TAG_LEN else None
        if counter >= REJECT_AFTER_MESSAGES and expected is None:
            expected = "replayed"
        assert exc.reason == (expected or "bad_tag")
    else:  # pragma: no cover
        pytest.fail("a forged datagram was accepted")
    assert recv.window.top == 0 and recv.window.check(0)


# --- key lifetime ----------------------------------------------------------------------------


def test_needs_rekey_and_expired_at_the_time_boundaries() -> None:
    created = 1000.0
    send = SendSession(KEY, index=INDEX, created=created)
    recv = RecvSession(KEY, index=INDEX, created=created)
    assert send.created == recv.created == created
    assert not send.needs_rekey(created)
    assert not send.needs_rekey(created + REKEY_AFTER_SECONDS - 0.001)
    assert send.needs_rekey(created + REKEY_AFTER_SECONDS)
    for session in (send, recv):
        assert not session.expired(created + REJECT_AFTER_SECONDS - 0.001)
        assert session.expired(created + REJECT_AFTER_SECONDS)
    assert REKEY_AFTER_SECONDS == 120.0 and REJECT_AFTER_SECONDS == 180.0


def test_needs_rekey_after_messages() -> None:
    assert REKEY_AFTER_MESSAGES == 2**60
    send, _ = pair(rekey_after_messages=3)
    for _ in range(2):
        seal(send, b"")
    assert not send.needs_rekey(0.0)
    seal(send, b"")
    assert send.needs_rekey(0.0)


def test_needs_rekey_after_a_byte_volume() -> None:
    send, _ = pair(rekey_after_bytes=3000)
    seal(send, bytes(1400))
    seal(send, bytes(1400))
    assert not send.needs_rekey(0.0) and send.bytes == 2800
    seal(send, bytes(200))
    assert send.needs_rekey(0.0)
    unlimited, _ = pair()
    seal(unlimited, bytes(65535))
    assert not unlimited.needs_rekey(0.0)


def test_counter_exhaustion_with_a_lowered_limit() -> None:
    send, recv = pair(reject_after_messages=3)
    for _ in range(3):
        recv.open(seal(send, b"ok"))
    with pytest.raises(KeyExhausted):
        send.seal(DatagramType.DATA, b"one too many")
    assert send.messages == 3  # the refused seal consumed nothing


def test_counter_exhaustion_at_reject_after_messages() -> None:
    assert REJECT_AFTER_MESSAGES == 2**64 - 2**13 - 1
    send = SendSession(KEY, index=INDEX, created=0.0, counter_start=REJECT_AFTER_MESSAGES - 1)
    recv = RecvSession(KEY, index=INDEX, created=0.0)
    assert send.needs_rekey(0.0)  # long past REKEY_AFTER_MESSAGES
    last = seal(send, b"last")
    assert parse_header(last).counter == REJECT_AFTER_MESSAGES - 1
    assert recv.open(last) == b"last"
    with pytest.raises(KeyExhausted):
        send.seal(DatagramType.DATA, b"")
    assert send.counter == REJECT_AFTER_MESSAGES and send.messages == 1
    # a datagram that claims a counter past the limit is refused before any decryption
    beyond = HEADER.pack(VERSION, DatagramType.DATA, 0, INDEX, REJECT_AFTER_MESSAGES)
    assert reason_of(recv, beyond + bytes(TAG_LEN)) == "replayed"


def test_counter_start_for_a_new_incarnation() -> None:
    """A restarted worker resumes a key at ``counter_start``; the receiver follows the jump."""
    send, recv = pair()
    early = [seal(send, b"old") for _ in range(3)]
    recv.open(early[0])
    later = SendSession(KEY, index=INDEX, created=0.0, counter_start=1 << 40)
    assert later.counter == 1 << 40 and later.messages == 0
    datagram = seal(later, b"new")
    assert parse_header(datagram).counter == 1 << 40 and later.messages == 1
    assert recv.open(datagram) == b"new"
    assert reason_of(recv, early[1]) == "replayed"  # far behind the window now
    assert not later.needs_rekey(0.0)


def test_constructor_checks() -> None:
    for bad_key in (b"", bytes(31), bytes(33)):
        with pytest.raises(ValueError):
            SendSession(bad_key, index=1, created=0.0)
        with pytest.raises(ValueError):
            RecvSession(bad_key, index=1, created=0.0)
    for bad_index in (-1, 2**32):
        with pytest.raises(ValueError):
            SendSession(KEY, index=bad_index, created=0.0)
        with pytest.raises(ValueError):
            RecvSession(KEY, index=bad_index, created=0.0)
    for bad_limit in (0, REJECT_AFTER_MESSAGES + 1):
        with pytest.raises(ValueError):
            SendSession(KEY, index=1, created=0.0, reject_after_messages=bad_limit)
    for bad_start in (-1, REJECT_AFTER_MESSAGES + 1):
        with pytest.raises(ValueError):
            SendSession(KEY, index=1, created=0.0, counter_start=bad_start)
