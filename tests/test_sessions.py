"""overlay_io's session table (``pipeline/overlay_io/sessions.py``): explicit ``now``, exact
entries and exact reports to control."""

from __future__ import annotations

import msgspec
import pytest

from pipeline import messages
from pipeline.crypto.ciphers import DataCipher
from pipeline.crypto.datapath import RecvSession, SendSession
from pipeline.errors import RemoteProtocolError
from pipeline.nodeid import NODE_ID_LEN
from pipeline.overlay_io.sessions import (
    HOP_ANSWER_S,
    HOP_REPORT_S,
    HOP_SILENT_S,
    NO_ENDPOINT,
    NullRecvSession,
    NullSendSession,
    SessionTable,
    parse_address,
)
from pipeline.wire.overlay import HEADER_LEN, DatagramType, build_header

KEY = [bytes([i]) * 32 for i in range(16)]
EP_1, EP_2 = "198.18.0.2:4789", "198.18.0.3:4789"
ADDR_1, ADDR_2 = ("198.18.0.2", 4789), ("198.18.0.3", 4789)


def nid(value: int) -> bytes:
    return value.to_bytes(NODE_ID_LEN, "big")


OWN_ID, ID_1, ID_2, ID_3 = nid(0x80 << 152), nid(0x20 << 152), nid(0x10 << 152), nid(0x70 << 152)


def key_entry(
    slot: int,
    n: int,
    *,
    endpoint: str = EP_1,
    confirmed: bool = True,
    created: float = 0.0,
    node_id: bytes = ID_1,
    counter_start: int = 0,
) -> messages.KeyEntry:
    """Session ``n`` of the link in ``slot``: receive index 100+n with KEY[n], send index
    200+n with KEY[n+1]."""
    return messages.KeyEntry(
        slot=slot,
        recv_index=100 + n,
        recv_key=KEY[n],
        send_index=200 + n,
        send_key=KEY[n + 1],
        counter_start=counter_start,
        created=created,
        confirmed=confirmed,
        endpoint=endpoint,
        node_id=node_id,
    )


def keys(*entries: messages.KeyEntry, version: int = 1) -> messages.SessionKeys:
    return messages.SessionKeys(version, entries, OWN_ID)


def table(**kw: object) -> SessionTable:
    args: dict[str, object] = {"worker": 0, "workers": 1, "classifiers": 1} | kw
    return SessionTable(**args)  # type: ignore[arg-type]


def seal(t: SessionTable, slot: int, payload: bytes = b"packet") -> bytes:
    return b"".join(t.send[slot].seal(DatagramType.DATA, payload))


