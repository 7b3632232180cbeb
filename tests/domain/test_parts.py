"""Long Vonage messages: settled from every part's receipt, in whatever order they come; a
partial acceptance that says so; and a retry that succeeds leaves no stale error behind.

Sends go through the Vonage adapter to a fake Vonage at the HTTP boundary (each request checked
against Vonage's API description); receipts are parsed by the adapter from receipts shaped as the
spec's `DeliveryReceipt`, and recorded as the status callback route records them.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
from sqlalchemy import select, update

from app.db.models import Message, MessageEvent, MessagePart
from app.db.session import SessionFactory, Tx
from app.delivery.pipeline import Submitted, deliver_message, record_submissions
from app.delivery.transitions import claim, record_status_report, run_raw_transaction
from app.kernel.status import MessageStatus
from app.providers.base import Accepted, CallbackRequest
from app.providers.vonage import VonageProvider, VonageSettings
from tests.api.test_status_callbacks import VONAGE_PATH, vonage_signed
from tests.conftest import PUBLIC_BASE_URL, World, make_settings
from tests.domain.test_delivery import (
    POLICY,
    Handler,
    RecordingProvider,
    history,
    load,
    make_due,
    queued_message,
    twilio_created,
)
from tests.events.test_emission import events, set_client_endpoint
from tests.providers.vonage_spec import SPEC

PART_IDS = ("0B00000127FDBC61", "0B00000127FDBC62", "0B00000127FDBC63")
ANTI_SPAM = "Anti-Spam Rejection: blocked by a carrier's anti-spam filter"


def vonage_answer(*statuses: str) -> dict[str, Any]:
    """A send response with one entry per part: accepted parts ("0") carry their id."""
    messages: list[dict[str, str]] = []
    for part_id, status in zip(PART_IDS, statuses, strict=False):
        if status == "0":
            messages.append(
                {
                    "to": "14155550123",
                    "message-id": part_id,
                    "status": "0",
                    "remaining-balance": "3.14159265",
                    "message-price": "0.03330000",
                    "network": "310260",
                }
            )
        else:
            messages.append({"status": status})
    body = {"message-count": str(len(statuses)), "messages": messages}
    schema = SPEC["success_schema"] if set(statuses) == {"0"} else SPEC["error_schema"]
    jsonschema.validate(body, schema)
    return body


def vonage(*answers: httpx.Response) -> Handler:
    """A fake Vonage giving these answers in turn."""
    queue = list(answers)
    return lambda request: queue.pop(0)


def accepting(parts: int) -> httpx.Response:
    return httpx.Response(200, json=vonage_answer(*["0"] * parts))


PARSER = VonageProvider(
    make_settings().section("vonage", VonageSettings), httpx.AsyncClient(), PUBLIC_BASE_URL
)


async def receipt(
    session_factory: SessionFactory,
    message_id: uuid.UUID,
    part: int,
    status: str,
    err_code: str = "0",
    *,
    client_ref: bool = True,
) -> None:
    """Vonage's receipt for part `part` (1-based), recorded as the callback route does."""
    params = {
        "msisdn": "14155550123",
        "to": "ACME",
        "network-code": "310260",
        "messageId": PART_IDS[part - 1],
        "price": "0.03330000",
        "status": status,
        "scts": "2612041000",
        "err-code": err_code,
        "message-timestamp": "2026-12-04 10:00:00",
    }
    if client_ref:
        params["client-ref"] = str(message_id)
    jsonschema.validate(params, SPEC["delivery_receipt_schema"])
    request = CallbackRequest(url=PUBLIC_BASE_URL, method="POST", params=params, headers={})
    report = PARSER.parse_status_callback(request)
    matched, _ = await record_status_report(session_factory, "vonage", report)
    assert matched


async def long_message(session_factory: SessionFactory, world: World, parts: int) -> uuid.UUID:
    await set_client_endpoint(session_factory, world.client_id)
    message_id = await queued_message(session_factory, world, sender=world.vonage_sender)
    async with session_factory.begin() as session:
        await session.execute(
            update(Message)
            .where(Message.id == message_id)
            .values(body="Your order #1042 has shipped. " * (6 * parts), segments=parts)
        )
    return message_id


