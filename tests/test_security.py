"""The security layer between real nodes, each in a namespace this module makes: certified
members link (Noise IK and XX) and carry traffic; a node that cannot prove membership
exchanges no frame; revocation cuts a running ping; replayed and forged datagrams are counted
drops; a handshake flood gets cookies while members' traffic flows; key files are private.

The IK pair (``lab``) is shared by the tests that leave it linked; the tests that break a
link (revocation, refused members) build their own. Helper processes (packet capture, a
sender from a node's own port, a hand-made handshake initiator, a flood) run inside the
testbed's namespaces and are ended by it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.wire.overlay import HEADER_LEN
from supervisor.testbed import (
    DEVICE,
    PORT,
    UNDERLAY,
    VIRTUAL,
    Authority,
    Namespace,
    Node,
    Testbed,
    two_nodes,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.netns

FLOOD_PORT = 5000  # the stranger's port, next to alpha's node on 198.18.0.1

# -- helper processes (run with ``python -c`` inside a namespace) --------------------------------

# Prints "ready", then the UDP payload (hex) of the first DATA datagram src:PORT -> dst:PORT
# that arrives on the interface. AF_PACKET sees the frame before the IP stack does.
CAPTURE = r"""
import socket, struct, sys, time
ifname, src, dst, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((ifname, 0))
s.settimeout(0.2)
print("ready", flush=True)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        frame, addr = s.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING or len(frame) < 14 + 20 + 8:
        continue
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    if ip[9] != 17 or socket.inet_ntoa(ip[12:16]) != src or socket.inet_ntoa(ip[16:20]) != dst:
        continue
    sport, dport, length = struct.unpack("!HHH", ip[ihl : ihl + 6])
    payload = ip[ihl + 8 : ihl + length]
    if sport == port and dport == port and len(payload) > 32 and payload[:2] == b"\x01\x01":
        print(payload.hex(), flush=True)  # overlay version 1, type DATA
        sys.exit(0)
sys.exit(1)
"""

# Sends each hex argument as one datagram from src:sport (SO_REUSEPORT: a node may hold it).
SEND = r"""
import socket, sys
src, sport, dst, dport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind((src, sport))
for text in sys.argv[5:]:
    s.sendto(bytes.fromhex(text), (dst, dport))
s.close()
"""

# A node reduced to its handshake: the product's LinkManager with a given key, certificate
# and authority, on a UDP socket; it initiates to the peer, answers what comes, and reports.
INITIATOR = r"""
import json, os, select, socket, sys, time
from collections import Counter
from pathlib import Path
from pipeline.control.links import LinkManager, PeerSpec
from pipeline.crypto.cert import RevocationList
from pipeline.crypto.datapath import SendSession
from pipeline.crypto.keyfiles import load_or_create_identity, read_certificate
from pipeline.wire.overlay import DatagramType

a = json.loads(sys.argv[1])
links = LinkManager(
    identity=load_or_create_identity(Path(a["state_dir"])),
    certificate=read_certificate(Path(a["certificate"])),
    ca=read_certificate(Path(a["ca"])),
    network=a["network"],
    peers=[PeerSpec(1, "beta", (a["peer_host"], a["port"]), bytes.fromhex(a["peer_key"]),
                    tuple(a["peer_addresses"]))],
    revoked=RevocationList.empty(),
    rng=os.urandom,
)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((a["host"], a["port"]))
kinds = {1: "data", 2: "overlay", 3: "handshake", 4: "cookie"}
received = Counter()
end = time.monotonic() + a["seconds"]
while (now := time.monotonic()) < end:
    links.handle_timer(now, time.time())
    for datagram, to in links.datagrams_to_send():
        sock.sendto(datagram, to)
    if select.select([sock], [], [], 0.05)[0]:
        data, source = sock.recvfrom(65536)
        kind = kinds.get(data[1] if len(data) > 1 else -1, "other")
        if kind == "handshake" and len(data) > 17:
            kind += f"/{data[17]}"  # the step
        received[kind] += 1
        links.receive(data, source, time.monotonic(), time.time())
