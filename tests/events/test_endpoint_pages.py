"""GET /v1/event-endpoints by cursor: every endpoint once, oldest first, per caller."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import text

from app.db.session import SessionFactory
from tests.api.test_send import assert_problem
from tests.conftest import World

T0 = datetime(2026, 12, 1, tzinfo=UTC)


async def add_endpoint(
    session_factory: SessionFactory,
    url: str,
    at: datetime,
    *,
    client_id: uuid.UUID | None = None,
    sender_id: uuid.UUID | None = None,
) -> None:
    async with session_factory.begin() as session:
        await session.execute(
            text(
                "INSERT INTO webhook_endpoints (id, client_id, sender_id, url, created_at) "
                "VALUES (:id, :client, :sender, :url, :at)"
            ),
            {"id": uuid.uuid4(), "client": client_id, "sender": sender_id, "url": url, "at": at},
        )


async def page_through(api: httpx.AsyncClient, key: str) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        response = await api.get(
            "/v1/event-endpoints", params=params, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append([endpoint["url"] for endpoint in page["data"]])
        assert page["has_more"] is (page["next_cursor"] is not None)
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 10, "pagination does not end"


async def test_endpoints_page_by_cursor_and_admins_also_see_senders(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    for n in range(3):
        await add_endpoint(
            session_factory, f"https://a.example/{n}", T0, client_id=world.client_id
        )  # the same instant: the id orders them
    await add_endpoint(
        session_factory,
        "https://s.example/ours",
        T0 + timedelta(minutes=1),
        sender_id=world.twilio_sender.id,
    )
    await add_endpoint(
        session_factory,
        "https://a.example/late",
        T0 + timedelta(hours=1),
        client_id=world.client_id,
    )

    client_pages = await page_through(api, world.client_key)
    admin_pages = await page_through(api, world.admin_key)

    client_urls = [url for page in client_pages for url in page]
    assert [len(page) for page in client_pages] == [2, 2]
    assert sorted(client_urls[:3]) == [f"https://a.example/{n}" for n in range(3)]
    assert client_urls[3] == "https://a.example/late"
    # The admin's own client has no endpoints here: it sees the senders'.
    assert [url for page in admin_pages for url in page] == ["https://s.example/ours"]


async def test_a_bad_cursor_is_a_422(api: httpx.AsyncClient, world: World) -> None:
    response = await api.get("/v1/event-endpoints", params={"cursor": "nope"}, headers=world.auth())

    assert_problem(response, 422, "invalid_cursor", field="cursor")