async def sent_long_message(session_factory: SessionFactory, world: World, parts: int) -> uuid.UUID:
    message_id = await long_message(session_factory, world, parts)
    provider = RecordingProvider(vonage(accepting(parts)))
    outcome = await deliver_message(message_id, session_factory, provider.providers(), POLICY)
    assert outcome.status is MessageStatus.SENT
    return message_id


async def status_of(session_factory: SessionFactory, message_id: uuid.UUID) -> str:
    return (await load(session_factory, message_id)).status


async def message_events(session_factory: SessionFactory) -> list[tuple[str, dict[str, Any]]]:
    return [(kind, data) for kind, _, data in await events(session_factory)]


async def parts_of(session_factory: SessionFactory, message_id: uuid.UUID) -> list[Any]:
    async with session_factory() as session:
        rows = await session.execute(
            select(MessagePart.number, MessagePart.total, MessagePart.status)
            .where(MessagePart.message_id == message_id)
            .order_by(MessagePart.number)
        )
        return [tuple(row) for row in rows]


def orders(parts: int) -> list[tuple[int, ...]]:
    return list(itertools.permutations(range(1, parts + 1)))


# --- every part delivered ------------------------------------------------------------------------


@pytest.mark.parametrize("order", orders(2) + orders(3), ids=str)
async def test_a_long_message_is_delivered_only_when_every_part_is(
    session_factory: SessionFactory, world: World, order: Sequence[int]
) -> None:
    parts = len(order)
    message_id = await sent_long_message(session_factory, world, parts)

    for part in order[:-1]:
        await receipt(session_factory, message_id, part, "delivered")
        assert await status_of(session_factory, message_id) == "sent"
    await receipt(session_factory, message_id, order[-1], "delivered")

    message = await load(session_factory, message_id)
    assert (message.status, message.error_code, message.error_message) == ("delivered", None, None)
    assert await history(session_factory, message_id) == ["sending", "sent", "delivered"]
    assert [kind for kind, _ in await message_events(session_factory)] == [
        "message.sent",
        "message.delivered",
    ]
    assert await parts_of(session_factory, message_id) == [
        (n, parts, "delivered") for n in range(1, parts + 1)
    ]


async def test_receipts_for_every_part_at_once_deliver_it(
    session_factory: SessionFactory, world: World
) -> None:
    message_id = await sent_long_message(session_factory, world, 3)

    # Each in its own transaction, at the same time: each takes the message row's lock before it
    # reads the other parts, so the last one to commit sees them all.
    await asyncio.gather(
        *(receipt(session_factory, message_id, part, "delivered") for part in (1, 2, 3))
    )

    assert await status_of(session_factory, message_id) == "delivered"
    assert await history(session_factory, message_id) == ["sending", "sent", "delivered"]


async def test_repeated_and_carrier_receipts_do_not_count_as_other_parts(
    session_factory: SessionFactory, world: World
) -> None:
    message_id = await sent_long_message(session_factory, world, 2)

    await receipt(session_factory, message_id, 1, "accepted")
    await receipt(session_factory, message_id, 1, "delivered")
    await receipt(session_factory, message_id, 1, "delivered")
    await receipt(session_factory, message_id, 1, "buffered")  # late: moves nothing back
    assert await status_of(session_factory, message_id) == "sent"
    await receipt(session_factory, message_id, 2, "buffered")
    await receipt(session_factory, message_id, 2, "unknown")
    assert await status_of(session_factory, message_id) == "sent"

    await receipt(session_factory, message_id, 2, "delivered")

    assert await status_of(session_factory, message_id) == "delivered"
    assert await parts_of(session_factory, message_id) == [(1, 2, "delivered"), (2, 2, "delivered")]


