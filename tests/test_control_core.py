"""control's top core in memory, on a virtual clock: two static IK peers link, their pings
make them up, the overlay_io workers get keys with fresh counter ranges, the route table is
published on change and every 2 s; timers fire at their deadline, not on a poll's tick; and
in plaintext mode the static peers are the routes."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from pipeline import messages
from pipeline.control import events as ev
from pipeline.control.addressing import AddressingSettings
from pipeline.control.core import (
    GENERATION_SHIFT,
    REPUBLISH_S,
    ControlCore,
    ControlSettings,
    Credentials,
)
from pipeline.control.links import LinkSettings, PeerSpec
from pipeline.crypto.cert import RevocationList
from pipeline.crypto.ciphers import DEFAULT_CIPHERS, DataCipher
from tests.test_links import WALL, ca_pair, member, rng_from

SUBNET = IPv4Network("100.64.0.0/24")
ENDPOINTS = [("198.18.0.1", 4789), ("198.18.0.2", 4789)]


def pair(*, encrypted: bool = True, start: float = 100.0, **options: Any) -> list[ControlCore]:
    """Two cores, each with the other as its static peer (slot 1), public keys known (IK);
    ``options``: more ``ControlSettings`` for both."""
    ca, ca_cert = ca_pair()
    members = [member(ca, ca_cert, 40 + i, f"n{i}") for i in range(2)]
    cores = []
    for i in range(2):
        ident, cert = members[i]
        other_ident, _ = members[1 - i]
        peer = PeerSpec(
            1,
            f"n{1 - i}",
            ENDPOINTS[1 - i],
            other_ident.public_key,
            (f"100.64.0.{2 - i}",),
        )
        settings = ControlSettings(
            node_name=f"n{i}",
            namespace="lab",
            subnet=SUBNET,
            address=IPv4Address(f"100.64.0.{i + 1}"),
            peers=(peer,),
            encrypted=encrypted,
            **options,
        )
        credentials = Credentials(ident, cert, ca_cert, RevocationList.empty())
        cores.append(
            ControlCore(
                settings,
                credentials=credentials if encrypted else None,
                rng=random.Random(i),
                entropy=rng_from(60 + i),
                epoch=7 + i,
                now=start,
            )
        )
    return cores


def exchange(cores: list[ControlCore], now: float, *, drop_handshakes: bool = False) -> None:
    """Carry handshakes and overlay messages between the two, until quiet."""
    for _ in range(20):
        moved = False
        for i, core in enumerate(cores):
            other = cores[1 - i]
            for datagram, _to, _slot in core.handshakes_to_send():
                moved = True
                if not drop_handshakes:
                    other.receive_handshake(datagram, ENDPOINTS[i], now, WALL + now)
            for slot, payload in core.overlay_to_send():
                assert slot == 1
                moved = True
                other.receive_overlay(1, payload, now, WALL + now)
        if not moved:
            return


def run(cores: list[ControlCore], now: float, until: float) -> tuple[float, list[object]]:
    """Step both cores from deadline to deadline up to ``until``, carrying what they send
    and confirming sessions as overlay_io would; (the time reached, a's events)."""
    events: list[object] = []
    while True:
        for core in cores:
            core.handle_timer(now, WALL + now)
        exchange(cores, now)
        for core in cores:
            assert core.routing is not None
            for session in core.routing.links.sessions():
                if not session.confirmed:
                    core.session_confirmed(session.recv_index, now, WALL + now)
            core.snapshot_to_publish(now)
        events += cores[0].events()
        cores[1].events()
        nxt = min(core.next_deadline() for core in cores)
        if nxt > until:
            return now, events
        assert nxt > now  # never a deadline in the past: no busy loop
        now = nxt


def test_static_peers_link_ping_and_come_up() -> None:
    a, _b = cores = pair()
    now, events = run(cores, 100.0, 103.0)
    ups = [e for e in events if isinstance(e, ev.PeerUp)]
    assert [(e.peer, e.slot) for e in ups] == [("n1", 1)]
    assert any(isinstance(e, ev.LinkFormed) for e in events)
    snap = a.snapshot()
    assert snap.peers[0].up and snap.address == "100.64.0.1"
    assert a.snapshot_to_publish(now) is None  # nothing changed since the last one
    assert a.snapshot_to_publish(now + REPUBLISH_S) is not None  # resync for late subscribers


def test_overlay_io_workers_get_keys_and_a_new_incarnation_a_new_counter_range() -> None:
    a, _b = cores = pair()
    for core in cores:
        core.handle_timer(100.0, WALL + 100)
    exchange(cores, 100.0)
    a.io_worker_started(b"overlay_io:0", pid=10)
    ((worker, keys),) = a.keys_to_send()
    assert worker == b"overlay_io:0" and keys.entries[0].counter_start == 0
    assert a.keys_to_send() == []  # nothing new
    a.io_worker_started(b"overlay_io:0", pid=11)  # the worker restarted
    ((_, keys),) = a.keys_to_send()
    assert keys.entries[0].counter_start == 1 << GENERATION_SHIFT
    a.io_worker_started(b"overlay_io:0", pid=11)  # asked again, same incarnation
    ((_, keys),) = a.keys_to_send()
    assert keys.entries[0].counter_start == 1 << GENERATION_SHIFT


@pytest.mark.parametrize(
    ("mine", "theirs", "agreed"),
    [
        (DEFAULT_CIPHERS, DEFAULT_CIPHERS, DataCipher.AES_256_GCM),
        (DEFAULT_CIPHERS, (DataCipher.CHACHA20_POLY1305,), DataCipher.CHACHA20_POLY1305),
    ],
)
def test_the_agreed_cipher_goes_to_overlay_io_and_into_status(
    mine: tuple[DataCipher, ...], theirs: tuple[DataCipher, ...], agreed: DataCipher
) -> None:
    a, b = cores = pair()
    for core, ciphers in [(a, mine), (b, theirs)]:
        assert core.routing is not None
        core.routing.links.settings = LinkSettings(ciphers=ciphers)
    run(cores, 100.0, 101.0)
    a.io_worker_started(b"overlay_io:0", pid=10)
    ((_, keys),) = a.keys_to_send()
    assert keys.entries and {e.cipher for e in keys.entries} == {agreed}
    status = a.status(101.0)
    assert status["peers"][0]["cipher"] == agreed.value
    assert [row["cipher"] for row in status["link_table"]] == [agreed.value]


def test_a_handshake_retry_fires_at_its_deadline_not_on_a_tick() -> None:
    """The first initiation is lost. The link layer says when to send it again (0.2 s later,
    then 0.4 s after that, doubling, until it times out 5 s after the first and a new one
    goes); stepping the core from deadline to deadline, each goes at exactly its time, never
    before, and the core was woken for it then, not at some later tick."""
    a, _b = pair()
    a.handle_timer(100.0, WALL + 100)
    (first,) = a.handshakes_to_send()  # lost
    assert a.routing is not None
    due = [100.2, 100.6, 101.4, 103.0, 105.0]
    assert a.routing.links.next_deadline() == pytest.approx(due[0])
    now = 100.0
    sent_at: list[float] = []
    sent = []
    while len(sent_at) < len(due):
        a.snapshot_to_publish(now)
        now = a.next_deadline()
        assert now <= due[len(sent_at)] + 1e-9  # no wake-up is skipped past the next send
        a.handle_timer(now, WALL + now)
        if out := a.handshakes_to_send():
            sent_at.append(now)
            sent += out
    assert sent_at == pytest.approx(due)
    assert sent[:4] == [first] * 4 and sent[4] != first  # the same bytes, then a new one


def test_a_dht_request_retries_at_its_deadline() -> None:
    """A tool's DHT get on a node alone: the DHT's own timers decide when it ends, and the
    core's deadline is that time (no poll): the answer comes as a Reply effect."""
    (a, _b) = pair()
    now = 100.0
    a.handle_timer(now, WALL + now)
    a.dht_get(b"cli", "ip:lab:100.64.0.9", now, WALL + now)
    for _ in range(200):
        a.snapshot_to_publish(now)
        deadline = a.next_deadline()
        assert deadline > now  # never a deadline in the past: no busy loop
        now = deadline
        a.handle_timer(now, WALL + now)
        a.handshakes_to_send()
        replies = [e for e in a.events() if isinstance(e, ev.Reply)]
        if replies:
            break
    (reply,) = replies
    assert reply.to == b"cli" and isinstance(reply.message, messages.DhtGetReply)


def test_the_deadline_is_never_in_the_past_once_idle() -> None:
    """Linked and idle, the cores sleep until their next real timer (pings, rekeys, the
    overlay's maintenance, republishing), never asking to be woken for nothing."""
    cores = pair()
    now, _ = run(cores, 100.0, 160.0)
    assert now > 159.0
    wakeups = 0
    while now < 220.0:
        now, _ = run(cores, now, now + 0.001)
        wakeups += 1
        now = min(core.next_deadline() for core in cores)
    assert 60 <= wakeups <= 400  # about 1-6 a second over 60 s: pings, publishing, overlay


def test_plaintext_static_peers_are_the_routes() -> None:
    a, b = cores = pair(encrypted=False)
    a.handle_timer(100.0, WALL + 100)
    ((slot, ping),) = a.overlay_to_send()
    b.receive_overlay(slot, ping, 100.0, WALL + 100)
    a.receive_overlay(1, b.overlay_to_send()[0][1], 100.001, WALL + 100)
    snap = a.snapshot_to_publish(100.001)
    assert snap is not None and snap.peers[0].endpoint == "198.18.0.2:4789" and snap.peers[0].up
    a.receive_handshake(b"\x01\x03" + bytes(30), ENDPOINTS[1], 100.0, WALL + 100)
    a.frame_from_tap(bytes(60), 100.0, WALL + 100)
    assert a.counters == {"handshake_without_links": 1, "frame_without_addressing": 1}
    del cores


def test_a_static_nodes_name_registration_starts_on_the_cores_clock() -> None:
    """The host name's create is made as the core is built, before any input: on the
    clock it was built with (it read 0 and timed out at the first timer, a try lost)."""
    addressing = AddressingSettings(
        subnet=SUBNET,
        gateway=IPv4Address("100.64.0.254"),
        domain="vpn.test",
        namespace="lab",
        node_name="n0",
        tap_mac=bytes.fromhex("020000000001"),
        gateway_mac=bytes.fromhex("02000000fe01"),
        mtu=1400,
        dhcp=False,
    )
    a, _b = pair(start=5000.0, addressing=addressing)
    assert a.routing is not None
    assert a.routing.dht.statistics()["waiting_for_join"] == 1  # the name: not on the circle
    a.handle_timer(5000.0, WALL + 5000.0)
    assert a.routing.dht.statistics().get("request_timeouts", 0) == 0


def test_a_stopping_node_leaves_the_overlay_and_its_peer_drops_it_at_once() -> None:
    """``stop``: a Close to every overlay connection (one ``overlay_left``, no warning per
    connection); the peer drops the connection as closed by a leave when it arrives, not
    after its timeout."""
    a, b = cores = pair()
    now, _ = run(cores, 100.0, 103.0)
    assert a.routing is not None and b.routing is not None
    assert len(b.routing.overlay.connections()) == 1
    b.events()
    a.stop(now, WALL + now)
    left = a.events()
    assert [e.connections for e in left if isinstance(e, ev.OverlayLeft)] == [1]
    assert not [e for e in left if isinstance(e, ev.OverlayConnectionRemoved)]
    closes = a.overlay_to_send()
    assert closes and {slot for slot, _ in closes} == {1}
    for _, payload in closes:
        b.receive_overlay(1, payload, now, WALL + now)
    assert b.routing.overlay.connections() == []
    removed = [e for e in b.events() if isinstance(e, ev.OverlayConnectionRemoved)]
    assert [e.reason for e in removed] == ["closed_leave"]