# A session it holds as the responder to the member's initiation (made before the member
# checked its answer) carries a frame, to show that the member holds no such session.
frames = 0
for s in links.sessions():
    header, sealed = SendSession(s.send_key, index=s.send_index, created=0.0,
                                 cipher=s.cipher).seal(DatagramType.DATA, b"\x45" + bytes(27))
    sock.sendto(header + sealed, (a["peer_host"], a["port"]))
    frames += 1
print(json.dumps({"counters": dict(links.counters), "refused": dict(links.refusals),
                  "sessions": len(links.sessions()), "frames_sent": frames,
                  "received": dict(received)}))
"""

# A stranger holding the network's CA certificate: first handshake messages with a valid
# mac1 and junk Noise, paced over some seconds; it opens every COOKIE reply it gets (from one
# address it gets none: its bucket stops it first).
FLOOD = r"""
import json, os, select, socket, sys, time
from pathlib import Path
from pipeline.crypto import handshake as hs
from pipeline.crypto.keyfiles import read_certificate
ca = read_certificate(Path(sys.argv[1]))
src, sport, dst, dport = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
count, seconds = int(sys.argv[6]), float(sys.argv[7])
mac1_key, seal_key = hs.mac1_key(ca.public_key), hs.cookie_key(ca.public_key)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((src, sport))
sock.setblocking(False)
mac1s = {}
cookies = opened = 0

def drain(until):
    global cookies, opened
    while True:
        left = until - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            continue
        if len(data) > 1 and data[1] == 4:
            cookies += 1
            mac1 = mac1s.get(hs.cookie_receiver(data))
            if mac1 is not None and len(hs.open_cookie_reply(seal_key, data, mac1)) == 16:
                opened += 1

start = time.monotonic()
for i in range(count):
    index = i + 1
    datagram = hs.build_handshake(mac1_key, receiver_index=0, pattern=hs.Pattern.IK, step=0,
                                  sender_index=index, noise=os.urandom(200))
    mac1s[index] = datagram[-2 * hs.MAC_LEN : -hs.MAC_LEN]
    while True:
        try:
            sock.sendto(datagram, (dst, dport))
            break
        except BlockingIOError:
            select.select([], [sock], [], 0.01)
    if index % 20 == 0:
        drain(start + seconds * index / count)
drain(time.monotonic() + 1.0)
print(json.dumps({"sent": count, "cookies": cookies, "opened": opened}))
"""


# -- helpers -------------------------------------------------------------------------------------


@dataclass
class Lab:
    tb: Testbed
    a: Node
    b: Node
    tmp: Path

    @property
    def authority(self) -> Authority:
        authority: Authority = self.a.extra["authority"]
        return authority


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with Testbed("avs") as tb:
        tmp = tmp_path_factory.mktemp("lab")
        a, b = two_nodes(tb, tmp)
        yield Lab(tb, a, b, tmp)


def _status(node: Node) -> dict[str, Any]:
    return node.status() or {}


def _stats(node: Node, stage: str) -> dict[str, Any]:
    for w in _status(node).get("workers", []):
        if w["stage"] == stage:
            stats: dict[str, Any] = w["stats"]
            return stats
    return {}


def _fresh_stats(node: Node, stage: str) -> dict[str, Any]:
    """The stage's counters from a heartbeat sent after this call began (not a stale one)."""
    since = time.monotonic()

    def check() -> dict[str, Any] | None:
        asked = time.monotonic()
        for w in _status(node).get("workers", []):
            if w["stage"] == stage and asked - w["heartbeat_age_s"] - 0.1 > since:
                stats: dict[str, Any] = w["stats"]
                return stats
        return None

    result: dict[str, Any] = wait_for(f"fresh {stage} counters of {node.name}", check, 10)
    return result


def _drops(node: Node) -> dict[str, int]:
    return dict(_stats(node, "overlay_io").get("drops", {}))


def _links(node: Node) -> dict[str, Any]:
    links: dict[str, Any] = _status(node).get("links") or {}
    return links


def _refused(node: Node) -> dict[str, int]:
    return dict(_links(node).get("refused", {}))


def _events(node: Node, event: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in node.log_records()
        if r["event"] == event and all(r.get(k) == v for k, v in fields.items())
    ]


def _unix(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["timestamp"]).timestamp()


def _flip(datagram: bytes, offset: int) -> bytes:
    out = bytearray(datagram)
    out[offset] ^= 0xFF
    return bytes(out)


