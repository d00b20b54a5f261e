"""Links between two LinkManagers in memory: IK and XX handshakes with certificates, every
refusal, cookies under load, rekeying without a gap, revocation. Time is driven by hand."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pipeline.control.links import (
    EventKind,
    LinkEvent,
    LinkManager,
    LinkSettings,
    PeerSpec,
    Via,
)
from pipeline.crypto import handshake as hs
from pipeline.crypto.cert import Certificate, RevocationList, issue, make_ca
from pipeline.crypto.identity import Identity
from pipeline.crypto.screen import resync_hint

NOW = 1_000.0
WALL = 1_800_000_000.0
A_ADDR = ("198.18.0.1", 4789)
B_ADDR = ("198.18.0.2", 4789)


def rng_from(seed: int) -> Callable[[int], bytes]:
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


def ca_pair(seed: int = 1) -> tuple[Identity, Certificate]:
    ca = Identity.from_seed(bytes([seed]) * 32)
    return ca, make_ca(ca, name="authority", not_before=0, not_after=2**40, serial=seed)


def member(
    ca: Identity,
    ca_cert: Certificate,
    seed: int,
    name: str,
    *,
    networks: tuple[str, ...] = ("lab",),
    not_after: int = 2**39,
    addresses: tuple[str, ...] = (),
) -> tuple[Identity, Certificate]:
    ident = Identity.from_seed(bytes([seed]) * 32)
    cert = issue(
        ca,
        ca_cert,
        public_key=ident.public_key,
        name=name,
        networks=list(networks),
        addresses=list(addresses),
        not_before=0,
        not_after=not_after,
        serial=seed,
    )
    return ident, cert


def manager(
    ident: Identity,
    cert: Certificate,
    ca_cert: Certificate,
    peer: PeerSpec,
    seed: int,
    **settings: float,
) -> LinkManager:
    return LinkManager(
        identity=ident,
        certificate=cert,
        ca=ca_cert,
        network="lab",
        peers=[peer],
        revoked=RevocationList.empty(),
        rng=rng_from(seed),
        settings=LinkSettings(**settings),  # type: ignore[arg-type]
    )


class Pair:
    def __init__(
        self, *, a_knows_b: bool = True, b_knows_a: bool = True, **settings: float
    ) -> None:
        self.ca, self.ca_cert = ca_pair()
        self.ia, self.ca_a = member(self.ca, self.ca_cert, 10, "alpha")
        self.ib, self.ca_b = member(self.ca, self.ca_cert, 20, "beta")
        self.a = manager(
            self.ia,
            self.ca_a,
            self.ca_cert,
            PeerSpec(1, "beta", B_ADDR, self.ib.public_key if a_knows_b else None, ("100.64.0.2",)),
            1,
            **settings,
        )
        self.b = manager(
            self.ib,
            self.ca_b,
            self.ca_cert,
            PeerSpec(
                1, "alpha", A_ADDR, self.ia.public_key if b_knows_a else None, ("100.64.0.1",)
            ),
            2,
            **settings,
        )
        self.now = NOW

    def deliver(self, drop: Callable[[bytes], bool] = lambda d: False) -> int:
        """Move every pending datagram across until both are quiet; return how many moved."""
        moved = 0
        for _ in range(10):
            batch = [(self.b, d, A_ADDR) for d, to in self.a.datagrams_to_send()]
            batch += [(self.a, d, B_ADDR) for d, to in self.b.datagrams_to_send()]
            if not batch:
                return moved
            for target, datagram, source in batch:
                if not drop(datagram):
                    target.receive(datagram, source, self.now, WALL)
                    moved += 1
        return moved

    def start_a(self) -> None:
        """Only alpha initiates (beta's first timer comes later)."""
        self.a.handle_timer(self.now, WALL)
        self.b.links[1].next_attempt = self.now + 0.5

    def tick(self, dt: float = 0.0) -> None:
        self.now += dt
        self.a.handle_timer(self.now, WALL + self.now - NOW)
        self.b.handle_timer(self.now, WALL + self.now - NOW)


def events(m: LinkManager) -> list[LinkEvent]:
    return list(m.events())


def keys_match(p: Pair) -> None:
    (sa,) = p.a.sessions()
    (sb,) = p.b.sessions()
    assert sa.send_key == sb.recv_key and sa.recv_key == sb.send_key
    assert sa.send_index == sb.recv_index and sb.send_index == sa.recv_index
    assert sa.send_key != sa.recv_key


class TestHandshakes:
    def test_ik_forms_a_link_with_matching_keys(self) -> None:
        p = Pair()
        p.start_a()
        p.deliver()
        keys_match(p)
        (sa,) = p.a.sessions()
        (sb,) = p.b.sessions()
        assert sa.pattern is hs.Pattern.IK and sa.confirmed and not sb.confirmed
        formed = [e for e in events(p.b) if e.kind is EventKind.LINK_FORMED]
        assert formed and formed[0].node_id == p.ia.node_id.hex()
        p.b.confirm(sb.recv_index)
        assert p.b.sessions()[0].confirmed

    def test_xx_learns_the_peers_key(self) -> None:
        p = Pair(a_knows_b=False, b_knows_a=False)
        p.start_a()
        p.deliver()
        keys_match(p)
        assert p.a.sessions()[0].pattern is hs.Pattern.XX
        assert p.b.sessions()[0].confirmed  # the initiator's last message confirmed it
        assert p.a.links[1].certificate == p.ca_b

    def test_crossed_initiations_end_in_one_working_pair(self) -> None:
        p = Pair()
        p.a.handle_timer(p.now, WALL)
        p.b.handle_timer(p.now, WALL)
        p.deliver()
        a_keys = {(s.send_key, s.recv_key) for s in p.a.sessions()}
        b_keys = {(s.recv_key, s.send_key) for s in p.b.sessions()}
        assert a_keys & b_keys
        # the winner sent its initiation again on the crossing; the copy is no refusal
        assert p.a.statistics()["refused"] == p.b.statistics()["refused"] == {}

    def test_initiation_lost_at_start_goes_again_when_theirs_crosses_it(self) -> None:
        """Both start; the initiation that wins a crossing (the smaller node id's: beta's
        here) is lost, the peer's port not bound yet. When alpha's own initiation reaches
        beta, beta sends its own again at once: the pair links without waiting for beta's
        resend timer."""
        p = Pair()
        assert p.ib.node_id < p.ia.node_id
        p.b.handle_timer(p.now, WALL)
        assert len(p.b.datagrams_to_send()) == 1  # lost
        p.now += 0.05  # alpha is up now and initiates; beta's resend is not due yet
        p.a.handle_timer(p.now, WALL)
        p.deliver()
        keys_match(p)
        assert p.b.statistics()["crossed_initiations"] == 1
        assert p.b.statistics()["initiations_resent"] == 1

    def test_crossing_resends_once_per_initiation(self) -> None:
        p = Pair()
        p.b.handle_timer(p.now, WALL)
        p.b.datagrams_to_send()  # lost
        p.a.handle_timer(p.now, WALL)
        (theirs,) = [d for d, _ in p.a.datagrams_to_send()]
        for _ in range(3):  # alpha's initiation, and two replays of it
            p.b.receive(theirs, A_ADDR, p.now, WALL)
        assert p.b.statistics()["crossed_initiations"] == 3
        assert len(p.b.datagrams_to_send()) == 1

    def test_lost_reply_is_retried(self) -> None:
        p = Pair()
        p.start_a()
        p.deliver(drop=lambda d: d[hs.HEADER_LEN + 1] == 1)  # every step-1 reply lost
        assert not p.a.sessions()
        p.tick(LinkSettings().retry_s + 0.01)
        p.deliver()
        assert p.a.sessions() and any(
            s.send_key == p.a.sessions()[-1].recv_key for s in p.b.sessions()
        )


class TestRefusals:
    @pytest.mark.parametrize(
        ("case", "reason"),
        [
            ("foreign_ca", "foreign_ca"),
            ("expired", "expired"),
            ("other_network", "wrong_network"),
            ("revoked", "revoked"),
            ("impostor", "unknown_peer"),
            ("stolen_certificate", "key_mismatch"),
        ],
    )
    def test_bad_initiator_is_refused_and_counted(self, case: str, reason: str) -> None:
        p = Pair()
        ca2, ca2_cert = ca_pair(seed=2)
        if case == "foreign_ca":
            ident, cert = member(ca2, ca2_cert, 10, "alpha")
        elif case == "expired":
            ident, cert = member(p.ca, p.ca_cert, 10, "alpha", not_after=int(WALL) - 10)
        elif case == "other_network":
            ident, cert = member(p.ca, p.ca_cert, 10, "alpha", networks=("other",))
        elif case == "impostor":  # a valid member that beta has not configured as a peer
            ident, cert = member(p.ca, p.ca_cert, 30, "mallory")
        elif case == "stolen_certificate":  # alpha's certificate without alpha's key
            ident, cert = member(p.ca, p.ca_cert, 30, "mallory")[0], p.ca_a
        else:
            ident, cert = p.ia, p.ca_a
            p.b.set_revocations(RevocationList.parse(f"serial {cert.serial}\n"))
        p.a = manager(
            ident,
            cert,
            p.ca_cert if case != "foreign_ca" else ca2_cert,
            PeerSpec(1, "beta", B_ADDR, p.ib.public_key, ("100.64.0.2",)),
            1,
        )
        p.start_a()
        p.deliver()
        assert p.b.sessions() == [] and p.a.sessions() == []
        refused = p.b.statistics()["refused"]
        assert isinstance(refused, dict)
        if case == "foreign_ca":  # its mac1 is keyed by the other authority
            assert refused == {"bad_mac1": 1}
        else:
            assert refused == {reason: 1}
            assert [e.reason for e in events(p.b) if e.kind is EventKind.HANDSHAKE_REFUSED] == [
                reason
            ]

    def test_replayed_initiation_is_refused(self) -> None:
        """The initiation answered last, again (the peer's resend, or a replay): counted,
        no second session, no answer; an older one: refused."""
        p = Pair()
        p.start_a()
        ((old, _),) = p.a.datagrams_to_send()
        p.a.links[1].pending = None
        p.now += p.a.settings.retry_s  # alpha initiates again, later (beta stays quiet)
        p.a.handle_timer(p.now, WALL + p.a.settings.retry_s)
        ((init, _),) = p.a.datagrams_to_send()
        p.b.receive(init, A_ADDR, p.now, WALL)
        assert len(p.b.datagrams_to_send()) == 1  # the answer
        p.b.receive(init, A_ADDR, p.now, WALL)
        assert p.b.datagrams_to_send() == []
        assert p.b.statistics()["initiations_repeated"] == 1
        assert p.b.statistics()["refused"] == {}
        p.b.receive(old, A_ADDR, p.now, WALL)
        assert p.b.statistics()["refused"] == {"replayed_initiation": 1}
        assert len(p.b.sessions()) == 1

    def test_junk_never_raises_and_is_counted(self) -> None:
        p = Pair()
        r = random.Random(5)
        for n in range(300):
            p.b.receive(r.randbytes(n % 200), A_ADDR, p.now, WALL)
        refused = p.b.statistics()["refused"]
        assert isinstance(refused, dict) and sum(refused.values()) == 300

    def test_flipped_byte_in_initiation_is_refused(self) -> None:
        p = Pair()
        p.start_a()
        ((init, _),) = p.a.datagrams_to_send()
        for i in range(len(init) - 2 * hs.MAC_LEN):
            bad = bytearray(init)
            bad[i] ^= 0x40
            p.b.receive(bytes(bad), A_ADDR, p.now, WALL)
        assert p.b.sessions() == []


class TestLoad:
    def test_a_relayed_flood_gets_cookies_and_a_relayed_member_still_links(self) -> None:
        """Handshakes that came through the overlay (overlay_io never saw them) pass the
        screen here: a bucket per node id, then cookies under load."""
        p = Pair(load_threshold=5)
        stranger, stranger_at = rng_from(9), Via(bytes(19) + b"\x09")
        key = hs.mac1_key(p.ca_cert.public_key)
        for i in range(40):  # a stranger who holds the CA certificate: valid mac1, junk inside
            junk = hs.build_handshake(
                key,
                receiver_index=0,
                pattern=hs.Pattern.IK,
                step=0,
                sender_index=i + 1,
                noise=stranger(150),
            )
            p.b.receive(junk, stranger_at, p.now, WALL)
        cookies = [d for d, to in p.b.datagrams_to_send() if to == stranger_at]
        stats = p.b.statistics()
        assert len(cookies) == 5 and stats["cookies_sent"] == 5  # 10 a source: 5 passed
        assert p.b.refusals["handshake_rate_limited"] == 30
        assert p.b.refusals["handshake_failed"] == 5  # the rest cost no Diffie-Hellman
        p.start_a()
        alpha_at = Via(p.a.identity.node_id)
        for _ in range(10):  # alpha's datagrams reach beta through the overlay
            for datagram, _to in p.a.datagrams_to_send():
                p.b.receive(datagram, alpha_at, p.now, WALL)
            for datagram, _to in p.b.datagrams_to_send():
                p.a.receive(datagram, B_ADDR, p.now, WALL)
        assert p.a.counters["cookies_received"] == 1  # alpha got a cookie, answered with mac2
        assert p.b.statistics()["passed_with_cookie"] == 1
        keys_match(p)

    def test_a_resync_hint_for_a_send_session_starts_one_handshake(self) -> None:
        """Beta restarted and answered alpha's datagram with a bare COOKIE header echoing
        the index alpha sent on: alpha handshakes again, toward beta's configured endpoint,
        once; a hint naming no session of ours is refused."""
        p = Pair()
        p.start_a()
        p.deliver()
        (session,) = p.a.sessions()
        p.tick(10)
        elsewhere = ("198.18.0.66", 4789)
        p.a.receive(resync_hint(session.send_index ^ 1), elsewhere, p.now, WALL)
        assert p.a.refusals["unknown_index"] == 1 and p.a.datagrams_to_send() == []
        p.a.receive(resync_hint(session.send_index), elsewhere, p.now, WALL)
        p.a.receive(resync_hint(session.send_index), elsewhere, p.now, WALL)
        out = p.a.datagrams_to_send()
        assert [to for _, to in out] == [B_ADDR]  # one handshake, never toward the hint's source
        assert p.a.counters["resyncs"] == 1 and p.a.counters["resync_hints_ignored"] == 1


class TestLifetime:
    def test_initiator_rekeys_and_old_session_stays_for_stragglers(self) -> None:
        p = Pair()
        p.start_a()
        p.deliver()
        p.b.confirm(p.b.sessions()[0].recv_index)
        first = p.a.sessions()[0]
        p.tick(LinkSettings().rekey_after_s + 1)
        p.deliver()
        assert len(p.a.sessions()) == 2 and p.a.sessions()[-1].send_key != first.send_key
        assert first in p.a.sessions()

    def test_sessions_expire_and_the_link_closes(self) -> None:
        p = Pair(retry_s=1000.0, retry_max_s=1000.0)
        p.tick()
        p.deliver()
        p.now += LinkSettings().reject_after_s + 1
        p.a.handle_timer(p.now, WALL)
        closed = [e for e in events(p.a) if e.kind is EventKind.LINK_CLOSED]
        assert closed and closed[0].reason == "expired" and p.a.sessions() == []

    def test_revocation_closes_a_live_link(self) -> None:
        p = Pair()
        p.tick()
        p.deliver()
        p.b.set_revocations(RevocationList.parse(f"node {p.ia.node_id.hex()}\n"))
        assert p.b.sessions() == []
        assert [e.reason for e in events(p.b) if e.kind is EventKind.LINK_CLOSED] == ["revoked"]
        p.tick(5)
        p.deliver()
        assert p.b.sessions() == []


# -- dynamic links: overlay nodes link to whoever is certified --------------------------------


class Members:
    """Two managers with no configured peers that accept any certified member."""

    def __init__(self, *, accept: bool = True) -> None:
        self.ca, self.ca_cert = ca_pair()
        self.ia, cert_a = member(self.ca, self.ca_cert, 10, "alpha")
        self.ib, cert_b = member(self.ca, self.ca_cert, 20, "beta")
        self.a, self.b = (
            LinkManager(
                identity=ident,
                certificate=cert,
                ca=self.ca_cert,
                network="lab",
                peers=[],
                revoked=RevocationList.empty(),
                rng=rng_from(seed),
                accept_members=accept,
            )
            for ident, cert, seed in ((self.ia, cert_a, 1), (self.ib, cert_b, 2))
        )
        self.now = NOW

    def deliver(self, *, via: bool = False) -> list[object]:
        """Move datagrams until quiet; return every target they were sent to."""
        targets: list[object] = []
        a_src: object = Via(self.ia.node_id) if via else A_ADDR
        b_src: object = Via(self.ib.node_id) if via else B_ADDR
        for _ in range(10):
            batch = [(self.b, d, a_src, to) for d, to in self.a.datagrams_to_send()]
            batch += [(self.a, d, b_src, to) for d, to in self.b.datagrams_to_send()]
            if not batch:
                break
            for target, datagram, source, to in batch:
                targets.append(to)
                target.receive(datagram, source, self.now, WALL)  # type: ignore[arg-type]
        return targets


def test_connect_to_an_endpoint_learns_who_is_there() -> None:
    m = Members()
    slot = m.a.connect(B_ADDR, m.now, WALL)
    m.deliver()
    link = m.a.links[slot]
    assert link.up and link.spec.name == "beta" and link.dynamic
    assert link.certificate is not None and link.certificate.node_id == m.ib.node_id
    (theirs,) = m.b.links.values()
    assert theirs.up and theirs.spec.name == "alpha" and theirs.endpoint == A_ADDR
    assert not theirs.wanted  # beta keeps it only while alpha does, or its own driver wants it
    assert [e.kind for e in m.a.events()].count(EventKind.LINK_FORMED) == 1
    a_send = {s.send_key for s in m.a.sessions()}
    assert a_send == {s.recv_key for s in m.b.sessions()}


def test_connect_through_the_overlay_to_a_node_id() -> None:
    m = Members()
    slot = m.a.connect(Via(m.ib.node_id), m.now, WALL, node_id=m.ib.node_id)
    targets = m.deliver(via=True)
    assert targets and all(isinstance(t, Via) for t in targets)
    assert m.a.links[slot].up and m.a.links[slot].endpoint == Via(m.ib.node_id)
    (theirs,) = m.b.links.values()
    assert theirs.up and theirs.endpoint == Via(m.ia.node_id)


def test_the_node_asked_for_must_answer() -> None:
    m = Members()
    m.a.connect(B_ADDR, m.now, WALL, node_id=bytes(20))
    m.deliver()
    assert not any(link.up for link in m.a.links.values())
    assert m.a.refusals["wrong_node"] == 1


def test_a_relayed_handshake_must_come_from_the_node_it_names() -> None:
    m = Members()
    m.a.connect(Via(m.ib.node_id), m.now, WALL)
    for datagram, _ in m.a.datagrams_to_send():  # routed, but claiming another source
        m.b.receive(datagram, Via(bytes(20)), m.now, WALL)
    for datagram, _ in m.b.datagrams_to_send():
        m.a.receive(datagram, Via(m.ib.node_id), m.now, WALL)
    for datagram, _ in m.a.datagrams_to_send():
        m.b.receive(datagram, Via(bytes(20)), m.now, WALL)
    assert not any(link.up for link in m.b.links.values())
    assert m.b.refusals["wrong_node"] == 1


def test_without_accept_members_an_unknown_member_is_refused() -> None:
    m = Members(accept=False)
    m.a.connect(B_ADDR, m.now, WALL)
    m.deliver()
    assert not m.b.links and m.b.refusals["unknown_peer"] == 1


def test_a_placeholder_to_a_known_node_merges_into_its_link() -> None:
    m = Members()
    m.a.connect(B_ADDR, m.now, WALL)
    m.deliver()
    (b_link,) = m.b.links.values()
    slot = m.b.connect(A_ADDR, m.now + 1, WALL)  # beta's driver wants alpha's address
    assert slot == b_link.spec.slot and b_link.wanted  # the same link: nothing new
    m.b.release(slot)
    m.b.links[slot].wanted = False
    placeholder = m.b.connect(("198.18.0.9", 4789), m.now, WALL)  # alpha, at another address
    for datagram, _ in m.b.datagrams_to_send():
        m.a.receive(datagram, B_ADDR, m.now, WALL)
    for datagram, _ in m.a.datagrams_to_send():
        m.b.receive(datagram, ("198.18.0.9", 4789), m.now, WALL)
    m.deliver()
    assert placeholder not in m.b.links and list(m.b.links) == [slot]
    assert m.b.links[slot].wanted and len(m.b.links[slot].sessions) == 2


def test_released_links_expire_and_unanswered_ones_are_forgotten() -> None:
    m = Members()
    slot = m.a.connect(B_ADDR, m.now, WALL)
    m.deliver()
    nobody = m.a.connect(("198.18.0.99", 4789), m.now, WALL)
    m.a.datagrams_to_send()
    m.a.release(nobody)
    assert nobody not in m.a.links
    m.a.release(slot)
    assert slot in m.a.links  # its sessions still carry what is in flight
    (b_slot,) = m.b.links
    m.now += LinkSettings().reject_after_s + 1
    m.a.handle_timer(m.now, WALL)
    m.b.handle_timer(m.now, WALL)
    assert slot not in m.a.links and b_slot not in m.b.links
    assert not m.a.datagrams_to_send()  # nobody initiated again


def test_a_wanted_link_is_rekeyed_by_its_initiator() -> None:
    m = Members()
    slot = m.a.connect(B_ADDR, m.now, WALL)
    m.deliver()
    m.now += LinkSettings().rekey_after_s + 1
    m.a.handle_timer(m.now, WALL)
    m.b.handle_timer(m.now, WALL)
    m.deliver()
    assert m.a.links[slot].handshakes == 2


def test_a_revoked_member_loses_its_dynamic_link() -> None:
    m = Members()
    m.a.connect(B_ADDR, m.now, WALL)
    m.deliver()
    (b_slot,) = m.b.links
    cert_a = m.b.links[b_slot].certificate
    assert cert_a is not None
    m.b.set_revocations(RevocationList(serials=frozenset({cert_a.serial})))
    assert not m.b.links