# --- one part fails -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "failing"),
    [(order, failing) for parts in (2, 3) for order in orders(parts) for failing in order],
    ids=str,
)
async def test_one_failed_part_fails_the_message_at_once_whatever_the_order(
    session_factory: SessionFactory, world: World, order: Sequence[int], failing: int
) -> None:
    parts = len(order)
    message_id = await sent_long_message(session_factory, world, parts)
    expected_message = f"part {failing} of {parts} failed (6: {ANTI_SPAM})"

    for part in order:
        if part == failing:
            await receipt(session_factory, message_id, part, "failed", "6")
            message = await load(session_factory, message_id)
            assert (message.status, message.error_code) == ("failed", "6")
            assert message.error_message == expected_message
        else:
            before = await status_of(session_factory, message_id)
            await receipt(session_factory, message_id, part, "delivered")
            # A delivered part never settles a message that has a part to come, or has failed.
            assert await status_of(session_factory, message_id) == before

    message = await load(session_factory, message_id)
    assert (message.status, message.error_code) == ("failed", "6")
    assert message.error_message == expected_message
    assert await history(session_factory, message_id) == ["sending", "sent", "failed"]
    async with session_factory() as session:
        failed_row = await session.scalar(
            select(MessageEvent).where(
                MessageEvent.message_id == message_id,
                MessageEvent.status == "failed",
                MessageEvent.applied.is_(True),
            )
        )
    assert failed_row is not None
    assert (failed_row.error_code, failed_row.detail) == ("6", expected_message)
    [sent, failed] = await message_events(session_factory)
    assert (sent[0], failed[0]) == ("message.sent", "message.failed")
    assert (failed[1]["error_code"], failed[1]["error_message"]) == ("6", expected_message)
    assert (failing, parts, "failed") in await parts_of(session_factory, message_id)


@pytest.mark.parametrize(
    ("dlr_status", "status"), [("expired", "expired"), ("rejected", "rejected")]
)
async def test_a_part_that_expires_or_is_rejected_ends_the_message_so(
    session_factory: SessionFactory, world: World, dlr_status: str, status: str
) -> None:
    message_id = await sent_long_message(session_factory, world, 3)

    await receipt(session_factory, message_id, 1, "delivered")
    await receipt(session_factory, message_id, 3, dlr_status, "1")
    await receipt(session_factory, message_id, 2, "delivered")

    message = await load(session_factory, message_id)
    assert (message.status, message.error_code) == (status, "1")
    assert message.error_message is not None
    assert message.error_message.startswith(f"part 3 of 3 {status} (1: Unknown")


@pytest.mark.parametrize(
    ("first", "second", "status", "error_code"),
    [
        # The issue's two cases: a later part's failure after part 1's delivery, and a later
        # part's delivery after part 1's failure; neither may decide by arriving first.
        (("1", "delivered", "0"), ("3", "failed", "6"), "failed", "6"),
        (("1", "failed", "6"), ("2", "delivered", "0"), "failed", "6"),
        (("3", "delivered", "0"), ("1", "delivered", "0"), "sent", None),
    ],
)
async def test_signed_receipts_for_the_parts_of_a_long_vonage_message(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    first: tuple[str, str, str],
    second: tuple[str, str, str],
    status: str,
    error_code: str | None,
) -> None:
    message_id = await sent_long_message(session_factory, world, 3)

    for part, dlr_status, err_code in (first, second):
        params = vonage_signed(
            {
                "messageId": PART_IDS[int(part) - 1],
                "status": dlr_status,
                "err-code": err_code,
                "client-ref": str(message_id),
            }
        )
        response = await api.get(VONAGE_PATH, params=params)
        assert response.status_code == 204, response.text

    body = (await api.get(f"/v1/messages/{message_id}", headers=world.auth())).json()
    assert (body["status"], body["error_code"]) == (status, error_code)
    last = body["history"][-1]
    assert last["status"] == status
    if status == "failed":
        failed_part = first[0] if first[1] == "failed" else second[0]
        assert last["error_code"] == "6"
        assert last["detail"].startswith(f"part {failed_part} of 3 failed (6: Anti-Spam")
        assert body["error_message"] == last["detail"]


# --- receipts that beat the worker's record of the acceptance ------------------------------------


async def claimed(session_factory: SessionFactory, message_id: uuid.UUID) -> Message:
    async def claim_it(tx: Tx) -> Message:
        [message] = (await claim(tx, [message_id])).claimed
        return message

    message, _ = await run_raw_transaction(session_factory, claim_it)
    return message


