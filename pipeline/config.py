"""Node settings: TOML in, typed frozen records out.

The supervisor is the only reader of TOML. It turns the file into ``Settings`` once,
refusing unknown keys and naming every bad key by its path (``stages.classifier.workers``),
all problems at once. Stages receive the validated settings as JSON (``to_json``), never TOML.

The schema is the records below (frozen msgspec Structs: a record class costs microseconds
to make where a frozen dataclass costs a millisecond, and every node start imports these):
a field's type says what the key accepts, its default makes it optional, and its ``check``
adds a range or shape rule (``_field``). ``_convert`` walks a record against a mapping and
collects problems instead of stopping at the first one.
"""

import enum
import hashlib
import json
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from pipeline.crypto.ciphers import DEFAULT_CIPHERS, DataCipher
from pipeline.errors import ConfigError
from pipeline.topology import Stage, Topology

Check = Callable[[Any], str | None]


class _Field(msgspec.Struct, frozen=True):
    """What the schema says of one key: its type, whether it may be left out, its check."""

    type: Any
    required: bool
    check: Check | None
    doc: str


_PENDING: list[tuple[bool, Check | None, str]] = []  # the fields of the record being made


def _field(default: Any = msgspec.NODEFAULT, check: Check | None = None, doc: str = "") -> Any:
    """A record's field: its default (none: required), its check and its documentation, which
    ``_Record`` files under the field's name once the class is made."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for defaults")
    _PENDING.append((default is msgspec.NODEFAULT, check, doc))
    return msgspec.field(default=default)


class _Record(msgspec.Struct, frozen=True, kw_only=True):
    """A table of the schema: every field made with ``_field``, in order. (This module's
    annotations are evaluated when a class is made, not strings: the schema reads them as
    they are, with nothing to resolve at each load.)"""

    schema: ClassVar[dict[str, _Field]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        types_ = cls.__dict__.get("__annotations__", {})
        pending = _PENDING[:]
        _PENDING.clear()
        if len(types_) != len(pending):
            raise TypeError(f"{cls.__name__}: every field needs _field()")
        cls.schema = {
            name: _Field(tp, required, check, doc)
            for (name, tp), (required, check, doc) in zip(types_.items(), pending, strict=True)
        }


def _between(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v}"


def _power_of_two(lo: int, hi: int) -> Check:
    def check(v: int) -> str | None:
        if v & (v - 1) or not lo <= v <= hi:
            return f"must be a power of two between {lo} and {hi}, got {v}"
        return None

    return check


def _ifname(v: str) -> str | None:
    if not 1 <= len(v) <= 15 or any(c in v for c in "/ \t\n:"):
        return f"must be a Linux interface name (1-15 characters, no '/', ':' or space), got {v!r}"
    return None


def _domain(v: str) -> str | None:
    labels = v.rstrip(".").split(".")
    ok = all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", lb) for lb in labels)
    return None if ok and len(v) <= 200 else f"must be a DNS domain like 'vpn.example', got {v!r}"


def _name(v: str) -> str | None:
    ok = v and len(v) <= 64 and all(c.isalnum() or c in "-_." for c in v)
    return None if ok else f"must be 1-64 characters of letters, digits, '-', '_', '.', got {v!r}"


def _absolute(v: Path) -> str | None:
    if v.is_absolute():
        return None
    return f"must be an absolute path (the node may run from any directory), got {str(v)!r}"


class Mode(enum.StrEnum):
    INTERFACE = "interface"
    ROUTER = "router"


class PortMapProtocol(enum.StrEnum):
    PCP = "pcp"
    NATPMP = "nat-pmp"
    UPNP = "upnp"  # UPnP IGD


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Endpoint(msgspec.Struct, frozen=True):
    """An underlay UDP endpoint, written ``"host:port"`` in TOML."""

    host: IPv4Address
    port: int

    @classmethod
    def parse(cls, text: str) -> "Endpoint":
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"must be 'IPv4:port', got {text!r}")
        try:
            address = IPv4Address(host)
        except ValueError:
            if re.fullmatch(r"[A-Za-z0-9.-]*[A-Za-z][A-Za-z0-9.-]*", host):
                raise ValueError(
                    f"a host name is not supported, give an IPv4 address: got {text!r}"
                ) from None
            raise ValueError(f"must be 'IPv4:port', got {text!r}") from None
        return cls(address, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class NodeSettings(_Record, frozen=True, kw_only=True):
    name: str = _field(check=_name, doc="this node's name, used in logs and status")
    state_dir: Path = _field(
        check=_absolute, doc="long-lived state (keys, leases), an absolute path; created 0700"
    )
    runtime_dir: Path = _field(
        check=_absolute,
        doc="sockets, pid file and settings while running, an absolute path; created 0700",
    )


class NetworkSettings(_Record, frozen=True, kw_only=True):
    namespace: str = _field(check=_name, doc="the virtual network's name")
    subnet: IPv4Network = _field(doc="the virtual network's subnet")
    address: IPv4Address | None = _field(
        None,
        doc="this node's static virtual address; absent: the node answers DHCP on its TAP "
        "with an address it wins in the DHT",
    )
    gateway: IPv4Address | None = _field(
        None, doc="the virtual gateway, DHCP and DNS server address; default: the last host"
    )
    domain: str = _field("autovn.internal", check=_domain, doc="DNS domain of the static names")
    mode: Mode = _field(Mode.INTERFACE, doc="interface (a TAP on this machine) or router")
    mtu: int = _field(1400, check=_between(576, 9000), doc="MTU of the TAP device")
    device: str = _field("autovn0", check=_ifname, doc="name of the TAP device")
    bridge: str | None = _field(
        None, check=_ifname, doc="router mode: the segment's bridge the TAP becomes a port of"
    )
    create_bridge: bool = _field(False, doc="router mode: make the bridge if it is missing")
    dhcp_port: int = _field(
        67, check=_between(1, 65534), doc="DHCP server port (clients use it + 1); router mode"
    )
    allowed_macs: tuple[str, ...] = _field(
        (), doc="router mode: the only machines served (empty: every MAC on the segment)"
    )
    allow_static: bool = _field(
        False, doc="router mode: a machine with an address of its own in the subnet is registered"
    )


class OverlaySettings(_Record, frozen=True, kw_only=True):
    listen_address: IPv4Address = _field(IPv4Address("0.0.0.0"), doc="UDP address to bind")
    listen_port: int = _field(4789, check=_between(1, 65535), doc="UDP port to bind")
    keepalive_interval_s: float = _field(1.0, check=_between(0.05, 60), doc="peer ping period")
    peer_timeout_s: float = _field(5.0, check=_between(0.2, 600), doc="silence before 'down'")
    networks: tuple[str, ...] = _field(
        (), doc="other virtual networks whose members may share this node's overlay and DHT"
    )
    bootstrap: tuple[Endpoint, ...] = _field(
        (), doc="underlay 'IPv4:port' of overlay members to join through; empty: the first node"
    )


def _metrics_listen(v: str) -> str | None:
    try:
        metrics_endpoint(v)
    except ValueError as exc:
        return str(exc)
    return None


def metrics_endpoint(text: str) -> Endpoint:
    """``metrics.listen``: "IPv4:port", or a port alone for the loopback address."""
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    try:
        return Endpoint.parse(text)
    except ValueError:
        raise ValueError(
            f"must be 'IPv4:port' (e.g. '127.0.0.1:9477') or a port alone, got {text!r}"
        ) from None


def _protocols(v: tuple[PortMapProtocol, ...]) -> str | None:
    if not v:
        return "must name at least one protocol (port_mapping = false turns port mapping off)"
    if len(set(v)) != len(v):
        return f"names a protocol twice: {[p.value for p in v]}"
    return None


def _public_key(v: str) -> str | None:
    ok = len(v) == 64 and all(c in "0123456789abcdefABCDEF" for c in v)
    return None if ok else "must be 64 hex digits (an Ed25519 public key, `supervisor key show`)"


class PeerSettings(_Record, frozen=True, kw_only=True):
    name: str = _field(check=_name, doc="the peer's node name")
    addresses: tuple[IPv4Address, ...] = _field(doc="the peer's virtual addresses")
    endpoint: Endpoint = _field(doc="the peer's underlay 'IPv4:port'")
    public_key: str | None = _field(
        None, check=_public_key, doc="the peer's public key (hex): Noise IK; absent: XX"
    )


def _ciphers(v: tuple[DataCipher, ...]) -> str | None:
    if not v:
        known = ", ".join(repr(c.value) for c in DataCipher)
        return f"must name at least one cipher (known: {known})"
    if len(set(v)) != len(v):
        return f"names a cipher twice: {[c.value for c in v]}"
    return None


class SecuritySettings(_Record, frozen=True, kw_only=True):
    ca_certificate: Path | None = _field(
        None, check=_absolute, doc="the network authority's certificate (must exist)"
    )
    certificate: Path | None = _field(
        None, check=_absolute, doc="this node's certificate; default <state_dir>/node.crt"
    )
    revocation_list: Path | None = _field(
        None, check=_absolute, doc="revoked serials and node ids; re-read on change"
    )
    rekey_after_s: float = _field(
        120.0, check=_between(5, 150), doc="session key lifetime (sessions end at 180 s)"
    )
    rekey_after_bytes: int = _field(1 << 36, check=_between(1 << 20, 1 << 60), doc="or volume")
    handshake_load_threshold: int = _field(
        50, check=_between(1, 100000), doc="handshakes per second before cookies are demanded"
    )
    ciphers: tuple[DataCipher, ...] = _field(
        DEFAULT_CIPHERS,
        check=_ciphers,
        doc="data ciphers this node allows, best first; a handshake takes the initiator's "
        "first that the responder allows too (aes-256-gcm, chacha20-poly1305)",
    )
    insecure_plaintext: bool = _field(
        False, doc="no handshakes, no encryption: only to measure the pipeline without crypto"
    )


_RING = _power_of_two(1 << 18, 1 << 28)


class TapReaderSettings(_Record, frozen=True, kw_only=True):
    queues: int = _field(1, check=_between(1, 16), doc="TAP queues, one worker each")
    ring_bytes: int = _field(1 << 19, check=_RING, doc="size of each ring this stage reads")
    batch: int = _field(64, check=_between(1, 1024), doc="frames handled per wake-up")
    offloads: bool = _field(
        True, doc="virtio-net headers and TSO on the TAP: 64 KiB super-frames (kernel willing)"
    )


class ClassifierSettings(_Record, frozen=True, kw_only=True):
    workers: int = _field(1, check=_between(1, 16), doc="classifier worker processes")
    ring_bytes: int = _field(1 << 19, check=_RING, doc="size of each ring this stage reads")
    batch: int = _field(64, check=_between(1, 1024), doc="frames handled per wake-up")


class OverlayIoSettings(_Record, frozen=True, kw_only=True):
    workers: int = _field(1, check=_between(1, 16), doc="overlay_io worker processes")
    ring_bytes: int = _field(1 << 19, check=_RING, doc="size of each ring this stage reads")
    batch: int = _field(64, check=_between(1, 1024), doc="datagrams handled per wake-up")
    socket_buffer_bytes: int = _field(1 << 19, check=_between(1 << 16, 1 << 28), doc="UDP buffers")
    offloads: bool = _field(True, doc="UDP GSO sends and GRO reads, where the kernel has them")


class ControlSettings(_Record, frozen=True, kw_only=True):
    ring_bytes: int = _field(1 << 20, check=_RING, doc="size of each ring this stage reads")
    batch: int = _field(64, check=_between(1, 1024), doc="messages handled per wake-up")


class StagesSettings(_Record, frozen=True, kw_only=True):
    tap_reader: TapReaderSettings = _field(TapReaderSettings())
    classifier: ClassifierSettings = _field(ClassifierSettings())
    overlay_io: OverlayIoSettings = _field(OverlayIoSettings())
    control: ControlSettings = _field(ControlSettings())
    heartbeat_interval_s: float = _field(2.0, check=_between(0.1, 30), doc="worker heartbeat")
    heartbeat_timeout_s: float = _field(10.0, check=_between(0.5, 300), doc="silence = hung")
    restart_backoff_max_s: float = _field(5.0, check=_between(0.1, 300), doc="back-off cap")
    stats_interval_s: float = _field(30.0, check=_between(1, 3600), doc="stats log period")

    def topology(self) -> Topology:
        """The workers and rings these knobs make (``pipeline/topology.py``)."""
        return Topology(
            tap_queues=self.tap_reader.queues,
            classifiers=self.classifier.workers,
            overlay_ios=self.overlay_io.workers,
            ring_bytes=(
                (Stage.TAP_READER, self.tap_reader.ring_bytes),
                (Stage.CLASSIFIER, self.classifier.ring_bytes),
                (Stage.OVERLAY_IO, self.overlay_io.ring_bytes),
                (Stage.CONTROL, self.control.ring_bytes),
            ),
        )


class LogSettings(_Record, frozen=True, kw_only=True):
    level: LogLevel = _field(LogLevel.INFO, doc="lowest level written")
    file: Path | None = _field(
        None, check=_absolute, doc="JSON-lines log; default <runtime_dir>/node.log"
    )


class MetricsSettings(_Record, frozen=True, kw_only=True):
    listen: str | None = _field(
        None,
        check=_metrics_listen,
        doc="where the supervisor serves Prometheus metrics over HTTP: 'IPv4:port', or a port "
        "alone for 127.0.0.1; absent: no metrics endpoint",
    )


class NatSettings(_Record, frozen=True, kw_only=True):
    stun_servers: tuple[Endpoint, ...] = _field(
        (), doc="STUN servers 'IPv4:port' that tell the node where it is seen from"
    )
    port_mapping: bool = _field(
        True,
        doc="ask the gateway for a UDP port mapping (PCP, NAT-PMP, UPnP IGD) and advertise it",
    )
    port_mapping_protocols: tuple[PortMapProtocol, ...] = _field(
        (PortMapProtocol.PCP, PortMapProtocol.NATPMP, PortMapProtocol.UPNP),
        check=_protocols,
        doc="the port mapping protocols, asked in this order until one maps the port: "
        "'pcp', 'nat-pmp', 'upnp' (UPnP IGD)",
    )
    shortcuts: bool = _field(
        True, doc="punch direct paths for links that are relayed and carry traffic"
    )
    pool_sockets: int = _field(
        256,
        check=_between(0, 1024),
        doc="birthday probing, where this node's NAT maps per destination and the peer's "
        "does not: how many extra UDP sockets overlay_io opens to probe the peer from "
        "(0: none, 1024 at most)",
    )
    spray_probes: int = _field(
        1024,
        check=_between(0, 4096),
        doc="birthday probing, where the peer's NAT maps per destination and this node's "
        "does not: how many probes go to random ports of the peer's public IP, over 3 s "
        "(0: none, 4096 at most)",
    )


class Settings(_Record, frozen=True, kw_only=True):
    node: NodeSettings = _field()
    network: NetworkSettings = _field()
    overlay: OverlaySettings = _field(OverlaySettings())
    peers: tuple[PeerSettings, ...] = _field(())
    security: SecuritySettings = _field(SecuritySettings())
    stages: StagesSettings = _field(StagesSettings())
    log: LogSettings = _field(LogSettings())
    nat: NatSettings = _field(NatSettings())
    metrics: MetricsSettings = _field(MetricsSettings())

    @property
    def log_file(self) -> Path:
        return self.log.file or self.node.runtime_dir / "node.log"

    @property
    def metrics_endpoint(self) -> Endpoint | None:
        """Where the supervisor serves its metrics, or None (``metrics.listen`` absent)."""
        listen = self.metrics.listen
        return None if listen is None else metrics_endpoint(listen)

    @property
    def certificate_file(self) -> Path:
        return self.security.certificate or self.node.state_dir / "node.crt"

    @property
    def gateway_address(self) -> IPv4Address:
        """The virtual gateway (DHCP and DNS server): configured, or the subnet's last host."""
        net = self.network
        if net.gateway is not None:
            return net.gateway
        return net.subnet.broadcast_address - 1 if net.subnet.prefixlen <= 30 else net.subnet[-1]

    @property
    def dhcp(self) -> bool:
        """True when the node has no static address: its TAP's address comes from DHCP."""
        return self.network.address is None

    @property
    def tap_mac(self) -> bytes:
        """The TAP's own MAC: locally administered, derived from the node name."""
        return b"\x02" + hashlib.blake2b(self.node.name.encode(), digest_size=5).digest()

    def to_json(self) -> str:
        return json.dumps(_to_plain(self), indent=2)


