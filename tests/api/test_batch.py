"""POST /v1/messages/batch: per-message results, the same checks and errors as a single send,
one Idempotency-Key for the whole batch, and delivery of what it accepted."""

from __future__ import annotations

import functools
import io
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy import func, select
from starlette.responses import JSONResponse

from app.db.models import IdempotencyKey, Message, MessageEvent, OptOut, Sender
from app.db.session import SessionFactory
from app.kernel.logs import JsonFormatter
from app.main import create_app
from app.senders.keywords import KeywordConfig
from app.sending.idempotency import lock_id
from tests.api.test_send import assert_problem
from tests.conftest import World
from tests.queueing import queued_message_ids
from tests.test_end_to_end import run_worker

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard

BATCH = "/v1/messages/batch"
TWILIO = "+14155550100"  # the shop's default sender
FAKE = "+14155550199"


def item(to: str = "+14155550123", body: str = "Your order #1042 has shipped.", **more: Any) -> Any:
    return {"to": to, "body": body, **more}


async def post_batch(
    api: httpx.AsyncClient,
    world: World,
    messages: list[Any],
    *,
    key: str | None = None,
    api_key: str | None = None,
) -> httpx.Response:
    headers = world.auth(api_key)
    if key is not None:
        headers["Idempotency-Key"] = key
    return await api.post(BATCH, json={"messages": messages}, headers=headers)


@functools.cache
def documented_result() -> dict[str, Any]:
    """The 200 response's schema in the OpenAPI document, with the components it refers to."""
    spec = create_app().openapi()
    response = spec["paths"][BATCH]["post"]["responses"]["200"]
    schema = response["content"]["application/json"]["schema"]
    return {**schema, "components": spec["components"]}


