"""Which URLs the crawler may reach: http(s) only, and no private, loopback or link-local address.

A crawler that follows links from the open web must not become a way into the network it
runs in (cloud metadata at 169.254.169.254, a database on 10.x, a dashboard on localhost).
The check runs where a connection is made: `guarded_socket_factory` makes the socket of
every connection attempt (aiohttp's `TCPConnector(socket_factory=...)`, aiohappyeyeballs'
`start_connection`) and refuses it when the address it is about to connect to is not
allowed. So the address checked is the address connected to, whatever led there: a host
name and its DNS answer (no rebinding gap), an IP literal (which aiohttp never sends
through a resolver), any spelling the HTTP client normalises into one (`127。0。0。2`,
fullwidth digits, a raw UTF-8 redirect), every redirect hop. An IPv6 address that embeds
an IPv4 one (IPv4-mapped, 6to4, NAT64, Teredo) counts as the IPv4 it reaches.

Hosts on the allow-list (a name, an address or a network such as 127.0.0.0/8) are let
through: the embedded web and the tests run on 127.0.0.1. An allow-listed *name* lets any
address it resolves to through, so the socket factory needs the name a connection is for:
the caller names it with `connecting_to(host)` (a context variable, so concurrent requests
on one event loop each see their own), which also collects what was refused.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: What `socket.getaddrinfo` returns per address: (family, type, proto, canonname, sockaddr).
AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix: the IPv4 is the last 32 bits


class ForbiddenAddress(OSError):
    """A connection to an address the crawl may not reach was refused."""


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches: IPv4-mapped, 6to4 (2002::/16), NAT64 (64:ff9b::/96), Teredo (2001::/32)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client address (stored XOR 0xffffffff; ipaddress undoes it)
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """True for a globally routable unicast address; an IPv6 address embedding an IPv4 one is judged by that."""
    ip = embedded_ipv4(ip) or ip
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


@dataclass(frozen=True)
class AllowList:
    """Hosts exempt from the address check: exact host names, and addresses or networks."""

    names: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> "AllowList":
        names: set[str] = set()
        networks = []
        for entry in entries:
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                if "/" in entry or ":" in entry:
                    raise ValueError(f"allow-list entry {entry!r} is neither a host name nor an address") from None
                names.add(entry.rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def allows_name(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.names

    def allows_ip(self, ip: IPAddress) -> bool:
        """`ip`, or the IPv4 address it embeds, is in an allowed network."""
        addresses = [a for a in (ip, embedded_ipv4(ip)) if a is not None]
        return any(a in net for a in addresses for net in self.networks if net.version == a.version)


def check_scheme(url: str) -> str | None:
    """"bad_scheme" unless the URL is http(s) with a host, else None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "bad_scheme"
    if parts.scheme.lower() not in ALLOWED_SCHEMES or not parts.hostname:
        return "bad_scheme"
    return None


def check_address(host: str, ip: IPAddress, allow: AllowList) -> None:
    """Raise ForbiddenAddress unless `ip` is public or allow-listed (by address or by host name)."""
    if is_public(ip) or allow.allows_ip(ip) or allow.allows_name(host):
        return
    if host and _parse_ip(host) != ip:
        raise ForbiddenAddress(f"{host} resolves to non-public address {ip}")
    raise ForbiddenAddress(f"non-public address {ip}")


@dataclass
class Destination:
    """The host the connections of one request are for, and what the guard refused on the way."""

    host: str
    refused: list[str] = field(default_factory=list)


_destination: ContextVar[Destination | None] = ContextVar("crawler_netguard_destination", default=None)


@contextlib.contextmanager
def connecting_to(host: str) -> Iterator[Destination]:
    """Connections opened inside this block are for `host` (as the HTTP client resolves it)."""
    destination = Destination(host)
    token = _destination.set(destination)
    try:
        yield destination
    finally:
        _destination.reset(token)


def guarded_socket_factory(allow: AllowList) -> Callable[[AddrInfo], socket.socket]:
    """A socket factory that refuses to make the socket for a forbidden peer address.

    It is called with the very address the socket then connects to, once per attempt
    (happy eyeballs tries a name's addresses one by one: a forbidden one is skipped, an
    allowed one may still serve), so no byte is sent to a forbidden address.
    """

    def make(addr_info: AddrInfo) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        destination = _destination.get()
        host = destination.host if destination is not None else ""
        ip = _parse_ip(str(sockaddr[0]))
        try:
            if ip is None:
                raise ForbiddenAddress(f"{host}: refusing to connect to an unparseable address {sockaddr[0]!r}")
            check_address(host, ip, allow)
        except ForbiddenAddress as exc:
            if destination is not None:
                destination.refused.append(str(exc))
            raise
        return socket.socket(family, type_, proto)

    return make