GATEWAY_MAC = bytes.fromhex("024156540001")  # "AVT": the virtual gateway every node answers as

# -- conversion ------------------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, msg: str) -> None:
        self.items.append((path or "(top level)", msg))


def _convert(tp: Any, value: Any, path: str, problems: _Problems) -> Any:
    origin = typing.get_origin(tp)
    if tp is Endpoint:
        return _convert_scalar(tp, value, path, problems)
    if isinstance(tp, type) and issubclass(tp, _Record):
        return _convert_record(tp, value, path, problems)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(args[0], value, path, problems)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.add(path, f"must be a list, got {_kind(value)}")
            return ()
        return tuple(_convert(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value))
    return _convert_scalar(tp, value, path, problems)


def _convert_scalar(tp: Any, value: Any, path: str, problems: _Problems) -> Any:
    expected = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in (int, bool, str):
        if type(value) is not tp:
            problems.add(path, f"must be {expected[tp]}, got {_kind(value)}")
            return None
        return value
    if tp is float:
        if type(value) not in (int, float):
            problems.add(path, f"must be a number, got {_kind(value)}")
            return None
        return float(value)
    if not isinstance(value, str):
        problems.add(path, f"must be a string, got {_kind(value)}")
        return None
    try:
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return tp(value)
        if tp is Endpoint:
            return Endpoint.parse(value)
        return tp(value)
    except ValueError as exc:
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            choices = ", ".join(repr(m.value) for m in tp)
            problems.add(path, f"must be one of {choices}, got {value!r}")
        else:
            problems.add(path, str(exc) or f"invalid value {value!r}")
        return None