def results(response: httpx.Response) -> list[dict[str, Any]]:
    """The per-message results, after checking the body is what /docs says it is."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    jsonschema.validate(body, documented_result())
    data: list[dict[str, Any]] = body["data"]
    assert [entry["index"] for entry in data] == list(range(len(data)))
    assert body["accepted"] == sum(entry["status"] == "accepted" for entry in data)
    assert body["rejected"] == sum(entry["status"] == "rejected" for entry in data)
    return data


def error_of(entry: dict[str, Any], status: int, code: str, field: str | None = None) -> None:
    assert entry["status"] == "rejected", entry
    assert set(entry) == {"index", "status", "error"}
    error = entry["error"]
    assert (error["status"], error["code"], error["type"]) == (status, code, "about:blank")
    if field is not None:
        assert field in [e["field"] for e in error["errors"]], error


async def stored(session_factory: SessionFactory) -> list[Message]:
    async with session_factory() as session:
        return list(await session.scalars(select(Message).order_by(Message.to)))


async def count(session_factory: SessionFactory, model: type[Any]) -> int:
    async with session_factory() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def opt_out(
    session_factory: SessionFactory, phone: str, sender: Sender | None, action: str = "opt_out"
) -> None:
    async with session_factory.begin() as session:
        session.add(
            OptOut(
                phone=phone,
                sender_id=sender.id if sender else None,
                action=action,
                source="keyword",
            )
        )


async def test_accepts_every_message_stores_each_with_its_history_and_queues_it(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    response = await post_batch(
        api,
        world,
        [
            item("(415) 555-0123", metadata={"order_id": "1"}),
            item("+14155550124", "Ça coûte 5€ " * 7, **{"from": "+1 (415) 555-0199"}),
            item("+14155550125", validity_period=600),
        ],
    )

    data = results(response)
    assert response.json()["accepted"] == 3 and response.json()["rejected"] == 0
    assert all(set(entry) == {"index", "status", "message"} for entry in data)
    messages = [entry["message"] for entry in data]
    assert [m["to"] for m in messages] == ["+14155550123", "+14155550124", "+14155550125"]
    assert [m["from"] for m in messages] == [TWILIO, FAKE, TWILIO]
    assert [m["provider"] for m in messages] == ["twilio", "fake", "twilio"]
    assert [(m["encoding"], m["segments"]) for m in messages] == [
        ("GSM-7", 1),
        ("UCS-2", 2),
        ("GSM-7", 1),
    ]
    assert messages[0]["metadata"] == {"order_id": "1"}
    assert {m["status"] for m in messages} == {"queued"}
    async with session_factory() as session:
        rows = {m.id: m for m in await session.scalars(select(Message))}
        events = list(await session.scalars(select(MessageEvent)))
    assert {str(message_id) for message_id in rows} == {m["id"] for m in messages}
    assert {row.status for row in rows.values()} == {"queued"}
    assert sorted(str(e.message_id) for e in events) == sorted(m["id"] for m in messages)
    assert {(e.status, e.applied, e.source) for e in events} == {("queued", True, "api")}
    for message in messages:  # each one is the resource GET /v1/messages/{id} shows
        shown = (await api.get(f"/v1/messages/{message['id']}", headers=world.auth())).json()
        assert {k: v for k, v in shown.items() if k not in ("history", "notes")} == message
        assert [step["status"] for step in shown["history"]] == ["queued"]
    assert sorted(await queued_message_ids(redis)) == sorted(m["id"] for m in messages)
    expires = rows[uuid.UUID(messages[2]["id"])]
    assert expires.expires_at is not None
    assert (expires.expires_at - expires.created_at).total_seconds() == 600


async def test_a_bad_message_is_refused_alone_with_the_code_and_field_of_a_single_send(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    await opt_out(session_factory, "+14155550126", world.twilio_sender)

    response = await post_batch(
        api,
        world,
        [
            item("+14155550121"),
            item("not a number"),
            item(body="a" * (153 * 10 + 1)),
            item(**{"from": "+14155550111"}),
            item("+14155550126"),
            item(status="delivered"),
            "not an object",
            item("+14155550126", **{"from": FAKE}),  # opted out of the other sender only
            item("+33142685300"),
        ],
    )

    data = results(response)
    assert [entry["status"] for entry in data] == [
        "accepted",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
        "accepted",
        "rejected",
    ]
    error_of(data[1], 422, "validation_error", "to")
    assert "not a phone number" in data[1]["error"]["errors"][0]["reason"]
    error_of(data[2], 422, "too_many_segments", "body")
    assert "limit is 10" in data[2]["error"]["detail"]
    error_of(data[3], 422, "unknown_sender", "from")
    error_of(data[4], 403, "recipient_opted_out")
    assert data[4]["error"]["detail"] == f"+14155550126 has opted out of messages from {TWILIO}"
    error_of(data[5], 422, "validation_error", "status")
    error_of(data[6], 422, "validation_error", "messages.6")
    error_of(data[8], 422, "validation_error", "to")
    assert "fixed-line" in data[8]["error"]["detail"]
    assert response.json()["accepted"] == 2 and response.json()["rejected"] == 7
    accepted = {data[0]["message"]["id"], data[7]["message"]["id"]}
    assert {str(m.id) for m in await stored(session_factory)} == accepted
    assert await count(session_factory, MessageEvent) == 2
    assert sorted(await queued_message_ids(redis)) == sorted(accepted)


async def incomplete_sender(session_factory: SessionFactory) -> None:
    async with session_factory.begin() as session:
        session.add(
            Sender(
                id=uuid.uuid4(),
                address="+14155550177",
                kind="long_code",
                provider="fake",
                keywords=KeywordConfig().model_dump(mode="json"),  # no replies configured
            )
        )


@pytest.mark.parametrize(
    "message",
    [
        item("not a number"),
        item("+1415555"),
        item("+19005550123"),
        item(body=""),
        item(body="€" * 800),
        item(**{"from": "+14155550111"}),
        item(**{"from": "+14155550177"}),
        item("+14155550126"),
        item(status="delivered"),
        item(from_=TWILIO),
        item(validity_period=0),
        item(validity_period="60"),
        item(metadata={"k": 1}),
        item(callback_url="not a url"),
        item(callback_url="https://127.0.0.1/events"),
        item(callback_url="http://93.184.215.14/events"),
        {"body": "no recipient"},
    ],
)
async def test_each_refusal_is_exactly_the_problem_a_single_send_gets(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, message: Any
) -> None:
    await incomplete_sender(session_factory)
    await opt_out(session_factory, "+14155550126", None)  # of every sender

    single = await api.post("/v1/messages", json=message, headers=world.auth())
    batch = await post_batch(api, world, [message])

    assert single.status_code in (403, 422), single.text
    assert single.headers["content-type"] == "application/problem+json"
    [entry] = results(batch)
    assert entry == {"index": 0, "status": "rejected", "error": single.json()}
    assert await count(session_factory, Message) == 0


async def test_no_sender_for_a_send_without_from_is_a_per_message_refusal(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    response = await post_batch(
        api,
        world,
        # A client without a default sender: its pool (two US long codes) serves no French number.
        [item("+33612345678"), item(**{"from": FAKE})],
        api_key=world.other_client_key,
    )

    data = results(response)
    error_of(data[0], 422, "no_sender_for_destination", "from")
    assert data[1]["status"] == "accepted"
    [message] = await stored(session_factory)
    assert str(message.id) == data[1]["message"]["id"]


async def test_rows_are_stored_exactly_as_a_single_send_stores_them(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    message = item(
        metadata={"order_id": "1042", "é": "ü"},
        validity_period=3600,
        callback_url="https://93.184.215.14/sms-status",
        **{"from": FAKE},
    )
    single = await api.post("/v1/messages", json=message, headers=world.auth())
    batch = await post_batch(api, world, [message])
    assert single.status_code == 202, single.text
    [entry] = results(batch)

    async def columns(message_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The message's columns (times relative to its creation) and its history row's."""
        async with session_factory() as session:
            row = dict(
                (await session.execute(select(Message.__table__).where(Message.id == message_id)))
                .one()
                ._mapping
            )
            event = dict(
                (
                    await session.execute(
                        select(MessageEvent.__table__).where(MessageEvent.message_id == message_id)
                    )
                )
                .one()
                ._mapping
            )
        for name in ("updated_at", "next_attempt_at", "expires_at"):
            row[name] = row[name] - row["created_at"] if row[name] else None
        event["created_at"] -= row.pop("created_at")
        del row["id"], event["id"], event["message_id"]
        return row, event

    assert await columns(entry["message"]["id"]) == await columns(single.json()["id"])
    varying = ("id", "created_at", "updated_at", "expires_at")
    same = {k: v for k, v in single.json().items() if k not in varying}
    assert {k: v for k, v in entry["message"].items() if k in same} == same


