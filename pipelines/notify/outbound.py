"""Where mallwatt may send HTTP: public https endpoints only, checked after DNS.

A webhook URL comes from a config file, so a wrong or hostile entry must not turn the
notifier into a probe of the machine's own network (cloud metadata at 169.254.169.254,
the warehouse endpoint on 127.0.0.1, private services). The rules:

* https only; plain http only with `allow_loopback_http` (tests) and then only to a
  loopback host;
* no credentials in the URL (they would end up in logs and dead letters);
* every address the host resolves to must be public (`ipaddress.is_global`): private,
  shared (100.64/10), link-local (169.254/16, fe80::/10), unique-local (fc00::/7),
  loopback, multicast, reserved and unspecified addresses are refused, also when hidden
  in an IPv4-mapped, 6to4, Teredo or NAT64 IPv6 address; loopback passes only with the
  test flag. One bad address refuses the host (no "use the good one");
* the connection goes to the addresses that were checked (an aiohttp resolver), so a
  second DNS answer cannot swap in another address between check and connect.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

MIN_SECRET_BYTES = 32
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})
NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Lookup = Callable[[str, int], Awaitable[list[tuple[int, str]]]]  # -> [(family, ip)]


class OutboundRefused(ValueError):
    """A destination or secret the notifier will not use; the message says why."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int


def check_secret(secret: bytes, what: str = "webhook secret") -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise OutboundRefused(f"{what} has {len(secret)} bytes; at least {MIN_SECRET_BYTES} are required "
                              "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return secret


def _translated_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a mapped (::ffff:a.b.c.d) or NAT64 address really reaches."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _tunnelled_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    out = [ip.sixtofour] if ip.sixtofour is not None else []
    return out + list(ip.teredo or ())


def address_problem(ip: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why `ip` may not be contacted, or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return f"{ip} is scoped (link-local)"
        inner = _translated_v4(ip)
        if inner is not None:  # judged by the IPv4 address it reaches
            problem = address_problem(inner, allow_loopback=allow_loopback)
            return f"{ip} reaches {problem}" if problem else None
        for tunnelled in _tunnelled_v4(ip):
            problem = address_problem(tunnelled, allow_loopback=allow_loopback)
            if problem:
                return f"{ip} embeds {problem}"
    if ip.is_loopback:
        return None if allow_loopback else f"{ip} is loopback"
    if ip.is_link_local:
        return f"{ip} is link-local (cloud metadata lives at 169.254.169.254)"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return f"{ip} is not a unicast address"
    if ip.is_private or not ip.is_global:
        return f"{ip} is private or not publicly routable"
    return None


def check_addresses(host: str, addresses: list[IPAddress], *, allow_loopback: bool = False) -> None:
    if not addresses:
        raise OutboundRefused(f"{host} resolves to no address")
    for ip in addresses:
        problem = address_problem(ip, allow_loopback=allow_loopback)
        if problem:
            raise OutboundRefused(f"{host}: {problem}; refusing to send there")


def check_url(url: str, *, allow_loopback_http: bool = False) -> Target:
    """Static checks of a destination URL (scheme, credentials, literal addresses)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise OutboundRefused(f"bad URL: {exc}") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if parts.username is not None or parts.password is not None:
        raise OutboundRefused("credentials in the URL are refused (they would be logged); use the signing secret")
    if not host:
        raise OutboundRefused("the URL has no host")
    literal: IPAddress | None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    loopback_host = host in LOOPBACK_NAMES or (literal is not None and literal.is_loopback)
    if scheme == "http":
        if not allow_loopback_http:
            raise OutboundRefused("plain http is refused; use https (http is for loopback tests only)")
        if not loopback_host:
            raise OutboundRefused(f"plain http is allowed only to a loopback host in tests, not {host}")
    elif scheme != "https":
        raise OutboundRefused(f"scheme {scheme or '(none)'!r} is refused; use https")
    if literal is not None:
        check_addresses(host, [literal], allow_loopback=allow_loopback_http)
    elif host in LOOPBACK_NAMES and not allow_loopback_http:
        raise OutboundRefused(f"{host} is loopback; refusing to send there")
    return Target(scheme, host, port or (443 if scheme == "https" else 80))


async def system_lookup(host: str, port: int) -> list[tuple[int, str]]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, str(sockaddr[0])) for family, _, _, _, sockaddr in infos]


class CheckedResolver(AbstractResolver):
    """aiohttp resolver that hands out only addresses passing `check_addresses`."""

    def __init__(self, *, allow_loopback: bool = False, lookup: Lookup = system_lookup) -> None:
        self.allow_loopback = allow_loopback
        self.lookup = lookup

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self.lookup(host, port)
        addresses = [ipaddress.ip_address(ip.split("%", 1)[0]) for _, ip in found]
        check_addresses(host, addresses, allow_loopback=self.allow_loopback)
        wanted = [(fam, ip) for fam, ip in found if family in (0, socket.AF_UNSPEC) or fam == family]
        return [ResolveResult(hostname=host, host=ip, port=port, family=fam, proto=0,
                              flags=socket.AI_NUMERICHOST) for fam, ip in wanted]

    async def close(self) -> None:
        return None


def checked_session(timeout: aiohttp.ClientTimeout, *, allow_loopback: bool = False,
                    lookup: Lookup = system_lookup) -> aiohttp.ClientSession:
    """The session every outbound provider uses: connections only to checked addresses
    (our resolver), no proxies from the environment (they would resolve for us). Callers
    pass allow_redirects=False on each request."""
    connector = aiohttp.TCPConnector(resolver=CheckedResolver(allow_loopback=allow_loopback, lookup=lookup),
                                     use_dns_cache=False)
    return aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False)


def describe(target: Any) -> str:
    """For messages: scheme://host:port, never a path or query (they may carry tokens)."""
    return f"{target.scheme}://{target.host}:{target.port}"
