"""Which URLs the fetcher may reach: http(s) only, and no private, loopback or link-local address.

A crawler that follows links from the open web must not become a way into the network it
runs in (cloud metadata at 169.254.169.254, a database on 10.x, a dashboard on localhost).
The check is made on the addresses a host *resolves to*, inside the connector's resolver,
so the address that is checked is the address that is connected to (no DNS-rebinding
gap). IP literals skip aiohttp's resolver, so `check_literal` covers them before the
request. Hosts on the allow-list (a name, an address or a network such as 127.0.0.0/8)
are let through: the embedded web and the tests run on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ForbiddenAddress(OSError):
    """A host resolved to an address the crawl may not reach."""


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def is_public(ip: IPAddress) -> bool:
    """True for a globally routable unicast address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
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
        return any(ip in net for net in self.networks if net.version == ip.version)


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
    raise ForbiddenAddress(f"{host} resolves to non-public address {ip}")


def check_literal(url: str, allow: AllowList) -> None:
    """Check a URL whose host is an IP literal (aiohttp does not resolve those)."""
    host = urlsplit(url).hostname or ""
    ip = _parse_ip(host)
    if ip is not None:
        check_address(host, ip, allow)


def check_host(host: str, allow: AllowList) -> None:
    """Resolve `host` now and check every address (for clients other than the fetcher's, e.g. yt-dlp)."""
    ip = _parse_ip(host)
    found = [ip] if ip is not None else [
        _parse_ip(str(sockaddr[0])) for *_, sockaddr in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)]
    for address in found:
        if address is None:
            raise ForbiddenAddress(f"{host} resolved to an unparseable address")
        check_address(host, address, allow)


def guarded_resolver(allow: AllowList):
    """An aiohttp resolver that refuses hosts resolving to any non-public, non-allowed address.

    Every address a name resolves to must pass, not only the first: otherwise a name with
    one public and one private record could be steered to the private one.
    """
    from aiohttp.resolver import DefaultResolver

    class GuardedResolver(DefaultResolver):
        async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
            results = await super().resolve(host, port, family)
            for result in results:
                ip = _parse_ip(result["host"])
                if ip is None:
                    raise ForbiddenAddress(f"{host} resolved to an unparseable address {result['host']!r}")
                check_address(host, ip, allow)
            return results

    return GuardedResolver()