class TestInstall:
    """Control's sessions become entries; what the table had survives an update."""

    def test_a_confirmed_session_seals_to_its_endpoint_and_every_session_opens(self) -> None:
        t = table()
        t.install_keys(keys(key_entry(1, 0), key_entry(2, 2, confirmed=False, endpoint=EP_2)))
        assert sorted(t.recv) == [100, 102]
        assert (t.recv[100].slot, t.recv[100].confirmed) == (1, True)
        assert (t.recv[102].slot, t.recv[102].confirmed) == (2, False)
        assert list(t.send) == [1] and t.relayed == {}
        out = t.send[1]
        assert (out.endpoint, out.dest, out.key, out.hop) == (ADDR_1, ID_1, KEY[1], -1)
        assert isinstance(out.session, SendSession) and out.session.index == 200
        assert t.version == 1 and t.statistics() == {"receive": 2, "send": 1}

    def test_each_session_seals_and_opens_with_the_cipher_control_named(self) -> None:
        """The handshake's cipher comes in the KeyEntry (absent: chacha20-poly1305, as
        before the negotiation); a session of each, side by side."""
        aes = msgspec.structs.replace(key_entry(1, 0), cipher=DataCipher.AES_256_GCM)
        t = table()
        t.install_keys(keys(aes, key_entry(2, 2, endpoint=EP_2)))
        for index, cipher in [(100, DataCipher.AES_256_GCM), (102, DataCipher.CHACHA20_POLY1305)]:
            inbound_session = t.recv[index].session
            assert isinstance(inbound_session, RecvSession) and inbound_session.cipher is cipher
        for slot, n, cipher in [(1, 0, aes.cipher), (2, 2, DataCipher.CHACHA20_POLY1305)]:
            out = t.send[slot].session
            assert isinstance(out, SendSession) and out.cipher is cipher
            datagram = seal(t, slot)
            assert (
                RecvSession(KEY[n + 1], index=200 + n, created=0.0, cipher=cipher).open(datagram)
                == b"packet"
            )
            sender = SendSession(KEY[n], index=100 + n, created=0.0, cipher=cipher)
            inbound = b"".join(sender.seal(DatagramType.DATA, b"in"))
            assert t.recv[100 + n].open(memoryview(inbound)) == b"in"
        assert t.send_ciphers() == {"aes-256-gcm": 1, "chacha20-poly1305": 1}

    def test_the_newest_confirmed_session_of_a_link_seals(self) -> None:
        t = table()
        t.install_keys(
            keys(
                key_entry(1, 0, created=10.0),
                key_entry(1, 2, created=20.0),
                key_entry(1, 4, created=30.0, confirmed=False),
            )
        )
        assert t.send[1].key == KEY[3]  # session 2: the newest the peer has shown it holds

    def test_objects_counters_and_windows_survive_an_update(self) -> None:
        t = table()
        t.install_keys(keys(key_entry(1, 0)))
        out, inbound = t.send[1], t.recv[100]
        datagram = seal(t, 1)
        peer = RecvSession(KEY[1], index=200, created=0.0)
        assert peer.open(datagram) == b"packet"
        sender = SendSession(KEY[0], index=100, created=0.0)
        opened = b"".join(sender.seal(DatagramType.DATA, b"in"))
        assert inbound.open(memoryview(opened)) == b"in"

        t.install_keys(keys(key_entry(1, 0), key_entry(2, 2, endpoint=EP_2), version=2))
        assert t.send[1] is out and t.recv[100] is inbound and t.version == 2
        assert peer.open(seal(t, 1)) == b"packet"  # counter 1, not 0 again
        with pytest.raises(RemoteProtocolError) as info:
            inbound.open(memoryview(opened))  # the window remembers counter 0
        assert info.value.reason == "replayed"

    def test_a_new_key_is_a_new_session_from_the_reserved_counter(self) -> None:
        t = table()
        t.install_keys(keys(key_entry(1, 0)))
        old = t.send[1]
        t.install_keys(keys(key_entry(1, 2, created=5.0, counter_start=7 << 40)))
        assert t.send[1] is not old and t.send[1].key == KEY[3]
        session = t.send[1].session
        assert isinstance(session, SendSession) and session.counter == 7 << 40
        assert list(t.recv) == [102]  # the old receive session is gone with its entry

    def test_confirmed_is_sticky(self) -> None:
        """Confirmed here (a datagram opened) stays so when control has not heard yet."""
        t = table()
        t.install_keys(keys(key_entry(1, 0, confirmed=False)))
        assert t.send == {}
        t.confirm(t.recv[100])
        t.install_keys(keys(key_entry(1, 0, confirmed=False)))
        assert t.recv[100].confirmed and list(t.send) == [1]

    def test_only_the_slots_this_worker_owns_seal_here(self) -> None:
        t = table(worker=1, workers=2)
        t.install_keys(keys(key_entry(1, 0), key_entry(2, 2, endpoint=EP_2, node_id=ID_2)))
        assert list(t.send) == [1]
        assert sorted(t.recv) == [100, 102]  # any worker opens what the kernel hands it
        assert t.relay_table.slots == [1, 2]  # and relays over every direct link
        assert t.owns(1) and not t.owns(2)

    def test_inbound_packets_go_to_the_classifier_of_their_slot(self) -> None:
        t = table(classifiers=3)
        t.install_keys(keys(key_entry(4, 0), key_entry(5, 2)))
        assert (t.recv[100].classifier, t.recv[102].classifier) == (1, 2)