def _send(ns: Namespace, datagrams: list[bytes]) -> None:
    """Datagrams to beta's port from alpha's address and port (which alpha's node holds)."""
    hexed = [d.hex() for d in datagrams]
    ns.run([sys.executable, "-c", SEND, UNDERLAY[0], str(PORT), UNDERLAY[1], str(PORT), *hexed])


def _underlay_ifname(ns: Namespace) -> str:
    (name,) = [n for n in ns.links() if n not in ("lo", DEVICE)]
    return name


def _blackhole(ns: Namespace, ifname: str, on: bool) -> None:
    """Drop (on) every packet arriving on ``ifname`` before the IP stack delivers it (a policy
    rule ahead of the local table; capture taps still see the frames), or undo that."""
    if on:
        ns.ip("rule", "add", "pref", "100", "lookup", "local")
        ns.ip("rule", "del", "pref", "0", "lookup", "local")
        ns.ip("rule", "add", "pref", "10", "iif", ifname, "blackhole")
    else:
        ns.ip("rule", "del", "pref", "10", check=False)
        ns.ip("rule", "add", "pref", "0", "lookup", "local", check=False)
        ns.ip("rule", "del", "pref", "100", "lookup", "local", check=False)


def _capture_data(lab: Lab, *, withheld: bool) -> bytes:
    """One encrypted DATA datagram alpha sent to beta (a ping's), taken off beta's wire.
    ``withheld``: beta's IP stack never received it (its counter is fresh to beta)."""
    a, b = lab.a, lab.b
    ifname = _underlay_ifname(b.ns)
    out = lab.tmp / f"capture-{time.monotonic_ns()}.txt"
    with open(out, "wb") as f:
        proc = b.ns.popen(
            [sys.executable, "-c", CAPTURE, ifname, UNDERLAY[0], UNDERLAY[1], str(PORT)], stdout=f
        )
    try:
        wait_for("capture ready", lambda: out.read_text().startswith("ready"))
        try:
            if withheld:
                _blackhole(b.ns, ifname, True)

            def captured() -> bytes | None:
                lines = out.read_text().split()
                if len(lines) > 1:
                    return bytes.fromhex(lines[1])
                a.ns.run(["ping", "-c", "1", "-W", "1", b.address], check=False)
                return None

            datagram: bytes = wait_for("a DATA datagram from alpha to beta", captured, 20)
        finally:
            if withheld:
                _blackhole(b.ns, ifname, False)
        assert proc.wait(timeout=10) == 0
    finally:
        lab.tb.stop(proc)
    return datagram


def _peer(node: Node) -> dict[str, Any]:
    """The node's one static peer from its status (the table is control's report, sent with
    its heartbeat: a status asked within a fast start's first seconds has none yet)."""
    (peer,) = wait_for(
        f"{node.name}'s status with its static peer", lambda: _status(node).get("peers")
    )
    assert isinstance(peer, dict)
    return peer


def _cert_show(node: Node, path: Path) -> dict[str, Any]:
    shown: dict[str, Any] = json.loads(node.cli("cert", "show", str(path), "--json").stdout)
    return shown


# -- 1. members link ---------------------------------------------------------------------------


def _check_linked(a: Node, b: Node, pattern: str) -> None:
    assert a.ping(b.address, count=3)
    assert b.ping(a.address, count=3)
    for me, other in ((a, b), (b, a)):
        own = _status(other)
        control = _stats(other, "control")
        cert = _cert_show(other, other.root / "state" / "node.crt")
        assert own["node_id"] == control["node_id"] == cert["node_id"], (own, cert)
        peer = _peer(me)
        assert peer["name"] == other.name and peer["state"] == "up"
        assert peer["node_id"] == own["node_id"]
        assert peer["pattern"] == pattern and peer["sessions"] >= 1
        formed = _events(me, "link_formed", peer=other.name)
        assert formed and all(
            r["node_id"] == own["node_id"] and r["pattern"] == pattern for r in formed
        )
        assert _status(me)["encrypted"] is True
        assert _stats(me, "overlay_io")["encrypted"] is True


def test_certified_members_link_with_ik_and_ping_both_ways(lab: Lab) -> None:
    _check_linked(lab.a, lab.b, "IK")


