"""The events API: endpoints and their checks at the edge, signing secrets and rotation, listing
events, their attempts, and redelivery; and the webhooks in the OpenAPI document."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.db.models import Client, Message
from app.db.session import SessionFactory
from app.events.outbox import EventType
from app.main import create_app
from tests.api.test_send import assert_problem
from tests.conftest import World
from tests.events.conftest import StartReceiver
from tests.events.support import (
    events_settings,
    respond,
    run_events_worker,
    verify_standard_webhook,
)
from tests.test_end_to_end import run_worker

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard

# Each address class, as a URL with an address literal (no DNS lookups in tests).
REFUSED_URLS = [
    ("https://127.0.0.1/events", "127.0.0.1 is a loopback address"),
    ("https://127.42.0.7:8443/events", "127.42.0.7 is a loopback address"),
    ("https://[::1]/events", "::1 is a loopback address"),
    ("https://10.20.30.40/events", "10.20.30.40 is a private address"),
    ("https://172.16.0.1/events", "172.16.0.1 is a private address"),
    ("https://172.31.255.254/events", "172.31.255.254 is a private address"),
    ("https://192.168.1.1/events", "192.168.1.1 is a private address"),
    (
        "https://169.254.169.254/latest/meta-data/",
        "169.254.169.254 is a link-local address (cloud metadata lives there)",
    ),
    ("https://[fc00::1]/events", "fc00::1 is a unique local address"),
    ("https://[fd00:ec2::254]/events", "fd00:ec2::254 is a unique local address"),
    ("https://localhost:8443/events", "localhost resolves to"),  # from /etc/hosts
    ("http://93.184.215.14/events", "must use https"),
]


@pytest.fixture
async def local_api(
    app_factory: Any, session_factory: SessionFactory
) -> AsyncIterator[httpx.AsyncClient]:
    """The API with settings that allow http receivers on this machine (development)."""
    async with app_factory(events=events_settings()) as client:
        yield client


async def message_count(session_factory: SessionFactory) -> int:
    async with session_factory() as session:
        return int(await session.scalar(select(func.count()).select_from(Message)) or 0)


# ---- Destinations are checked at the edge ----


@pytest.mark.parametrize(("url", "reason"), REFUSED_URLS)
async def test_a_callback_url_into_our_network_is_refused_with_a_422(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, url: str, reason: str
) -> None:
    response = await api.post(
        "/v1/messages",
        json={"to": "+14155550123", "body": "hi", "callback_url": url},
        headers=world.auth(),
    )

    assert_problem(response, 422, "destination_refused", field="callback_url")
    assert reason in response.json()["errors"][0]["reason"]
    assert await message_count(session_factory) == 0


@pytest.mark.parametrize(("url", "reason"), REFUSED_URLS)
async def test_a_default_endpoint_into_our_network_is_refused_with_a_422(
    api: httpx.AsyncClient, world: World, url: str, reason: str
) -> None:
    response = await api.put("/v1/event-endpoints/default", json={"url": url}, headers=world.auth())

    assert_problem(response, 422, "destination_refused", field="url")
    assert reason in response.json()["errors"][0]["reason"]


async def test_a_public_https_callback_url_is_accepted(
    api: httpx.AsyncClient, world: World
) -> None:
    response = await api.post(
        "/v1/messages",
        json={"to": "+14155550123", "body": "hi", "callback_url": "https://93.184.215.14/e"},
        headers=world.auth(),
    )

    assert response.status_code == 202, response.text


async def test_a_replayed_send_is_not_checked_again(api: httpx.AsyncClient, world: World) -> None:
    body = {"to": "+14155550123", "body": "hi", "callback_url": "https://93.184.215.14/e"}
    headers = {**world.auth(), "Idempotency-Key": "k-1"}

    first = await api.post("/v1/messages", json=body, headers=headers)
    again = await api.post("/v1/messages", json=body, headers=headers)

    assert (first.status_code, again.status_code) == (202, 202)
    assert again.headers["Idempotent-Replayed"] == "true"


# ---- Endpoints ----


async def test_a_client_sets_lists_and_clears_its_default_endpoint(
    local_api: httpx.AsyncClient, world: World
) -> None:
    url = "http://127.0.0.1:9/events"

    put = await local_api.put(
        "/v1/event-endpoints/default", json={"url": url}, headers=world.auth()
    )
    listed = await local_api.get("/v1/event-endpoints", headers=world.auth())
    others = await local_api.get("/v1/event-endpoints", headers=world.auth(world.other_client_key))
    cleared = await local_api.delete("/v1/event-endpoints/default", headers=world.auth())
    after = await local_api.get("/v1/event-endpoints", headers=world.auth())

    assert put.status_code == 200, put.text
    endpoint = put.json()
    assert (endpoint["url"], endpoint["is_default"], endpoint["disabled_at"]) == (url, True, None)
    assert endpoint["client_id"] == str(world.client_id) and endpoint["sender_id"] is None
    assert [e["id"] for e in listed.json()["data"]] == [endpoint["id"]]
    assert others.json()["data"] == []
    assert cleared.status_code == 204
    assert [e["is_default"] for e in after.json()["data"]] == [False]


async def test_changing_the_default_endpoint_keeps_one_default(
    local_api: httpx.AsyncClient, world: World
) -> None:
    for port in (9, 10, 9):
        response = await local_api.put(
            "/v1/event-endpoints/default",
            json={"url": f"http://127.0.0.1:{port}/events"},
            headers=world.auth(),
        )
        assert response.status_code == 200

    listed = (await local_api.get("/v1/event-endpoints", headers=world.auth())).json()["data"]
    assert [(e["url"], e["is_default"]) for e in listed] == [
        ("http://127.0.0.1:9/events", True),
        ("http://127.0.0.1:10/events", False),
    ]


# ---- Signing secrets ----


async def test_each_client_has_its_own_secret_and_rotation_keeps_the_old_one_a_while(
    api: httpx.AsyncClient, world: World
) -> None:
    first = (await api.get("/v1/signing-secrets", headers=world.auth())).json()["data"]
    again = (await api.get("/v1/signing-secrets", headers=world.auth())).json()["data"]
    other = (
        await api.get("/v1/signing-secrets", headers=world.auth(world.other_client_key))
    ).json()["data"]

    rotated = await api.post("/v1/signing-secrets/rotate", headers=world.auth())

    assert len(first) == 1 and first == again
    assert first[0]["secret"].startswith("whsec_") and first[0]["expires_at"] is None
    assert other[0]["secret"] != first[0]["secret"]
    assert rotated.status_code == 200, rotated.text
    new, old = rotated.json()["data"]
    assert old["secret"] == first[0]["secret"] and new["expires_at"] is None
    expires = datetime.fromisoformat(old["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=1))) < timedelta(minutes=1)


async def test_a_rotation_can_revoke_the_old_secret_at_once(
    api: httpx.AsyncClient, world: World
) -> None:
    await api.get("/v1/signing-secrets", headers=world.auth())

    rotated = await api.post(
        "/v1/signing-secrets/rotate", json={"grace_period_seconds": 0}, headers=world.auth()
    )
    refused = await api.post(
        "/v1/signing-secrets/rotate", json={"grace_period_seconds": -1}, headers=world.auth()
    )

    assert [s["expires_at"] for s in rotated.json()["data"]] == [None]
    assert_problem(refused, 422, "validation_error", field="grace_period_seconds")


async def test_sender_secrets_are_the_senders_and_for_admins(
    api: httpx.AsyncClient, world: World
) -> None:
    path = f"/v1/senders/{world.twilio_sender.id}/signing-secrets"

    client = await api.get(path, headers=world.auth())
    sender = await api.get(path, headers=world.auth(world.admin_key))
    rotated = await api.post(f"{path}/rotate", headers=world.auth(world.admin_key))
    mine = await api.get("/v1/signing-secrets", headers=world.auth(world.admin_key))

    assert client.status_code == 403
    assert sender.status_code == 200 and rotated.status_code == 200
    assert len(rotated.json()["data"]) == 2
    assert mine.json()["data"][0]["secret"] not in {s["secret"] for s in rotated.json()["data"]}


# ---- Events, attempts, redelivery ----


async def test_events_attempts_and_redelivery_through_the_api(
    local_api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    receivers: StartReceiver,
) -> None:
    receiver = await receivers(respond(400, b"unknown order"), default=respond(204))
    await local_api.put(
        "/v1/event-endpoints/default", json={"url": receiver.url()}, headers=world.auth()
    )
    sent = await local_api.post(
        "/v1/messages",
        json={"to": "+14155550123", "body": "hi", "from": "+14155550199"},
        headers=world.auth(),
    )
    message_id = sent.json()["id"]
    await run_worker()  # the fake provider: sent, then delivered
    await run_events_worker()

    listed = (await local_api.get("/v1/events", headers=world.auth())).json()
    assert [(e["type"], e["status"]) for e in listed["data"]] == [
        ("message.delivered", "delivered"),  # newest first; it went once `sent` was given up
        ("message.sent", "failed"),
    ]
    failed = listed["data"][1]
    assert failed["message_id"] == message_id and failed["url"] == receiver.url()
    assert failed["last_error"] == "HTTP 400" and failed["next_attempt_at"] is None
    only_failed = await local_api.get("/v1/events?status=failed", headers=world.auth())
    assert [e["id"] for e in only_failed.json()["data"]] == [failed["id"]]
    by_type = await local_api.get("/v1/events?type=message.delivered", headers=world.auth())
    assert [e["type"] for e in by_type.json()["data"]] == ["message.delivered"]
    one = await local_api.get(f"/v1/events/{failed['id']}", headers=world.auth())
    assert one.json()["payload"]["data"]["id"] == message_id

    attempts = await local_api.get(f"/v1/events/{failed['id']}/attempts", headers=world.auth())
    [attempt] = attempts.json()["data"]
    assert (attempt["status"], attempt["response_status"]) == ("failed", 400)
    assert attempt["response_body"] == "unknown order" and attempt["latency_ms"] >= 0

    redelivered = await local_api.post(f"/v1/events/{failed['id']}/redeliver", headers=world.auth())
    twice = await local_api.post(f"/v1/events/{failed['id']}/redeliver", headers=world.auth())
    assert redelivered.status_code == 202 and redelivered.json()["status"] == "pending"
    assert_problem(twice, 409, "event_pending")
    await run_events_worker()

    after = await local_api.get(f"/v1/events/{failed['id']}", headers=world.auth())
    assert after.json()["status"] == "delivered"
    attempts = await local_api.get(f"/v1/events/{failed['id']}/attempts", headers=world.auth())
    assert [a["response_status"] for a in attempts.json()["data"]] == [400, 204]
    # The same event id both times: receivers dedupe on it.
    sent_requests = [r for r in receiver.received if r.json()["type"] == "message.sent"]
    assert {r.headers["webhook-id"] for r in sent_requests} == {failed["id"]}
    [secret] = (await local_api.get("/v1/signing-secrets", headers=world.auth())).json()["data"]
    assert all(
        verify_standard_webhook(secret["secret"], r.headers, r.body) for r in receiver.received
    )


async def test_a_client_sees_only_its_own_events_and_admins_see_all(
    local_api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await local_api.put(
        "/v1/event-endpoints/default",
        json={"url": "http://127.0.0.1:9/"},
        headers=world.auth(),
    )
    await local_api.post(
        "/v1/messages",
        json={"to": "+14155550123", "body": "hi", "from": "+14155550199"},
        headers=world.auth(),
    )
    await run_worker()
    [newest, oldest] = (await local_api.get("/v1/events", headers=world.auth())).json()["data"]
    other = world.auth(world.other_client_key)

    assert (await local_api.get("/v1/events", headers=other)).json()["data"] == []
    for path in (f"/v1/events/{newest['id']}", f"/v1/events/{newest['id']}/attempts"):
        assert_problem(await local_api.get(path, headers=other), 404, "event_not_found")
    assert_problem(
        await local_api.post(f"/v1/events/{newest['id']}/redeliver", headers=other),
        404,
        "event_not_found",
    )
    admin = (await local_api.get("/v1/events", headers=world.auth(world.admin_key))).json()
    assert len(admin["data"]) == 2
    page = (await local_api.get("/v1/events?limit=1", headers=world.auth())).json()
    assert [e["id"] for e in page["data"]] == [newest["id"]] and page["has_more"]
    rest = await local_api.get(
        f"/v1/events?limit=1&cursor={page['next_cursor']}", headers=world.auth()
    )
    assert [e["id"] for e in rest.json()["data"]] == [oldest["id"]]
    assert not rest.json()["has_more"]


async def test_after_a_410_the_endpoint_is_enabled_again_and_the_event_redelivered(
    local_api: httpx.AsyncClient, world: World, receivers: StartReceiver
) -> None:
    receiver = await receivers(respond(410), default=respond(200))
    endpoint = (
        await local_api.put(
            "/v1/event-endpoints/default", json={"url": receiver.url()}, headers=world.auth()
        )
    ).json()
    await local_api.post(
        "/v1/messages",
        json={"to": "+14155550123", "body": "hi", "from": "+14155550199"},
        headers=world.auth(),
    )
    await run_worker()
    await run_events_worker()
    listed = (await local_api.get("/v1/events", headers=world.auth())).json()["data"]
    assert [e["status"] for e in listed] == ["failed", "failed"]
    gone = (await local_api.get("/v1/event-endpoints", headers=world.auth())).json()["data"][0]
    assert gone["disabled_reason"] == "the receiver answered 410 Gone"

    refused = await local_api.post(f"/v1/events/{listed[1]['id']}/redeliver", headers=world.auth())
    enabled = await local_api.post(
        f"/v1/event-endpoints/{endpoint['id']}/enable", headers=world.auth()
    )
    for event in reversed(listed):
        response = await local_api.post(f"/v1/events/{event['id']}/redeliver", headers=world.auth())
        assert response.status_code == 202
    await run_events_worker()

    assert_problem(refused, 409, "endpoint_disabled")
    assert enabled.status_code == 200 and enabled.json()["disabled_at"] is None
    final = (await local_api.get("/v1/events", headers=world.auth())).json()["data"]
    assert [e["status"] for e in final] == ["delivered", "delivered"]
    assert len(receiver.received) == 3
    other = await local_api.post(
        f"/v1/event-endpoints/{endpoint['id']}/enable", headers=world.auth(world.other_client_key)
    )
    assert_problem(other, 404, "endpoint_not_found")


async def test_a_senders_events_are_signed_with_the_senders_secret(
    local_api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    receivers: StartReceiver,
) -> None:
    from tests.api.test_inbound import twilio_inbound

    receiver = await receivers()
    admin = world.auth(world.admin_key)
    await local_api.put(
        f"/v1/senders/{world.twilio_sender.id}/event-endpoint",
        json={"url": receiver.url()},
        headers=admin,
    )

    await twilio_inbound(local_api, "Where is my parcel?")
    await run_events_worker()

    [request] = receiver.received
    assert request.json()["type"] == "inbound.received"
    sender_secrets = (
        await local_api.get(f"/v1/senders/{world.twilio_sender.id}/signing-secrets", headers=admin)
    ).json()["data"]
    client_secrets = (await local_api.get("/v1/signing-secrets", headers=admin)).json()["data"]
    assert verify_standard_webhook(sender_secrets[0]["secret"], request.headers, request.body)
    assert not verify_standard_webhook(client_secrets[0]["secret"], request.headers, request.body)
    async with session_factory() as session:
        assert await session.scalar(select(func.count()).select_from(Client)) == 3
    admin_events = (await local_api.get("/v1/events", headers=admin)).json()["data"]
    assert [e["type"] for e in admin_events] == ["inbound.received"]
    assert (await local_api.get("/v1/events", headers=world.auth())).json()["data"] == []


async def test_unknown_events_and_endpoints_are_404(api: httpx.AsyncClient, world: World) -> None:
    missing = uuid.uuid4()

    for method, path, code in [
        ("GET", f"/v1/events/{missing}", "event_not_found"),
        ("GET", f"/v1/events/{missing}/attempts", "event_not_found"),
        ("POST", f"/v1/events/{missing}/redeliver", "event_not_found"),
        ("POST", f"/v1/event-endpoints/{missing}/enable", "endpoint_not_found"),
    ]:
        assert_problem(await api.request(method, path, headers=world.auth()), 404, code)


# ---- Documentation ----


def test_every_event_type_is_documented_as_a_webhook_with_its_schema() -> None:
    spec = create_app().openapi()
    webhooks = spec["webhooks"]
    schemas = spec["components"]["schemas"]

    assert set(webhooks) == {event_type.value for event_type in EventType}
    for name, item in webhooks.items():
        operation = item["post"]
        assert operation["description"], name
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        payload = schemas[body["$ref"].rsplit("/", 1)[-1]]
        assert {"id", "type", "timestamp", "data"} <= set(payload["properties"]), name
        assert payload["examples"], name
        headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
        assert headers == {"webhook-id", "webhook-timestamp", "webhook-signature"}, name
        assert "422" not in operation["responses"], name


@pytest.mark.parametrize("grace", [False, True, "0", 0.0, 1.5])
async def test_a_grace_period_must_be_an_integer_not_a_boolean(
    api: httpx.AsyncClient, world: World, grace: Any
) -> None:
    first = (await api.get("/v1/signing-secrets", headers=world.auth())).json()["data"]

    refused = await api.post(
        "/v1/signing-secrets/rotate", json={"grace_period_seconds": grace}, headers=world.auth()
    )

    # `false` was read as 0 and revoked every secret at once.
    assert_problem(refused, 422, "validation_error", field="grace_period_seconds")
    after = (await api.get("/v1/signing-secrets", headers=world.auth())).json()["data"]
    assert after == first
