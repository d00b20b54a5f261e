"""The data cipher's negotiation in the handshake, between two LinkManagers in memory: the
initiator offers its ``ciphers``, the responder takes the first it allows, the initiator
checks the choice; an older node (no offer, no choice) means chacha20-poly1305."""

from __future__ import annotations

import msgspec
import pytest

from pipeline.control.links import EventKind, LinkManager
from pipeline.crypto import handshake as hs
from pipeline.crypto.ciphers import DataCipher
from tests.test_links import Pair, events, keys_match

AES = DataCipher.AES_256_GCM
CHACHA = DataCipher.CHACHA20_POLY1305


class OldPayload(msgspec.Struct, array_like=True, frozen=True):
    """``HandshakePayload`` as a node older than the negotiation sends it."""

    certificate: bytes
    timestamp_ns: int


def allow(m: LinkManager, *ciphers: DataCipher) -> None:
    m.settings = msgspec.structs.replace(m.settings, ciphers=ciphers)


def behave_old(m: LinkManager) -> None:
    """``m`` sends payloads without offer or choice (and XX's first message empty), and
    seals with chacha20-poly1305, the only data cipher there was."""
    cert = m.certificate.encode()
    allow(m, CHACHA)

    def payload(wall: float, choice: DataCipher | None = None) -> bytes:
        return msgspec.msgpack.encode(OldPayload(cert, int(wall * 1e9)))

    m._payload = payload  # type: ignore[method-assign]
    m._offer = lambda: b""  # type: ignore[method-assign]


def ignore_offer(offer: object, allowed: object) -> DataCipher:
    """An older responder's choice: it reads no offer and seals with chacha20-poly1305."""
    return CHACHA


def linked(p: Pair) -> tuple[DataCipher, DataCipher]:
    p.start_a()
    p.deliver()
    keys_match(p)
    (sa,) = p.a.sessions()
    (sb,) = p.b.sessions()
    return sa.cipher, sb.cipher


def refused(p: Pair) -> tuple[dict[str, int], dict[str, int]]:
    p.start_a()
    p.deliver()
    assert p.a.sessions() == [] or not p.b.sessions()[0].confirmed
    a, b = p.a.statistics()["refused"], p.b.statistics()["refused"]
    assert isinstance(a, dict) and isinstance(b, dict)
    return a, b


PATTERNS = [pytest.param({}, id="IK"), pytest.param({"a_knows_b": False}, id="XX")]


