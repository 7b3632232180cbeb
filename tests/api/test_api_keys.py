"""/v1/api-keys: list, create, revoke, rotate with an overlap, expiry; revocation in every
process within the cache time; last use recorded without a write per request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from app.access import api_keys
from app.access.auth import hash_key
from app.db.models import ApiKey, Client
from app.db.session import SessionFactory
from tests.api.test_send import assert_problem
from tests.conftest import World


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def make_key(api: httpx.AsyncClient, world: World, **body: Any) -> dict[str, Any]:
    response = await api.post(
        "/v1/api-keys", json={"client": "shop", **body}, headers=world.auth(world.admin_key)
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def works(api: httpx.AsyncClient, key: str) -> bool:
    response = await api.get("/v1/messages", headers=auth(key))
    if response.status_code == 401:
        assert response.json()["code"] == "invalid_api_key"
        return False
    assert response.status_code == 200, response.text
    return True


async def stored(session_factory: SessionFactory, raw_key: str) -> ApiKey:
    async with session_factory() as session:
        key = await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(raw_key)))
        assert key is not None
        return key


async def test_a_created_key_works_and_is_listed_without_its_secret(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    created = await make_key(api, world, name="billing backend")

    raw_key = created["key"]
    assert raw_key.startswith("sk_")
    assert await works(api, raw_key)
    listing = await api.get(
        "/v1/api-keys", params={"client": "shop"}, headers=world.auth(world.admin_key)
    )
    assert listing.status_code == 200, listing.text
    [mine] = [k for k in listing.json()["data"] if k["id"] == created["api_key"]["id"]]
    assert mine["client"] == "shop"
    assert mine["name"] == "billing backend"
    assert mine["prefix"] == raw_key[:10]
    assert (mine["admin"], mine["status"], mine["expires_at"]) == (False, "active", None)
    assert mine["last_used_at"] is not None  # the request above
    assert {k["client"] for k in listing.json()["data"]} == {"shop"}
    assert raw_key not in listing.text
    assert (await stored(session_factory, raw_key)).name == "billing backend"


async def test_a_revoked_key_stops_at_once_in_this_process(
    api: httpx.AsyncClient, world: World
) -> None:
    created = await make_key(api, world)
    assert await works(api, created["key"])  # now cached

    revoked = await api.post(
        f"/v1/api-keys/{created['api_key']['id']}/revoke", headers=world.auth(world.admin_key)
    )

    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked"
    assert not await works(api, created["key"])
    assert await works(api, world.client_key)  # other keys are untouched


async def test_a_revoked_key_stops_in_another_process_within_the_cache_time(
    app_factory: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    async with (
        app_factory() as admin_process,
        app_factory(lookup_cache_seconds=0.5) as other_process,
    ):
        created = await make_key(admin_process, world)
        assert await works(other_process, created["key"])  # cached there
        await admin_process.post(
            f"/v1/api-keys/{created['api_key']['id']}/revoke",
            headers=world.auth(world.admin_key),
        )
        await asyncio.sleep(0.6)
        assert not await works(other_process, created["key"])


async def test_rotation_keeps_the_old_key_for_the_overlap_only(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    old = await make_key(api, world, name="shop backend")
    assert await works(api, old["key"])

    rotated = await api.post(
        f"/v1/api-keys/{old['api_key']['id']}/rotate",
        json={"overlap_seconds": 3600},
        headers=world.auth(world.admin_key),
    )

    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert new["key"] != old["key"]
    assert new["api_key"]["name"] == "shop backend" and new["api_key"]["client"] == "shop"
    ends = datetime.fromisoformat(new["previous"]["expires_at"])
    assert timedelta(minutes=59) < ends - datetime.now(UTC) <= timedelta(hours=1)
    assert await works(api, old["key"]) and await works(api, new["key"])

    # The overlap ends (as if an hour passed): the old key stops, the new one goes on.
    async with session_factory.begin() as session:
        await session.execute(
            update(ApiKey)
            .where(ApiKey.key_hash == hash_key(old["key"]))
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    api_app_forgets = await api.post(  # any key change empties this process's key cache
        f"/v1/api-keys/{new['api_key']['id']}/rotate",
        json={"overlap_seconds": 3600},
        headers=world.auth(world.admin_key),
    )
    assert api_app_forgets.status_code == 201
    assert not await works(api, old["key"])
    assert await works(api, new["key"])


async def test_rotation_without_overlap_stops_the_old_key_now(
    api: httpx.AsyncClient, world: World
) -> None:
    old = await make_key(api, world)
    assert await works(api, old["key"])

    rotated = await api.post(
        f"/v1/api-keys/{old['api_key']['id']}/rotate",
        json={"overlap_seconds": 0},
        headers=world.auth(world.admin_key),
    )

    assert rotated.status_code == 201, rotated.text
    assert not await works(api, old["key"])
    assert await works(api, rotated.json()["key"])
    again = await api.post(
        f"/v1/api-keys/{old['api_key']['id']}/rotate", headers=world.auth(world.admin_key)
    )
    assert_problem(again, 409, "api_key_inactive")


async def test_an_expiry_is_checked_on_every_use_even_while_cached(
    api: httpx.AsyncClient, world: World
) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=1)
    created = await make_key(api, world, expires_at=expires.isoformat())
    assert await works(api, created["key"])  # cached for LOOKUP_CACHE_SECONDS (5 s)

    await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.1)

    assert not await works(api, created["key"])
    listing = await api.get("/v1/api-keys", headers=world.auth(world.admin_key))
    [mine] = [k for k in listing.json()["data"] if k["id"] == created["api_key"]["id"]]
    assert mine["status"] == "expired"


async def test_last_use_is_written_at_most_once_a_minute(
    app_factory: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    # No cache: every request loads its key, and still the row is written once.
    async with app_factory(lookup_cache_seconds=0) as api:
        assert await works(api, world.client_key)
        first = (await stored(session_factory, world.client_key)).last_used_at
        for _ in range(3):
            assert await works(api, world.client_key)
        again = (await stored(session_factory, world.client_key)).last_used_at

        async with session_factory.begin() as session:  # as if a minute went by
            await session.execute(
                update(ApiKey)
                .where(ApiKey.key_hash == hash_key(world.client_key))
                .values(last_used_at=datetime.now(UTC) - timedelta(minutes=2))
            )
        assert await works(api, world.client_key)
        later = (await stored(session_factory, world.client_key)).last_used_at

    assert first is not None and again == first
    assert later is not None and later > datetime.now(UTC) - timedelta(seconds=30)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"client": "x", "admin": 1}, "admin"),
        ({"client": "x", "admin": "yes"}, "admin"),
        ({"client": ""}, "client"),
        ({"client": "x", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
        ({"client": "x", "expires_at": "2099-01-01T00:00:00"}, "expires_at"),
        # Within year 9999 as written, past it in UTC: the driver cannot even encode it.
        ({"client": "x", "expires_at": "9999-12-31T23:59:59-12:00"}, "expires_at"),
        ({"client": "x", "owner": "y"}, "owner"),
    ],
)
async def test_bad_key_requests_are_422_naming_the_field(
    api: httpx.AsyncClient, world: World, body: dict[str, Any], field: str
) -> None:
    response = await api.post("/v1/api-keys", json=body, headers=world.auth(world.admin_key))

    assert_problem(response, 422, "validation_error", field=field)


@pytest.mark.parametrize("overlap", [False, True, "60", 1.5, -1, 30 * 86400 + 1])
async def test_a_rotation_overlap_must_be_an_integer_in_range(
    api: httpx.AsyncClient, world: World, overlap: Any
) -> None:
    created = await make_key(api, world)

    response = await api.post(
        f"/v1/api-keys/{created['api_key']['id']}/rotate",
        json={"overlap_seconds": overlap},
        headers=world.auth(world.admin_key),
    )

    assert_problem(response, 422, "validation_error", field="overlap_seconds")
    assert await works(api, created["key"])


async def test_a_rotations_expiry_past_year_9999_in_utc_is_a_422(
    api: httpx.AsyncClient, world: World
) -> None:
    created = await make_key(api, world)

    response = await api.post(
        f"/v1/api-keys/{created['api_key']['id']}/rotate",
        json={"expires_at": "9999-12-31T23:59:59-12:00"},
        headers=world.auth(world.admin_key),
    )

    assert_problem(response, 422, "validation_error", field="expires_at")
    assert await works(api, created["key"])


async def test_two_first_keys_of_a_new_client_made_at_once_share_the_client(
    session_factory: SessionFactory,
) -> None:
    """The second request waits for the first's new client and uses it (it used to fail on the
    client's unique name: a 500)."""
    async with session_factory() as first, session_factory() as second:
        await first.begin()
        await second.begin()
        await api_keys.create(first, "newco", name=None, is_admin=False, expires_at=None)
        racing = asyncio.ensure_future(
            api_keys.create(second, "newco", name=None, is_admin=False, expires_at=None)
        )
        await asyncio.sleep(0.3)
        await first.commit()
        _, key = await racing
        await second.commit()
    async with session_factory() as session:
        clients = await session.scalar(
            select(func.count()).select_from(Client).where(Client.name == "newco")
        )
    assert clients == 1 and key.client_name == "newco"


async def test_an_unknown_key_is_a_404(api: httpx.AsyncClient, world: World) -> None:
    unknown = "9d4c2a1e-6f0b-4e8a-b3c5-7d1e2f3a4b5c"
    for action in ("revoke", "rotate"):
        response = await api.post(
            f"/v1/api-keys/{unknown}/{action}", headers=world.auth(world.admin_key)
        )
        assert_problem(response, 404, "api_key_not_found")


async def test_a_nul_in_a_client_name_is_a_422_not_a_500(
    api: httpx.AsyncClient, world: World
) -> None:
    admin = world.auth(world.admin_key)

    listed = await api.get("/v1/api-keys", params={"client": "x\x00"}, headers=admin)
    granted = await api.put(f"/v1/senders/{world.fake_sender.id}/clients/x%00y", headers=admin)
    created = await api.post("/v1/api-keys", json={"client": "x\x00"}, headers=admin)

    assert_problem(listed, 422, "validation_error", field="client")
    assert_problem(granted, 422, "validation_error", field="client_name")
    assert_problem(created, 422, "validation_error", field="client")