def relayed_via_1() -> SessionTable:
    """Direct links 1 and 3, and link 2 relayed (no endpoint): its hop is link 1."""
    t = table()
    t.install_keys(
        keys(
            key_entry(1, 0, endpoint=EP_1, node_id=ID_1),
            key_entry(3, 4, endpoint=EP_2, node_id=ID_3),
            key_entry(2, 2, endpoint="", node_id=ID_2),
        )
    )
    return t


class TestRelayed:
    """A link without an endpoint is sealed end to end and handed to the closest direct link."""

    def test_relayed_session_gets_the_closest_direct_link_as_hop(self) -> None:
        t = relayed_via_1()
        assert sorted(t.send) == [1, 3] and list(t.relayed) == [2]
        e2e = t.relayed[2]
        assert (e2e.endpoint, e2e.dest, e2e.hop) == (NO_ENDPOINT, ID_2, 1)
        assert t.relay_route(2) is e2e
        assert t.relay_route(9) == "no_session"

    def test_no_direct_link_closer_than_us_is_no_route(self) -> None:
        t = table()
        t.install_keys(
            keys(key_entry(1, 0, node_id=nid(0x90 << 152)), key_entry(2, 2, endpoint=""))
        )
        assert t.relayed[2].hop == -1 and t.relay_route(2) == "relay_no_route"

    def test_a_relayed_session_that_gains_an_endpoint_moves_with_its_counter(self) -> None:
        t = table()
        t.install_keys(keys(key_entry(1, 0), key_entry(2, 2, endpoint="", node_id=ID_2)))
        e2e = t.relayed[2]
        e2e.seal(DatagramType.DATA, b"x")
        t.install_keys(keys(key_entry(1, 0), key_entry(2, 2, endpoint=EP_2, node_id=ID_2)))
        assert t.send[2] is e2e and t.relayed == {} and e2e.endpoint == ADDR_2
        assert isinstance(e2e.session, SendSession) and e2e.session.counter == 1
        t.install_keys(keys(key_entry(1, 0), key_entry(2, 2, endpoint="", node_id=ID_2)))
        assert t.relayed[2] is e2e and e2e.endpoint == NO_ENDPOINT and e2e.hop == 1

    def test_only_the_hops_control_names_carry_relay_payloads(self) -> None:
        """``SessionKeys.hops``: the overlay's live connections; a direct link that is none
        (made for a route) or whose node went silent is no hop, and a relayed session goes
        to the closest hop that is left."""
        t = table()
        entries = (
            key_entry(1, 0, endpoint=EP_1, node_id=ID_1),
            key_entry(3, 4, endpoint=EP_2, node_id=ID_3),
            key_entry(2, 2, endpoint="", node_id=ID_2),
        )
        t.install_keys(messages.SessionKeys(1, entries, OWN_ID, hops=(ID_1, ID_3)))
        assert t.relay_table.slots == [1, 3] and t.relayed[2].hop == 1
        t.install_keys(messages.SessionKeys(2, entries, OWN_ID, hops=(ID_3,)))
        assert t.relay_table.slots == [3] and t.relayed[2].hop == 3
        assert sorted(t.send) == [1, 3]  # slot 1 still seals for its own peer
        t.install_keys(messages.SessionKeys(3, entries, OWN_ID, hops=()))
        assert t.relay_route(2) == "relay_no_route"

    def test_a_chosen_relay_is_the_hop_while_it_is_one(self) -> None:
        """``KeyEntry.via`` (both NATs vary: a relay both reach fast): link 3's node is the
        hop though link 1's is closer to the peer; a via that is no hop (suspect, or no
        direct link) leaves the greedy choice."""
        t = table()
        direct = (key_entry(1, 0, node_id=ID_1), key_entry(3, 4, endpoint=EP_2, node_id=ID_3))
        via_3 = msgspec.structs.replace(key_entry(2, 2, endpoint="", node_id=ID_2), via=ID_3)
        t.install_keys(keys(*direct, via_3))
        assert t.relayed[2].hop == 3 and t.relayed[2].via == ID_3
        t.install_keys(messages.SessionKeys(2, (*direct, via_3), OWN_ID, hops=(ID_1,)))
        assert t.relayed[2].hop == 1
        unknown = msgspec.structs.replace(via_3, via=nid(0x33 << 152))
        t.install_keys(keys(*direct, unknown, version=3))
        assert t.relayed[2].hop == 1


