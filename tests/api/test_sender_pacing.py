"""A sender's rate and fallback provider through /v1/senders."""

from __future__ import annotations

import httpx
import pytest

from app.db.session import SessionFactory
from tests.api.test_send import assert_problem
from tests.api.test_senders import create, load_sender
from tests.conftest import World


@pytest.mark.parametrize(
    ("address", "kind", "rate"),
    [
        ("+14155550142", "long_code", 1.0),
        ("+18885550142", "long_code", 3.0),  # toll-free
        ("54321", "short_code", 100.0),
        ("SHOP", "alphanumeric", 10.0),
    ],
)
async def test_a_new_sender_gets_its_kinds_rate(
    api: httpx.AsyncClient, world: World, address: str, kind: str, rate: float
) -> None:
    response = await create(api, world, address=address, kind=kind, provider="twilio")

    assert response.status_code == 201, response.text
    assert (response.json()["rate_per_second"], response.json()["fallback_provider"]) == (
        rate,
        None,
    )


async def test_rate_and_fallback_are_set_kept_and_removed(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    created = await create(
        api,
        world,
        address="SHOP",
        kind="alphanumeric",
        provider="twilio",
        rate_per_second=25,
        fallback_provider="vonage",
    )
    sender_id = created.json()["id"]
    url = f"/v1/senders/{sender_id}"
    auth = world.auth(world.admin_key)

    kept = await api.patch(url, json={"rate_per_second": 5.5}, headers=auth)
    removed = await api.patch(url, json={"fallback_provider": None}, headers=auth)

    assert (created.json()["rate_per_second"], created.json()["fallback_provider"]) == (
        25.0,
        "vonage",
    )
    assert (kept.json()["rate_per_second"], kept.json()["fallback_provider"]) == (5.5, "vonage")
    assert removed.json()["fallback_provider"] is None
    stored = await load_sender(session_factory, sender_id)
    assert (stored.rate_per_second, stored.fallback_provider) == (5.5, None)


@pytest.mark.parametrize(
    "body",
    [
        {"provider": "twilio", "fallback_provider": "twilio"},
        {"provider": "twilio", "rate_per_second": 0},
        {"provider": "twilio", "rate_per_second": 20000},
    ],
)
async def test_impossible_settings_are_refused(
    api: httpx.AsyncClient, world: World, body: dict[str, object]
) -> None:
    response = await create(api, world, address="SHOP", kind="alphanumeric", **body)

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] in {"fallback_provider", "rate_per_second"}


async def test_a_provider_change_cannot_make_it_its_own_fallback(
    api: httpx.AsyncClient, world: World
) -> None:
    created = await create(
        api, world, address="SHOP", kind="alphanumeric", provider="twilio", fallback_provider="fake"
    )

    response = await api.patch(
        f"/v1/senders/{created.json()['id']}",
        json={"provider": "fake"},
        headers=world.auth(world.admin_key),
    )

    assert_problem(response, 422, "invalid_sender")
