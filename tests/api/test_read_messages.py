"""GET /v1/messages/{id} and GET /v1/messages: history, client isolation, order, cursor, filters."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from app.db.models import Message, MessageEvent
from app.db.session import SessionFactory
from tests.api.test_send import assert_problem
from tests.conftest import World

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)


async def send(
    api: httpx.AsyncClient, world: World, key: str | None = None, **body: Any
) -> dict[str, Any]:
    body.setdefault("to", "+14155550123")
    body.setdefault("body", "Your order #1042 has shipped.")
    if key == world.other_client_key:
        body.setdefault("from", "+14155550199")  # the other client has no default sender
    response = await api.post("/v1/messages", json=body, headers=world.auth(key))
    assert response.status_code == 202, response.text
    message: dict[str, Any] = response.json()
    return message


async def send_many(api: httpx.AsyncClient, world: World, count: int) -> list[str]:
    """Send `count` messages; return their ids in the order sent."""
    return [(await send(api, world, body=f"message {n}"))["id"] for n in range(count)]


async def set_created_at(session_factory: SessionFactory, times: dict[str, datetime]) -> None:
    async with session_factory.begin() as session:
        for message_id, created_at in times.items():
            await session.execute(
                update(Message)
                .where(Message.id == uuid.UUID(message_id))
                .values(created_at=created_at)
            )


async def set_status(session_factory: SessionFactory, message_id: str, status: str) -> None:
    async with session_factory.begin() as session:
        await session.execute(
            update(Message).where(Message.id == uuid.UUID(message_id)).values(status=status)
        )


async def list_ids(
    api: httpx.AsyncClient, world: World, key: str | None = None, **params: Any
) -> list[str]:
    response = await api.get("/v1/messages", params=params, headers=world.auth(key))
    assert response.status_code == 200, response.text
    return [message["id"] for message in response.json()["data"]]


async def pages(
    api: httpx.AsyncClient, world: World, limit: int, **params: Any
) -> list[dict[str, Any]]:
    """Every page of a listing, following `next_cursor` until `has_more` is false."""
    result: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        response = await api.get("/v1/messages", params=query, headers=world.auth())
        assert response.status_code == 200, response.text
        page: dict[str, Any] = response.json()
        result.append(page)
        if not page["has_more"]:
            return result
        cursor = page["next_cursor"]
        assert len(result) < 20, "pagination does not end"


def cursor_of(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


async def test_get_returns_the_message_with_its_history(
    api: httpx.AsyncClient, world: World
) -> None:
    sent = await send(
        api,
        world,
        to="(415) 555-0123",
        metadata={"order_id": "1042"},
        # An address, not a name: callback URLs are resolved and checked, and tests use no DNS.
        callback_url="https://93.184.215.14/sms-status",
    )

    response = await api.get(f"/v1/messages/{sent['id']}", headers=world.auth())

    assert response.status_code == 200, response.text
    message = response.json()
    assert message["id"] == sent["id"]
    assert message["status"] == "queued"
    assert message["to"] == "+14155550123"
    assert message["from"] == "+14155550100"
    assert message["body"] == "Your order #1042 has shipped."
    assert message["provider"] == "twilio"
    assert message["encoding"] == "GSM-7"
    assert message["segments"] == 1
    assert message["metadata"] == {"order_id": "1042"}
    assert message["callback_url"] == "https://93.184.215.14/sms-status"
    assert message["created_at"] == sent["created_at"]
    assert message["history"] == [
        {
            "status": "queued",
            "source": "api",
            "detail": None,
            "error_code": None,
            "created_at": sent["created_at"],
        }
    ]
    assert message["notes"] == []
    # Everything but the history and notes is what the send returned.
    assert {k: v for k, v in message.items() if k not in ("history", "notes")} == sent


async def test_history_lists_the_transitions_that_took_effect_oldest_first(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    sent = await send(api, world)
    message_id = uuid.UUID(sent["id"])
    async with session_factory.begin() as session:
        session.add(
            MessageEvent(message_id=message_id, status="sending", applied=True, source="worker")
        )
    async with session_factory.begin() as session:
        # A late duplicate report that changed nothing is kept as a note, not history.
        session.add(
            MessageEvent(
                message_id=message_id,
                status="queued",
                applied=False,
                source="twilio",
                provider_status="queued",
            )
        )
    async with session_factory.begin() as session:
        session.add(
            MessageEvent(
                message_id=message_id,
                status="sent",
                applied=True,
                source="twilio",
                provider_status="sent",
            )
        )
    async with session_factory.begin() as session:
        session.add(
            MessageEvent(
                message_id=message_id,
                status="undelivered",
                applied=True,
                source="twilio",
                provider_status="undelivered",
                error_code="unreachable",
                detail="handset off",
            )
        )
    await set_status(session_factory, sent["id"], "undelivered")

    response = await api.get(f"/v1/messages/{sent['id']}", headers=world.auth())

    assert response.status_code == 200, response.text
    message = response.json()
    assert message["status"] == "undelivered"
    history = [
        (step["status"], step["source"], step["error_code"], step["detail"])
        for step in message["history"]
    ]
    assert history == [
        ("queued", "api", None, None),
        ("sending", "worker", None, None),
        ("sent", "twilio", None, None),
        ("undelivered", "twilio", "unreachable", "handset off"),
    ]
    times = [datetime.fromisoformat(step["created_at"]) for step in message["history"]]
    assert times == sorted(times)
    assert [(n["status"], n["source"]) for n in message["notes"]] == [("queued", "twilio")]


async def test_another_clients_message_is_not_found_nor_listed(
    api: httpx.AsyncClient, world: World
) -> None:
    mine = await send(api, world)
    theirs = await send(api, world, key=world.other_client_key)

    as_me = await api.get(f"/v1/messages/{theirs['id']}", headers=world.auth())
    as_them = await api.get(
        f"/v1/messages/{mine['id']}", headers=world.auth(world.other_client_key)
    )
    as_owner = await api.get(
        f"/v1/messages/{theirs['id']}", headers=world.auth(world.other_client_key)
    )

    assert_problem(as_me, 404, "message_not_found")
    assert_problem(as_them, 404, "message_not_found")
    assert as_owner.status_code == 200, as_owner.text
    assert as_owner.json()["from"] == "+14155550199"
    assert await list_ids(api, world) == [mine["id"]]
    assert await list_ids(api, world, key=world.other_client_key) == [theirs["id"]]
    # Not even an admin key of another client reads them.
    assert await list_ids(api, world, key=world.admin_key) == []


async def test_an_unknown_message_is_404(api: httpx.AsyncClient, world: World) -> None:
    await send(api, world)
    unknown = uuid.uuid4()

    response = await api.get(f"/v1/messages/{unknown}", headers=world.auth())

    assert_problem(response, 404, "message_not_found")
    assert str(unknown) in response.json()["detail"]


async def test_a_malformed_message_id_is_422(api: httpx.AsyncClient, world: World) -> None:
    response = await api.get("/v1/messages/not-a-uuid", headers=world.auth())

    assert_problem(response, 422, "validation_error", field="message_id")


@pytest.mark.parametrize("path", ["/v1/messages", f"/v1/messages/{uuid.uuid4()}"])
async def test_reading_needs_an_api_key(api: httpx.AsyncClient, world: World, path: str) -> None:
    response = await api.get(path)

    assert_problem(response, 401, "missing_api_key")


async def test_an_empty_listing(api: httpx.AsyncClient, world: World) -> None:
    response = await api.get("/v1/messages", headers=world.auth())

    assert response.status_code == 200, response.text
    assert response.json() == {"data": [], "has_more": False, "next_cursor": None}


async def test_lists_newest_first(api: httpx.AsyncClient, world: World) -> None:
    sent = await send_many(api, world, 3)

    assert await list_ids(api, world) == list(reversed(sent))


async def test_orders_by_creation_time_not_by_insertion(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    a, b, c = await send_many(api, world, 3)
    await set_created_at(
        session_factory, {a: T0 + timedelta(hours=2), b: T0, c: T0 + timedelta(hours=1)}
    )

    response = await api.get("/v1/messages", headers=world.auth())

    assert [m["id"] for m in response.json()["data"]] == [a, c, b]
    assert [m["created_at"] for m in response.json()["data"]] == [
        "2026-01-01T12:00:00Z",
        "2026-01-01T11:00:00Z",
        "2026-01-01T10:00:00Z",
    ]


async def test_cursor_pagination_returns_every_message_once(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    ids = await send_many(api, world, 7)
    # ids[n] is n minutes after T0, so newest first is ids reversed.
    await set_created_at(
        session_factory, {message_id: T0 + timedelta(minutes=n) for n, message_id in enumerate(ids)}
    )
    newest_first = list(reversed(ids))

    result = await pages(api, world, limit=3)

    assert [[m["id"] for m in page["data"]] for page in result] == [
        newest_first[0:3],
        newest_first[3:6],
        newest_first[6:7],
    ]
    assert [page["has_more"] for page in result] == [True, True, False]
    assert result[0]["next_cursor"] and result[1]["next_cursor"]
    assert result[0]["next_cursor"] != result[1]["next_cursor"]
    assert result[2]["next_cursor"] is None
    seen = [m["id"] for page in result for m in page["data"]]
    assert len(seen) == len(set(seen)) == 7
    assert set(seen) == set(ids)


async def test_cursor_pagination_breaks_ties_in_creation_time_by_id(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    ids = await send_many(api, world, 7)
    await set_created_at(session_factory, dict.fromkeys(ids, T0))
    # PostgreSQL orders uuids bytewise, as Python orders their integer values.
    expected = sorted(ids, key=uuid.UUID, reverse=True)

    result = await pages(api, world, limit=3)

    assert [len(page["data"]) for page in result] == [3, 3, 1]
    assert [m["id"] for page in result for m in page["data"]] == expected
    assert [page["has_more"] for page in result] == [True, True, False]


async def test_a_last_full_page_says_there_is_no_more(api: httpx.AsyncClient, world: World) -> None:
    ids = await send_many(api, world, 6)

    result = await pages(api, world, limit=3)

    assert [len(page["data"]) for page in result] == [3, 3]
    assert result[-1] == {**result[-1], "has_more": False, "next_cursor": None}
    assert {m["id"] for page in result for m in page["data"]} == set(ids)


async def test_a_message_created_after_the_first_page_does_not_shift_later_pages(
    api: httpx.AsyncClient, world: World
) -> None:
    ids = await send_many(api, world, 4)
    first = (await api.get("/v1/messages", params={"limit": 2}, headers=world.auth())).json()
    newer = await send(api, world, body="arrived while paging")

    second = (
        await api.get(
            "/v1/messages",
            params={"limit": 2, "cursor": first["next_cursor"]},
            headers=world.auth(),
        )
    ).json()

    assert [m["id"] for m in first["data"]] == [ids[3], ids[2]]
    assert [m["id"] for m in second["data"]] == [ids[1], ids[0]]
    assert second["has_more"] is False
    assert newer["id"] not in [m["id"] for m in second["data"]]


async def test_filters_by_recipient_in_any_format(api: httpx.AsyncClient, world: World) -> None:
    a = (await send(api, world, to="+14155550123"))["id"]
    b = (await send(api, world, to="+14155550124"))["id"]
    c = (await send(api, world, to="415-555-0123"))["id"]

    assert await list_ids(api, world, to="(415) 555-0123") == [c, a]
    assert await list_ids(api, world, to="+1 415 555 0124") == [b]
    assert await list_ids(api, world, to="+14155550125") == []


async def test_the_recipient_filter_lists_only_the_clients_own_messages(
    api: httpx.AsyncClient, world: World
) -> None:
    mine = (await send(api, world, to="+14155550123"))["id"]
    theirs = (await send(api, world, key=world.other_client_key, to="+14155550123"))["id"]

    assert await list_ids(api, world, to="+14155550123") == [mine]
    assert await list_ids(api, world, key=world.other_client_key, to="+14155550123") == [theirs]


async def test_an_invalid_recipient_filter_is_422(api: httpx.AsyncClient, world: World) -> None:
    response = await api.get("/v1/messages", params={"to": "not a number"}, headers=world.auth())

    assert_problem(response, 422, "validation_error", field="to")


async def test_filters_by_status(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    a, b, c = await send_many(api, world, 3)
    await set_status(session_factory, b, "delivered")
    await set_status(session_factory, c, "failed")

    assert await list_ids(api, world, status="delivered") == [b]
    assert await list_ids(api, world, status="failed") == [c]
    assert await list_ids(api, world, status="queued") == [a]
    assert await list_ids(api, world, status="sent") == []


async def test_filters_page_with_the_cursor(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    ids = await send_many(api, world, 6)
    delivered = [ids[0], ids[2], ids[3], ids[5]]
    for message_id in delivered:
        await set_status(session_factory, message_id, "delivered")

    result = await pages(api, world, limit=3, status="delivered")

    assert [[m["id"] for m in page["data"]] for page in result] == [
        [ids[5], ids[3], ids[2]],
        [ids[0]],
    ]
    assert {m["status"] for page in result for m in page["data"]} == {"delivered"}


async def test_filters_by_creation_time(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    ten, eleven, noon = await send_many(api, world, 3)
    await set_created_at(
        session_factory,
        {ten: T0, eleven: T0 + timedelta(hours=1), noon: T0 + timedelta(hours=2)},
    )

    # created_after is inclusive, created_before exclusive.
    assert await list_ids(api, world, created_after="2026-01-01T11:00:00Z") == [noon, eleven]
    assert await list_ids(api, world, created_before="2026-01-01T12:00:00Z") == [eleven, ten]
    assert await list_ids(
        api,
        world,
        created_after="2026-01-01T10:00:01Z",
        created_before="2026-01-01T12:00:00Z",
    ) == [eleven]
    # An offset is honoured: 12:00+01:00 is 11:00 UTC.
    assert await list_ids(api, world, created_after="2026-01-01T12:00:00+01:00") == [
        noon,
        eleven,
    ]
    assert await list_ids(api, world, created_after="2026-01-01T12:00:01Z") == []
    assert await list_ids(api, world, created_before="2026-01-01T10:00:00Z") == []


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "!!!",
        "é",
        cursor_of("2026-01-01T10:00:00+00:00|not-a-uuid"),
        cursor_of(f"yesterday|{uuid.uuid4()}"),
        cursor_of("no separator at all"),
        base64.urlsafe_b64encode(b"\xff\xfe\xfd|x").decode(),
        "",
        # Cursors the API hands out always carry an offset.
        cursor_of(f"2026-01-01T10:00:00|{uuid.uuid4()}"),
        # Edited to instants that exist only outside UTC's range.
        cursor_of(f"0001-01-01T00:00:00+14:00|{uuid.uuid4()}"),
        cursor_of(f"9999-12-31T23:59:59-14:00|{uuid.uuid4()}"),
    ],
)
async def test_a_garbage_cursor_is_422(api: httpx.AsyncClient, world: World, cursor: str) -> None:
    await send(api, world)

    response = await api.get("/v1/messages", params={"cursor": cursor}, headers=world.auth())

    assert_problem(response, 422, "invalid_cursor", field="cursor")


@pytest.mark.parametrize("limit", ["0", "101", "-1", "ten"])
async def test_a_limit_out_of_range_is_422(
    api: httpx.AsyncClient, world: World, limit: str
) -> None:
    response = await api.get("/v1/messages", params={"limit": limit}, headers=world.auth())

    assert_problem(response, 422, "validation_error", field="limit")


@pytest.mark.parametrize(("limit", "expected"), [(1, 1), (100, 2)])
async def test_the_limit_bounds_are_allowed(
    api: httpx.AsyncClient, world: World, limit: int, expected: int
) -> None:
    await send_many(api, world, 2)

    assert len(await list_ids(api, world, limit=limit)) == expected


async def test_the_default_page_size_is_20(api: httpx.AsyncClient, world: World) -> None:
    await send_many(api, world, 21)

    response = await api.get("/v1/messages", headers=world.auth())

    assert len(response.json()["data"]) == 20
    assert response.json()["has_more"] is True


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "lost"}, "status"),
        ({"status": "QUEUED"}, "status"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_before": "2026-13-01T00:00:00Z"}, "created_before"),
        # Without an offset the instant is ambiguous: refused rather than guessed.
        ({"created_after": "2026-01-01T10:00:00"}, "created_after"),
        # Valid datetimes that fall outside the representable range once converted to UTC.
        ({"created_after": "0001-01-01T00:00:00+14:00"}, "created_after"),
        ({"created_before": "9999-12-31T23:59:59-14:00"}, "created_before"),
    ],
)
async def test_invalid_filters_are_422(
    api: httpx.AsyncClient, world: World, params: dict[str, str], field: str
) -> None:
    response = await api.get("/v1/messages", params=params, headers=world.auth())

    assert_problem(response, 422, "validation_error", field=field)