class TestReports:
    """What the table tells control, once each, in order."""

    def test_a_silent_hop_is_reported_at_most_once_per_interval(self) -> None:
        t = table()
        t.install_keys(keys(key_entry(1, 0), key_entry(2, 2, endpoint="", node_id=ID_2)))
        t.heard[1] = 10.0
        t.relayed_over(1, 10.0 + HOP_SILENT_S - 0.01)  # heard lately: nothing to say
        assert t.reports_to_send() == []
        t.relayed_over(1, 10.0 + HOP_SILENT_S)
        t.relayed_over(1, 10.0 + HOP_SILENT_S + HOP_REPORT_S / 2)
        assert t.reports_to_send() == [messages.HopSilent(1)]
        t.relayed_over(1, 10.0 + HOP_SILENT_S + HOP_REPORT_S)
        assert t.reports_to_send() == [messages.HopSilent(1)]
        t.heard[1] = 20.0  # it answered: quiet again
        t.relayed_over(1, 20.0 + HOP_SILENT_S / 2)
        assert t.reports_to_send() == []

    def test_a_hop_silent_after_the_report_is_left_out_until_heard(self) -> None:
        t = relayed_via_1()
        assert t.relayed[2].hop == 1
        t.heard[1] = t.heard[3] = 10.0
        t.relayed_over(1, 11.0)  # reported: control pings it
        assert t.reports_to_send() == [messages.HopSilent(1)]
        t.relayed_over(1, 11.0 + HOP_ANSWER_S - 0.01)
        assert t.relayed[2].hop == 1 and not t.suspect_hops
        t.relayed_over(1, 11.0 + HOP_ANSWER_S)  # no answer: the next closest hop
        assert t.suspect_hops == {1} and t.relayed[2].hop == 3 and t.hops_suspected == 1
        t.install_keys(  # new keys keep it out
            keys(
                key_entry(1, 0, endpoint=EP_1, node_id=ID_1),
                key_entry(3, 4, endpoint=EP_2, node_id=ID_3),
                key_entry(2, 2, endpoint="", node_id=ID_2),
                version=2,
            )
        )
        assert t.relayed[2].hop == 3
        t.heard[1] = 13.0
        t.hop_heard(1)  # it answered after all
        assert not t.suspect_hops and t.relayed[2].hop == 1

    def test_a_session_confirmed_here_is_reported_once(self) -> None:
        t = table()
        t.install_keys(keys(key_entry(1, 0, confirmed=False)))
        t.confirm(t.recv[100])
        t.confirm(t.recv[100])
        assert t.reports_to_send() == [messages.SessionConfirmed(100)]
        assert t.reports_to_send() == []

    def test_a_session_of_age_asks_for_a_rekey_once(self) -> None:
        t = table()
        t.install_keys(keys(key_entry(1, 0, created=0.0), key_entry(2, 2, created=50.0)))
        t.check_rekeys(119.9)
        assert t.reports_to_send() == []
        t.check_rekeys(120.0)
        t.check_rekeys(121.0)
        assert t.reports_to_send() == [messages.RekeyRequest(1)]
        t.check_rekeys(170.0)
        assert t.reports_to_send() == [messages.RekeyRequest(2)]

    def test_a_session_that_carried_its_volume_asks_for_a_rekey_once(self) -> None:
        t = table(rekey_after_bytes=10)
        t.install_keys(keys(key_entry(1, 0), key_entry(2, 2, endpoint="", node_id=ID_2)))
        seal(t, 1, b"123456789")
        t.check_rekeys(1.0)
        assert t.reports_to_send() == []
        t.relayed[2].seal(DatagramType.DATA, b"0123456789")
        seal(t, 1, b"0")
        t.check_rekeys(1.0)
        t.check_rekeys(2.0)
        assert t.reports_to_send() == [messages.RekeyRequest(1), messages.RekeyRequest(2)]

    def test_a_new_key_may_ask_again(self) -> None:
        t = table()
        t.install_keys(keys(key_entry(1, 0, created=0.0)))
        t.check_rekeys(120.0)
        t.install_keys(keys(key_entry(1, 2, created=120.5)))
        t.check_rekeys(240.5)
        assert t.reports_to_send() == [messages.RekeyRequest(1), messages.RekeyRequest(1)]