async def accept(session_factory: SessionFactory, message: Message, parts: int) -> set[uuid.UUID]:
    ids = PART_IDS[:parts]
    accepted = Accepted(provider_message_id=ids[0], part_ids=ids)
    moved, _ = await record_submissions(session_factory, [Submitted(message, "vonage", accepted)])
    return moved


@pytest.mark.parametrize("order", orders(2) + orders(3), ids=str)
async def test_every_receipt_before_the_acceptance_is_recorded_delivers_it_then(
    session_factory: SessionFactory, world: World, order: Sequence[int]
) -> None:
    parts = len(order)
    message = await claimed(session_factory, await long_message(session_factory, world, parts))

    for part in order:
        await receipt(session_factory, message.id, part, "delivered")
    # Until the acceptance says how many parts there are, no receipt can settle the message.
    assert await status_of(session_factory, message.id) == "sent"
    await accept(session_factory, message, parts)

    settled = await load(session_factory, message.id)
    assert (settled.status, settled.provider_message_id) == ("delivered", PART_IDS[0])
    assert await history(session_factory, message.id) == ["sending", "sent", "delivered"]
    assert [kind for kind, _ in await message_events(session_factory)] == [
        "message.sent",
        "message.delivered",
    ]


async def test_some_receipts_before_the_acceptance_and_the_rest_after(
    session_factory: SessionFactory, world: World
) -> None:
    message = await claimed(session_factory, await long_message(session_factory, world, 3))

    await receipt(session_factory, message.id, 3, "delivered")
    await receipt(session_factory, message.id, 1, "delivered")
    await accept(session_factory, message, 3)
    assert await status_of(session_factory, message.id) == "sent"
    await receipt(session_factory, message.id, 2, "delivered")

    assert await status_of(session_factory, message.id) == "delivered"


async def test_a_failed_part_before_the_acceptance_fails_it_for_good(
    session_factory: SessionFactory, world: World
) -> None:
    message = await claimed(session_factory, await long_message(session_factory, world, 2))

    await receipt(session_factory, message.id, 2, "failed", "6")
    failed = await load(session_factory, message.id)
    assert (failed.status, failed.error_code) == ("failed", "6")
    # Its place is not known yet: the part is named by its id.
    assert failed.error_message == f"part {PART_IDS[1]} failed (6: {ANTI_SPAM})"
    await receipt(session_factory, message.id, 1, "delivered")

    assert await accept(session_factory, message, 2) == set()
    after = await load(session_factory, message.id)
    assert (after.status, after.error_code, after.provider_message_id) == (
        "failed",
        "6",
        PART_IDS[0],
    )


async def test_a_receipt_without_our_id_finds_the_message_by_its_parts_id(
    session_factory: SessionFactory, world: World
) -> None:
    message_id = await sent_long_message(session_factory, world, 2)

    await receipt(session_factory, message_id, 2, "delivered", client_ref=False)
    await receipt(session_factory, message_id, 1, "delivered", client_ref=False)

    assert await status_of(session_factory, message_id) == "delivered"


async def test_a_one_part_vonage_message_is_settled_by_its_receipt(
    session_factory: SessionFactory, world: World
) -> None:
    message_id = await sent_long_message(session_factory, world, 1)

    await receipt(session_factory, message_id, 1, "delivered")

    assert await status_of(session_factory, message_id) == "delivered"
    assert await parts_of(session_factory, message_id) == []  # nothing to keep per part


