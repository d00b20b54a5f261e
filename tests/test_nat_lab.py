"""The NAT laboratory does what it claims, and the NAT cores work against real servers in it:
coturn and stund for StunProbe, miniupnpd for PortMapper and the PCP/NAT-PMP codecs."""

from __future__ import annotations

import os
import random
import select
import socket
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.control.nat import (
    MappingDeleted,
    Phase,
    PortMapper,
    PortMapSettings,
    Protocol,
    StunProbe,
)
from pipeline.wire import natpmp, pcp
from supervisor.testbed import Namespace, Testbed, wait_for
from supervisor.testbed.nat import (
    NAT_LAB_PACKAGES,
    NatKind,
    NatLab,
    Site,
    gateway_ruleset,
    missing_programs,
    netns_socket,
    parse_conntrack,
)

# ----------------------------------------------------------------------------------------------
# without namespaces


def test_rulesets() -> None:
    none = gateway_ruleset(NatKind.NONE)
    assert "masquerade" not in none and "policy accept" in none
    eim = gateway_ruleset(NatKind.EIM)
    assert 'oifname "wan" masquerade\n' in eim
    assert 'iifname "wan" counter name in_dropped drop' in eim
    assert "fully-random" in gateway_ruleset(NatKind.RANDOM)
    assert 'iifname "wan" counter name in_unsolicited accept' in gateway_ruleset(NatKind.EIM_OPEN)
    upnp = gateway_ruleset(NatKind.UPNP, stun_hosts=("198.18.90.3", "198.18.90.4"))
    assert "ip saddr { 198.18.90.3, 198.18.90.4 } udp sport { 3478, 3479 } accept" in upnp
    for chain in ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"):
        assert f"jump {chain}" in upnp


def test_parse_conntrack() -> None:
    text = (
        "udp      17 28 src=198.18.90.100 dst=198.18.90.11 sport=4000 dport=5000 [UNREPLIED] "
        "src=198.18.90.11 dst=198.18.90.100 sport=5000 dport=4000 mark=0 use=1\n"
        "udp      17 117 src=198.19.1.10 dst=198.18.90.3 sport=40000 dport=3478 "
        "src=198.18.90.3 dst=198.18.90.11 sport=3478 dport=40000 [ASSURED] mark=0 use=1\n"
        "icmp     1 29 src=198.19.1.10 dst=198.18.90.100 type=8 code=0 id=7 "
        "src=198.18.90.100 dst=198.18.90.11 type=0 code=0 id=7 mark=0 use=1\n"
    )
    early, flow = parse_conntrack(text)
    assert early.unreplied and early.original == ("198.18.90.100", 4000, "198.18.90.11", 5000)
    assert not flow.unreplied and flow.flags == {"ASSURED"}
    assert flow.reply == ("198.18.90.3", 3478, "198.18.90.11", 40000)


def test_package_list_names_each_program() -> None:
    programs = {prog for _, prog in NAT_LAB_PACKAGES.values()}
    assert programs == {"nft", "conntrack", "turnserver", "stund", "miniupnpd", "natpmpc"}


# ----------------------------------------------------------------------------------------------
# the lab


def require_nat_lab() -> None:
    """Skip without the lab's Debian packages, but fail under CI, which must install them."""
    missing = missing_programs()
    if missing:
        reason = f"NAT lab packages missing: {' '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def lab(testbed: Testbed, tmp_path: Path) -> Iterator[NatLab]:
    require_nat_lab()
    with NatLab(testbed, tmp_path / "lab") as made:
        yield made


def udp(ns: Namespace, port: int = 0) -> socket.socket:
    sock = netns_socket(ns)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(2.0)
    return sock


def heard(sock: socket.socket, timeout: float = 1.0) -> tuple[bytes, tuple[str, int]] | None:
    sock.settimeout(timeout)
    try:
        data, source = sock.recvfrom(2048)
    except TimeoutError:
        return None
    return data, source


class SansIo(typing.Protocol):
    def datagrams_to_send(self) -> list[tuple[bytes, tuple[str, int]]]: ...
    def receive(self, datagram: bytes, source: tuple[str, int], now: float) -> bool: ...
    def handle_timer(self, now: float) -> None: ...
    def next_deadline(self) -> float | None: ...


