"""The names of one virtual network: static names, host names, the reverse zone. Pure.

- A **static name** is ``C`` and the last three octets of an address, three digits each, in
  the network's domain: ``C005032155.vpn.test`` is 10.5.32.155 in 10.0.0.0/8. The first
  octet comes from the subnet, so the rule needs a subnet of one first octet (a prefix of at
  least 8 bits). Any first label of that shape (``C`` and nine digits) is static, whether or
  not it names an address of the subnet, so a host can never be named like one.
- A **host name** is any other single valid label (letters, digits, hyphens; 1 to 63; no
  hyphen first or last) under the domain, looked up in the DHT as
  ``name:<namespace>:<label>``, the label in lower case (``host_key``).
- The **reverse zone** is the ``in-addr.arpa`` names of the subnet's addresses and of the
  octet-aligned prefixes inside the subnet: for 100.64.0.0/10, ``1.0.64.100.in-addr.arpa``
  and ``64.100.in-addr.arpa`` are ours, ``100.in-addr.arpa`` is not (it holds addresses
  outside the subnet).

Names compare case-insensitively (ASCII letters only, RFC 4343); wire labels are bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

import msgspec

__all__ = [
    "Name",
    "NameKind",
    "Zone",
    "host_key",
    "host_label",
    "normalise_domain",
    "static_address",
    "static_name",
]

_ARPA = (b"in-addr", b"arpa")
_LDH = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")
_DIGITS = frozenset(b"0123456789")


def normalise_domain(domain: str) -> str:
    """``domain`` in lower case without a trailing dot; ValueError unless it is one or more
    valid labels of at most 253 characters in all."""
    name = domain.lower().removesuffix(".")
    labels = name.encode("ascii", "replace").split(b".")
    if len(name) > 253 or not all(_valid_label(label) for label in labels):
        raise ValueError(f"not a valid domain name: {domain!r}")
    return name


def static_name(address: IPv4Address, subnet: IPv4Network, domain: str) -> str:
    """The static name of ``address``: ``static_name(10.5.32.155, 10.0.0.0/8, "vpn.test")``
    is ``"C005032155.vpn.test"``. ValueError if the address is outside the subnet, or the
    subnet spans more than one first octet."""
    _check_subnet(subnet)
    if address not in subnet:
        raise ValueError(f"{address} is outside {subnet}")
    return _static_label(address) + "." + normalise_domain(domain)


def static_address(name: str, subnet: IPv4Network, domain: str) -> IPv4Address | None:
    """The address a static name stands for, or None: not ``C`` and nine digits followed by
    the domain (case-insensitive, a trailing dot allowed), an octet above 255, or an address
    outside the subnet."""
    _check_subnet(subnet)
    suffix = "." + normalise_domain(domain)
    text = name.lower().removesuffix(".")
    if not text.endswith(suffix):
        return None
    return _address_of_static(text[: -len(suffix)].encode("ascii", "replace"), subnet)


def host_label(text: str) -> str | None:
    """``text`` as a host label (lower case), or None if it cannot be one: not a valid
    label, or shaped like a static name. What DHCP registers and DNS looks up."""
    label = text.lower().encode("ascii", "replace")
    if not _valid_label(label) or _is_static_shape(label):
        return None
    return label.decode("ascii")


def host_key(namespace: str, host: str) -> bytes:
    """The DHT key of a host name: ``b"name:<namespace>:<host label>"``; ValueError if
    ``host`` cannot be a host label (see ``host_label``)."""
    label = host_label(host)
    if label is None:
        raise ValueError(f"not a host label: {host!r}")
    return f"name:{namespace}:{label}".encode()


class NameKind(enum.Enum):
    FOREIGN = "foreign"  # outside our domain and our reverse zone: REFUSED
    APEX = "apex"  # the domain itself, or the top of our reverse zone: SOA only
    STATIC = "static"  # a static name of an address in the subnet: A
    HOST = "host"  # a host label: exists if the DHT says so
    POINTER = "pointer"  # the reverse name of an address in the subnet: PTR
    EMPTY = "empty"  # a reverse name of a prefix inside our zone: exists, holds nothing
    MISSING = "missing"  # in our zones but cannot exist: NXDOMAIN


class Name(msgspec.Struct, frozen=True):
    """What a query name is to us. ``address`` for STATIC and POINTER, ``host`` for HOST;
    ``apex`` (wire labels) is the zone the name falls in, for the SOA of negative answers;
    empty for FOREIGN."""

    kind: NameKind
    apex: tuple[bytes, ...] = ()
    address: IPv4Address | None = None
    host: str | None = None


class Zone(msgspec.Struct, frozen=True):
    """The forward domain and reverse zone of one virtual network."""

    domain: str  # normalised: lower case, no trailing dot
    subnet: IPv4Network

    def __post_init__(self) -> None:
        _check_subnet(self.subnet)
        if normalise_domain(self.domain) != self.domain:
            raise ValueError(f"domain not normalised: {self.domain!r}")

    @property
    def domain_labels(self) -> tuple[bytes, ...]:
        return tuple(self.domain.encode("ascii").split(b"."))

    @property
    def reverse_depth(self) -> int:
        """How many octets the top of the reverse zone names: 1 for a /8, 2 for a /10."""
        return -(-self.subnet.prefixlen // 8)

    def classify(self, labels: Sequence[bytes]) -> Name:
        """What the name ``labels`` (wire labels, any case, root excluded) is."""
        lowered = tuple(label.lower() for label in labels)
        domain = self.domain_labels
        if lowered[-len(domain) :] == domain:
            return self._forward(lowered[: -len(domain)], domain)
        if lowered[-2:] == _ARPA:
            return self._reverse(lowered[:-2])
        return Name(NameKind.FOREIGN)

    def _forward(self, below: tuple[bytes, ...], apex: tuple[bytes, ...]) -> Name:
        if not below:
            return Name(NameKind.APEX, apex)
        if len(below) == 1:
            label = below[0]
            if _is_static_shape(label):
                address = _address_of_static(label, self.subnet)
                if address is not None:
                    return Name(NameKind.STATIC, apex, address=address)
            elif _valid_label(label):
                return Name(NameKind.HOST, apex, host=label.decode("ascii"))
        return Name(NameKind.MISSING, apex)

    def _reverse(self, below: tuple[bytes, ...]) -> Name:
        """``below``: the labels in front of ``in-addr.arpa``, most specific first."""
        octets: list[int] = []
        for label in reversed(below):
            octet = _octet(label)
            if octet is None or len(octets) == 4:
                break
            octets.append(octet)
        depth = len(octets)
        if depth < self.reverse_depth:
            return Name(NameKind.FOREIGN)
        prefix = IPv4Network((bytes(octets + [0] * (4 - depth)), 8 * depth))
        if not prefix.subnet_of(self.subnet):
            return Name(NameKind.FOREIGN)
        apex = tuple(str(o).encode() for o in reversed(octets[: self.reverse_depth])) + _ARPA
        if depth < len(below):
            return Name(NameKind.MISSING, apex)
        if depth == 4:
            return Name(NameKind.POINTER, apex, address=prefix.network_address)
        return Name(NameKind.APEX if depth == self.reverse_depth else NameKind.EMPTY, apex)


def _check_subnet(subnet: IPv4Network) -> None:
    if subnet.prefixlen < 8:
        raise ValueError(f"{subnet} spans more than one first octet")


def _static_label(address: IPv4Address) -> str:
    _, b, c, d = address.packed
    return f"C{b:03d}{c:03d}{d:03d}"


def _is_static_shape(label: bytes) -> bool:
    return len(label) == 10 and label[:1] in (b"c", b"C") and set(label[1:]) <= _DIGITS


def _address_of_static(label: bytes, subnet: IPv4Network) -> IPv4Address | None:
    if not _is_static_shape(label):
        return None
    octets = [int(label[i : i + 3]) for i in (1, 4, 7)]
    if max(octets) > 255:
        return None
    address = IPv4Address(bytes([subnet.network_address.packed[0], *octets]))
    return address if address in subnet else None


def _valid_label(label: bytes) -> bool:
    return (
        0 < len(label) <= 63
        and set(label.lower()) <= _LDH
        and not label.startswith(b"-")
        and not label.endswith(b"-")
    )


def _octet(label: bytes) -> int | None:
    """A decimal octet as reverse names write it: 0 to 255, no leading zero."""
    if not 0 < len(label) <= 3 or not set(label) <= _DIGITS:
        return None
    if len(label) > 1 and label.startswith(b"0"):
        return None
    value = int(label)
    return value if value <= 255 else None