async def test_opt_outs_follow_the_single_send_rules_per_sender(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await opt_out(session_factory, "+14155550131", world.twilio_sender)
    await opt_out(session_factory, "+14155550132", world.twilio_sender)
    await opt_out(session_factory, "+14155550132", world.twilio_sender, "opt_in")  # back in
    await opt_out(session_factory, "+14155550133", None)  # every sender
    await opt_out(session_factory, "+14155550134", None)
    await opt_out(session_factory, "+14155550134", world.fake_sender, "opt_in")  # this one again

    response = await post_batch(
        api,
        world,
        [
            item("+14155550131"),
            item("+14155550131", **{"from": FAKE}),
            item("+14155550132"),
            item("+14155550133"),
            item("+14155550133", **{"from": FAKE}),
            item("+14155550134"),
            item("+14155550134", **{"from": FAKE}),
            item("+14155550131"),  # the same pair twice: refused twice
        ],
    )

    statuses = [entry["status"] for entry in results(response)]
    assert statuses == [
        "rejected",
        "accepted",
        "accepted",
        "rejected",
        "rejected",
        "rejected",
        "accepted",
        "rejected",
    ]
    for entry in results(response):
        if entry["status"] == "rejected":
            error_of(entry, 403, "recipient_opted_out")


async def test_repeated_numbers_and_bodies_are_judged_alike(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    response = await post_batch(
        api,
        world,
        [
            item("(415) 555-0123"),
            item("+1 415 555 0123"),
            item("(415) 555-0123"),
            item("+1415555"),
            item("+1415555"),
            item(body="€" * 800),
            item(body="€" * 800),
        ],
    )

    data = results(response)
    assert [entry["message"]["to"] for entry in data[:3]] == ["+14155550123"] * 3
    assert len({entry["message"]["id"] for entry in data[:3]}) == 3
    assert data[3]["error"] == data[4]["error"]
    error_of(data[3], 422, "validation_error", "to")
    assert data[5]["error"] == data[6]["error"]
    error_of(data[5], 422, "too_many_segments", "body")
    assert await count(session_factory, Message) == 3


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [item()] * 1001}, "messages"),
        ({}, "messages"),
        ({"messages": item()}, "messages"),
        ({"messages": [item()], "priority": "high"}, "priority"),
        ([item()], "body"),
    ],
)
async def test_a_malformed_batch_is_one_422_and_stores_nothing(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    redis: Redis,
    body: Any,
    field: str,
) -> None:
    response = await api.post(BATCH, json=body, headers=world.auth())

    assert_problem(response, 422, "validation_error", field=field)
    assert await count(session_factory, Message) == 0
    assert await queued_message_ids(redis) == []