def drive(core: SansIo, sock: socket.socket, until: Callable[[], bool], timeout: float) -> None:
    """The smallest real driver: one socket, the monotonic clock, select."""
    deadline = time.monotonic() + timeout
    while True:
        for data, address in core.datagrams_to_send():
            sock.sendto(data, address)
        if until():
            return
        now = time.monotonic()
        assert now < deadline, "the core did not finish in time"
        wake = core.next_deadline()
        wait = min(deadline, wake if wake is not None else deadline) - now
        ready, _, _ = select.select([sock], [], [], max(wait, 0.0))
        now = time.monotonic()
        if ready:
            data, source = sock.recvfrom(2048)
            core.receive(data, source, now)
        wake = core.next_deadline()
        if wake is not None and now >= wake:
            core.handle_timer(now)


@pytest.mark.netns
def test_a_host_behind_each_kind_reaches_the_internet(lab: NatLab) -> None:
    pub = lab.internet_host("pub")
    listener = udp(pub, 4000)
    for kind in (NatKind.NONE, NatKind.EIM, NatKind.EIM_OPEN, NatKind.RANDOM):
        site = lab.gateway(kind)
        host = site.host("a")
        host.run(["ping", "-c", "1", "-W", "2", lab.address(pub)])
        with udp(host, 5000) as sock:
            sock.sendto(kind.value.encode(), (lab.address(pub), 4000))
            got = heard(listener)
        assert got is not None
        seen_from = got[1][0]
        assert seen_from == (lab.address(host) if kind is NatKind.NONE else site.wan_address)


@pytest.mark.netns
def test_unsolicited_inbound(lab: NatLab) -> None:
    """Routed LANs take it; home routers drop it at the gateway; eim_open accepts it there."""
    pub = lab.internet_host("pub")
    routed, home, open_ = (lab.gateway(k) for k in (NatKind.NONE, NatKind.EIM, NatKind.EIM_OPEN))
    inside = udp(routed.host("a"), 5000)
    with udp(pub, 4000) as sock:
        sock.sendto(b"hi", (lab.address(routed.hosts["a"]), 5000))
        assert heard(inside) is not None
        sock.sendto(b"hi", (home.wan_address, 5000))
        sock.sendto(b"hi", (open_.wan_address, 5000))
    assert home.counters()["in_dropped"] == 1 and home.counters()["in_unsolicited"] == 0
    assert open_.counters()["in_unsolicited"] == 1 and open_.counters()["in_dropped"] == 0
    inside.close()


@pytest.mark.netns
def test_two_hosts_share_a_lan(lab: NatLab) -> None:
    site = lab.gateway(NatKind.EIM)
    a, b = site.host("a"), site.host("b")
    assert (lab.address(a), lab.address(b)) == ("198.19.1.10", "198.19.1.11")
    with udp(b, 5000) as listener, udp(a) as sock:
        sock.sendto(b"lan", (lab.address(b), 5000))
        got = heard(listener)
    assert got is not None and got[1][0] == lab.address(a)  # straight, not through the NAT


@pytest.mark.netns
@pytest.mark.parametrize("kind", [NatKind.NONE, NatKind.EIM, NatKind.RANDOM])
def test_stun_probe_from_behind(lab: NatLab, kind: NatKind) -> None:
    """coturn and stund see one mapping (the local port kept) behind eim; two behind random."""
    site = lab.gateway(kind)
    host = site.host("a")
    assert len(lab.stun_servers) == 2
    with udp(host, 40000) as sock:
        probe = StunProbe(lab.stun_servers, time.monotonic(), random.Random(1))
        drive(probe, sock, lambda: probe.done, timeout=10.0)
    report = probe.report()
    assert report.failed == () and len(report.observations) == 2
    ports = {o.reflexive[1] for o in report.observations}
    if kind is NatKind.RANDOM:
        assert report.varies is True and len(ports) == 2
        assert {o.reflexive[0] for o in report.observations} == {site.wan_address}
    else:
        outside = lab.address(host) if kind is NatKind.NONE else site.wan_address
        assert report.varies is False and report.reflexive == (outside, 40000)