class TestNullSessions:
    """Plaintext mode: sealing writes the header, opening checks it."""

    def test_seal_is_the_plain_header_and_the_payload_as_given(self) -> None:
        payload = memoryview(b"an ip packet")
        header, body = NullSendSession().seal(DatagramType.DATA, payload)
        assert header == build_header(DatagramType.DATA) and body is payload
        assert NullSendSession().seal(2, b"m") == [build_header(DatagramType.OVERLAY), b"m"]
        assert not NullSendSession().needs_rekey(1e9)

    def test_open_is_the_payload_after_a_good_header(self) -> None:
        datagram = memoryview(build_header(DatagramType.OVERLAY, session=5) + b"msg")
        payload = NullRecvSession().open(datagram)
        assert isinstance(payload, memoryview) and bytes(payload) == b"msg"
        assert NullRecvSession().index == 0

    @pytest.mark.parametrize(
        ("datagram", "reason"),
        [
            (b"\x01\x01" + bytes(13), "short_datagram"),
            (b"\x02\x01" + bytes(14), "bad_version"),
            (build_header(DatagramType.RELAY) + bytes(40), "bad_type"),
            (build_header(DatagramType.HANDSHAKE), "bad_type"),
            (b"\x01\x09" + bytes(14), "bad_type"),
        ],
    )
    def test_open_refuses_what_plaintext_does_not_carry(self, datagram: bytes, reason: str) -> None:
        with pytest.raises(RemoteProtocolError) as info:
            NullRecvSession().open(datagram)
        assert info.value.reason == reason

    def test_plaintext_table_takes_the_configured_peers_of_the_route_snapshot(self) -> None:
        t = table(plaintext=True, classifiers=2)
        peers = (
            messages.PeerRoute(1, "beta", ("100.64.0.2",), EP_1, True),
            messages.PeerRoute(2, "gamma", ("100.64.0.3",), EP_2, False),
            messages.PeerRoute(3, "delta", ("100.64.0.4",), "", False),  # nowhere to send
        )
        t.install_routes(messages.RouteSnapshot(1, 4, peers))
        assert {s: e.endpoint for s, e in t.send.items()} == {1: ADDR_1, 2: ADDR_2}
        assert {a: (e.slot, e.classifier) for a, e in t.by_source.items()} == {
            ADDR_1: (1, 1),
            ADDR_2: (2, 0),
        }
        assert all(e.confirmed for e in t.by_source.values()) and t.recv == {}
        plain = build_header(DatagramType.DATA) + b"p"
        assert b"".join(t.send[1].seal(DatagramType.DATA, b"p")) == plain
        assert t.version == 4 and t.statistics() == {"receive": 0, "send": 0}
        t.install_routes(messages.RouteSnapshot(1, 5, peers[:1]))
        assert list(t.send) == [1] and list(t.by_source) == [ADDR_1]

    def test_plaintext_has_no_keys_no_handshakes_and_no_relaying(self) -> None:
        t = table(plaintext=True)
        t.install_keys(keys(key_entry(1, 0)))
        assert t.send == {} and t.recv == {} and t.version == -1
        assert t.handshake_types == frozenset()
        assert t.relay_route(1) == "no_endpoint"
        t.install_routes(
            messages.RouteSnapshot(1, 1, (messages.PeerRoute(1, "b", (), EP_1, True),))
        )
        t.check_rekeys(1e9)
        assert t.reports_to_send() == []

    def test_a_keyed_table_ignores_route_snapshots(self) -> None:
        t = table()
        t.install_routes(
            messages.RouteSnapshot(1, 1, (messages.PeerRoute(1, "b", (), EP_1, True),))
        )
        assert t.send == {} and t.by_source == {}
        assert t.handshake_types == {DatagramType.HANDSHAKE, DatagramType.COOKIE}


def test_parse_address() -> None:
    assert parse_address("198.18.0.2:4789") == ("198.18.0.2", 4789)
    with pytest.raises(ValueError):
        parse_address("")
    assert HEADER_LEN == 16