# --- partial acceptance ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "accepted"),
    [(("0", "1"), 1), (("0", "0", "1"), 2), (("0", "5", "10"), 1)],
    ids=str,
)
async def test_a_partly_accepted_message_fails_as_partially_sent_and_is_not_resent(
    session_factory: SessionFactory, world: World, statuses: tuple[str, ...], accepted: int
) -> None:
    parts = len(statuses)
    message_id = await long_message(session_factory, world, parts)
    provider = RecordingProvider(vonage(httpx.Response(200, json=vonage_answer(*statuses))))

    outcome = await deliver_message(message_id, session_factory, provider.providers(), POLICY)

    assert outcome.status is MessageStatus.FAILED
    assert len(provider.requests) == 1  # never again: part of it may be on the phone
    message = await load(session_factory, message_id)
    assert message.error_code == "partially_sent"
    assert message.error_message is not None
    assert message.error_message.startswith(
        f"partially sent: {accepted} of {parts} parts accepted; part {accepted + 1} refused"
    )
    [(kind, data)] = await message_events(session_factory)
    assert kind == "message.failed"
    assert (data["error_code"], data["error_message"]) == ("partially_sent", message.error_message)

    # The accepted parts' receipts are kept; the message stays failed.
    await receipt(session_factory, message_id, 1, "delivered")
    assert await status_of(session_factory, message_id) == "failed"
    assert await parts_of(session_factory, message_id) == [(None, None, "delivered")]


# --- a retry that succeeds ------------------------------------------------------------------------


def vonage_refusal(status: str) -> httpx.Response:
    return httpx.Response(200, json={"message-count": "1", "messages": [{"status": status}]})


@pytest.mark.parametrize(
    ("first", "code", "message"),
    [
        (vonage_refusal("1"), "1", "status 1: Throttled"),
        (vonage_refusal("5"), "5", "status 5: Internal Error"),
        (vonage_refusal("10"), "10", "status 10: Too Many Existing Binds"),
        (httpx.Response(429), "http_429", "Vonage answered HTTP 429"),
        (httpx.Response(500), "http_500", "Vonage answered HTTP 500"),
    ],
    ids=["throttled", "internal-error", "too-many-binds", "http-429", "http-500"],
)
async def test_a_retry_that_succeeds_clears_the_error_and_keeps_it_in_history(
    session_factory: SessionFactory, world: World, first: httpx.Response, code: str, message: str
) -> None:
    await set_client_endpoint(session_factory, world.client_id)
    message_id = await queued_message(session_factory, world, sender=world.vonage_sender)
    providers = RecordingProvider(vonage(first, accepting(1))).providers()

    retried = await deliver_message(message_id, session_factory, providers, POLICY)
    waiting = await load(session_factory, message_id)
    assert retried.status is MessageStatus.QUEUED
    assert (waiting.error_code, waiting.error_message) == (code, message)
    await make_due(session_factory, message_id)
    outcome = await deliver_message(message_id, session_factory, providers, POLICY)

    assert outcome.status is MessageStatus.SENT
    sent = await load(session_factory, message_id)
    assert (sent.status, sent.error_code, sent.error_message) == ("sent", None, None)
    [(kind, data)] = await message_events(session_factory)
    assert (kind, data["error_code"], data["error_message"]) == ("message.sent", None, None)
    async with session_factory() as session:
        retry_row = await session.scalar(
            select(MessageEvent).where(
                MessageEvent.message_id == message_id, MessageEvent.status == "queued"
            )
        )
    assert retry_row is not None and retry_row.error_code == code
    assert retry_row.detail is not None and message in retry_row.detail

    await receipt(session_factory, message_id, 1, "delivered")
    delivered = await load(session_factory, message_id)
    assert (delivered.status, delivered.error_code, delivered.error_message) == (
        "delivered",
        None,
        None,
    )


async def test_a_twilio_retry_that_succeeds_clears_the_error_too(
    session_factory: SessionFactory, world: World
) -> None:
    message_id = await queued_message(session_factory, world)
    providers = RecordingProvider(vonage(httpx.Response(429), twilio_created_once())).providers()

    await deliver_message(message_id, session_factory, providers, POLICY)
    assert (await load(session_factory, message_id)).error_code == "http_429"
    await make_due(session_factory, message_id)
    await deliver_message(message_id, session_factory, providers, POLICY)

    sent = await load(session_factory, message_id)
    assert (sent.status, sent.error_code, sent.error_message) == ("sent", None, None)


def twilio_created_once() -> httpx.Response:
    request = httpx.Request(
        "POST",
        "https://api.twilio.com/",
        data={
            "To": "+14155550123",
            "From": "+14155550100",
            "Body": "Your order #1042 has shipped.",
        },
    )
    return twilio_created(request)