def early_punch_then_flow(lab: NatLab, site: Site, pub: Namespace) -> tuple[str, int]:
    """The peer's packet reaches the gateway before the LAN host's first packet to the peer;
    returns where the peer then sees the LAN host's packet come from."""
    host = site.host("a")
    with udp(pub, 4000) as peer:
        peer.sendto(b"early punch", (site.wan_address, 5000))
        wait_for("the gateway to see the early punch", lambda: sum(site.counters().values()))
        with udp(host, 5000) as sock:
            sock.sendto(b"punch", (lab.address(pub), 4000))
            got = heard(peer)
    assert got is not None
    return got[1]


@pytest.mark.netns
def test_eim_open_keeps_the_early_punch_and_remaps(lab: NatLab) -> None:
    """The stale-conntrack clash: the early packet becomes an [UNREPLIED] entry on the
    gateway's own address and port 5000, so the LAN host's flow from port 5000 to the same
    peer is given another port; the peer's packets to port 5000 never reach the host."""
    pub = lab.internet_host("pub")
    site = lab.gateway(NatKind.EIM_OPEN)
    source = early_punch_then_flow(lab, site, pub)
    assert source[0] == site.wan_address and source[1] != 5000
    entries = site.conntrack()
    early = [e for e in entries if e.original == (lab.address(pub), 4000, site.wan_address, 5000)]
    assert len(early) == 1 and early[0].unreplied
    flow = [e for e in entries if e.original[:2] == (lab.address(site.hosts["a"]), 5000)]
    assert len(flow) == 1 and flow[0].reply == (lab.address(pub), 4000, site.wan_address, source[1])


@pytest.mark.netns
def test_eim_drops_the_early_punch_and_keeps_the_port(lab: NatLab) -> None:
    pub = lab.internet_host("pub")
    site = lab.gateway(NatKind.EIM)
    assert early_punch_then_flow(lab, site, pub) == (site.wan_address, 5000)
    assert site.counters()["in_dropped"] == 1
    assert not [e for e in site.conntrack() if e.original[0] == lab.address(pub)]


@pytest.mark.netns
def test_lab_removes_its_own_workdir(testbed: Testbed) -> None:
    require_nat_lab()
    with NatLab(testbed, stun_servers=()) as lab:
        assert lab.workdir.is_dir() and lab.stun_servers == []
    assert not lab.workdir.exists()


# ----------------------------------------------------------------------------------------------
# port mapping against miniupnpd


@pytest.fixture
def upnp_lab(testbed: Testbed, tmp_path: Path) -> Iterator[tuple[NatLab, Site]]:
    require_nat_lab()
    with NatLab(testbed, tmp_path / "lab", stun_servers=("stund",)) as made:
        yield made, made.gateway(NatKind.UPNP)


@pytest.mark.netns
@pytest.mark.parametrize(
    "protocols",
    [(Protocol.PCP, Protocol.NATPMP), (Protocol.NATPMP,)],
    ids=["pcp", "natpmp"],
)
def test_port_mapper_against_miniupnpd(
    upnp_lab: tuple[NatLab, Site], protocols: tuple[Protocol, ...]
) -> None:
    lab, site = upnp_lab
    host, pub = site.host("a"), lab.internet_host("pub")
    app = udp(host, 40000)  # the socket whose port is mapped
    control = udp(host)  # the mapper's own socket
    settings = PortMapSettings(lifetime_s=600, protocols=protocols)
    mapper = PortMapper(
        site.lan_address, (lab.address(host), 40000), time.monotonic(), random.Random(5), settings
    )
    drive(mapper, control, lambda: mapper.phase is not Phase.ASKING, timeout=10.0)
    mapping = mapper.mapping
    assert mapping is not None and mapping.protocol is protocols[0]
    assert mapping.external[0] == site.wan_address and mapping.lifetime_s == 600
    assert f"dport {mapping.external[1]} dnat ip to 198.19.1.10:40000" in site.ruleset()
    with udp(pub, 4000) as peer:  # unsolicited inbound now reaches the LAN host
        peer.sendto(b"through the mapping", mapping.external)
        got = heard(app)
    assert got == (b"through the mapping", (lab.address(pub), 4000))

    mapper.stop(time.monotonic())
    drive(mapper, control, lambda: mapper.done, timeout=10.0)
    assert MappingDeleted(protocols[0], True) in mapper.events()
    assert "dnat" not in site.ruleset()
    with udp(pub, 4001) as peer:  # a new flow: the old one's conntrack entry does not count
        peer.sendto(b"after stop", mapping.external)
        assert heard(app, 0.5) is None
    app.close()
    control.close()


