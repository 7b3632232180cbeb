"""Where events may be sent: https URLs whose every address is on the public internet.

Clients choose the URLs we POST events to, so without checks a client could make us call our own
network (the database, a cache, an admin port on localhost, the cloud metadata service at
169.254.169.254): a server-side request forgery. A destination is checked twice:

* when it is given to us (`check_destination`), so the client hears about it at once as a 422
  naming the field;
* before every attempt (`resolve_destination`), after resolving its name again, because DNS can
  change in between: a name may point at a public address when it is registered and at 127.0.0.1
  a minute later. The attempt then connects to the address that was checked, never to what a
  second lookup returns (DNS rebinding).

A name is refused if *any* of its addresses is refused (an attacker controls which one a client
library would pick). IPv4 addresses embedded in IPv6 ones (`::ffff:127.0.0.1`, 6to4, NAT64,
Teredo) are checked as the IPv4 address they carry. Networks listed in
`EVENTS__ALLOWED_NETWORKS` are allowed all the same (a developer's receiver on localhost).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from app.kernel.errors import ValidationFailed
from app.kernel.settings import EventsSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
"""Resolves (host, port) to addresses; `system_resolver` in production, a fake in tests."""

# Each refused class with the networks it covers, checked in this order (the first match names
# the reason). Anything else that is not globally routable is refused as "not public".
REFUSED_NETWORKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a loopback address", ("127.0.0.0/8", "::1/128")),
    ("a private address", ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),
    # 169.254.169.254 is the cloud metadata service (AWS, GCP, Azure, OpenStack).
    ("a link-local address (cloud metadata lives there)", ("169.254.0.0/16", "fe80::/10")),
    ("a unique local address", ("fc00::/7",)),
    ("a carrier-grade NAT address", ("100.64.0.0/10",)),
    ("an unspecified address", ("0.0.0.0/8", "::/128")),
    ("a multicast address", ("224.0.0.0/4", "ff00::/8")),
    ("a reserved address", ("240.0.0.0/4",)),
    # IPv6 forms that carry or translate to an IPv4 address some networks route internally:
    # IPv4-compatible (::a.b.c.d), SIIT (::ffff:0:a.b.c.d), local-use NAT64, Teredo, and the
    # deprecated site-local range.
    (
        "an IPv6 address that embeds or translates to another address",
        ("::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48", "2001::/32", "fec0::/10"),
    ),
)
_REFUSED: tuple[tuple[str, IPNetwork], ...] = tuple(
    (reason, ipaddress.ip_network(network))
    for reason, networks in REFUSED_NETWORKS
    for network in networks
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class DestinationRefused(Exception):
    """A URL we will not send to. `temporary` when it may work later (DNS did not answer)."""

    def __init__(self, reason: str, *, temporary: bool = False, unresolved: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.temporary = temporary
        self.unresolved = unresolved  # the name does not resolve (at all, or for now)


@dataclass(frozen=True, slots=True)
class Destination:
    """A checked URL and the addresses it may be reached at (connect to the first)."""

    url: httpx.URL
    addresses: tuple[IPAddress, ...]

    def pinned(self) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
        """The URL with the checked address as its host, the Host header the server expects, and
        the request extensions that keep TLS verifying the certificate against the name."""
        address = self.addresses[0]
        url = self.url.copy_with(host=str(address))
        host_header = self.url.netloc.decode("ascii")
        extensions = {"sni_hostname": self.url.host} if self.url.scheme == "https" else {}
        return url, {"Host": host_header}, extensions


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal_reason(address: IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """Why `address` may not be called (e.g. "a loopback address"), or None when it may."""
    candidates: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if address.ipv4_mapped is not None:
            candidates = [address.ipv4_mapped]  # ::ffff:a.b.c.d is that IPv4 address
        elif embedded is not None:
            candidates.append(embedded)  # judged as itself and as the IPv4 address it carries
    for candidate in candidates:
        if any(candidate.version == net.version and candidate in net for net in allowed):
            continue
        for reason, network in _REFUSED:
            if candidate.version == network.version and candidate in network:
                return reason
        if not candidate.is_global:
            return "not a public address"
    return None


def parse_destination_url(url: str, *, allow_http: bool) -> httpx.URL:
    """`url` parsed, if its form is acceptable (scheme, host, no credentials)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as error:
        raise DestinationRefused(f"not a valid URL: {error}") from None
    allowed_schemes = ("https", "http") if allow_http else ("https",)
    if parsed.scheme not in allowed_schemes:
        raise DestinationRefused(
            "must use https" if parsed.scheme == "http" else "must be an https URL"
        )
    if not parsed.host:
        raise DestinationRefused("has no host")
    if parsed.userinfo:
        raise DestinationRefused("must not contain credentials (sign-in details are not sent)")
    return parsed


# Webhook lookups get threads of their own: a lookup that times out keeps its thread until the
# system resolver gives up, and names whose servers never answer must not take the default
# pool's threads from everything else (database and Redis connections resolve names too).
_DNS_THREADS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook-dns")


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """The host's addresses, from the operating system's resolver."""
    infos = await asyncio.get_running_loop().run_in_executor(
        _DNS_THREADS,
        functools.partial(
            socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        ),
    )
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        # IPv6 scope ids ("fe80::1%eth0") are dropped: the address itself is what is checked.
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


async def resolve_destination(
    url: str, settings: EventsSettings, resolver: Resolver = system_resolver
) -> Destination:
    """Check `url` and resolve it to the addresses an attempt may connect to.

    Raises `DestinationRefused` for a URL of the wrong form, a name that does not resolve, or an
    address in a refused network.
    """
    parsed = parse_destination_url(url, allow_http=settings.allow_http)
    host = parsed.host
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
        literal = True
    except ValueError:
        addresses = await _resolve(resolver, host, port, settings.connect_timeout_seconds)
        literal = False
    if not addresses:
        raise DestinationRefused(f"{host} has no address")
    allowed = [ipaddress.ip_network(network) for network in settings.allowed_networks]
    for address in addresses:
        reason = refusal_reason(address, allowed)
        if reason is not None:
            shown = host if literal else f"{host} resolves to {address}, which"
            raise DestinationRefused(f"{shown} is {reason}")
    return Destination(url=parsed, addresses=tuple(addresses))


async def _resolve(resolver: Resolver, host: str, port: int, timeout: float) -> list[IPAddress]:
    try:
        async with asyncio.timeout(timeout):
            return await resolver(host, port)
    except TimeoutError:
        raise DestinationRefused(f"{host} did not resolve in time", temporary=True) from None
    except socket.gaierror as error:
        # NONAME: the name does not exist (a typo), which will not get better by itself.
        permanent = error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None))
        raise DestinationRefused(
            f"{host} cannot be resolved ({error.strerror})",
            temporary=not permanent,
            unresolved=True,
        ) from None
    except (OSError, UnicodeError) as error:
        raise DestinationRefused(f"{host} cannot be resolved ({error})", temporary=True) from None


async def check_destination(
    url: str, settings: EventsSettings, *, field: str, resolver: Resolver = system_resolver
) -> None:
    """The API edge: a 422 naming `field` unless `url` is a destination we may send to.

    A name whose DNS lookup fails only for now (no answer, a timeout) is accepted: refusing a
    send over a DNS hiccup would be worse, and every attempt checks the destination again.
    """
    try:
        await resolve_destination(url, settings, resolver)
    except DestinationRefused as refused:
        if refused.temporary:
            return
        raise ValidationFailed.for_field("destination_refused", field, refused.reason) from None
