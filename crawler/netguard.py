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

What counts as public is decided by explicit tables (`SPECIAL_IPV4`, `SPECIAL_IPV6`: the
IANA special-purpose address registries, multicast, and IPv6 outside global unicast
2000::/3), not by the `ipaddress` module's `is_global`, whose answers change between
Python versions (3.11 calls fec0::/10, 3fff::/20, 192.0.0.8 and 192.88.99.0/24 public).

Entries on the allow-list (a name, an address or a network such as 127.0.0.0/8, each with
or without a port: `127.0.0.1:8470`, `[::1]:8470`, `127.0.0.0/8:8470`) are let through: the
embedded web and the tests run on 127.0.0.1. An entry with a port lets only that port
through, so allowing a local web server does not open the Ray dashboard beside it. An
allow-listed *name* lets any address it resolves to through, so the socket factory needs
the name a connection is for: the caller names it with `connecting_to(host)` (a context
variable, so concurrent requests on one event loop each see their own), which also
collects what was refused.
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


def _networks(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


#: Every block of the IANA IPv4 Special-Purpose Address Registry (RFC 6890 and its updates), multicast
#: and the reserved 240.0.0.0/4 (limited broadcast included). Refused whole, even the few blocks the
#: registry marks globally reachable (anycast relays and AS112 servers): no image host lives there.
SPECIAL_IPV4 = _networks(
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # shared address space (carrier-grade NAT)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local (cloud metadata services)
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments: DS-Lite, 192.0.0.8 dummy, PCP/TURN anycast, NAT64 discovery
    "192.0.2.0/24",  # documentation (TEST-NET-1)
    "192.31.196.0/24",  # AS112-v4
    "192.52.193.0/24",  # AMT
    "192.88.99.0/24",  # deprecated 6to4 relay anycast
    "192.168.0.0/16",  # private
    "192.175.48.0/24",  # direct delegation AS112
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation (TEST-NET-2)
    "203.0.113.0/24",  # documentation (TEST-NET-3)
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, 255.255.255.255 included
)
#: IPv6 unicast the Internet routes: global unicast. Everything outside it (loopback, unspecified,
#: IPv4-compatible, discard 100::/64, NAT64 local use 64:ff9b:1::/48, unique local fc00::/7,
#: deprecated site-local fec0::/10, link-local fe80::/10, multicast ff00::/8, SRv6 5f00::/16) is refused.
GLOBAL_UNICAST_IPV6 = ipaddress.IPv6Network("2000::/3")
#: Blocks of the IANA IPv6 Special-Purpose Address Registry inside 2000::/3. 6to4 (2002::/16) and
#: Teredo (2001::/32) are not here: they are judged by the IPv4 address they embed.
SPECIAL_IPV6 = _networks(
    "2001::/23",  # IETF protocol assignments (Teredo judged by its IPv4 before this), benchmarking, ORCHID, AMT
    "2001:db8::/32",  # documentation
    "2620:4f:8000::/48",  # direct delegation AS112
    "3fff::/20",  # documentation (RFC 9637)
)


def is_public(ip: IPAddress) -> bool:
    """True for a globally routable unicast address, by the tables above (the same on every Python version);
    an IPv6 address embedding an IPv4 one is judged by that IPv4 address."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        ip = inner
    if isinstance(ip, ipaddress.IPv4Address):
        return not any(ip in net for net in SPECIAL_IPV4)
    return ip in GLOBAL_UNICAST_IPV6 and not any(ip in net for net in SPECIAL_IPV6)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _split_port(entry: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port`, `net/len:port`, `[v6net/len]:port` -> (host part, port or None).

    An IPv6 address or network without brackets has no port (its colons are its own).
    """
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"allow-list entry {entry!r}: expected [ADDRESS] or [ADDRESS]:PORT")
        port = rest[1:] if rest else None
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    else:
        return entry, None
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"allow-list entry {entry!r}: the port must be a number from 1 to 65535")
    return host, int(port)


@dataclass(frozen=True)
class AllowList:
    """Entries exempt from the address check: exact host names, and addresses or networks; each for one
    port, or for every port when the entry names none."""

    names: frozenset[tuple[str, int | None]] = frozenset()
    networks: tuple[tuple[Network, int | None], ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> "AllowList":
        names: set[tuple[str, int | None]] = set()
        networks = []
        for entry in entries:
            entry = entry.strip().lower()
            if not entry:
                continue
            host, port = _split_port(entry)
            try:
                networks.append((ipaddress.ip_network(host, strict=False), port))
            except ValueError:
                if "/" in host or ":" in host or not host:
                    raise ValueError(f"allow-list entry {entry!r} is neither a host name nor an address "
                                     "(optionally with :PORT)") from None
                names.add((host.rstrip("."), port))
        return cls(frozenset(names), tuple(networks))

    def allows_name(self, host: str, port: int | None = None) -> bool:
        """`host` is allowed by name, on `port` (None: only entries for every port count)."""
        host = host.lower().rstrip(".")
        return (host, None) in self.names or (port is not None and (host, port) in self.names)

    def allows_ip(self, ip: IPAddress, port: int | None = None) -> bool:
        """`ip`, or the IPv4 address it embeds, is in an allowed network, for `port` (None: any-port entries only)."""
        addresses = [a for a in (ip, embedded_ipv4(ip)) if a is not None]
        return any(a in net for a in addresses for net, allowed in self.networks
                   if net.version == a.version and allowed in (None, port))


def check_scheme(url: str) -> str | None:
    """"bad_scheme" unless the URL is http(s) with a host, else None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "bad_scheme"
    if parts.scheme.lower() not in ALLOWED_SCHEMES or not parts.hostname:
        return "bad_scheme"
    return None


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, the port filled in from the scheme: what "the same origin" compares."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower().rstrip("."), parts.port or (443 if scheme == "https" else 80)


def origin_entry(url: str) -> str:
    """The allow-list entry for exactly the host and port of `url` (an API base the crawl was pointed at)."""
    _, host, port = origin(url)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_address(host: str, ip: IPAddress, allow: AllowList, port: int | None = None) -> None:
    """Raise ForbiddenAddress unless `ip` is public or allow-listed (by address or by host name) for `port`."""
    if is_public(ip) or allow.allows_ip(ip, port) or allow.allows_name(host, port):
        return
    where = f" port {port}" if port is not None else ""
    if host and _parse_ip(host) != ip:
        raise ForbiddenAddress(f"{host} resolves to non-public address {ip}{where}")
    raise ForbiddenAddress(f"non-public address {ip}{where}")


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
            check_address(host, ip, allow, int(sockaddr[1]))
        except ForbiddenAddress as exc:
            if destination is not None:
                destination.refused.append(str(exc))
            raise
        return socket.socket(family, type_, proto)

    return make