def ask(sock: socket.socket, site: Site, request: bytes) -> bytes:
    sock.sendto(request, (site.lan_address, pcp.PORT))
    got = heard(sock, 2.0)
    assert got is not None and got[1] == (site.lan_address, pcp.PORT)
    return got[0]


@pytest.mark.netns
def test_codecs_against_miniupnpd(upnp_lab: tuple[NatLab, Site]) -> None:
    """Requests made by our codecs, sent from a LAN host; miniupnpd's answers decoded."""
    lab, site = upnp_lab
    host = site.host("a")
    me = lab.address(host)
    with udp(host) as sock:
        announce = pcp.parse_response(ask(sock, site, pcp.AnnounceRequest(me).encode()))
        assert announce == pcp.AnnounceResponse(pcp.Result.SUCCESS, announce.epoch_s, 0)

        nonce = bytes(range(12))
        request = pcp.MapRequest(nonce, 41000, 300, me, 41000)
        mapped = pcp.parse_response(ask(sock, site, request.encode()))
        assert isinstance(mapped, pcp.MapResponse)
        assert (mapped.result, mapped.nonce, mapped.internal_port) == (0, nonce, 41000)
        assert (mapped.external_address, mapped.external_port) == (site.wan_address, 41000)

        wrong = pcp.MapRequest(bytes(12), 41000, 0, me, 41000)
        refused = pcp.parse_response(ask(sock, site, wrong.encode()))
        assert isinstance(refused, pcp.MapResponse)
        assert refused.result == pcp.Result.NOT_AUTHORIZED  # a delete needs the nonce
        deleted = pcp.parse_response(ask(sock, site, pcp.MapRequest(nonce, 41000, 0, me).encode()))
        assert isinstance(deleted, pcp.MapResponse) and deleted.result == pcp.Result.SUCCESS

        address = natpmp.parse_response(ask(sock, site, natpmp.ExternalAddressRequest().encode()))
        assert address == natpmp.ExternalAddressResponse(0, address.epoch_s, site.wan_address)
        mapping = natpmp.parse_response(
            ask(sock, site, natpmp.MapRequest(41001, 41001, 60).encode())
        )
        assert mapping == natpmp.MapResponse(0, mapping.epoch_s, 41001, 41001, 60)
        gone = natpmp.parse_response(ask(sock, site, natpmp.MapRequest(41001, 0, 0).encode()))
        assert gone == natpmp.MapResponse(0, gone.epoch_s, 41001, 0, 0)


@pytest.mark.netns
def test_natpmp_matches_natpmpc(upnp_lab: tuple[NatLab, Site]) -> None:
    """natpmpc (libnatpmp) and our codec see the same public address and the same mapping."""
    lab, site = upnp_lab
    host = site.host("a")
    out = host.run(["natpmpc", "-g", site.lan_address, "-a", "42010", "42011", "udp", "60"]).stdout
    assert f"Public IP address : {site.wan_address}" in out
    assert "Mapped public port 42010 protocol UDP to local port 42011" in out
    with udp(host) as sock:
        address = natpmp.parse_response(ask(sock, site, natpmp.ExternalAddressRequest().encode()))
        assert isinstance(address, natpmp.ExternalAddressResponse)
        assert address.address == site.wan_address
        renewal = natpmp.MapRequest(42011, 42010, 60).encode()  # natpmpc's mapping, renewed
        mapping = natpmp.parse_response(ask(sock, site, renewal))
        assert mapping == natpmp.MapResponse(0, mapping.epoch_s, 42011, 42010, 60)
    assert site.ruleset().count("dnat") == 1