def _convert_record(tp: type[_Record], value: Any, path: str, problems: _Problems) -> Any:
    if not isinstance(value, Mapping):
        problems.add(path, f"must be a table, got {_kind(value)}")
        return None
    fields = tp.schema
    for key in value:
        if key not in fields:
            problems.add(_join(path, key), f"unknown key (known: {', '.join(fields)})")
    kwargs: dict[str, Any] = {}
    before = len(problems.items)
    for name, f in fields.items():
        sub = _join(path, name)
        if name not in value:
            if f.required:
                problems.add(sub, "is required")
            continue
        converted = _convert(f.type, value[name], sub, problems)
        check = f.check
        if converted is not None and check is not None and (msg := check(converted)):
            problems.add(sub, msg)
        kwargs[name] = converted
    if len(problems.items) > before:
        return None
    return tp(**kwargs)


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names |= {list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _cross_checks(s: Settings, problems: _Problems) -> None:
    net = s.network
    if net.subnet.prefixlen > 29 or net.subnet.prefixlen < 8:
        problems.add("network.subnet", "must be a /8 to /29 (room for a gateway and nodes)")
        return
    gateway = s.gateway_address
    seen: dict[IPv4Address, str] = {gateway: "network.gateway"}
    for key, addr in (("network.gateway", net.gateway), ("network.address", net.address)):
        if addr is None:
            continue
        if addr not in net.subnet:
            problems.add(key, f"{addr} is not in network.subnet {net.subnet}")
        elif addr in (net.subnet.network_address, net.subnet.broadcast_address):
            problems.add(key, "must not be the subnet's network or broadcast address")
    if net.mode is Mode.ROUTER:
        if net.bridge is None:
            problems.add("network.bridge", "is required in router mode (the segment's bridge)")
        if net.address is not None:
            problems.add("network.address", "a router has no address: its machines get theirs")
    elif net.bridge is not None or net.allowed_macs or net.dhcp_port != 67 or net.allow_static:
        problems.add(
            "network.mode", "bridge, dhcp_port, allowed_macs, allow_static are for router mode"
        )
    for i, mac in enumerate(net.allowed_macs):
        if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", mac):
            problems.add(
                f"network.allowed_macs[{i}]", f"must be a MAC like 02:00:5e:00:00:01, got {mac!r}"
            )
    if net.address is not None:
        if net.address == gateway:
            problems.add("network.address", f"{gateway} is the virtual gateway's address")
        seen[net.address] = "network.address"
    names: set[str] = {s.node.name}
    for i, peer in enumerate(s.peers):
        if peer.name in names:
            problems.add(f"peers[{i}].name", f"duplicate node name {peer.name!r}")
        names.add(peer.name)
        if not peer.addresses:
            problems.add(f"peers[{i}].addresses", "must name at least one address")
        for j, addr in enumerate(peer.addresses):
            where = f"peers[{i}].addresses[{j}]"
            if addr not in net.subnet:
                problems.add(where, f"{addr} is not in network.subnet {net.subnet}")
            if addr in seen:
                problems.add(where, f"{addr} is already used by {seen[addr]}")
            seen[addr] = where
    sec = s.security
    if not sec.insecure_plaintext and sec.ca_certificate is None:
        problems.add(
            "security.ca_certificate",
            "is required (the network authority's ca.crt); only a benchmark may set "
            "security.insecure_plaintext = true instead",
        )
    if len(s.peers) > 65000:
        problems.add("peers", "at most 65000 static peers")
    ov = s.overlay
    if ov.peer_timeout_s < ov.keepalive_interval_s:
        problems.add(
            "overlay.peer_timeout_s",
            f"must be at least overlay.keepalive_interval_s ({ov.keepalive_interval_s:g}): a "
            f"peer pinged every {ov.keepalive_interval_s:g} s cannot answer within "
            f"{ov.peer_timeout_s:g} s",
        )


def check_files(s: Settings) -> None:
    """What ``check-config`` and ``start`` check beyond the file itself: the files the node
    needs to exist do. ConfigError naming each missing one by its key."""
    problems = _Problems()
    ca = s.security.ca_certificate
    if ca is not None and not s.security.insecure_plaintext and not ca.is_file():
        why = "is a directory" if ca.is_dir() else "does not exist"
        problems.add(
            "security.ca_certificate",
            f"{ca} {why} (`supervisor ca init DIR` makes DIR/ca.crt; copy it here)",
        )
    if problems.items:
        raise ConfigError(problems.items)


def settings_from_mapping(data: Mapping[str, Any]) -> Settings:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    problems = _Problems()
    settings = _convert(Settings, data, "", problems)
    if settings is not None:
        _cross_checks(settings, problems)
    if problems.items:
        raise ConfigError(problems.items)
    assert isinstance(settings, Settings)
    return settings


MAX_CONFIG_BYTES = 1 << 20


def load_settings(path: Path) -> Settings:
    """Read and validate a TOML file; ConfigError for anything wrong with it, never another
    exception (unreadable, too long, binary, not UTF-8, not TOML, a duplicate key, ...)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot read: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([(str(path), f"more than {MAX_CONFIG_BYTES} bytes: not a config")])
    if b"\0" in raw:
        raise ConfigError([(str(path), "a binary file (it holds NUL bytes), not a TOML config")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            [(str(path), f"not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}): a "
              "TOML config must be UTF-8")]
        ) from None  # fmt: skip
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_problem(path, text, exc)]) from None
    return settings_from_mapping(data)


_LINE_RE = re.compile(r"\(at line (\d+), column \d+\)")


def _toml_problem(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> tuple[str, str]:
    """A TOML syntax error as (where, what): a key defined twice by its key path."""
    msg = str(exc)
    found = _LINE_RE.search(msg)
    if found is not None and msg.startswith(("Cannot overwrite", "Cannot declare")):
        key = _key_on_line(text, int(found.group(1)))
        if key is not None:
            return key, f"defined twice (line {found.group(1)} of {path})"
    return str(path), f"not valid TOML: {msg}"


def _key_on_line(text: str, lineno: int) -> str | None:
    """The full key path of the key or table header on line ``lineno`` (1-based), found by
    reading the table headers above it; None if the line holds neither."""
    lines = text.splitlines()
    if not 1 <= lineno <= len(lines):
        return None
    table = ""
    for raw in lines[: lineno - 1]:
        header = re.fullmatch(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?", raw)
        if header:
            table = _plain_key(header.group(1))
    line = lines[lineno - 1]
    header = re.fullmatch(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?", line)
    if header:
        return _plain_key(header.group(1))
    key, eq, _ = line.partition("=")
    if not eq or not key.strip():
        return None
    return _join(table, _plain_key(key))


def _plain_key(key: str) -> str:
    """A dotted TOML key without its quotes and the spaces around its dots."""
    return ".".join(part.strip().strip("\"'") for part in key.split("."))


def settings_from_json(text: str) -> Settings:
    """What a stage does with the supervisor's effective settings."""
    return settings_from_mapping(json.loads(text))


def _to_plain(value: Any) -> Any:
    if isinstance(value, Endpoint):
        return str(value)
    if isinstance(value, _Record):
        out = {}
        for name in value.__struct_fields__:
            v = getattr(value, name)
            if v is not None:
                out[name] = _to_plain(v)
        return out
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, bool | int | float):
        return value
    return str(value)