def test_members_without_each_others_keys_link_with_xx(tmp_path: Path) -> None:
    with Testbed("avs") as tb:
        a, b = two_nodes(tb, tmp_path, peer_keys=False)
        _check_linked(a, b, "XX")


# -- 2. no membership, no frame -------------------------------------------------------------


@dataclass
class Member:
    """Beta, running; alpha's namespace and key (the key beta's config names) but no node."""

    tb: Testbed
    a: Node
    b: Node
    tmp: Path

    @property
    def authority(self) -> Authority:
        authority: Authority = self.b.extra["authority"]
        return authority


def _bad_alpha(m: Member, case: str) -> tuple[Node, Authority, str]:
    """Alpha's key with a certificate that does not make it a member: its node and config,
    the authority its config trusts and its network."""
    root = m.tmp / f"alpha-{case}"
    state = root / "state"
    state.mkdir(parents=True, mode=0o700)
    shutil.copyfile(m.a.root / "state" / "node.key", state / "node.key")
    os.chmod(state / "node.key", 0o600)
    trusted, network = m.authority, "test"
    now = int(time.time())
    if case == "other_authority":  # all of it from another authority: mac1 is wrong too
        trusted = Authority.create(root / "other", name="other-authority")
        trusted.certify(state, "alpha")
    elif case == "foreign_ca":  # the member's CA certificate, another authority's certificate
        Authority.create(root / "other", name="other-authority").certify(state, "alpha")
    elif case == "expired":
        m.authority.certify(state, "alpha", not_after=now - 60)  # valid from now - 300
    elif case == "wrong_network":
        m.authority.certify(state, "alpha", networks=("other",))
        network = "other"
    else:
        raise AssertionError(case)
    beta_key = (m.b.root / "state" / "node.pub").read_text().strip()
    config = write_config(root, "alpha", 0, 1, "beta", ca=trusted.path, peer_key=beta_key)
    text = config.read_text()
    config.write_text(text.replace('namespace = "test"', f'namespace = "{network}"'))
    node = Node("alpha", m.a.ns, config, VIRTUAL[0], UNDERLAY[0], root)
    return node, trusted, network


