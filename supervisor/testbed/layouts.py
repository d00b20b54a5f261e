"""The networks of the test bed: namespaces, links and the nodes on them.

- ``two_nodes``: two namespaces joined by a veth pair (``veth_pair``: underlay
  198.18.0.1/.2) and a node in each (virtual 100.64.0.1/.2) naming the other as a static
  peer (``node_pair``: such two nodes, also for a benchmark's next pair);
- ``overlay_nodes``: nodes on one bridged segment that know only the first node's address;
- ``routed_nodes``: nodes on several segments joined by a router namespace, with no virtual
  address in their configs (``Node.dhcp`` gets each one);
- ``router_segment``: a router-mode node serving machine namespaces on its bridge, and a
  remote node in interface mode;
- ``nat_pair``: nodes A and B behind gateways of the NAT lab (``nat``), with four public
  nodes between them on the overlay's circle, so A reaches B relayed before any shortcut.

Each certifies its nodes with a fresh ``Authority`` (``member``: one node of such a
network) and starts them unless told not to.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.crypto.identity import Identity
from pipeline.crypto.keyfiles import seed_text
from pipeline.statefiles import write_new
from supervisor.testbed.dhclient import DhcpClient
from supervisor.testbed.nat import NatLab
from supervisor.testbed.netns import Namespace, Testbed
from supervisor.testbed.nodes import (
    DOMAIN,
    UNDERLAY,
    VIRTUAL,
    Authority,
    Node,
    node_config,
    start_all,
    stop_all,
    wait_for,
    write_config,
)

NAMES = ("alpha", "beta")  # the nodes of two_nodes, in namespaces "a" and "b"


def two_nodes(
    testbed: Testbed,
    tmp: Path,
    *,
    start: bool = True,
    secure: bool = True,
    peer_keys: bool = True,
    security_lines: tuple[str, ...] = (),
    **stages: int,
) -> tuple[Node, Node]:
    """Two nodes on a veth pair, certified by a fresh authority (``secure``; with
    ``peer_keys`` each names the other's public key, so the handshake is Noise IK, else XX),
    or in plaintext for measuring the pipeline alone."""
    ns_a, ns_b = veth_pair(testbed)
    a, b = node_pair(
        ns_a,
        ns_b,
        tmp,
        secure=secure,
        peer_keys=peer_keys,
        security_lines=security_lines,
        stages=stages,
    )
    if start:
        start_all((a, b), peers_up=True)
    return a, b


def veth_pair(testbed: Testbed) -> tuple[Namespace, Namespace]:
    """The namespaces of :func:`two_nodes`, "a" and "b", joined by a veth pair with the
    underlay addresses 198.18.0.1/24 and .2/24."""
    ns_a = testbed.namespace("a")
    ns_b = testbed.namespace("b")
    testbed.link(ns_a, ns_b, f"{UNDERLAY[0]}/24", f"{UNDERLAY[1]}/24")
    return ns_a, ns_b


def node_pair(
    ns_a: Namespace,
    ns_b: Namespace,
    root: Path,
    *,
    secure: bool = True,
    peer_keys: bool = True,
    security_lines: tuple[str, ...] = (),
    stages: dict[str, int] | None = None,
    source_tree: Path | None = None,
) -> tuple[Node, Node]:
    """The two nodes of :func:`two_nodes` (alpha in ``ns_a``, beta in ``ns_b``), not
    started, with their directories under ``root/alpha`` and ``root/beta`` (and, if
    ``secure``, a fresh authority in ``root/authority``); ``source_tree``: the code they
    run (see :class:`Node`)."""
    authority = Authority.create(root / "authority") if secure else None
    keys: list[str | None] = [None, None]
    if authority is not None:
        for me, name in enumerate(NAMES):
            keys[me] = authority.certify(root / name / "state", name).public_key.hex()
    nodes = []
    for me, (name, ns) in enumerate(zip(NAMES, (ns_a, ns_b), strict=True)):
        peer = 1 - me
        config = write_config(
            root / name,
            name,
            me,
            peer,
            NAMES[peer],
            ca=authority.path if authority else None,
            peer_key=keys[peer] if peer_keys else None,
            stages=stages,
            security_lines=security_lines,
        )
        node = Node(
            name, ns, config, VIRTUAL[me], UNDERLAY[me], root / name, source_tree=source_tree
        )
        node.extra["authority"] = authority
        nodes.append(node)
    a, b = nodes
    return a, b


def member(
    ns: Namespace,
    tmp: Path,
    authority: Authority,
    name: str,
    underlay: str,
    virtual: str | None,
    *,
    first: bool,
    stages: dict[str, int] | None = None,
    domain: str | None = None,
    network_lines: tuple[str, ...] = (),
    bootstrap: tuple[str, ...] = ("198.18.0.1",),
    nat_lines: tuple[str, ...] = (),
    seed: bytes | None = None,
    source_tree: Path | None = None,
) -> Node:
    """A node certified by ``authority`` that knows only ``bootstrap`` (by default
    198.18.0.1, the first node's underlay address; the first knows none: it founds the
    overlay), with its directories under ``tmp/<name>``; ``network_lines`` and ``nat_lines``
    go to its ``[network]`` and ``[nat]`` tables. ``seed``: its key (so its node id, its
    place on the circle) instead of a random one. ``source_tree``: the code it runs (see
    :class:`Node`)."""
    root = tmp / name
    if seed is not None:
        state = root / "state"
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_new(state / "node.key", seed_text(seed), 0o600)
    cert = authority.certify(root / "state", name)
    config = node_config(
        root,
        name,
        underlay=underlay,
        virtual=virtual,
        ca=authority.path,
        bootstrap=() if first else bootstrap,
        stages=stages,
        domain=domain,
        network_lines=network_lines,
        nat_lines=nat_lines,
    )
    node = Node(name, ns, config, virtual or "", underlay, root, source_tree=source_tree)
    node.extra["authority"] = authority
    node.extra["node_id"] = cert.node_id.hex()
    return node


def overlay_nodes(
    testbed: Testbed,
    tmp: Path,
    count: int,
    *,
    start: bool = True,
    source_tree: Path | None = None,
    **stages: int,
) -> list[Node]:
    """``count`` nodes on one bridged segment (underlay 198.18.0.1.., virtual 100.64.0.1..),
    certified by one authority, with no static peers: each knows only the first node's
    address (the first knows none: it founds the overlay). ``source_tree``: the code they
    run (see :class:`Node`)."""
    hub = testbed.namespace("seg")
    bridge = testbed.bridge(hub, "br0")
    authority = Authority.create(tmp / "authority")
    nodes = []
    for i in range(count):
        name = f"n{i + 1}"
        ns = testbed.namespace(name)
        underlay, virtual = f"198.18.0.{i + 1}", f"100.64.0.{i + 1}"
        testbed.attach(ns, hub, bridge, f"{underlay}/24")
        nodes.append(
            member(
                ns,
                tmp,
                authority,
                name,
                underlay,
                virtual,
                first=i == 0,
                stages=stages,
                source_tree=source_tree,
            )  # fmt: skip
        )
    if start:
        start_all(nodes)
    return nodes


def routed_nodes(
    testbed: Testbed,
    tmp: Path,
    sizes: Sequence[int] = (3, 2),
    *,
    start: bool = True,
    domain: str = DOMAIN,
    **stages: int,
) -> list[Node]:
    """Nodes on ``len(sizes)`` segments joined by a router, configured without a virtual
    address (each gets one with :meth:`Node.dhcp`), in DNS domain ``domain``.

    Segment k is a bridge ``brk`` in namespace ``segk`` with underlay 198.18.k.0/24; the
    router (namespace ``rt``, forwarding on inside it only) is 198.18.k.254 on each, and
    every node routes the other segments through it. Nodes are n1, n2, ... in segment
    order, ``sizes[k]`` of them on segment k at 198.18.k.1, .2, ... (``extra["segment"]``
    says which); all are certified by one authority and know only the first node's address.
    """
    if not 1 <= len(sizes) <= 16 or not all(1 <= n <= 200 for n in sizes):
        raise ValueError(f"sizes {tuple(sizes)}: 1 to 16 segments of 1 to 200 nodes")
    authority = Authority.create(tmp / "authority")
    router = testbed.namespace("rt")
    router.sysctl("net.ipv4.ip_forward", "1")
    nodes: list[Node] = []
    for k, size in enumerate(sizes):
        hub = testbed.namespace(f"seg{k}")
        bridge = testbed.bridge(hub, f"br{k}")
        testbed.attach(router, hub, bridge, f"198.18.{k}.254/24", ifname=f"seg{k}")
        for i in range(size):
            name = f"n{len(nodes) + 1}"
            ns = testbed.namespace(name)
            underlay = f"198.18.{k}.{i + 1}"
            testbed.attach(ns, hub, bridge, f"{underlay}/24", ifname="eth0")
            for other in range(len(sizes)):
                if other != k:
                    ns.ip("route", "add", f"198.18.{other}.0/24", "via", f"198.18.{k}.254")
            node = member(
                ns, tmp, authority, name, underlay, None,
                first=not nodes, stages=stages, domain=domain,
            )  # fmt: skip
            node.extra["segment"] = k
            nodes.append(node)
    if start:
        start_all(nodes)
    return nodes


@dataclass
class Machine:
    """A machine behind a router-mode node: a namespace on the segment, with a DHCP client."""

    name: str
    ns: Namespace
    dhcp: DhcpClient
    address: str = ""


def router_segment(
    testbed: Testbed,
    tmp: Path,
    machines: int = 3,
    *,
    dhcp_port: int = 1067,
    allowed: tuple[int, ...] | None = None,
    allow_static: bool = False,
    start: bool = True,
) -> tuple[Node, Node, list[Machine]]:
    """A router-mode node ``gw`` whose TAP is a port of the bridge ``br0`` of its namespace,
    ``machines`` machine namespaces (m1, ...) on veths into that bridge, each with a DHCP
    client pointed at ``dhcp_port``, and a remote node ``far`` in interface mode (DHCP on its
    own TAP) across the underlay (198.18.0.1 far, 198.18.0.2 gw). ``allowed``: the machines
    (1-based) in the router's ``allowed_macs`` (None: no list)."""
    authority = Authority.create(tmp / "authority")
    far_ns, gw_ns = testbed.namespace("far"), testbed.namespace("gw")
    testbed.link(far_ns, gw_ns, "198.18.0.1/24", "198.18.0.2/24")
    bridge = testbed.bridge(gw_ns, "br0")
    segment = []
    for i in range(machines):
        ns = testbed.namespace(f"m{i + 1}")
        testbed.attach(ns, gw_ns, bridge, None, ifname="eth0")
        mac = f"02:00:5e:10:00:{i + 1:02x}"
        ns.ip("link", "set", "dev", "eth0", "address", mac)
        client = DhcpClient(ns, "eth0", tmp / f"m{i + 1}", f"m{i + 1}", server_port=dhcp_port)
        segment.append(Machine(f"m{i + 1}", ns, client))
    lines = ['mode = "router"', f'bridge = "{bridge}"', f"dhcp_port = {dhcp_port}"]
    if allow_static:
        lines.append("allow_static = true")
    if allowed is not None:
        macs = ", ".join(f'"02:00:5e:10:00:{i:02x}"' for i in allowed)
        lines.append(f"allowed_macs = [{macs}]")
    far = member(far_ns, tmp, authority, "far", "198.18.0.1", None, first=True, domain=DOMAIN)
    gw = member(gw_ns, tmp, authority, "gw", "198.18.0.2", None, first=False, domain=DOMAIN,
                network_lines=tuple(lines))  # fmt: skip
    if start:
        start_all([far, gw])
    return gw, far, segment


def circle_seeds(count: int) -> list[bytes]:
    """``count`` key seeds, ordered by their nodes' place on the overlay's circle."""
    seeds = [os.urandom(32) for _ in range(count)]
    return sorted(seeds, key=lambda s: Identity.from_seed(s).node_id)


@dataclass
class NatPair:
    """Nodes ``a`` and ``b`` behind the NAT lab's gateways, the ``publics`` between them."""

    lab: NatLab
    a: Node
    b: Node
    publics: list[Node]
    nodes: list[Node]
    started_at: float = 0.0  # time.monotonic() when the nodes were started

    def close(self) -> None:
        """Stop the nodes still running, then the lab (its gateways and servers)."""
        try:
            stop_all([n for n in self.nodes if n.proc is not None and n.proc.poll() is None])
        finally:
            self.lab.close()


def registered(node: Node) -> bool:
    """The node's overlay says it has joined (its place on the circle is linked)."""
    st = node.status()
    return bool(st and (st.get("overlay") or {}).get("registered"))


def statuses(nodes: Sequence[Node]) -> list[dict[str, Any]] | None:
    """Every node's ``status --json``, or None while one has no overlay to show yet."""
    out = []
    for n in nodes:
        st = n.status()
        if st is None or not st.get("overlay"):
            return None
        out.append(st)
    return out


def overlay_settled(
    nodes: Sequence[Node], unlinkable: frozenset[str] = frozenset()
) -> list[dict[str, Any]] | None:
    """The nodes' statuses once every one has joined and registered and is near-linked with
    its two neighbours on each side of the circle (but for the node ids in ``unlinkable``,
    which cannot link with each other); None until then."""
    sts = statuses(nodes)
    if sts is None:
        return None
    if not all(s["overlay"]["state"] == "joined" and s["overlay"]["registered"] for s in sts):
        return None
    ids = sorted(s["node_id"] for s in sts)
    for s in sts:
        me = ids.index(s["node_id"])
        want = {ids[(me + d) % len(ids)] for d in (-2, -1, 1, 2)} - {s["node_id"]}
        if s["node_id"] in unlinkable:
            want -= unlinkable
        near = {lk["node_id"] for lk in s["link_table"] if "near" in lk["kind"] and lk["up"]}
        if not want <= near:
            return None
    return sts


def link_row(node: Node, other: Node) -> dict[str, Any] | None:
    """``node``'s link table row of the link that routes to ``other``'s virtual address."""
    st = node.status()
    if not st:
        return None
    rows = [r for r in st["link_table"] if other.address in r["routes"]]
    return rows[0] if rows else None


def nat_pair(
    testbed: Testbed,
    tmp: Path,
    a_kind: str,
    b_kind: str | None,
    *,
    port_mapping: bool = False,
    roaming: bool = False,
    shortcuts: bool = True,
    a_gateway: Mapping[str, Any] | None = None,
) -> NatPair:
    """Node A (virtual 100.64.0.1) behind a gateway of ``a_kind``, node B (100.64.0.2) behind
    one of ``b_kind`` (None: on A's LAN), and four public nodes on the lab's internet, every
    one told the lab's STUN servers; started, and each registered on the overlay.

    The keys are chosen so that two public nodes lie between A and B on each side of the
    circle: A and B are not overlay neighbours, so A reaches B first through the overlay
    (relayed), and any direct path is the shortcut's doing. ``port_mapping``: A and B ask
    their gateways for a port mapping (the public nodes never do). ``roaming``: A binds
    0.0.0.0 (its address may change). ``shortcuts=False``: the pair stays relayed.
    ``a_gateway``: options for A's gateway (``NatLab.gateway``, e.g. ``natpmp=False``).
    The lab's ``sites`` are A's, then B's.
    """
    lab = NatLab(testbed, tmp / "lab")
    try:
        authority = Authority.create(tmp / "ca")
        seeds = circle_seeds(6)  # A at 0, B at 3, public nodes at 1, 2, 4, 5
        stun = ", ".join(f'"{h}:{p}"' for h, p in lab.stun_servers)

        def nat_lines(mapping: bool) -> tuple[str, ...]:
            return (
                f"stun_servers = [{stun}]",
                f"port_mapping = {str(mapping).lower()}",
                f"shortcuts = {str(shortcuts).lower()}",
            )

        publics: list[Node] = []
        for i, seat in enumerate((1, 2, 4, 5)):
            ns = lab.internet_host(f"p{i}")
            node = member(
                ns, tmp, authority, f"p{i}", lab.address(ns), f"100.64.0.{10 + i}",
                first=i == 0, bootstrap=(lab.address(publics[0].ns),) if publics else (),
                nat_lines=nat_lines(False), seed=seeds[seat],
            )  # fmt: skip
            publics.append(node)
        site_a = lab.gateway(a_kind, **(a_gateway or {}))
        site_b = site_a if b_kind is None else lab.gateway(b_kind)
        ends = []
        for name, site, seat, virtual in (
            ("a", site_a, 0, "100.64.0.1"),
            ("b", site_b, 3, "100.64.0.2"),
        ):
            ns = site.host(name)
            address = "0.0.0.0" if roaming and name == "a" else lab.address(ns)
            node = member(
                ns, tmp, authority, name, address, virtual, first=False,
                bootstrap=(publics[0].underlay,), nat_lines=nat_lines(port_mapping),
                seed=seeds[seat],
            )  # fmt: skip
            ends.append(node)
    except BaseException:
        lab.close()
        raise
    pair = NatPair(lab, ends[0], ends[1], publics, [*publics, *ends])
    try:
        pair.started_at = time.monotonic()
        start_all(pair.nodes)
        for node in pair.nodes:
            wait_for(f"{node.name} registered", partial(registered, node), 60, every=0.5)
    except BaseException:
        pair.close()
        raise
    return pair
