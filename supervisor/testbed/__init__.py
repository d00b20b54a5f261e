"""The test bed: real autovn nodes in throw-away network namespaces on this one machine.

The integration tests, the benchmarks in ``bench/`` and ``supervisor demo`` build their
networks with it; the product (``supervisor start`` and its workers) never imports it.

Modules:

- ``netns``: ``Testbed`` and ``Namespace``: namespaces, veth links, bridges, tc, processes
  started inside and ended by pid, and the cleanup that removes all of it (also on signals);
  pure standard library, and the place of the project's network rules.
- ``nodes``: ``Node`` (one ``supervisor start`` in a namespace, and its waits), its config
  (``node_config``, ``write_config``), ``Authority``, ``start_all``, ``stop_all``,
  ``wait_for``, the test network's addresses, and systemd's end of the notify protocol
  (``notify_socket``, ``notify_datagrams``).
- ``layouts``: ready-made networks: ``two_nodes`` (and its parts ``veth_pair`` and
  ``node_pair``), ``overlay_nodes``, ``routed_nodes``, ``router_segment``, ``nat_pair``
  (two nodes behind the NAT lab's gateways; ``link_row``, ``registered``),
  ``statuses`` and ``overlay_settled`` (every node joined and near-linked), and ``member``,
  one node of them.
- ``nat``: ``NatLab``, an "internet" segment with STUN servers and sites behind Linux NAT
  gateways of several kinds (MASQUERADE, random ports, miniupnpd), and conntrack views.
- ``dhclient``: ``DhcpClient``, ISC dhclient kept inside its namespace, and its leases.
- ``demo``: ``supervisor demo``, five nodes on two segments, shown working.

The API, re-exported here::

    with Testbed("avx") as tb:                       # removed on exit, failure, Ctrl-C
        a, b = two_nodes(tb, tmp)                    # started, peers up
        a.ping(b.address)
        a.status()                                   # status --json, parsed
        stop_all([a, b])                             # supervisor stop; gone

A node runs the code its working directory finds: ``Node.source_tree`` names another
checkout (see ``nodes``).
"""

from supervisor.testbed.dhclient import DhcpClient, DhcpError, DhcpLease, parse_leases
from supervisor.testbed.layouts import (
    Machine,
    NatPair,
    link_row,
    member,
    nat_pair,
    node_pair,
    overlay_nodes,
    overlay_settled,
    registered,
    routed_nodes,
    router_segment,
    statuses,
    two_nodes,
    veth_pair,
)
from supervisor.testbed.netns import (
    CommandError,
    Namespace,
    NetnsError,
    QdiscUnavailable,
    Testbed,
    leftover_etc_netns,
    leftover_namespaces,
    require_root,
)
from supervisor.testbed.nodes import (
    DEVICE,
    DOMAIN,
    PORT,
    SUBNET,
    UNDERLAY,
    VIRTUAL,
    Authority,
    Node,
    node_config,
    notify_datagrams,
    notify_socket,
    start_all,
    stop_all,
    wait_for,
    write_config,
)

__all__ = [
    "DEVICE",
    "DOMAIN",
    "PORT",
    "SUBNET",
    "UNDERLAY",
    "VIRTUAL",
    "Authority",
    "CommandError",
    "DhcpClient",
    "DhcpError",
    "DhcpLease",
    "Machine",
    "NatPair",
    "Namespace",
    "NetnsError",
    "Node",
    "QdiscUnavailable",
    "Testbed",
    "leftover_etc_netns",
    "leftover_namespaces",
    "link_row",
    "member",
    "nat_pair",
    "node_config",
    "notify_datagrams",
    "notify_socket",
    "node_pair",
    "overlay_nodes",
    "overlay_settled",
    "parse_leases",
    "registered",
    "require_root",
    "routed_nodes",
    "router_segment",
    "start_all",
    "statuses",
    "stop_all",
    "two_nodes",
    "veth_pair",
    "wait_for",
    "write_config",
]