class TestNonMembers:
    """Beta is a member whose config names alpha (and alpha's key). Alpha's certificate does
    not make it a member: beta refuses it by reason and not one frame crosses."""

    @pytest.fixture(scope="class")
    def member(self, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Member]:
        with Testbed("avs") as tb:
            tmp = tmp_path_factory.mktemp("member")
            a, b = two_nodes(tb, tmp, start=False)
            b.start()
            b.wait_running()
            yield Member(tb, a, b, tmp)

    @pytest.mark.parametrize(
        ("case", "reason", "how"),
        [
            ("other_authority", "bad_mac1", "node"),
            ("foreign_ca", "foreign_ca", "initiator"),
            ("expired", "expired", "initiator"),
            ("wrong_network", "wrong_network", "node"),
        ],
    )
    def test_a_node_that_cannot_prove_membership_exchanges_no_frame(
        self, member: Member, case: str, reason: str, how: str
    ) -> None:
        beta = member.b
        alpha, trusted, network = _bad_alpha(member, case)
        early = reason == "bad_mac1"  # dropped by beta's overlay_io before any ring, counted
        counted = _drops if early else _refused
        before = counted(beta).get(reason, 0)
        unknown = _drops(beta).get("unknown_session", 0)
        refused = lambda: counted(beta).get(reason, 0) > before  # noqa: E731
        if how == "node":
            # Its own check passes (its own authority / its own network): a real node runs.
            alpha.start()
            try:
                alpha.wait_running()
                wait_for(f"beta refusing alpha ({reason})", refused)
                assert not alpha.ping(beta.address, count=2, wait=1)
                wait_for(
                    "alpha's frames dropped for want of a session",
                    lambda: _drops(alpha).get("no_session", 0) >= 2,
                )
                peer = _peer(alpha)
                assert peer["sessions"] == 0 and peer["state"] != "up", peer
            finally:
                assert alpha.proc is not None
                member.tb.stop(alpha.proc)
        else:
            # The node itself refuses to start with this certificate ...
            res = alpha.cli("start", str(alpha.config), check=False, timeout=30)
            assert res.returncode == 1, res.stdout + res.stderr
            assert "cannot start" in res.stderr and reason in res.stderr, res.stderr
            # ... so its handshake runs by hand: the product's LinkManager, alpha's key and
            # this certificate, from alpha's endpoint, for a few seconds.
            args = {
                "state_dir": str(alpha.root / "state"),
                "certificate": str(alpha.root / "state" / "node.crt"),
                "ca": str(trusted.path),
                "network": network,
                "host": UNDERLAY[0],
                "peer_host": UNDERLAY[1],
                "port": PORT,
                "peer_key": (beta.root / "state" / "node.pub").read_text().strip(),
                "peer_addresses": [VIRTUAL[1]],
                "seconds": 3.0,
            }
            out = alpha.root / "initiator.json"
            with open(out, "wb") as f:
                proc = alpha.ns.popen([sys.executable, "-c", INITIATOR, json.dumps(args)], stdout=f)
            try:
                wait_for(f"beta refusing alpha ({reason})", refused)
                assert proc.wait(timeout=20) == 0
            finally:
                member.tb.stop(proc)
            report = json.loads(out.read_text())
            assert report["counters"].get("initiations_sent", 0) >= 1, report
            # Beta never answered alpha's initiation (no step 1) and sent it no data ...
            assert set(report["received"]) <= {"handshake/0", "cookie"}, report
            # ... and a frame alpha sealed with a session it made answering beta is not
            # opened: beta refused that answer and holds no such session.
            assert report["frames_sent"] == report["sessions"]
            if report["frames_sent"]:
                wait_for(
                    "alpha's frames dropped at beta",
                    lambda: (
                        _drops(beta).get("unknown_session", 0) >= unknown + report["frames_sent"]
                    ),
                )
        # At the member: counted, logged with the reason and alpha's address (by control;
        # what overlay_io dropped never reached it), no session.
        logged = _events(beta, "handshake_refused", reason=reason)
        if early:
            assert not logged
        else:
            assert logged and all(r["source"].startswith(f"{UNDERLAY[0]}:") for r in logged)
        peer = _peer(beta)
        assert peer["sessions"] == 0 and peer["node_id"] is None and peer["state"] != "up"
        io = _stats(beta, "overlay_io")
        assert io["datagrams_received"] == 0 and io["sessions"] == {"receive": 0, "send": 0}
        assert not _events(beta, "link_formed")


def test_xx_peer_must_be_certified_as_the_configured_peer(tmp_path: Path) -> None:
    """Beta knows alpha by name and endpoint only (XX). A member certified as "mallory",
    with its own key, at alpha's endpoint is not alpha: beta may link with it as the member
    it is (the overlay links any certified member), but never under alpha's name, and it
    gets nothing of alpha's: no static slot, no address."""
    with Testbed("avs") as tb:
        a, b = two_nodes(tb, tmp_path, start=False, peer_keys=False)
        for name in ("node.key", "node.pub", "node.crt"):
            (a.root / "state" / name).unlink()
        authority: Authority = a.extra["authority"]
        mallory = authority.certify(a.root / "state", "mallory")  # a valid member, a new key
        for n in (a, b):
            n.start()
        for n in (a, b):
            n.wait_running()
        wait_for(
            "beta linking with or refusing the node at alpha's endpoint",
            lambda: _events(b, "link_formed") or _events(b, "handshake_refused"),
        )
        formed = _events(b, "link_formed")
        assert all(e["peer"] == "mallory" for e in formed), formed  # as itself, if at all
        assert not a.ping(b.address, count=2, wait=1)  # it sends as 100.64.0.1: alpha's
        alpha = _peer(b)
        assert alpha["state"] != "up" and alpha["node_id"] in (None, "")
        assert mallory.node_id.hex() not in str(alpha)


# -- 3. revocation ------------------------------------------------------------------------------


