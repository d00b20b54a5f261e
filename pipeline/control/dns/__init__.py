"""DNS for one virtual network, sans-I/O: static names, host names from the DHT, PTR.

``DnsResponder`` (``responder.py``) answers the queries sent to the virtual DNS address;
``names.py`` holds the naming rules that DHCP and ARP share with it (``static_name``,
``static_address``, ``host_label``, ``host_key``); ``message.py`` reads queries and writes
responses.
"""

from pipeline.control.dns.names import (
    host_key,
    host_label,
    static_address,
    static_name,
)
from pipeline.control.dns.responder import Answer, DnsResponder, DnsSettings, Lookup

__all__ = [
    "Answer",
    "DnsResponder",
    "DnsSettings",
    "Lookup",
    "host_key",
    "host_label",
    "static_address",
    "static_name",
]
