"""The address other hosts reach a node daemon (and its replicas) by.

A node reports every replica as `http://ADVERTISED:PORT`; a router on another host uses that
URL as it is. So the advertised address is the one the node serves on when that is a
specific address; when the node listens on every interface (0.0.0.0 or ::) it is the first
address of an interface that is up and not loopback (in a Kubernetes pod: the pod IP; pass
`--advertise $(POD_IP)` to say so explicitly). It is never a loopback address while the node
listens on a non-loopback one: such a URL would send a router on another host to itself.
"""

from __future__ import annotations

import fcntl
import ipaddress
import re
import socket
import struct
from pathlib import Path

_SIOCGIFADDR = 0x8915
_IFF_UP, _IFF_LOOPBACK = 0x1, 0x8
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


class AddressError(ValueError):
    pass


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def is_loopback_host(host: str) -> bool:
    ip = _ip(host)
    return host == "localhost" if ip is None else ip.is_loopback


def is_unspecified_host(host: str) -> bool:
    ip = _ip(host)
    return host == "" or (ip is not None and ip.is_unspecified)


def check_advertise(value: str) -> str:
    """An IP address or a DNS name, nothing else (no scheme, port or path)."""
    if _ip(value) is not None:
        ip = _ip(value)
        assert ip is not None
        if ip.is_unspecified or ip.is_multicast:
            raise AddressError(f"advertise {value!r}: other hosts cannot connect to an "
                               "unspecified or multicast address")
        return str(ip)
    if not _HOSTNAME.fullmatch(value):
        raise AddressError(f"advertise {value!r} is neither an IP address nor a host name "
                           "(give the address alone: no scheme, port or path)")
    return value.rstrip(".")


def interface_addresses() -> list[tuple[str, str]]:
    """(interface, address) of every interface that is up and not loopback: IPv4 first
    (SIOCGIFADDR), then global IPv6 (/proc/net/if_inet6), in interface order."""
    found: list[tuple[str, str]] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            flags = _flags(name)
            if flags is None or not flags & _IFF_UP or flags & _IFF_LOOPBACK:
                continue
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR,
                                     struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            found.append((name, socket.inet_ntoa(packed[20:24])))
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) != 6 or fields[3] != "00":  # scope 00: global
            continue
        name = fields[5]
        flags = _flags(name)
        if flags is None or not flags & _IFF_UP or flags & _IFF_LOOPBACK:
            continue
        found.append((name, str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))))
    return found


def _flags(interface: str) -> int | None:
    try:
        return int(Path(f"/sys/class/net/{interface}/flags").read_text(), 16)
    except (OSError, ValueError):
        return None


def advertised_host(bind: str, advertise: str | None) -> str:
    """The host part of the URLs this node reports (see the module doc)."""
    if advertise:
        advertise = check_advertise(advertise)
        if is_loopback_host(advertise) and not is_loopback_host(bind):
            raise AddressError(f"advertise {advertise!r} is a loopback address, but the node "
                               f"listens on {bind!r}: routers on other hosts would reach "
                               "themselves, not this node's replicas")
        return advertise
    if not is_unspecified_host(bind):
        return bind
    addresses = interface_addresses()
    if not addresses:
        raise AddressError(f"the node listens on {bind!r} but no interface other than "
                           "loopback is up: give --advertise HOST (the address routers "
                           "reach this node by)")
    return addresses[0][1]


def url_host(host: str) -> str:
    """`host` as it goes in a URL (an IPv6 address in brackets)."""
    ip = _ip(host)
    return f"[{ip}]" if ip is not None and ip.version == 6 else host
