"""The SMS pumping alarm through the HTTP API on real PostgreSQL and Redis: a synthetic pumping
burst (many sequential numbers of one range) sets it off, the same volume spread over realistic
numbers does not, in both actions; held messages wait for an admin's release or cancel; Redis
down does not stop sends (fail-open)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
import pytest
from arq import create_pool
from arq.connections import RedisSettings
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.exceptions import ReadOnlyError, ResponseError
from sqlalchemy import func, select, update

from app.db.models import Message, WebhookEndpoint
from app.db.session import SessionFactory
from app.delivery.transitions import promote_scheduled
from app.kernel.outages import REDIS
from app.kernel.phone import InvalidPhoneNumber, normalize_phone
from app.kernel.settings import PumpingSettings
from app.traffic.velocity import (
    ALERT_BUFFER_LIMIT,
    KEY_PREFIX,
    VelocityCheck,
    keep_per_window,
    number_range,
)
from app.twilio_api.vocabulary import issue_credentials
from app.worker.tasks import retention
from tests.conftest import TEST_REDIS_URL, World, make_settings
from tests.queueing import push_ids, queued_message_ids
from tests.test_end_to_end import run_worker

pytestmark = pytest.mark.network_guard

BATCH = "/v1/messages/batch"
FAKE_SENDER = "+14155550199"  # the fake provider delivers at once, no HTTP to mock


def pumping_burst(count: int = 200) -> list[str]:
    """What a bot filling a sign-up form sends to: consecutive numbers of one mobile range."""
    return [f"+336123{index:05d}" for index in range(count)]


# Area codes of large US cities, Canadian ones and French mobile prefixes: a client's real
# sign-ups come from everywhere.
_US_CA_AREA_CODES = [
    "212", "213", "305", "312", "404", "415", "512", "617", "702", "206",
    "303", "214", "602", "713", "818", "646", "347", "503", "612", "919",
    "416", "514", "604", "403", "613",
]  # fmt: skip


def normal_mix(count: int = 200, seed: int = 7) -> list[str]:
    """The same volume spread as real traffic is: varied countries, area codes, exchanges."""
    rng = random.Random(seed)
    numbers: set[str] = set()
    while len(numbers) < count:
        if rng.random() < 0.75:
            area = rng.choice(_US_CA_AREA_CODES)
            candidate = f"+1{area}{rng.randint(200, 989)}{rng.randint(1000, 9999)}"
        else:
            candidate = f"+33{rng.choice('67')}{rng.randint(10_000_000, 99_999_999)}"
        try:  # only numbers the API takes (some ranges are not assigned)
            numbers.add(normalize_phone(candidate, "US"))
        except InvalidPhoneNumber:
            continue
    return sorted(numbers, key=lambda _: rng.random())


async def send_in_batches(
    api: httpx.AsyncClient, world: World, numbers: list[str], size: int = 20, **extra: Any
) -> list[dict[str, Any]]:
    """Send to `numbers` in batches (a bot posts request after request); every message's
    result, in order (`extra`: more fields of every message)."""
    results: list[dict[str, Any]] = []
    for start in range(0, len(numbers), size):
        messages = [
            {"to": to, "from": FAKE_SENDER, "body": "Your code is 482913", **extra}
            for to in numbers[start : start + size]
        ]
        response = await api.post(BATCH, json={"messages": messages}, headers=world.auth())
        assert response.status_code == 200, response.text
        for item in response.json()["data"]:
            assert item["status"] == "accepted", item
            results.append(item["message"])
        await counted(api)  # as if the requests were further apart than the alarm's linger
    return results


async def counted(api: httpx.AsyncClient) -> None:
    """Wait for the alarm's counts: with `alert` a request's numbers are counted after it
    answered, with those of the requests around it (app.traffic.velocity)."""
    app = api._transport.app  # type: ignore[attr-defined]
    await app.state.acceptor.velocity.flush()


async def hget(redis: Redis, key: str, name: str) -> bytes | None:
    return await cast(Awaitable[bytes | None], redis.hget(key, name))


async def hset(redis: Redis, key: str, mapping: dict[str, Any]) -> None:
    await cast(Awaitable[int], redis.hset(key, mapping=mapping))


def suspected(action: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "smsgate_pumping_suspected_total", {"country_code": "33", "action": action}
        )
        or 0.0
    )


async def add_default_endpoint(session_factory: SessionFactory, world: World) -> None:
    async with session_factory.begin() as session:
        session.add(
            WebhookEndpoint(
                client_id=world.client_id, url="https://hooks.example.com/sms", is_default=True
            )
        )


async def pumping_events(api: httpx.AsyncClient, key: str) -> list[dict[str, Any]]:
    response = await api.get(
        "/v1/events",
        params={"type": "traffic.pumping_suspected"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["data"]
    return events


@pytest.fixture(autouse=True)
def _redis_outage_cleared() -> Iterator[None]:
    """The process-wide Redis outage state starts clear (another test may have left Redis
    "down": the check is then skipped until Redis answers again) and is left clear."""
    REDIS.recovered()
    yield
    REDIS.recovered()


@pytest.fixture
def hold_api(
    app_factory: Callable[..., Any], session_factory: SessionFactory
) -> Callable[..., Any]:
    """An app whose pumping alarm holds (settings overridable)."""

    @asynccontextmanager
    async def build(**pumping: Any) -> AsyncIterator[httpx.AsyncClient]:
        async with app_factory(pumping=PumpingSettings(action="hold", **pumping)) as client:
            yield client

    return build


# ---- alert ----


async def test_alert_fires_once_on_a_pumping_burst_and_sends_everything(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await add_default_endpoint(session_factory, world)
    before = suspected("alert")
    caplog.set_level(logging.WARNING, logger="app.traffic.velocity")
    # The client's usual traffic: spread over many ranges (quiet, as the next test shows).
    await send_in_batches(api, world, normal_mix(seed=11))
    assert suspected("alert") == before

    results = await send_in_batches(api, world, pumping_burst())

    assert {message["status"] for message in results} == {"queued"}
    assert len(await queued_message_ids(redis)) == 400
    assert suspected("alert") == before + 1  # once per range and window, not per request
    alarms = [record for record in caplog.records if record.message == "sms pumping suspected"]
    assert len(alarms) == 1
    assert alarms[0].__dict__["range"] == "+33 6123"
    assert alarms[0].__dict__["distinct_numbers"] >= 50
    assert alarms[0].__dict__["client_id"] == str(world.client_id)
    (event,) = await pumping_events(api, world.client_key)
    data = event["payload"]["data"]
    assert event["payload"]["type"] == "traffic.pumping_suspected"
    assert data["range"] == "+33 6123"
    assert data["action"] == "alert"
    assert data["client_id"] == str(world.client_id)
    assert 50 <= data["distinct_numbers"] <= 60
    assert data["threshold"] == 50
    # Admins see it too; another client does not.
    assert len(await pumping_events(api, world.admin_key)) == 1
    assert await pumping_events(api, world.other_client_key) == []


async def test_alert_stays_quiet_on_a_normal_mix(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await add_default_endpoint(session_factory, world)
    before = suspected("alert")
    caplog.set_level(logging.WARNING, logger="app.traffic.velocity")

    results = await send_in_batches(api, world, normal_mix())

    assert {message["status"] for message in results} == {"queued"}
    assert suspected("alert") == before
    assert not [r for r in caplog.records if r.message == "sms pumping suspected"]
    assert await pumping_events(api, world.admin_key) == []
    # It was counted (the check ran), spread over many ranges.
    assert len(await redis.keys(f"{KEY_PREFIX}:{world.client_id}:*:s")) > 100


async def test_a_first_burst_of_sign_ups_does_not_trip_it(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    """Five sign-ups in one range within seconds: far under the minimum count."""
    await add_default_endpoint(session_factory, world)
    before = suspected("alert")

    await send_in_batches(api, world, pumping_burst(5), size=1)

    assert suspected("alert") == before
    assert await pumping_events(api, world.admin_key) == []


async def test_a_range_the_client_usually_sends_much_to_is_judged_by_its_usual_count(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    """A client that usually reaches 100 numbers a minute in the range: 200 is not 5 times it;
    1,100 is, whatever the span counted (1 to 2 windows: at most 1,000 expected)."""
    await add_default_endpoint(session_factory, world)
    state = f"{KEY_PREFIX}:{world.client_id}:+33 6123:s"
    time_now, _ = await redis.time()
    await hset(redis, state, {"bucket": int(time_now) // 60, "count": 0, "usual": "100"})

    await send_in_batches(api, world, pumping_burst(200), size=100)
    assert await pumping_events(api, world.admin_key) == []
    # Still about 100: a window's count weighs little against a day's half-life.
    assert 99 < float(await hget(redis, state, "usual") or 0) < 101

    await send_in_batches(api, world, pumping_burst(1100)[200:], size=100)
    (event,) = await pumping_events(api, world.admin_key)
    data = event["payload"]["data"]
    assert data["distinct_numbers"] > 500
    assert 500 <= data["threshold"] <= 1000
    assert data["distinct_numbers"] > data["threshold"]


async def wait_until_into_window(redis: Redis, window: int, low: float, high: float) -> int:
    """Sleep until Redis's clock is between `low` and `high` of the way into a window; its
    bucket."""
    while True:
        seconds, micros = await redis.time()
        into = (seconds % window + micros / 1e6) / window
        if low <= into < high:
            return int(seconds) // window
        await asyncio.sleep(0.05)


async def seed_steady_traffic(redis: Redis, client_id: uuid.UUID, bucket: int, count: int) -> None:
    """A usual count of 100 per window in `+33 6123`, and `count` distinct numbers there in the
    whole previous window."""
    prefix = f"{KEY_PREFIX}:{client_id}:+33 6123"
    await hset(redis, f"{prefix}:s", {"bucket": bucket, "count": 0, "usual": "100"})
    await redis.pfadd(f"{prefix}:{bucket - 1}", *pumping_burst(count))


@pytest.mark.parametrize("rate", [2.5, 3.0])
async def test_steady_traffic_below_the_multiple_does_not_fire(
    app_factory: Callable[..., Any],
    world: World,
    session_factory: SessionFactory,
    redis: Redis,
    rate: float,
) -> None:
    """Usual 100 a window, now `rate` times that, steadily: the previous window and as much
    again in the current one, 40-50% into it (the counts of two windows, compared with the
    usual count of one, fired from about 2.5 times)."""
    await add_default_endpoint(session_factory, world)
    window = 10
    bucket = await wait_until_into_window(redis, window, 0.4, 0.5)
    per_window = int(rate * 100)
    await seed_steady_traffic(redis, world.client_id, bucket, per_window)
    async with app_factory(pumping=PumpingSettings(window_seconds=window)) as api:
        numbers = pumping_burst(2 * per_window)[per_window:]
        await send_in_batches(api, world, numbers, size=100)
        assert await pumping_events(api, world.admin_key) == []
    seconds, _ = await redis.time()
    assert int(seconds) // window == bucket  # all of it in the one window


async def test_steady_traffic_above_the_multiple_fires(
    app_factory: Callable[..., Any],
    world: World,
    session_factory: SessionFactory,
    redis: Redis,
) -> None:
    """Usual 100 a window, now 5.5 times that in the previous window and in this one."""
    await add_default_endpoint(session_factory, world)
    window = 10
    bucket = await wait_until_into_window(redis, window, 0.4, 0.5)
    await seed_steady_traffic(redis, world.client_id, bucket, 550)
    async with app_factory(pumping=PumpingSettings(window_seconds=window)) as api:
        await send_in_batches(api, world, pumping_burst(1100)[550:], size=100)
        (event,) = await pumping_events(api, world.admin_key)
    data = event["payload"]["data"]
    assert data["usual"] == pytest.approx(100, abs=0.5)
    # 5 times the usual count over 1.4 to 1.5 windows (a little more once the sends take time).
    assert 700 <= data["threshold"] <= 900
    assert data["threshold"] < data["distinct_numbers"] <= 1110


async def test_the_usual_count_is_folded_in_when_a_window_ends(
    api: httpx.AsyncClient, world: World, redis: Redis
) -> None:
    state = f"{KEY_PREFIX}:{world.client_id}:+33 6123:s"
    time_now, _ = await redis.time()
    bucket = int(time_now) // 60
    # The last window seen was three windows ago, with 300 numbers; no usual count yet.
    await hset(redis, state, {"bucket": bucket - 3, "count": 300, "usual": "0"})

    await send_in_batches(api, world, pumping_burst(1), size=1)

    now_bucket = int(await hget(redis, state, "bucket") or 0)
    assert now_bucket in (bucket, bucket + 1)
    keep = keep_per_window(PumpingSettings())
    # Folded in, then decayed over the empty windows between (two, unless a window just ended).
    expected = (1 - keep) * 300 * keep ** (now_bucket - (bucket - 3) - 1)
    assert float(await hget(redis, state, "usual") or 0) == pytest.approx(expected, rel=1e-6)


# ---- hold ----


async def held_ids(session_factory: SessionFactory) -> set[str]:
    async with session_factory() as session:
        rows = await session.scalars(select(Message.id).where(Message.status == "held"))
        return {str(row) for row in rows}


async def test_hold_holds_the_burst_from_the_threshold_on(
    hold_api: Callable[..., Any],
    world: World,
    session_factory: SessionFactory,
    redis: Redis,
) -> None:
    await add_default_endpoint(session_factory, world)
    before = suspected("hold")
    async with hold_api() as api:
        results = await send_in_batches(api, world, pumping_burst())
        events = await pumping_events(api, world.client_key)
        listing = await api.get(
            "/v1/messages", params={"status": "held", "limit": 100}, headers=world.auth()
        )

    statuses = [message["status"] for message in results]
    # 20 a request: the first two requests (40 numbers) are under the minimum of 50; from the
    # third on the range is over it, and every later request's messages there are held.
    assert statuses[:40] == ["queued"] * 40
    assert statuses[60:] == ["held"] * 140
    held = {message["id"] for message in results if message["status"] == "held"}
    assert held == await held_ids(session_factory)
    assert not held & set(await queued_message_ids(redis))  # never handed to a worker
    assert suspected("hold") == before + 1
    assert len(events) == 1
    assert events[0]["payload"]["data"]["action"] == "hold"
    # The client sees them, held.
    listed = listing.json()["data"]
    assert len(listed) == 100
    assert {message["status"] for message in listed} == {"held"}


async def test_hold_holds_nothing_of_a_normal_mix(
    hold_api: Callable[..., Any], world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    async with hold_api() as api:
        results = await send_in_batches(api, world, normal_mix())

    assert {message["status"] for message in results} == {"queued"}
    assert await held_ids(session_factory) == set()
    assert len(await queued_message_ids(redis)) == 200


async def test_held_messages_are_sent_only_once_released(
    hold_api: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    async with hold_api(min_distinct=5) as api:
        results = await send_in_batches(api, world, pumping_burst(12), size=1)
        statuses = [message["status"] for message in results]
        assert statuses == ["queued"] * 4 + ["held"] * 8
        held = [message["id"] for message in results[4:]]

        await run_worker()

        assert await held_ids(session_factory) == set(held)
        for message in results[:4]:
            read = await api.get(f"/v1/messages/{message['id']}", headers=world.auth())
            assert read.json()["status"] == "delivered"

        admin = world.auth(world.admin_key)
        one = await api.post(f"/v1/held-messages/{held[0]}/release", headers=admin)
        assert one.status_code == 200, one.text
        assert one.json()["status"] == "queued"
        again = await api.post(f"/v1/held-messages/{held[0]}/release", headers=admin)
        assert again.status_code == 409
        assert again.json()["code"] == "message_not_held"

        await run_worker()

        first = (await api.get(f"/v1/messages/{held[0]}", headers=world.auth())).json()
        assert first["status"] == "delivered"
        assert [step["status"] for step in first["history"]] == [
            "held",
            "queued",
            "sending",
            "sent",
            "delivered",
        ]
        assert await held_ids(session_factory) == set(held[1:])

        bulk = await api.post("/v1/held-messages/release", json={"client": "shop"}, headers=admin)
        assert bulk.status_code == 200, bulk.text
        assert bulk.json() == {"client": "shop", "released": 7, "canceled": 0}

        await run_worker()

        for message_id in held:
            read = await api.get(f"/v1/messages/{message_id}", headers=world.auth())
            assert read.json()["status"] == "delivered"


async def test_held_messages_canceled_are_never_sent(
    hold_api: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    await add_default_endpoint(session_factory, world)
    async with hold_api(min_distinct=3) as api:
        results = await send_in_batches(api, world, pumping_burst(8), size=1)
        held = [message["id"] for message in results if message["status"] == "held"]
        assert len(held) == 6
        admin = world.auth(world.admin_key)

        refused = await api.post(f"/v1/held-messages/{held[0]}/cancel", headers=world.auth())
        assert refused.status_code == 403
        unknown = await api.post(f"/v1/held-messages/{uuid.uuid4()}/cancel", headers=admin)
        assert unknown.status_code == 404
        no_client = await api.post(
            "/v1/held-messages/cancel", json={"client": "no-such-client"}, headers=admin
        )
        assert no_client.status_code == 404
        assert no_client.json()["code"] == "client_not_found"

        one = await api.post(f"/v1/held-messages/{held[0]}/cancel", headers=admin)
        assert one.status_code == 200, one.text
        assert one.json()["status"] == "canceled"
        late = await api.post(f"/v1/held-messages/{held[0]}/release", headers=admin)
        assert late.status_code == 409
        not_held = await api.post(f"/v1/held-messages/{results[0]['id']}/cancel", headers=admin)
        assert not_held.status_code == 409
        assert "is queued" in not_held.json()["detail"]

        bulk = await api.post("/v1/held-messages/cancel", json={"client": "shop"}, headers=admin)
        assert bulk.json() == {"client": "shop", "released": 0, "canceled": 5}

        await run_worker()

        for message_id in held:
            read = (await api.get(f"/v1/messages/{message_id}", headers=world.auth())).json()
            assert read["status"] == "canceled"
            assert read["error_code"] == "canceled"
        canceled_events = await api.get(
            "/v1/events", params={"type": "message.canceled"}, headers=world.auth()
        )
        assert len(canceled_events.json()["data"]) == 6
    async with session_factory() as session:
        sent = await session.scalar(
            select(func.count()).select_from(Message).where(Message.status == "delivered")
        )
    assert sent == 2  # only the two sent before the range went over the minimum


async def test_redis_down_does_not_block_sends(
    app_factory: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    """Fail-open: with Redis unreachable the messages are accepted unjudged, and counted."""
    before = REGISTRY.get_sample_value("smsgate_pumping_unchecked_messages_total") or 0.0
    settings = PumpingSettings(action="hold", min_distinct=2)
    async with app_factory(redis_url="redis://127.0.0.1:1/0", pumping=settings) as api:
        results = await send_in_batches(api, world, pumping_burst(6), size=2)

    assert {message["status"] for message in results} == {"queued"}
    assert await held_ids(session_factory) == set()
    unchecked = REGISTRY.get_sample_value("smsgate_pumping_unchecked_messages_total") or 0.0
    assert unchecked == before + 6


@asynccontextmanager
async def silent_redis() -> AsyncIterator[str]:
    """A Redis URL whose server accepts connections, reads, and never answers (a hung Redis,
    not a refusing one)."""
    connections: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        for writer in connections:
            writer.close()
        server.close()


async def test_a_hung_redis_costs_a_send_a_short_timeout_only(
    app_factory: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    """Fail-open within `PUMPING__TIMEOUT_SECONDS` (and the feed's push within its own), not
    the sockets' timeouts: the outage is reported, the messages counted unchecked; once Redis
    is known down the check is not even tried."""
    before = REGISTRY.get_sample_value("smsgate_pumping_unchecked_messages_total") or 0.0
    settings = PumpingSettings(action="hold", min_distinct=2, timeout_seconds=0.3)
    async with silent_redis() as url, app_factory(redis_url=url, pumping=settings) as api:
        for to in ("+33612300001", "+33612300002"):
            message = {"to": to, "from": FAKE_SENDER, "body": "Your code is 482913"}
            started = time.monotonic()
            response = await api.post("/v1/messages", json=message, headers=world.auth())
            assert response.status_code == 202, response.text
            assert time.monotonic() - started < 1.0
            assert REDIS.down

    assert await held_ids(session_factory) == set()
    unchecked = REGISTRY.get_sample_value("smsgate_pumping_unchecked_messages_total") or 0.0
    assert unchecked == before + 2


async def test_off_makes_no_redis_call_and_holds_nothing(
    app_factory: Callable[..., Any], world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    async with app_factory(pumping=PumpingSettings(action="off", min_distinct=2)) as api:
        results = await send_in_batches(api, world, pumping_burst(10), size=5)

    assert {message["status"] for message in results} == {"queued"}
    assert await redis.keys(f"{KEY_PREFIX}:*") == []


def test_a_number_range_is_its_country_code_and_first_national_digits() -> None:
    assert number_range("+33612345678", 4) == "+33 6123"
    assert number_range("+14155550123", 4) == "+1 4155"
    assert number_range("+447911123456", 3) == "+44 791"
    assert number_range("+35312345678", 2) == "+353 12"


# ---- a client's own settings ----


async def test_an_admin_gives_one_client_its_own_settings(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    admin = world.auth(world.admin_key)
    path = "/v1/clients/shop/pumping"
    assert (await api.put(path, json={"action": "hold"}, headers=world.auth())).status_code == 403
    unknown = await api.put("/v1/clients/no-such-client/pumping", json={}, headers=admin)
    assert unknown.status_code == 404
    assert (await api.put(path, json={"min_distinct": 1}, headers=admin)).status_code == 422
    assert (await api.get(path, headers=admin)).json()["own"] is None

    put = await api.put(path, json={"action": "hold", "min_distinct": 5}, headers=admin)

    assert put.status_code == 200, put.text
    assert put.json()["own"] == {"action": "hold", "min_distinct": 5, "baseline_multiple": None}
    effective = put.json()["effective"]
    assert (effective["action"], effective["min_distinct"]) == ("hold", 5)
    assert effective["baseline_multiple"] == 5.0  # the service's
    assert (await api.get(path, headers=admin)).json() == put.json()
    # The client's burst is held from its fifth number; another client's, under the service's
    # settings (alert, 50), is not.
    mine = await send_in_batches(api, world, pumping_burst(8), size=1)
    assert [message["status"] for message in mine] == ["queued"] * 4 + ["held"] * 4
    other = world.auth(world.other_client_key)
    for to in pumping_burst(8):
        response = await api.post(
            "/v1/messages", json={"to": to, "from": FAKE_SENDER, "body": "x"}, headers=other
        )
        assert response.json()["status"] == "queued"

    cleared = await api.put(path, json={}, headers=admin)

    assert cleared.json()["own"] is None
    assert cleared.json()["effective"]["action"] == "alert"
    again = await send_in_batches(api, world, [f"+336123{index:05d}" for index in range(8, 10)])
    assert {message["status"] for message in again} == {"queued"}


async def test_the_twilio_compatible_api_is_judged_too_and_shows_held_as_accepted(
    app_factory: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    async with session_factory.begin() as session:
        sid, token = await issue_credentials(session, "shop")
    settings = PumpingSettings(action="hold", min_distinct=2)
    async with app_factory(pumping=settings) as api:
        statuses = []
        for to in pumping_burst(3):
            answer = await api.post(
                f"/2010-04-01/Accounts/{sid}/Messages.json",
                data={"To": to, "From": FAKE_SENDER, "Body": "Your code is 482913"},
                auth=(sid, token),
            )
            assert answer.status_code == 201, answer.text
            statuses.append(answer.json()["status"])

    assert statuses == ["queued", "accepted", "accepted"]
    assert len(await held_ids(session_factory)) == 2


async def test_one_batch_of_a_thousand_numbers_in_one_range_is_held_whole(
    hold_api: Callable[..., Any], world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    """The whole request is judged at once (its numbers counted in chunks by the script)."""
    async with hold_api() as api:
        results = await send_in_batches(api, world, pumping_burst(1000), size=1000)

    assert {message["status"] for message in results} == {"held"}
    assert len(await held_ids(session_factory)) == 1000
    assert await queued_message_ids(redis) == []


# ---- a held message's send time, a client's cancel, the admin listing, the time limit ----


async def held_burst(api: httpx.AsyncClient, world: World, **extra: Any) -> list[str]:
    """Six messages of one range, one a request, with the alarm holding from the third: the
    held ones' ids."""
    results = await send_in_batches(api, world, pumping_burst(6), size=1, **extra)
    held = [message["id"] for message in results if message["status"] == "held"]
    assert len(held) == 4
    return held


async def history_of(api: httpx.AsyncClient, world: World, message_id: str) -> list[str]:
    read = (await api.get(f"/v1/messages/{message_id}", headers=world.auth())).json()
    return [step["status"] for step in read["history"]]


async def test_a_released_message_whose_send_at_is_ahead_waits_for_it(
    hold_api: Callable[..., Any], world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    send_at = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    async with hold_api(min_distinct=3) as api:
        held = await held_burst(api, world, send_at=send_at)
        admin = world.auth(world.admin_key)
        one = await api.post(f"/v1/held-messages/{held[0]}/release", headers=admin)
        assert one.status_code == 200, one.text
        assert one.json()["status"] == "scheduled"
        bulk = await api.post("/v1/held-messages/release", json={"client": "shop"}, headers=admin)
        assert bulk.json() == {"client": "shop", "released": 3, "canceled": 0}

        assert not set(held) & set(await queued_message_ids(redis))  # on no queue
        await run_worker()
        for message_id in held:
            assert await history_of(api, world, message_id) == ["held", "scheduled"]
        assert await promote_scheduled(session_factory, 10) == []  # not before its time

        async with session_factory.begin() as session:
            await session.execute(
                update(Message)
                .where(Message.id == uuid.UUID(held[0]))
                .values(send_at=func.now() - timedelta(seconds=1))
            )
        assert await promote_scheduled(session_factory, 10) == [uuid.UUID(held[0])]
        await push_ids(redis, [held[0]])  # as the worker's scheduler hands it over
        await run_worker()
        assert (await history_of(api, world, held[0]))[:3] == ["held", "scheduled", "queued"]
        assert (await history_of(api, world, held[0]))[-1] == "delivered"


async def test_a_released_message_whose_send_at_has_come_is_sent_at_once(
    hold_api: Callable[..., Any], world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    send_at = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    async with hold_api(min_distinct=3) as api:
        held = await held_burst(api, world, send_at=send_at)
        async with session_factory.begin() as session:  # held past its send time
            await session.execute(
                update(Message)
                .where(Message.id == uuid.UUID(held[0]))
                .values(send_at=func.now() - timedelta(minutes=5))
            )
        admin = world.auth(world.admin_key)
        one = await api.post(f"/v1/held-messages/{held[0]}/release", headers=admin)

        assert one.json()["status"] == "queued"
        assert held[0] in await queued_message_ids(redis)
        await run_worker()
        assert await history_of(api, world, held[0]) == [
            "held",
            "queued",
            "sending",
            "sent",
            "delivered",
        ]


async def test_a_client_cancels_its_own_held_message(
    hold_api: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    await add_default_endpoint(session_factory, world)
    async with hold_api(min_distinct=3) as api:
        held = await held_burst(api, world)
        path = f"/v1/messages/{held[0]}/cancel"
        other = await api.post(path, headers=world.auth(world.other_client_key))
        assert other.status_code == 404

        canceled = await api.post(path, headers=world.auth())
        again = await api.post(path, headers=world.auth())
        late = await api.post(
            f"/v1/held-messages/{held[0]}/release", headers=world.auth(world.admin_key)
        )
        events = await api.get(
            "/v1/events", params={"type": "message.canceled"}, headers=world.auth()
        )
        await run_worker()
        read = (await api.get(f"/v1/messages/{held[0]}", headers=world.auth())).json()

    assert canceled.status_code == 200, canceled.text
    assert (canceled.json()["status"], canceled.json()["error_code"]) == ("canceled", "canceled")
    assert again.status_code == 200  # idempotent
    assert late.status_code == 409
    assert late.json()["code"] == "message_not_held"
    assert [event["payload"]["data"]["id"] for event in events.json()["data"]] == [held[0]]
    assert [step["status"] for step in read["history"]] == ["held", "canceled"]
    assert await held_ids(session_factory) == set(held[1:])


async def test_an_admin_lists_a_clients_held_messages_page_by_page(
    hold_api: Callable[..., Any], world: World
) -> None:
    async with hold_api(min_distinct=3) as api:
        held = await held_burst(api, world)
        admin = world.auth(world.admin_key)
        first = await api.get(
            "/v1/held-messages", params={"client": "shop", "limit": 3}, headers=admin
        )
        second = await api.get(
            "/v1/held-messages",
            params={"client": "shop", "limit": 3, "cursor": first.json()["next_cursor"]},
            headers=admin,
        )
        other = await api.get("/v1/held-messages", params={"client": "other-shop"}, headers=admin)
        forbidden = await api.get(
            "/v1/held-messages", params={"client": "shop"}, headers=world.auth()
        )
        unknown = await api.get("/v1/held-messages", params={"client": "nobody"}, headers=admin)
        missing = await api.get("/v1/held-messages", headers=admin)
        bad_cursor = await api.get(
            "/v1/held-messages", params={"client": "shop", "cursor": "x"}, headers=admin
        )

    assert first.status_code == 200, first.text
    assert first.json()["has_more"] is True
    assert second.json()["has_more"] is False
    listed = [m["id"] for page in (first, second) for m in page.json()["data"]]
    assert listed == held[::-1]  # newest first, each once
    assert {m["status"] for page in (first, second) for m in page.json()["data"]} == {"held"}
    assert other.json() == {"data": [], "has_more": False, "next_cursor": None}
    assert forbidden.status_code == 403
    assert (unknown.status_code, unknown.json()["code"]) == (404, "client_not_found")
    assert missing.status_code == 422
    assert bad_cursor.status_code == 422


async def test_a_message_held_past_the_time_limit_is_canceled_by_retention(
    hold_api: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    await add_default_endpoint(session_factory, world)
    async with hold_api(min_distinct=3) as api:
        held = await held_burst(api, world)
        async with session_factory.begin() as session:
            await session.execute(
                update(Message)
                .where(Message.id.in_([uuid.UUID(held[0]), uuid.UUID(held[1])]))
                .values(created_at=func.now() - timedelta(days=7, minutes=1))
            )
        queue = await create_pool(RedisSettings.from_dsn(TEST_REDIS_URL))
        try:
            ctx = {"settings": make_settings(), "session_factory": session_factory, "redis": queue}
            first = await retention(ctx)
            second = await retention(ctx)
        finally:
            await queue.aclose()
        events = await api.get(
            "/v1/events", params={"type": "message.canceled"}, headers=world.auth()
        )
        read = (await api.get(f"/v1/messages/{held[0]}", headers=world.auth())).json()

    assert (first, second) == (2, 0)
    assert await held_ids(session_factory) == set(held[2:])  # younger ones: still held
    assert (read["status"], read["error_code"]) == ("canceled", "canceled")
    assert "PUMPING__HELD_MAX_DAYS" in read["error_message"]
    assert [step["status"] for step in read["history"]] == ["held", "canceled"]
    assert {event["payload"]["data"]["id"] for event in events.json()["data"]} == set(held[:2])


# ---- alert: counted off the request, requests of one linger together ----


async def test_alert_counts_the_requests_of_one_linger_in_one_round_trip(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing reaches Redis while the requests come; then one count for all of them, both
    clients in one pipeline, and the alarm fires once with every number counted."""
    fired: list[tuple[uuid.UUID, list[str]]] = []

    async def hook(alarm: Any, fresh: list[Any]) -> None:
        fired.append((alarm.client_id, [reading.range for reading in fresh]))

    check = VelocityCheck(redis, PumpingSettings(), on_alarm=hook, linger=3600)
    bot, quiet = uuid.uuid4(), uuid.uuid4()
    burst = pumping_burst(120)
    counts: list[int] = []  # each count's number of clients
    count = check._count

    async def counting(entries: Any, timeout: float) -> Any:
        counts.append(len(entries))
        return await count(entries, timeout)

    check._count = counting  # type: ignore[method-assign]
    for start in range(0, len(burst), 20):
        assert await check.judge(bot, burst[start : start + 20]) is None  # nothing to hold
    assert await check.judge(quiet, normal_mix(30)) is None
    assert await redis.keys(f"{KEY_PREFIX}:*") == []  # not counted yet

    await check.flush()

    assert counts == [2]  # one count (one round trip: a pipeline) for both clients
    assert fired == [(bot, ["+33 6123"])]
    state = await hget(redis, f"{KEY_PREFIX}:{bot}:+33 6123:s", "count")
    assert 114 <= int(state or 0) <= 126  # all 120 (a HyperLogLog's estimate)
    assert len(await redis.keys(f"{KEY_PREFIX}:{quiet}:*:s")) > 10


async def test_alert_counts_on_its_own_after_the_linger_and_at_once_when_full(
    redis: Redis,
) -> None:
    check = VelocityCheck(redis, PumpingSettings(), linger=0.05)
    client = uuid.uuid4()
    await check.judge(client, pumping_burst(3))
    deadline = time.monotonic() + 5
    while not await redis.keys(f"{KEY_PREFIX}:{client}:*:s"):
        assert time.monotonic() < deadline, "the linger's timer never counted"
        await asyncio.sleep(0.02)

    patient = VelocityCheck(redis, PumpingSettings(), linger=3600)
    other = uuid.uuid4()
    many = [f"+3361{index:07d}" for index in range(ALERT_BUFFER_LIMIT)]
    await patient.judge(other, many)  # fills the buffer: counted now, not in an hour
    deadline = time.monotonic() + 10
    while not await redis.keys(f"{KEY_PREFIX}:{other}:*:s"):
        assert time.monotonic() < deadline, "a full buffer was not counted at once"
        await asyncio.sleep(0.02)


async def test_a_redis_wide_script_error_is_an_outage_not_one_clients(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READONLY (a replica after a failover), OOM and the like are Redis's state: the count
    is an outage (Redis known down, every number unchecked), not a per-client refusal."""
    REDIS.recovered()
    before = REGISTRY.get_sample_value("smsgate_pumping_unchecked_messages_total") or 0.0
    check = VelocityCheck(redis, PumpingSettings(), linger=3600)

    async def read_only(entries: list[Any]) -> list[Any]:
        return [
            ResponseError("fine"),
            ReadOnlyError("You can't write against a read only replica."),
        ]

    monkeypatch.setattr(check, "_run", read_only)
    await check.judge(uuid.uuid4(), pumping_burst(2))
    await check.judge(uuid.uuid4(), pumping_burst(3))
    try:
        await check.flush()
        assert REDIS.down
    finally:
        REDIS.recovered()
    after = REGISTRY.get_sample_value("smsgate_pumping_unchecked_messages_total") or 0.0
    assert after == before + 5


async def test_alert_with_redis_down_counts_the_numbers_unchecked() -> None:
    """The count that finds Redis unreachable drops its numbers, counted as unchecked."""
    REDIS.recovered()
    before = REGISTRY.get_sample_value("smsgate_pumping_unchecked_messages_total") or 0.0
    unreachable = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        check = VelocityCheck(unreachable, PumpingSettings(), linger=3600)
        await check.judge(uuid.uuid4(), pumping_burst(7))
        await check.flush()
    finally:
        await unreachable.aclose()
    after = REGISTRY.get_sample_value("smsgate_pumping_unchecked_messages_total") or 0.0
    assert after == before + 7
    assert REDIS.down


async def test_a_script_error_for_one_client_spares_the_others_count(redis: Redis) -> None:
    """One client's counts refused by Redis (here a key of the wrong type) are that client's
    alone: unchecked and logged, the other client's counted, and Redis is not taken for down."""
    REDIS.recovered()
    before = REGISTRY.get_sample_value("smsgate_pumping_unchecked_messages_total") or 0.0
    check = VelocityCheck(redis, PumpingSettings(), linger=3600)
    broken, fine = uuid.uuid4(), uuid.uuid4()
    await redis.set(f"{KEY_PREFIX}:{broken}:+33 6123:s", "not a hash")
    await check.judge(broken, pumping_burst(4))
    await check.judge(fine, pumping_burst(3))

    await check.flush()

    after = REGISTRY.get_sample_value("smsgate_pumping_unchecked_messages_total") or 0.0
    assert after == before + 4
    assert await hget(redis, f"{KEY_PREFIX}:{fine}:+33 6123:s", "count") == b"3"
    assert not REDIS.down