async def test_a_thousand_messages_are_accepted_in_one_request(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    messages = [
        item(f"+1415555{n % 200 + 100:04d}", f"Your order #{n} has shipped.") for n in range(1000)
    ]

    data = results(await post_batch(api, world, messages))

    assert [entry["message"]["body"] for entry in data] == [m["body"] for m in messages]
    assert await count(session_factory, Message) == 1000
    assert await count(session_factory, MessageEvent) == 1000
    queued = await queued_message_ids(redis)  # in jobs of up to BATCH_JOB_MAX messages
    assert len(queued) == 1000 and set(queued) == {entry["message"]["id"] for entry in data}


async def test_a_replay_returns_the_first_response_and_stores_nothing_new(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    messages = [item(), item("not a number"), item("+14155550124", **{"from": FAKE})]
    first = await post_batch(api, world, messages, key="batch-1")
    # The same JSON value with its keys in another order is the same request.
    second = await post_batch(
        api, world, [dict(reversed(list(m.items()))) for m in messages], key="batch-1"
    )

    assert results(first) == results(second)
    assert second.json() == first.json()
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert await count(session_factory, Message) == 2
    assert await count(session_factory, MessageEvent) == 2
    assert await count(session_factory, IdempotencyKey) == 1
    assert sorted(await queued_message_ids(redis)) == sorted(
        entry["message"]["id"] for entry in results(first) if entry["status"] == "accepted"
    )


async def test_the_same_key_with_a_different_batch_is_refused(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await post_batch(api, world, [item()], key="batch-2")

    response = await post_batch(api, world, [item(), item("+14155550124")], key="batch-2")

    assert_problem(response, 422, "idempotency_key_reused", field="Idempotency-Key")
    assert await count(session_factory, Message) == 1


async def test_a_key_still_in_flight_gets_409(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    async with session_factory() as holder, holder.begin():
        await holder.execute(
            select(func.pg_advisory_xact_lock(lock_id(world.client_id, "batch-busy")))
        )
        response = await post_batch(api, world, [item()], key="batch-busy")

    assert_problem(response, 409, "idempotency_key_in_use")
    assert await count(session_factory, Message) == 0


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "missing_api_key"), ({"Authorization": "Bearer sk_not-a-real-key"}, "invalid_api_key")],
)
async def test_requires_a_valid_api_key(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    headers: dict[str, str],
    code: str,
) -> None:
    response = await api.post(BATCH, json={"messages": [item()]}, headers=headers)

    assert_problem(response, 401, code)
    assert await count(session_factory, Message) == 0


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(previous_level)


def queued_total(sender: str, provider: str) -> float:
    labels = {"status": "queued", "provider": provider, "sender": sender}
    return REGISTRY.get_sample_value("smsgate_messages_total", labels) or 0.0


async def test_one_log_line_and_one_count_per_sender_for_the_batch(
    api: httpx.AsyncClient, world: World, json_logs: io.StringIO
) -> None:
    twilio_before, fake_before = queued_total(TWILIO, "twilio"), queued_total(FAKE, "fake")

    response = await post_batch(
        api,
        world,
        [item()] * 3 + [item(**{"from": FAKE})] * 2 + [item("+1415555")] * 2,
    )

    assert response.status_code == 200, response.text
    assert queued_total(TWILIO, "twilio") == twilio_before + 3
    assert queued_total(FAKE, "fake") == fake_before + 2
    records = [json.loads(line) for line in json_logs.getvalue().splitlines() if line.strip()]
    ours = [r for r in records if r["logger"].startswith("app.sending")]
    assert [(r["msg"], r["accepted"], r["rejected"]) for r in ours] == [("batch processed", 5, 2)]
    assert ours[0]["refused"] == {"validation_error": 2}


async def test_every_accepted_message_is_delivered_through_the_fake_provider(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, redis: Redis
) -> None:
    response = await post_batch(
        api,
        world,
        [item(f"+1415555{n:04d}", f"Code {n}", **{"from": FAKE}) for n in range(120, 140)]
        + [item("not a number", **{"from": FAKE})],
    )
    accepted = [e["message"]["id"] for e in results(response) if e["status"] == "accepted"]
    assert len(accepted) == 20

    await run_worker()

    for message in await stored(session_factory):
        assert message.status == "delivered", message.id
        assert message.provider_message_id is not None
    assert {str(m.id) for m in await stored(session_factory)} == set(accepted)
    assert await queued_message_ids(redis) == []


def test_docs_show_the_message_schema_examples_and_refusals() -> None:
    spec = create_app().openapi()
    operation = spec["paths"][BATCH]["post"]
    schemas = spec["components"]["schemas"]
    body_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    batch_schema = schemas[body_ref.rsplit("/", 1)[-1]]

    items = batch_schema["properties"]["messages"]
    assert items["items"] == {"$ref": "#/components/schemas/SendMessageRequest"}
    assert (items["minItems"], items["maxItems"]) == (1, 1000)
    assert schemas["SendMessageRequest"]["examples"][0]["to"] == "+14155550123"
    assert batch_schema["examples"][0]["messages"]
    example = schemas["BatchResult"]["examples"][0]
    assert {entry["status"] for entry in example["data"]} == {"accepted", "rejected"}
    # Its own answers, and the edge's that every operation documents (400, 413, 431, 503).
    assert set(operation["responses"]) == {"200", "401", "409", "422", "400", "413", "431", "503"}
    assert "Idempotency-Key" in [p["name"] for p in operation["parameters"]]


async def test_the_answer_is_encoded_exactly_as_starlette_encodes_json(
    api: httpx.AsyncClient, world: World
) -> None:
    """The send endpoints encode with pydantic-core (json.dumps was a sixth of a batch's CPU):
    byte for byte what Starlette's JSONResponse writes, non-ASCII text, escapes and a refusal's
    problem included."""
    response = await post_batch(
        api,
        world,
        [
            item("+14155550124", 'Ça coûte 5€, "fragile" \\ tab\there 😀'),
            item("not a number"),
        ],
    )

    assert response.status_code == 200
    assert response.content == JSONResponse(response.json()).body
    single = await api.post(
        "/v1/messages", headers=world.auth(), json=item(body="Ünïcode «ok» \u2028")
    )
    assert single.status_code == 202
    assert single.content == JSONResponse(single.json()).body
