"""Destination checks (SSRF): which URLs and addresses events may be sent to. No network: names
are resolved by a fake resolver, or by the system only where /etc/hosts or numeric parsing
answers (localhost, 2130706433)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from app.events.destinations import (
    DestinationRefused,
    IPAddress,
    Resolver,
    check_destination,
    refusal_reason,
    resolve_destination,
    system_resolver,
)
from app.kernel.errors import ValidationFailed
from app.kernel.settings import EventsSettings

STRICT = EventsSettings()  # production defaults: https only, no network allowed

# Every refused class, with an address at each end of its range where it matters.
REFUSED = [
    ("127.0.0.1", "a loopback address"),
    ("127.255.255.254", "a loopback address"),
    ("::1", "a loopback address"),
    ("10.0.0.1", "a private address"),
    ("10.255.255.255", "a private address"),
    ("172.16.0.1", "a private address"),
    ("172.31.255.254", "a private address"),
    ("192.168.0.1", "a private address"),
    ("192.168.255.254", "a private address"),
    ("169.254.169.254", "a link-local address (cloud metadata lives there)"),
    ("169.254.0.1", "a link-local address (cloud metadata lives there)"),
    ("fe80::1", "a link-local address (cloud metadata lives there)"),
    ("fc00::1", "a unique local address"),
    ("fdff:ffff::1", "a unique local address"),
    ("100.64.0.1", "a carrier-grade NAT address"),
    ("0.0.0.0", "an unspecified address"),
    ("::", "an unspecified address"),
    ("224.0.0.1", "a multicast address"),
    ("ff02::1", "a multicast address"),
    ("240.0.0.1", "a reserved address"),
    ("192.0.2.10", "not a public address"),  # documentation range
    # IPv4 wrapped in IPv6 is judged by the IPv4 address it carries.
    ("::ffff:127.0.0.1", "a loopback address"),
    ("::ffff:10.1.1.1", "a private address"),
    ("::ffff:169.254.169.254", "a link-local address (cloud metadata lives there)"),
    ("64:ff9b::a9fe:a9fe", "a link-local address (cloud metadata lives there)"),  # NAT64
    ("2002:7f00:1::1", "a loopback address"),  # 6to4 of 127.0.0.1
    # Forms some networks translate to IPv4 internally (found in review).
    ("::127.0.0.1", "an IPv6 address that embeds or translates to another address"),
    ("::ffff:0:127.0.0.1", "an IPv6 address that embeds or translates to another address"),
    ("64:ff9b:1::a00:1", "an IPv6 address that embeds or translates to another address"),
    ("fec0::1", "an IPv6 address that embeds or translates to another address"),
    (
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "an IPv6 address that embeds or translates to another address",
    ),
]
PUBLIC = ["93.184.215.14", "8.8.8.8", "172.32.0.1", "192.169.0.1", "2606:4700::1111"]


def resolver_of(*addresses: str) -> Resolver:
    async def resolve(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address(address) for address in addresses]

    return resolve


async def no_dns(host: str, port: int) -> list[IPAddress]:
    raise AssertionError(f"an address literal needs no lookup ({host})")


def literal_url(address: str, scheme: str = "https") -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}/events"


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_each_refused_class_is_named(address: str, reason: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", [*PUBLIC, "::ffff:93.184.215.14", "2002:5db8:d70e::1"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(("address", "reason"), REFUSED)
async def test_an_address_literal_is_refused(address: str, reason: str) -> None:
    with pytest.raises(DestinationRefused) as refused:
        await resolve_destination(literal_url(address), STRICT, no_dns)

    assert refused.value.reason == f"{address} is {reason}"
    assert not refused.value.temporary


@pytest.mark.parametrize(("address", "reason"), REFUSED)
async def test_a_name_resolving_into_a_refused_class_is_refused(address: str, reason: str) -> None:
    with pytest.raises(DestinationRefused) as refused:
        await resolve_destination("https://hooks.example.test/", STRICT, resolver_of(address))

    shown = ipaddress.ip_address(address)  # as Python writes it: ::ffff:7f00:1
    assert refused.value.reason == f"hooks.example.test resolves to {shown}, which is {reason}"


async def test_a_name_is_refused_if_any_of_its_addresses_is() -> None:
    resolver = resolver_of("93.184.215.14", "2606:4700::1111", "192.168.1.20")

    with pytest.raises(DestinationRefused, match=r"192\.168\.1\.20"):
        await resolve_destination("https://hooks.example.test/", STRICT, resolver)


async def test_a_public_destination_is_pinned_to_its_checked_address() -> None:
    destination = await resolve_destination(
        "https://hooks.example.test:8443/sms?x=1", STRICT, resolver_of("93.184.215.14")
    )

    url, headers, extensions = destination.pinned()
    assert str(url) == "https://93.184.215.14:8443/sms?x=1"
    assert headers == {"Host": "hooks.example.test:8443"}
    assert extensions == {"sni_hostname": "hooks.example.test"}  # TLS checks the name


async def test_an_ipv6_destination_is_pinned_in_brackets() -> None:
    destination = await resolve_destination(
        "https://v6.example.test/", STRICT, resolver_of("2606:4700::1111")
    )

    assert str(destination.pinned()[0]) == "https://[2606:4700::1111]/"


async def test_allowed_networks_let_a_local_receiver_through_and_nothing_else() -> None:
    settings = EventsSettings(allowed_networks=["127.0.0.0/8", "::1/128"])

    await resolve_destination("https://127.0.0.1:9000/", settings, no_dns)
    await resolve_destination("https://[::1]:9000/", settings, no_dns)
    with pytest.raises(DestinationRefused, match="private"):
        await resolve_destination("https://10.0.0.1/", settings, no_dns)
    with pytest.raises(DestinationRefused, match="link-local"):
        await resolve_destination("https://169.254.169.254/", settings, no_dns)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://93.184.215.14/events", "must use https"),
        ("ftp://93.184.215.14/events", "must be an https URL"),
        ("https://user:secret@93.184.215.14/", "must not contain credentials"),
        ("https:///events", "has no host"),
        ("https://[::1/", "not a valid URL"),
    ],
)
async def test_urls_of_the_wrong_form_are_refused(url: str, reason: str) -> None:
    with pytest.raises(DestinationRefused) as refused:
        await resolve_destination(url, STRICT, no_dns)

    assert reason in refused.value.reason


async def test_http_is_allowed_only_when_configured() -> None:
    await resolve_destination("http://93.184.215.14/", EventsSettings(allow_http=True), no_dns)


@pytest.mark.parametrize("host", ["localhost", "2130706433", "0x7f.1", "127.1"])
async def test_other_spellings_of_loopback_are_caught_after_resolution(host: str) -> None:
    # The system resolver answers these from /etc/hosts or by parsing the number: no network.
    with pytest.raises(DestinationRefused, match="loopback"):
        await resolve_destination(f"https://{host}/", STRICT, system_resolver)


async def test_at_the_api_edge_a_refusal_is_a_422_naming_the_field() -> None:
    with pytest.raises(ValidationFailed) as failed:
        await check_destination("https://10.0.0.1/", STRICT, field="callback_url")

    assert failed.value.code == "destination_refused"
    assert failed.value.errors is not None
    assert failed.value.errors[0].field == "callback_url"
    assert failed.value.errors[0].reason == "10.0.0.1 is a private address"


async def test_a_name_that_does_not_exist_is_refused_but_a_dns_hiccup_is_not() -> None:
    async def missing(host: str, port: int) -> list[IPAddress]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def hiccup(host: str, port: int) -> list[IPAddress]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    with pytest.raises(ValidationFailed, match="cannot be resolved"):
        await check_destination("https://nope.example.test/", STRICT, field="url", resolver=missing)
    # Every attempt checks again, so a lookup that fails only now does not refuse a send.
    await check_destination("https://slow.example.test/", STRICT, field="url", resolver=hiccup)


async def test_a_lookup_that_hangs_is_given_up_as_temporary() -> None:
    async def slow(host: str, port: int) -> list[IPAddress]:
        await asyncio.sleep(10)
        return []

    settings = EventsSettings(connect_timeout_seconds=0.05)
    with pytest.raises(DestinationRefused) as refused:
        await resolve_destination("https://slow.example.test/", settings, slow)

    assert refused.value.temporary
