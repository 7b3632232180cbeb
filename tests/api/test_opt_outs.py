"""/v1/opt-outs: recording opt-outs and opt-ins, reading state and history, listing, CSV import."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.consent.optouts import OptAction, OptChange, OptSource, record_change
from app.db.models import OptOut
from app.db.session import SessionFactory
from tests.api.test_send import assert_problem, message_count, send
from tests.conftest import World

TWILIO = "+14155550100"  # world.twilio_sender, the client's default sender
FAKE = "+14155550199"  # world.fake_sender
VONAGE = "ACME"  # world.vonage_sender

Row = tuple[str, uuid.UUID | None, str, str, str | None, str | None]


async def put(
    api: httpx.AsyncClient,
    world: World,
    phone: str,
    *,
    sender_id: uuid.UUID | None = None,
    key: str | None = None,
) -> httpx.Response:
    params = {"sender_id": str(sender_id)} if sender_id else {}
    return await api.put(f"/v1/opt-outs/{phone}", params=params, headers=world.auth(key))


async def delete(
    api: httpx.AsyncClient,
    world: World,
    phone: str,
    *,
    sender_id: uuid.UUID | None = None,
    key: str | None = None,
) -> httpx.Response:
    params = {"sender_id": str(sender_id)} if sender_id else {}
    return await api.delete(
        f"/v1/opt-outs/{phone}", params=params, headers=world.auth(key or world.admin_key)
    )


async def get_status(
    api: httpx.AsyncClient, world: World, phone: str, *, sender_id: uuid.UUID | None = None
) -> httpx.Response:
    params = {"sender_id": str(sender_id)} if sender_id else {}
    return await api.get(
        f"/v1/opt-outs/{phone}", params=params, headers=world.auth(world.admin_key)
    )


async def list_page(api: httpx.AsyncClient, world: World, **params: Any) -> httpx.Response:
    return await api.get("/v1/opt-outs", params=params, headers=world.auth(world.admin_key))


async def import_csv(
    api: httpx.AsyncClient, world: World, text: str, *, key: str | None = None
) -> httpx.Response:
    return await api.post(
        "/v1/opt-outs/import",
        content=text.encode(),
        headers={**world.auth(key or world.admin_key), "content-type": "text/csv"},
    )


async def send_from(api: httpx.AsyncClient, world: World, to: str, sender: str) -> httpx.Response:
    return await send(api, world, to=to, **{"from": sender})


async def rows(session_factory: SessionFactory) -> list[Row]:
    """Every opt_outs row, oldest first, as (phone, sender_id, action, source, actor, detail)."""
    async with session_factory() as session:
        result = await session.execute(
            select(
                OptOut.phone,
                OptOut.sender_id,
                OptOut.action,
                OptOut.source,
                OptOut.actor,
                OptOut.detail,
            ).order_by(OptOut.id)
        )
        return [tuple(row) for row in result]  # type: ignore[misc]


async def row_count(session_factory: SessionFactory) -> int:
    async with session_factory() as session:
        return int(await session.scalar(select(func.count()).select_from(OptOut)) or 0)


# PUT


async def test_a_client_key_records_an_opt_out_and_sends_to_the_number_are_refused(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    sender_id = world.twilio_sender.id

    response = await put(api, world, "+14155550123", sender_id=sender_id)

    assert response.status_code == 200, response.text
    status = response.json()
    assert status["phone"] == "+14155550123"
    assert status["sender_id"] == str(sender_id)
    assert status["opted_out"] is True
    [event] = status["history"]
    assert event["phone"] == "+14155550123"
    assert event["sender_id"] == str(sender_id)
    assert (event["action"], event["source"], event["actor"]) == ("opt_out", "api", "client:shop")
    assert await rows(session_factory) == [
        ("+14155550123", sender_id, "opt_out", "api", "client:shop", None)
    ]

    refused = await send(api, world, to="+14155550123")  # from the default sender, Twilio's

    assert_problem(refused, 403, "recipient_opted_out")
    assert "+14155550123" in refused.json()["detail"]
    assert await message_count(session_factory) == 0


async def test_any_client_may_record_an_opt_out_under_its_own_name(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    response = await put(api, world, "+14155550123", key=world.other_client_key)

    assert response.status_code == 200, response.text
    assert response.json()["history"][0]["actor"] == "client:other-shop"
    # Without a sender: each of the client's senders (here all three), never service-wide.
    assert sorted(await rows(session_factory), key=str) == sorted(
        (
            ("+14155550123", sender.id, "opt_out", "api", "client:other-shop", None)
            for sender in (world.twilio_sender, world.vonage_sender, world.fake_sender)
        ),
        key=str,
    )
    assert_problem(await send(api, world, to="+14155550123"), 403, "recipient_opted_out")


async def test_an_opt_out_without_a_sender_applies_to_every_sender(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    response = await put(api, world, "+14155550123")

    assert response.status_code == 200, response.text
    assert response.json()["sender_id"] is None
    assert response.json()["opted_out"] is True
    for sender in (TWILIO, FAKE, VONAGE):
        refused = await send_from(api, world, "+14155550123", sender)
        assert_problem(refused, 403, "recipient_opted_out")
    assert await message_count(session_factory) == 0
    # Other numbers are not affected.
    assert (await send_from(api, world, "+14155550124", FAKE)).status_code == 202


async def test_an_opt_out_with_a_sender_applies_to_that_sender_only(
    api: httpx.AsyncClient, world: World
) -> None:
    response = await put(api, world, "+14155550123", sender_id=world.fake_sender.id)

    assert response.status_code == 200, response.text
    assert_problem(await send_from(api, world, "+14155550123", FAKE), 403, "recipient_opted_out")
    for sender in (TWILIO, VONAGE):
        accepted = await send_from(api, world, "+14155550123", sender)
        assert accepted.status_code == 202, accepted.text


@pytest.mark.parametrize("phone", ["(415) 555-0124", "415.555.0124", "+1 415 555 0124"])
async def test_a_number_in_another_format_is_normalised(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, phone: str
) -> None:
    response = await put(api, world, phone, key=world.admin_key)

    assert response.status_code == 200, response.text
    assert response.json()["phone"] == "+14155550124"
    assert [row[0] for row in await rows(session_factory)] == ["+14155550124"]
    assert_problem(await send(api, world, to="+14155550124"), 403, "recipient_opted_out")


@pytest.mark.parametrize(
    ("phone", "reason"),
    [
        ("not a number", "not a phone number"),
        ("555-0123", "impossible number"),
        ("+15555550123", "invalid number"),
        ("+33142685300", "fixed-line"),
    ],
)
async def test_an_invalid_number_is_a_422_naming_phone(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, phone: str, reason: str
) -> None:
    response = await put(api, world, phone)

    assert_problem(response, 422, "validation_error", field="phone")
    assert reason in response.json()["errors"][0]["reason"]
    assert await row_count(session_factory) == 0


@pytest.mark.parametrize("method", ["PUT", "DELETE", "GET"])
async def test_an_unknown_sender_is_a_404(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, method: str
) -> None:
    unknown = uuid.uuid4()

    response = await api.request(
        method,
        "/v1/opt-outs/+14155550123",
        params={"sender_id": str(unknown)},
        headers=world.auth(world.admin_key),
    )

    assert_problem(response, 404, "sender_not_found")
    assert str(unknown) in response.json()["detail"]
    assert await row_count(session_factory) == 0


# DELETE


async def test_delete_needs_an_admin_key(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    assert (await put(api, world, "+14155550123", key=world.admin_key)).status_code == 200

    for key in (world.client_key, world.other_client_key):
        assert_problem(await delete(api, world, "+14155550123", key=key), 403, "admin_key_required")
    anonymous = await api.delete("/v1/opt-outs/+14155550123")

    assert_problem(anonymous, 401, "missing_api_key")
    assert await row_count(session_factory) == 1
    assert_problem(await send(api, world, to="+14155550123"), 403, "recipient_opted_out")


async def test_delete_records_an_opt_in_keeping_the_history_and_sending_works_again(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    sender_id = world.twilio_sender.id
    assert (await put(api, world, "+14155550123", sender_id=sender_id)).status_code == 200
    assert await row_count(session_factory) == 1

    response = await delete(api, world, "+14155550123", sender_id=sender_id)

    assert response.status_code == 200, response.text
    status = response.json()
    assert status["opted_out"] is False
    assert [(e["action"], e["actor"]) for e in status["history"]] == [
        ("opt_in", "client:operator"),
        ("opt_out", "client:shop"),
    ]
    # Nothing was deleted: the opt-in is a new row.
    assert await row_count(session_factory) == 2
    assert await rows(session_factory) == [
        ("+14155550123", sender_id, "opt_out", "api", "client:shop", None),
        ("+14155550123", sender_id, "opt_in", "api", "client:operator", None),
    ]
    accepted = await send(api, world, to="+14155550123")
    assert accepted.status_code == 202, accepted.text


async def test_a_service_wide_delete_lifts_a_service_wide_opt_out(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    assert (await put(api, world, "+14155550123", key=world.admin_key)).status_code == 200

    response = await delete(api, world, "+14155550123")

    assert response.status_code == 200, response.text
    assert response.json()["opted_out"] is False
    assert await row_count(session_factory) == 2
    for sender in (TWILIO, FAKE, VONAGE):
        accepted = await send_from(api, world, "+14155550123", sender)
        assert accepted.status_code == 202, accepted.text


async def test_the_change_recorded_last_decides_even_if_its_transaction_began_first(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    # Changes to a number are serialised by its lock, not by when their transactions began: an
    # opt-in whose transaction began before a concurrent opt-out, but was recorded after it
    # (and so was told it changed the state), must be the state that holds.
    async with session_factory() as early, early.begin():
        await early.execute(select(func.now()))  # this transaction's now() is fixed here
        assert (await put(api, world, "+14155550123", key=world.admin_key)).status_code == 200
        changed = await record_change(
            early,
            OptChange("+14155550123", None, OptAction.OPT_IN, OptSource.API, "client:operator"),
        )
    assert changed.changed is True

    status = (await get_status(api, world, "+14155550123")).json()

    assert status["opted_out"] is False
    assert [e["action"] for e in status["history"]] == ["opt_in", "opt_out"]
    accepted = await send(api, world, to="+14155550123")
    assert accepted.status_code == 202, accepted.text


# GET one number


async def test_get_shows_the_state_and_the_history_newest_first(
    api: httpx.AsyncClient, world: World
) -> None:
    assert (await put(api, world, "+14155550123", key=world.admin_key)).status_code == 200
    assert (await delete(api, world, "+14155550123")).status_code == 200
    other = await put(api, world, "+14155550123", sender_id=world.fake_sender.id)
    assert other.status_code == 200
    assert (await put(api, world, "+14155550123", key=world.admin_key)).status_code == 200

    response = await get_status(api, world, "(415) 555-0123")

    assert response.status_code == 200, response.text
    status = response.json()
    assert status["phone"] == "+14155550123"
    assert status["sender_id"] is None
    assert status["opted_out"] is True
    history = status["history"]
    # An admin sees every row, whoever recorded it, for every sender.
    assert [(e["action"], e["actor"], e["sender_id"]) for e in history] == [
        ("opt_out", "client:operator", None),
        ("opt_out", "client:shop", str(world.fake_sender.id)),
        ("opt_in", "client:operator", None),
        ("opt_out", "client:operator", None),
    ]
    times = [datetime.fromisoformat(e["created_at"]) for e in history]
    assert times == sorted(times, reverse=True)
    assert [e["id"] for e in history] == sorted((e["id"] for e in history), reverse=True)

    lifted = await delete(api, world, "+14155550123")
    assert lifted.json()["opted_out"] is False
    again = await get_status(api, world, "+14155550123")
    assert again.json()["opted_out"] is False
    assert [e["action"] for e in again.json()["history"]] == [
        "opt_in",
        "opt_out",
        "opt_out",
        "opt_in",
        "opt_out",
    ]


async def test_get_of_a_number_never_opted_out(api: httpx.AsyncClient, world: World) -> None:
    response = await get_status(api, world, "+14155550123")

    assert response.status_code == 200, response.text
    assert response.json() == {
        "phone": "+14155550123",
        "sender_id": None,
        "opted_out": False,
        "history": [],
        "senders": None,
    }


async def test_get_for_a_sender_counts_a_service_wide_opt_out(
    api: httpx.AsyncClient, world: World
) -> None:
    assert (await put(api, world, "+14155550123", key=world.admin_key)).status_code == 200

    response = await get_status(api, world, "+14155550123", sender_id=world.fake_sender.id)

    assert response.status_code == 200, response.text
    assert response.json()["sender_id"] == str(world.fake_sender.id)
    assert response.json()["opted_out"] is True
    assert [e["sender_id"] for e in response.json()["history"]] == [None]


@pytest.mark.parametrize("path", ["/v1/opt-outs", "/v1/opt-outs?phone=%2B14155550123"])
async def test_reading_opt_outs_needs_an_admin_key(
    api: httpx.AsyncClient, world: World, path: str
) -> None:
    assert (await put(api, world, "+14155550123")).status_code == 200

    for key in (world.client_key, world.other_client_key):
        assert_problem(await api.get(path, headers=world.auth(key)), 403, "admin_key_required")
    assert_problem(await api.get(path), 401, "missing_api_key")


# GET the list


async def test_the_list_shows_current_opt_outs_only_newest_first(
    api: httpx.AsyncClient, world: World
) -> None:
    assert (await put(api, world, "+14155550101", key=world.admin_key)).status_code == 200
    assert (
        await put(api, world, "+14155550102", key=world.admin_key)
    ).status_code == 200  # opted back in below
    assert (
        await put(api, world, "+14155550103", sender_id=world.twilio_sender.id)
    ).status_code == 200
    assert (await delete(api, world, "+14155550102")).status_code == 200

    response = await list_page(api, world)

    assert response.status_code == 200, response.text
    page = response.json()
    assert [(e["phone"], e["sender_id"]) for e in page["data"]] == [
        ("+14155550103", str(world.twilio_sender.id)),
        ("+14155550101", None),
    ]
    assert all(e["action"] == "opt_out" for e in page["data"])
    assert page["has_more"] is False
    assert page["next_cursor"] is None


async def test_the_list_agrees_with_the_send_check_after_a_service_wide_opt_in(
    api: httpx.AsyncClient, world: World
) -> None:
    await put(api, world, "+14155550104", sender_id=world.twilio_sender.id)
    await delete(api, world, "+14155550104")  # opted back in everywhere

    listed = (await list_page(api, world)).json()["data"]
    sent = await send_from(api, world, "+14155550104", TWILIO)

    assert listed == []
    assert sent.status_code == 202, sent.text


async def test_the_list_filters_by_phone_and_by_sender(
    api: httpx.AsyncClient, world: World
) -> None:
    twilio, fake = world.twilio_sender.id, world.fake_sender.id
    assert (await put(api, world, "+14155550101", sender_id=fake)).status_code == 200
    assert (await put(api, world, "+14155550101", key=world.admin_key)).status_code == 200
    assert (await put(api, world, "+14155550102", sender_id=twilio)).status_code == 200
    assert (await put(api, world, "+14155550103", sender_id=fake)).status_code == 200
    assert (await put(api, world, "+14155550104", sender_id=fake)).status_code == 200
    assert (await delete(api, world, "+14155550104", sender_id=fake)).status_code == 200

    def listed(response: httpx.Response) -> list[tuple[str, str | None]]:
        assert response.status_code == 200, response.text
        return [(e["phone"], e["sender_id"]) for e in response.json()["data"]]

    assert listed(await list_page(api, world, phone="+14155550101")) == [
        ("+14155550101", None),
        ("+14155550101", str(fake)),
    ]
    # The filter is validated and normalised like any number.
    assert listed(await list_page(api, world, phone="(415) 555-0102")) == [
        ("+14155550102", str(twilio))
    ]
    assert listed(await list_page(api, world, phone="+14155550104")) == []
    assert listed(await list_page(api, world, sender_id=str(fake))) == [
        ("+14155550103", str(fake)),
        ("+14155550101", str(fake)),
    ]
    assert listed(await list_page(api, world, phone="+14155550101", sender_id=str(twilio))) == []
    assert_problem(
        await list_page(api, world, phone="not a number"), 422, "validation_error", field="phone"
    )


async def page_through(api: httpx.AsyncClient, world: World, limit: int) -> list[list[str]]:
    """Every page of the list, following `next_cursor`, as the phones on each page."""
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        response = await list_page(api, world, **params)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append([e["phone"] for e in page["data"]])
        assert page["has_more"] is (page["next_cursor"] is not None)
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 10, "pagination does not end"


async def test_the_list_paginates_with_a_cursor_without_duplicates_or_gaps(
    api: httpx.AsyncClient, world: World
) -> None:
    for last in "12345":
        assert (await put(api, world, f"+1415555010{last}", key=world.admin_key)).status_code == 200
    assert (await put(api, world, "+14155550109", key=world.admin_key)).status_code == 200
    assert (await delete(api, world, "+14155550109")).status_code == 200

    pages = await page_through(api, world, limit=2)

    assert pages == [
        ["+14155550105", "+14155550104"],
        ["+14155550103", "+14155550102"],
        ["+14155550101"],
    ]


async def test_pagination_is_exact_among_opt_outs_recorded_at_the_same_time(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    # Rows added in one transaction get its now() as created_at, so the id must break the tie.
    async with session_factory.begin() as session:
        session.add_all(
            OptOut(phone=f"+1415555010{last}", sender_id=None, action="opt_out", source="api")
            for last in "12345"
        )
    async with session_factory() as session:
        assert len(set(await session.scalars(select(OptOut.created_at)))) == 1

    pages = await page_through(api, world, limit=2)

    assert pages == [
        ["+14155550105", "+14155550104"],
        ["+14155550103", "+14155550102"],
        ["+14155550101"],
    ]


async def test_a_cursor_that_is_not_ours_is_a_422(api: httpx.AsyncClient, world: World) -> None:
    response = await list_page(api, world, cursor="not-a-cursor")

    assert_problem(response, 422, "invalid_cursor", field="cursor")


# CSV import

IMPORT = (
    "phone,sender\n"  # 1: header
    "+14155550131\n"  # 2
    "(415) 555-0132\n"  # 3
    "415.555.0133,+14155550199\n"  # 4: the fake sender only
    "not a number\n"  # 5
    "+14155550134,+14155550111\n"  # 6: not one of our senders
    "\n"  # 7
    "1 415 555 0135, ACME\n"  # 8: the Vonage sender only
    "+33142685300\n"  # 9: fixed line
    "   \n"  # 10
    "+14155550136,(415) 555-0100\n"  # 11: the Twilio sender, written nationally
)


async def test_import_records_valid_lines_and_reports_the_others(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    response = await import_csv(api, world, IMPORT)

    assert response.status_code == 200, response.text
    result = response.json()
    assert result["recorded"] == 5
    errors = result["errors"]
    assert [(e["line"], e["value"]) for e in errors] == [
        (5, "not a number"),
        (6, "+14155550111"),
        (9, "+33142685300"),
    ]
    assert "not a phone number" in errors[0]["reason"]
    assert errors[1]["reason"] == "not one of our senders"
    assert "fixed-line" in errors[2]["reason"]
    imported = ("opt_out", "import", "client:operator", "bulk import")
    assert await rows(session_factory) == [
        ("+14155550131", None, *imported),
        ("+14155550132", None, *imported),
        ("+14155550133", world.fake_sender.id, *imported),
        ("+14155550135", world.vonage_sender.id, *imported),
        ("+14155550136", world.twilio_sender.id, *imported),
    ]


async def test_sends_to_imported_numbers_are_refused(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    assert (await import_csv(api, world, IMPORT)).status_code == 200

    refused = [
        ("+14155550131", TWILIO),  # every sender
        ("+14155550132", FAKE),
        ("+14155550132", VONAGE),
        ("+14155550133", FAKE),  # its sender
        ("+14155550135", VONAGE),
        ("+14155550136", TWILIO),
    ]
    for to, sender in refused:
        assert_problem(await send_from(api, world, to, sender), 403, "recipient_opted_out")
    assert await message_count(session_factory) == 0
    allowed = [
        ("+14155550133", TWILIO),  # scoped to another sender
        ("+14155550135", FAKE),
        ("+14155550136", VONAGE),
        ("+14155550134", TWILIO),  # its line had an unknown sender: nothing recorded
    ]
    for to, sender in allowed:
        accepted = await send_from(api, world, to, sender)
        assert accepted.status_code == 202, (to, sender, accepted.text)


async def test_import_without_a_header_records_the_first_line(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    response = await import_csv(api, world, "+14155550141\nphone\n+14155550142")

    assert response.status_code == 200, response.text
    # "phone" is a header on line 1 only; elsewhere it is just an invalid number.
    assert response.json()["recorded"] == 2
    assert [(e["line"], e["value"]) for e in response.json()["errors"]] == [(2, "phone")]
    assert [row[0] for row in await rows(session_factory)] == ["+14155550141", "+14155550142"]


async def test_import_needs_an_admin_key(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    for key in (world.client_key, world.other_client_key):
        response = await import_csv(api, world, IMPORT, key=key)
        assert_problem(response, 403, "admin_key_required")
    anonymous = await api.post(
        "/v1/opt-outs/import", content=IMPORT.encode(), headers={"content-type": "text/csv"}
    )

    assert_problem(anonymous, 401, "missing_api_key")
    assert await row_count(session_factory) == 0
    accepted = await send(api, world, to="+14155550131")
    assert accepted.status_code == 202, accepted.text


@pytest.mark.parametrize(
    ("text", "recorded"),
    [
        ("\ufeffphone\n+14155550121\n+14155550122\n", 2),  # a BOM before the header
        ("+14155550121\r+14155550122\r", 2),  # old Mac line endings
        ("phone;sender\n+14155550121;+14155550100\n+14155550122;\n", 2),  # semicolons
    ],
)
async def test_import_reads_the_csv_dialects_spreadsheets_write(
    api: httpx.AsyncClient, world: World, text: str, recorded: int
) -> None:
    response = await import_csv(api, world, text)

    assert response.status_code == 200, response.text
    assert response.json() == {"recorded": recorded, "unchanged": 0, "errors": []}


async def test_import_reports_a_bad_sender_cell_on_its_line(
    api: httpx.AsyncClient, world: World
) -> None:
    response = await import_csv(api, world, "+14155550121,+1415555\x000100\n+14155550122\n")

    assert response.status_code == 200, response.text
    assert response.json()["recorded"] == 1
    assert [(e["line"], e["reason"]) for e in response.json()["errors"]] == [
        (1, "not a sender address")
    ]


async def test_an_unreadable_csv_is_a_422(api: httpx.AsyncClient, world: World) -> None:
    response = await import_csv(api, world, "+14155550121," + "x" * 200_000 + "\n")

    assert_problem(response, 422, "invalid_csv", field="body")


async def test_a_large_import_is_recorded_in_one_go(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    # Beyond what PostgreSQL's lock table holds if every number took its own lock.
    numbers = [f"+1{area}555{n:04d}" for area in (415, 650) for n in range(10_000)]

    response = await import_csv(api, world, "\n".join(numbers))

    assert response.status_code == 200, response.text
    assert response.json()["recorded"] == 20_000
    assert await row_count(session_factory) == 20_000


async def test_importing_a_file_again_records_nothing_twice(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    assert (await import_csv(api, world, IMPORT)).json()["recorded"] == 5
    # An opt-in since: that number is recorded again; a repeated line counts once.
    assert (await delete(api, world, "+14155550131")).status_code == 200

    response = await import_csv(api, world, IMPORT + "+14155550132\n")

    assert response.status_code == 200, response.text
    assert (response.json()["recorded"], response.json()["unchanged"]) == (1, 5)
    assert await row_count(session_factory) == 5 + 1 + 1  # the import, the opt-in, one again


async def test_a_sender_scoped_import_after_a_service_wide_opt_in_is_recorded(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    line = "+14155550136,+14155550100\n"  # the Twilio sender only
    assert (await import_csv(api, world, line)).json()["recorded"] == 1
    assert (await delete(api, world, "+14155550136")).status_code == 200  # service-wide opt-in

    response = await import_csv(api, world, line)

    assert response.json()["recorded"] == 1  # the opt-in lifted it: opting out again counts
    assert_problem(await send_from(api, world, "+14155550136", TWILIO), 403, "recipient_opted_out")
