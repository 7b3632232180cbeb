"""Traffic control through the API: destination countries (service-wide and per client, single
sends and batches item by item), costly number types, and quotas per client in Redis (429 with
Retry-After and RateLimit headers, idempotent replays not counted, quota given back for what is
not stored, Redis down)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httpx
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from app.db.models import OptOut
from app.db.session import SessionFactory
from app.kernel.settings import TrafficSettings
from tests.api.test_send import assert_problem, message_count, send
from tests.conftest import World, make_settings
from tests.queueing import queued_message_ids

pytestmark = pytest.mark.network_guard

US = "+14155550123"
FR = "+33612345678"  # a French mobile
GB = "+447400123456"  # a UK mobile
CA = "+16135550123"
PERSONAL = "+447011123456"  # a UK personal (call-forwarding) number
BATCH = "/v1/messages/batch"


async def set_traffic(
    api: httpx.AsyncClient, world: World, client: str = "shop", **rules: Any
) -> httpx.Response:
    return await api.put(
        f"/v1/clients/{client}/traffic", json=rules, headers=world.auth(world.admin_key)
    )


async def batch(api: httpx.AsyncClient, world: World, messages: list[Any]) -> httpx.Response:
    return await api.post(BATCH, json={"messages": messages}, headers=world.auth())


async def away_from_window_edge(window: int, margin: float = 3.0) -> None:
    """Wait until the current fixed window has at least `margin` seconds left, so a test's
    requests all fall in one window."""
    left = window - time.time() % window
    if left < margin:
        await asyncio.sleep(left + 0.1)


# ---- Destination permissions -------------------------------------------------------------


async def test_a_country_off_the_service_list_is_refused_naming_it_and_nothing_is_stored(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    response = await send(api, world, to=GB)

    assert_problem(response, 403, "destination_not_permitted", field="to")
    assert "GB" in response.json()["detail"]
    assert await message_count(session_factory) == 0
    assert await queued_message_ids(redis) == []
    # The default list: US, CA and FR are permitted.
    for to in (US, CA, FR):
        accepted = await send(api, world, to=to)
        assert accepted.status_code == 202, accepted.text
    assert await message_count(session_factory) == 3


async def test_the_recipients_country_decides_not_the_senders(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    assert (await set_traffic(api, world, permitted_countries=["US", "CA"])).status_code == 200

    # A French number from the shop's US long code (+14155550100), France not permitted.
    refused = await send(api, world, to=FR, **{"from": "+14155550100"})
    assert_problem(refused, 403, "destination_not_permitted", field="to")
    assert "FR" in refused.json()["detail"]
    # ... and from the alphanumeric sender too; a US number from the same sender goes.
    assert_problem(
        await send(api, world, to=FR, **{"from": "ACME"}), 403, "destination_not_permitted"
    )
    assert (await send(api, world, to=US, **{"from": "+14155550100"})).status_code == 202
    assert await message_count(session_factory) == 1


async def test_a_clients_narrower_list_applies_to_it_only(
    api: httpx.AsyncClient, world: World
) -> None:
    response = await set_traffic(api, world, permitted_countries=["fr"])
    assert response.status_code == 200, response.text
    assert response.json()["effective_countries"] == ["FR"]
    assert response.json()["permitted_countries"] == ["FR"]

    assert_problem(await send(api, world, to=US), 403, "destination_not_permitted")
    assert (await send(api, world, to=FR)).status_code == 202
    other = await api.post(
        "/v1/messages",
        json={"to": US, "body": "hi", "from": "+14155550100"},
        headers=world.auth(world.other_client_key),
    )
    assert other.status_code == 202, other.text

    # Back to the service's list.
    assert (await set_traffic(api, world)).json()["effective_countries"] == ["CA", "FR", "US"]
    assert (await send(api, world, to=US)).status_code == 202


async def test_a_clients_list_cannot_widen_the_services_and_only_admins_set_it(
    api: httpx.AsyncClient, world: World
) -> None:
    wider = await set_traffic(api, world, permitted_countries=["FR", "GB"])
    assert_problem(wider, 422, "country_not_permitted_by_service", field="permitted_countries")
    assert "GB" in wider.json()["detail"]
    assert_problem(
        await set_traffic(api, world, permitted_countries=["FRA"]), 422, "validation_error"
    )
    not_admin = await api.put(
        "/v1/clients/shop/traffic", json={"permitted_countries": ["FR"]}, headers=world.auth()
    )
    assert_problem(not_admin, 403, "admin_key_required")
    assert_problem(await set_traffic(api, world, client="nobody"), 404, "client_not_found")
    read = await api.get("/v1/clients/shop/traffic", headers=world.auth(world.admin_key))
    assert read.json()["permitted_countries"] is None  # nothing was stored
    assert read.json()["effective_limits"]["messages_per_minute"] == 0


async def test_a_batch_is_judged_country_by_country(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await set_traffic(api, world, permitted_countries=["US"])
    body = "Your order #1042 has shipped."
    response = await batch(
        api, world, [{"to": US, "body": body}, {"to": GB, "body": body}, {"to": FR, "body": body}]
    )

    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["accepted"], result["rejected"]) == (1, 2)
    assert [entry["status"] for entry in result["data"]] == ["accepted", "rejected", "rejected"]
    for entry, country in zip(result["data"][1:], ("GB", "FR"), strict=True):
        assert entry["error"]["code"] == "destination_not_permitted"
        assert entry["error"]["status"] == 403
        assert country in entry["error"]["detail"]
        assert entry["error"]["errors"][0]["field"] == "to"
    assert await message_count(session_factory) == 1


async def test_personal_numbers_are_refused_unless_allowed(
    app_factory: Callable[..., Any], world: World
) -> None:
    permitting_gb = TrafficSettings(permitted_countries=["US", "GB"])
    async with app_factory(traffic=permitting_gb) as api:
        refused = await send(api, world, to=PERSONAL)
        assert_problem(refused, 403, "number_type_not_permitted", field="to")
        assert (await send(api, world, to=GB)).status_code == 202  # a UK mobile is fine
    allowing = TrafficSettings(permitted_countries=["US", "GB"], allow_personal_numbers=True)
    async with app_factory(traffic=allowing) as api:
        assert (await send(api, world, to=PERSONAL)).status_code == 202


# ---- Quotas and rate limits ----------------------------------------------------------------


async def test_over_the_per_minute_limit_is_429_with_retry_after_and_ratelimit_headers(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await set_traffic(api, world, messages_per_minute=3)
    await away_from_window_edge(60)

    accepted = [await send(api, world) for _ in range(3)]
    refused = await send(api, world)

    assert [r.status_code for r in accepted] == [202, 202, 202]
    assert accepted[0].headers["RateLimit-Policy"] == '"messages-minute";q=3;w=60'
    assert accepted[0].headers["RateLimit"].startswith('"messages-minute";r=2;t=')
    assert_problem(refused, 429, "rate_limited")
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert refused.headers["RateLimit-Policy"] == '"messages-minute";q=3;w=60'
    assert refused.headers["RateLimit"] == f'"messages-minute";r=0;t={retry_after}'
    assert await message_count(session_factory) == 3
    # Another client is not affected.
    other = await api.post(
        "/v1/messages",
        json={"to": US, "body": "hi", "from": "+14155550100"},
        headers=world.auth(world.other_client_key),
    )
    assert other.status_code == 202 and "RateLimit" not in other.headers


async def test_over_the_daily_quota_is_quota_exceeded(
    app_factory: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    # The service's default applies to every client without limits of its own.
    async with app_factory(traffic=TrafficSettings(messages_per_day=2)) as api:
        await away_from_window_edge(86400)
        assert [(await send(api, world)).status_code for _ in range(2)] == [202, 202]
        refused = await send(api, world)
    assert_problem(refused, 429, "quota_exceeded")
    assert int(refused.headers["Retry-After"]) <= 86400
    assert '"messages-day";q=2;w=86400' in refused.headers["RateLimit-Policy"]
    assert await message_count(session_factory) == 2


async def test_a_batch_is_judged_against_the_segments_limit_item_by_item(
    app_factory: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    two_segments = "x" * 200  # GSM-7: 2 segments
    async with app_factory(max_segments=3) as api:  # a limit of 3 fits the longest message
        assert (await set_traffic(api, world, segments_per_minute=3)).status_code == 200
        await away_from_window_edge(60)
        response = await batch(
            api,
            world,
            [
                {"to": US, "body": two_segments},
                {"to": US, "body": two_segments},
                {"to": US, "body": "x"},
            ],
        )

    assert response.status_code == 200, response.text
    result = response.json()
    assert [entry["status"] for entry in result["data"]] == ["accepted", "rejected", "accepted"]
    assert result["data"][1]["error"]["code"] == "rate_limited"
    assert result["data"][1]["error"]["status"] == 429
    assert response.headers["RateLimit"].startswith('"segments-minute";r=0;')
    assert await message_count(session_factory) == 2


@pytest.mark.parametrize("field", ["segments_per_minute", "segments_per_day"])
async def test_a_segment_limit_no_message_of_max_segments_could_meet_is_refused(
    api: httpx.AsyncClient, world: World, field: str
) -> None:
    """MAX_SEGMENTS is 10: a limit of 9 would refuse every 10-segment message forever."""
    assert (await set_traffic(api, world, messages_per_minute=5)).status_code == 200

    refused = await set_traffic(api, world, "shop", **{field: 9})

    assert_problem(refused, 422, "limit_below_max_segments", field=field)
    assert "MAX_SEGMENTS" in refused.json()["detail"]
    # Nothing changed.
    rules = await api.get("/v1/clients/shop/traffic", headers=world.auth(world.admin_key))
    assert rules.json()["messages_per_minute"] == 5
    assert rules.json()[field] is None
    # The longest message's segments, and 0 (unlimited), are limits a message can meet.
    for value in (10, 0):
        accepted = await set_traffic(api, world, "shop", **{field: value})
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()[field] == value


@pytest.mark.parametrize("field", ["segments_per_minute", "segments_per_day"])
def test_the_service_refuses_to_start_with_a_segment_limit_below_max_segments(field: str) -> None:
    with pytest.raises(
        ValidationError, match=f"TRAFFIC__{field.upper()}=4 is below MAX_SEGMENTS=5"
    ):
        make_settings(max_segments=5, traffic=TrafficSettings(**{field: 4}))
    assert (
        getattr(make_settings(max_segments=5, traffic=TrafficSettings(**{field: 5})).traffic, field)
        == 5
    )


async def test_an_idempotent_replay_does_not_count_twice(
    api: httpx.AsyncClient, world: World, redis: Redis
) -> None:
    await set_traffic(api, world, messages_per_minute=2)
    await away_from_window_edge(60)
    headers = {**world.auth(), "Idempotency-Key": "order-1042"}
    body = {"to": US, "body": "Your order #1042 has shipped."}

    first = await api.post("/v1/messages", json=body, headers=headers)
    replays = [await api.post("/v1/messages", json=body, headers=headers) for _ in range(3)]
    second = await send(api, world)
    third = await send(api, world)

    assert first.status_code == 202
    assert all(r.status_code == 202 and r.headers["Idempotent-Replayed"] == "true" for r in replays)
    assert second.status_code == 202, second.text
    assert_problem(third, 429, "rate_limited")
    # A replay is answered even when the client is at its limit.
    late = await api.post("/v1/messages", json=body, headers=headers)
    assert late.status_code == 202 and late.headers["Idempotent-Replayed"] == "true"
    (key,) = await redis.keys("traffic:*minute*")
    assert await cast(Awaitable[list[bytes]], redis.hmget(key, ["m", "s"])) == [b"2", b"2"]


async def test_a_message_refused_for_an_opt_out_gives_its_quota_back(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await set_traffic(api, world, messages_per_minute=1)
    await away_from_window_edge(60)
    async with session_factory.begin() as session:
        session.add(OptOut(phone=US, sender_id=None, action="opt_out", source="api"))

    assert_problem(await send(api, world, to=US), 403, "recipient_opted_out")
    assert (await send(api, world, to=CA)).status_code == 202
    assert_problem(await send(api, world, to=FR), 429, "rate_limited")


async def test_with_redis_down_sends_are_accepted_unchecked_by_default(
    app_factory: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    down = "redis://127.0.0.1:1/0"  # nothing listens there
    limits = TrafficSettings(messages_per_minute=1)
    async with app_factory(redis_url=down, traffic=limits) as api:
        responses = [await send(api, world) for _ in range(3)]
    assert [r.status_code for r in responses] == [202, 202, 202]
    assert "RateLimit" not in responses[0].headers
    assert await message_count(session_factory) == 3


async def test_with_redis_down_and_fail_closed_sends_are_refused_and_nothing_stored(
    app_factory: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    down = "redis://127.0.0.1:1/0"
    limits = TrafficSettings(messages_per_minute=1, quota_fail_open=False)
    async with app_factory(redis_url=down, traffic=limits) as api:
        single = await send(api, world)
        many = await batch(api, world, [{"to": US, "body": "a"}, {"to": GB, "body": "b"}])
    assert_problem(single, 503, "quota_unavailable")
    assert single.headers["Retry-After"] == "5"
    codes = [entry["error"]["code"] for entry in many.json()["data"]]
    assert codes == ["quota_unavailable", "destination_not_permitted"]
    assert await message_count(session_factory) == 0