@pytest.mark.parametrize("pattern", PATTERNS)
class TestNegotiation:
    def test_two_defaults_agree_on_aes(self, pattern: dict[str, bool]) -> None:
        assert linked(Pair(**pattern)) == (AES, AES)

    def test_the_initiators_preference_wins(self, pattern: dict[str, bool]) -> None:
        p = Pair(**pattern)
        allow(p.a, CHACHA, AES)
        assert linked(p) == (CHACHA, CHACHA)

    @pytest.mark.parametrize("side", ["initiator", "responder"])
    def test_a_chacha_only_side_gets_chacha(self, pattern: dict[str, bool], side: str) -> None:
        p = Pair(**pattern)
        allow(p.a if side == "initiator" else p.b, CHACHA)
        assert linked(p) == (CHACHA, CHACHA)

    def test_no_common_cipher_is_refused_by_the_responder(self, pattern: dict[str, bool]) -> None:
        p = Pair(**pattern)
        allow(p.a, AES)
        allow(p.b, CHACHA)
        a, b = refused(p)
        assert p.a.sessions() == [] and p.b.sessions() == []
        assert b == {"no_common_cipher": 1} and a == {}
        (event,) = [e for e in events(p.b) if e.kind is EventKind.HANDSHAKE_REFUSED]
        assert event.reason == "no_common_cipher" and "aes-256-gcm" in event.detail

    def test_an_older_initiator_gets_chacha(self, pattern: dict[str, bool]) -> None:
        p = Pair(**pattern)
        behave_old(p.a)
        assert linked(p) == (CHACHA, CHACHA)

    def test_an_older_initiator_and_an_aes_only_responder_do_not_link(
        self, pattern: dict[str, bool]
    ) -> None:
        p = Pair(**pattern)
        behave_old(p.a)
        allow(p.b, AES)
        _, b = refused(p)
        assert p.b.sessions() == [] and b == {"no_common_cipher": 1}

    @pytest.mark.parametrize("offer", [(AES, CHACHA), (AES,)], ids=["both", "aes-only"])
    def test_an_older_responder_means_chacha(
        self,
        pattern: dict[str, bool],
        offer: tuple[DataCipher, ...],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """An older responder reads no offer and names no choice: chacha20-poly1305, which
        an initiator that does not allow it refuses."""
        p = Pair(**pattern)
        behave_old(p.b)
        monkeypatch.setattr(hs, "choose_cipher", ignore_offer)  # only beta chooses here
        allow(p.a, *offer)
        p.start_a()
        p.deliver()
        if CHACHA in offer:
            keys_match(p)
            assert [s.cipher for s in p.a.sessions() + p.b.sessions()] == [CHACHA, CHACHA]
        else:
            assert p.a.sessions() == []
            assert p.a.statistics()["refused"] == {"no_common_cipher": 1}

    def test_a_choice_not_offered_is_refused(self, pattern: dict[str, bool]) -> None:
        """A responder that names a cipher the initiator did not offer (a bug, or someone
        with the responder's key): the initiator makes no session with it."""
        p = Pair(**pattern)
        allow(p.a, CHACHA)
        cert = p.b.certificate.encode()

        def payload(wall: float, choice: DataCipher | None = None) -> bytes:
            return hs.encode_payload(hs.HandshakePayload(cert, int(wall * 1e9), cipher=AES))

        p.b._payload = payload  # type: ignore[method-assign]
        a, _ = refused(p)
        assert p.a.sessions() == [] and a == {"cipher_not_offered": 1}


def test_an_offer_of_unknown_names_is_passed_over() -> None:
    assert hs.choose_cipher(["rot13", "aes-256-gcm"], [CHACHA, AES]) is AES
    assert hs.choose_cipher([], [CHACHA]) is CHACHA  # no offer: an older node
    with pytest.raises(hs.RemoteProtocolError) as err:
        hs.choose_cipher(["rot13"], [CHACHA, AES])
    assert err.value.reason == "no_common_cipher"


def test_a_choice_is_checked_against_the_offer() -> None:
    assert hs.offer_accepted("aes-256-gcm", [AES, CHACHA]) is AES
    assert hs.offer_accepted("", [AES, CHACHA]) is CHACHA  # no choice: an older node
    for choice, offered, reason in [
        ("", [AES], "no_common_cipher"),
        ("chacha20-poly1305", [AES], "cipher_not_offered"),
        ("rot13", [AES, CHACHA], "cipher_not_offered"),
    ]:
        with pytest.raises(hs.RemoteProtocolError) as err:
            hs.offer_accepted(choice, offered)
        assert err.value.reason == reason


def test_an_oversized_offer_is_a_bad_payload() -> None:
    data = hs.encode_payload(hs.HandshakePayload(b"c", 1, tuple(["x"] * 17)))
    with pytest.raises(hs.RemoteProtocolError) as err:
        hs.decode_payload(data)
    assert err.value.reason == "bad_payload"


def test_payloads_old_and_new_read_each_other() -> None:
    new = hs.HandshakePayload(b"c", 1, (AES, CHACHA), "")
    assert msgspec.msgpack.decode(hs.encode_payload(new), type=OldPayload) == OldPayload(b"c", 1)
    old = hs.decode_payload(msgspec.msgpack.encode(OldPayload(b"c", 1)))
    assert old.ciphers == () and old.cipher == ""