def test_revoking_a_peer_stops_its_running_ping(tmp_path: Path) -> None:
    with Testbed("avs") as tb:
        a, b = two_nodes(tb, tmp_path, start=False)
        revocations = tmp_path / "revoked.txt"
        revocations.write_text("")  # must exist when the node starts
        beta_key = (b.root / "state" / "node.pub").read_text().strip()
        authority: Authority = a.extra["authority"]
        write_config(
            a.root, "alpha", 0, 1, "beta", ca=authority.path, peer_key=beta_key,
            revocation_list=revocations,
        )  # fmt: skip
        for n in (a, b):
            n.start()
        for n in (a, b):
            n.wait_running()
            n.wait_peers_up()
        serial = _cert_show(b, b.root / "state" / "node.crt")["serial"]

        out = tmp_path / "ping.txt"
        with open(out, "wb") as f:
            ping = a.ns.popen(["ping", "-D", "-i", "0.2", "-W", "1", b.address], stdout=f)

        def replies() -> list[float]:  # ping -D: "[unix.time] 64 bytes from ..."
            return [
                float(line[1 : line.index("]")])
                for line in out.read_text().splitlines()
                if "bytes from" in line
            ]

        wait_for("ping replies", lambda: len(replies()) >= 5)
        new = revocations.with_name(".revoked.tmp")
        new.write_text(f"# beta\nserial {serial}\n")
        os.replace(new, revocations)

        loaded = wait_for(
            "revocation_list_loaded", lambda: _events(a, "revocation_list_loaded"), 15
        )
        assert loaded[-1]["entries"] == 1
        closed = wait_for(
            "link_closed (revoked)",
            lambda: _events(a, "link_closed", peer="beta", reason="revoked"),
            15,
        )
        assert closed
        # Alpha keeps trying; beta answers, alpha refuses what it answers with.
        wait_for("alpha refusing beta (revoked)", lambda: _refused(a).get("revoked", 0) > 0)
        start = _unix(loaded[-1])
        wait_for(
            "3.5 s of watching after the revocation",
            lambda: time.time() > start + 3.5 and replies(),
            15,
        )
        assert ping.poll() is None, "ping exited"
        got = replies()
        late = [t for t in got if t > start + 0.5]  # a reply in flight at that instant may land
        assert not late, f"{len(late)} replies after the revocation at {start}: {late}"
        assert len(got) >= 5
        peer = _peer(a)
        assert peer["sessions"] == 0 and peer["node_id"] is None
        assert _stats(a, "overlay_io")["sessions"] == {"receive": 0, "send": 0}
        tb.stop(ping)


# -- 4., 5. replayed and forged datagrams -------------------------------------------------------


def test_a_replayed_datagram_is_dropped_and_counted(lab: Lab) -> None:
    a, b = lab.a, lab.b
    datagram = _capture_data(lab, withheld=False)  # beta took it already
    before = _drops(b).get("replayed", 0)
    _send(a.ns, [datagram, datagram, datagram])  # from alpha's own address and port
    wait_for("3 replays counted", lambda: _drops(b).get("replayed", 0) >= before + 3)
    assert _drops(b).get("replayed", 0) == before + 3
    assert a.ping(b.address, count=2)


def test_forged_datagrams_are_dropped_by_reason(lab: Lab) -> None:
    a, b = lab.a, lab.b
    fresh = _capture_data(lab, withheld=True)  # beta never saw this one: its counter is new
    d0 = _drops(b)
    _send(a.ns, [_flip(fresh, HEADER_LEN + 4)])  # a byte of the ciphertext
    wait_for("bad_tag", lambda: _drops(b).get("bad_tag", 0) > d0.get("bad_tag", 0))
    _send(a.ns, [_flip(fresh, 5)])  # a byte of the session index
    wait_for(
        "unknown_session",
        lambda: _drops(b).get("unknown_session", 0) > d0.get("unknown_session", 0),
    )
    # The datagram as alpha sealed it is still good (the flips alone made the drops) ...
    written = _fresh_stats(b, "tap_reader")["frames_written"]
    _send(a.ns, [fresh])
    wait_for(
        "the untouched datagram written to beta's TAP",
        lambda: _stats(b, "tap_reader").get("frames_written", 0) > written,
    )
    # ... once.
    _send(a.ns, [fresh])
    wait_for("replayed", lambda: _drops(b).get("replayed", 0) > d0.get("replayed", 0))
    d1 = _drops(b)
    for reason in ("bad_tag", "unknown_session", "replayed"):
        assert d1.get(reason, 0) == d0.get(reason, 0) + 1, (reason, d0, d1)
    assert a.ping(b.address, count=2)


# -- 6. handshake flood ------------------------------------------------------------------------


def test_a_handshake_flood_dies_in_overlay_io_while_members_traffic_flows(lab: Lab) -> None:
    """3000 first messages with a valid mac1 from one address in 4 s: beta's overlay_io lets
    its bucket's few through (10, then 5 a second) and drops the rest, counted; control
    spends a Diffie-Hellman on those few only."""
    a, b = lab.a, lab.b
    links0 = _links(b)
    drops0 = _drops(b)
    server = b.ns.popen(["iperf3", "-s", "-1", "-B", b.address], stderr=subprocess.DEVNULL)
    try:
        wait_for(
            "iperf3 server", lambda: b.ns.run(["ss", "-ltn"], check=False).stdout.count(":5201")
        )
        out = lab.tmp / "flood.json"
        with open(out, "wb") as f:
            flood = a.ns.popen(
                [
                    sys.executable, "-c", FLOOD, str(lab.authority.path),
                    UNDERLAY[0], str(FLOOD_PORT), UNDERLAY[1], str(PORT), "3000", "4",
                ],
                stdout=f,
            )  # fmt: skip
        try:
            res = a.ns.run(["iperf3", "-c", b.address, "-t", "3", "-J"], timeout=60)
            assert flood.poll() is None, "the flood ended before iperf3 did"
            assert flood.wait(timeout=30) == 0
        finally:
            lab.tb.stop(flood)
    finally:
        lab.tb.stop(server)
    report = json.loads(out.read_text())
    bits = json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"]
    assert bits > 1e6, bits

    def dropped() -> dict[str, int] | None:
        d = _drops(b)
        early = sum(
            d.get(k, 0) - drops0.get(k, 0)
            for k in ("handshake_rate_limited", "handshake_overflow", "cookie_demanded")
        )
        return d if early >= report["sent"] - 40 else None

    wait_for("beta's overlay_io dropped the flood", dropped)
    # The few let through cost a Diffie-Hellman each and failed; no more than the bucket's.
    links = _links(b)
    failed = links["refused"].get("handshake_failed", 0)
    failed0 = links0.get("refused", {}).get("handshake_failed", 0)
    assert 0 < failed - failed0 <= 40, links
    # The link stayed up: nothing closed, no worker restarted, traffic still flows.
    for node in (a, b):
        peer = _peer(node)
        assert peer["state"] == "up" and peer["sessions"] >= 1, peer
        assert not _events(node, "link_closed")
        assert all(w["restarts"] == 0 for w in _status(node)["workers"])
    assert a.ping(b.address, count=2)


# -- 7. private keys --------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_key_files_are_private_and_an_exposed_key_stops_the_start(lab: Lab) -> None:
    a = lab.a
    assert all(w["state"] == "running" for w in _status(a)["workers"])
    assert _mode(a.root / "state" / "node.key") == 0o600
    assert _mode(a.root / "state") == 0o700
    assert _mode(a.root / "run") == 0o700
    # A network authority's key, made by the CLI, is private too.
    ns = lab.tb.namespace("c")
    ca_dir = lab.tmp / "cli-ca"
    ns.run([sys.executable, "-m", "supervisor", "ca", "init", str(ca_dir)])
    assert _mode(ca_dir / "ca.key") == 0o600 and _mode(ca_dir) == 0o700

    # A node whose key file others can read does not start (and the file is not "fixed").
    root = lab.tmp / "gamma"
    lab.authority.certify(root / "state", "gamma")
    config = write_config(root, "gamma", 0, 1, "beta", ca=lab.authority.path)
    key = root / "state" / "node.key"
    os.chmod(key, 0o644)
    out = root / "supervisor.out"
    with open(out, "wb") as f:
        proc = ns.popen(
            [sys.executable, "-m", "supervisor", "start", str(config)], stdout=f, stderr=f
        )
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        lab.tb.stop(proc)
    text = out.read_text()
    assert code is not None and code != 0, text
    assert str(key) in text and "0644" in text and "chmod 600" in text, text
    assert _mode(key) == 0o644
    assert DEVICE not in ns.links()
