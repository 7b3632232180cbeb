"""The console's conversation, consent, senders, events and overview pages over plain HTTP:
what each shows, the forms (CSRF-checked, refusals named), and that they agree with the API."""

from __future__ import annotations

import html
import logging
import re
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import select, text

from app.console import routes as console_routes
from app.db.models import Sender, WebhookEndpoint, WebhookEvent
from app.db.session import SessionFactory
from app.main import create_app
from app.senders.keywords import KeywordConfig
from tests.api.test_inbound import twilio_inbound
from tests.conftest import World
from tests.console.test_sessions import csrf_of, sign_in
from tests.test_end_to_end import post_message, run_worker

# No network call (Redis: the overview's breakers and queue, an event's enqueue) inside a
# transaction.
pytestmark = pytest.mark.network_guard

PHONE = "+14155550123"
NATIONAL = "(415) 555-0123"


@pytest.fixture
async def console(api: httpx.AsyncClient, world: World) -> httpx.AsyncClient:
    """The API client, signed in to the console with the admin key."""
    assert (await sign_in(api, world.admin_key)).status_code == 303
    return api


async def test_every_page_needs_a_session(api: httpx.AsyncClient, world: World) -> None:
    for path in (
        "/console/overview",
        "/console/conversations",
        "/console/consent",
        "/console/senders",
        f"/console/senders/{world.twilio_sender.id}",
        "/console/senders/reply-cost?text=hi",
        "/console/events",
    ):
        answer = await api.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/console/sign-in"), path


async def test_the_conversation_shows_a_stop_and_our_reply(
    console: httpx.AsyncClient, world: World
) -> None:
    await post_message(console, world, to=PHONE, **{"from": world.twilio_sender.address})
    assert (await twilio_inbound(console, "Stop")).status_code == 200
    assert (await twilio_inbound(console, "where is my parcel?")).status_code == 200

    page = await console.get(
        "/console/conversations",
        params={"phone": NATIONAL, "sender_id": str(world.twilio_sender.id)},
    )

    assert page.status_code == 200
    kinds = re.findall(r'data-direction="(\w+)" data-kind="(\w+)"', page.text)
    assert kinds == [
        ("outbound", "regular"),
        ("inbound", "inbound"),
        ("outbound", "opt_out_confirmation"),
        ("inbound", "inbound"),
    ]
    assert 'data-keyword="STOP"' in page.text and "keyword STOP (opt_out)" in page.text
    assert "where is my parcel?" not in page.text  # hidden until asked for
    shown = await console.post(
        "/console/conversations/bodies",
        data={
            "phone": PHONE,
            "sender_id": str(world.twilio_sender.id),
            "csrf_token": csrf_of(page),
        },
    )
    assert "where is my parcel?" in shown.text

    bad = await console.get(
        "/console/conversations",
        params={"phone": "not a number", "sender_id": str(world.twilio_sender.id)},
    )
    assert (
        bad.status_code == 200 and 'role="alert"' in bad.text and "data-direction" not in bad.text
    )


async def test_showing_a_conversations_bodies_is_a_checked_and_logged_post(
    console: httpx.AsyncClient, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by review: bodies were shown on a plain GET (`?show=true`, no CSRF, replayable
    from history) and logged without the number."""
    sent = await post_message(console, world, to=PHONE, **{"from": world.twilio_sender.address})
    assert (await twilio_inbound(console, "where is my parcel?")).status_code == 200
    where = {"phone": NATIONAL, "sender_id": str(world.twilio_sender.id)}
    caplog.set_level(logging.INFO, logger="app.console")

    page = await console.get("/console/conversations", params=where | {"show": "true"})
    assert page.status_code == 200 and "where is my parcel?" not in page.text
    for data in (where, where | {"csrf_token": "forged"}):
        refused = await console.post("/console/conversations/bodies", data=data)
        assert refused.status_code == 403 and "where is my parcel?" not in refused.text
    assert not [r for r in caplog.records if "bodies shown" in r.getMessage()]

    shown = await console.post(
        "/console/conversations/bodies", data=where | {"csrf_token": csrf_of(page)}
    )

    assert shown.status_code == 200 and "where is my parcel?" in shown.text
    [line] = [r for r in caplog.records if "bodies shown" in r.getMessage()]
    facts = line.__dict__
    assert (facts["operator"], facts["phone"], facts["sender"]) == (
        world.admin_key[:10], PHONE, world.twilio_sender.address,
    )  # fmt: skip
    assert sent["id"] in facts["message_ids"] and len(facts["message_ids"]) == 2
    assert "where is my parcel?" not in str(facts)
    # A reveal is for its request only: no link of the page carries it on.
    assert "show" not in " ".join(re.findall(r'href="([^"]+)"', shown.text))
    again = await console.get("/console/conversations", params=where)
    assert "where is my parcel?" not in again.text


async def _opt_out_state(api: httpx.AsyncClient, world: World, sender: Sender) -> bool:
    answer = await api.get(
        f"/v1/opt-outs/{PHONE}",
        params={"sender_id": str(sender.id)},
        headers=world.auth(world.admin_key),
    )
    assert answer.status_code == 200, answer.text
    return bool(answer.json()["opted_out"])


async def test_an_operator_opts_a_number_out_and_back_in_with_a_reason(
    console: httpx.AsyncClient, world: World
) -> None:
    page = await console.get("/console/consent", params={"phone": NATIONAL})
    assert page.status_code == 200 and "Never recorded" in page.text
    form = {
        "csrf_token": csrf_of(page),
        "phone": PHONE,
        "sender_id": str(world.twilio_sender.id),
        "action": "opt_out",
        "reason": "asked by phone, ticket 1234",
    }

    done = await console.post("/console/consent", data=form)
    assert done.status_code == 303 and "done=recorded" in done.headers["location"]
    assert await _opt_out_state(console, world, world.twilio_sender)
    assert not await _opt_out_state(console, world, world.fake_sender)
    shown = await console.get(done.headers["location"])
    assert "Recorded." in shown.text and "asked by phone, ticket 1234" in shown.text
    assert re.search(r"operator:[\w-]+", shown.text)
    assert f'data-sender="{world.twilio_sender.address}" data-state="opted_out"' in shown.text

    back = await console.post("/console/consent", data={**form, "action": "opt_in"})
    assert back.status_code == 303
    assert not await _opt_out_state(console, world, world.twilio_sender)
    again = await console.post("/console/consent", data={**form, "action": "opt_in"})
    assert "done=unchanged" in again.headers["location"]


@pytest.mark.parametrize(
    ("change", "status", "says"),
    [
        ({"reason": "  "}, 422, "reason"),
        ({"phone": "12"}, 422, 'role="alert"'),
        ({"action": "maybe"}, 422, "choose an action"),
        ({"sender_id": str(uuid.uuid4())}, 422, "no sender"),
        ({"csrf_token": "forged"}, 403, ""),
    ],
)
async def test_a_refused_consent_change_records_nothing(
    console: httpx.AsyncClient, world: World, change: dict[str, str], status: int, says: str
) -> None:
    page = await console.get("/console/consent", params={"phone": PHONE})
    form = {
        "csrf_token": csrf_of(page),
        "phone": PHONE,
        "sender_id": str(world.twilio_sender.id),
        "action": "opt_out",
        "reason": "test",
        **change,
    }
    answer = await console.post("/console/consent", data=form)
    assert answer.status_code == status
    assert says in answer.text
    assert not await _opt_out_state(console, world, world.twilio_sender)


async def test_senders_show_what_is_missing_and_take_a_reply(
    console: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    async with session_factory.begin() as session:
        bare = Sender(
            id=uuid.uuid4(),
            address="+14155550177",
            kind="long_code",
            provider="fake",
            keywords=KeywordConfig().model_dump(mode="json"),
        )
        session.add(bare)
    listing = await console.get("/console/senders")
    assert "missing replies help/en, help/fr, opt_out/en, opt_out/fr" in listing.text

    cost = await console.get("/console/senders/reply-cost", params={"text": "Arrêt"})
    assert cost.json() == {
        "encoding": "UCS-2",
        "segments": 1,
        "units": 5,
        "non_gsm_characters": ["ê"],
    }
    page = await console.get(f"/console/senders/{bare.id}")
    assert page.status_code == 200 and 'data-cost-output="cost-opt_out-fr"' in page.text
    form = {"csrf_token": csrf_of(page), "category": "opt_out", "language": "fr"}
    saved = await console.post(
        f"/console/senders/{bare.id}/replies", data={**form, "reply": "Désabonné. ARRET."}
    )
    assert saved.status_code == 303
    after = await console.get(saved.headers["location"])
    assert "missing replies help/en, help/fr, opt_out/en<" in after.text
    assert "Désabonné. ARRET.</textarea>" in after.text

    refused = await console.post(
        f"/console/senders/{bare.id}/replies", data={**form, "language": "FR", "reply": "x"}
    )
    assert refused.status_code == 422 and "language" in refused.text
    forged = await console.post(
        f"/console/senders/{bare.id}/replies", data={**form, "csrf_token": "x", "reply": "y"}
    )
    assert forged.status_code == 403
    async with session_factory() as session:
        stored = await session.scalar(select(Sender.keywords).where(Sender.id == bare.id))
    assert stored is not None and stored["opt_out"]["replies"] == {"fr": "Désabonné. ARRET."}
    assert (await console.get(f"/console/senders/{uuid.uuid4()}")).status_code == 404
    script = await console.get("/console/static/replies.js")
    assert script.status_code == 200 and "reply-cost" in script.text


async def failed_event(
    session_factory: SessionFactory, client_id: uuid.UUID, url: str, attempts: int, error: str
) -> WebhookEvent:
    """A client's endpoint at `url` and one `message.delivered` event to it that failed."""
    async with session_factory.begin() as session:
        endpoint = WebhookEndpoint(id=uuid.uuid4(), client_id=client_id, url=url)
        session.add(endpoint)
        await session.flush()
        event = WebhookEvent(
            id=uuid.uuid4(),
            type="message.delivered",
            client_id=client_id,
            endpoint_id=endpoint.id,
            payload={},
            status="failed",
            attempts=attempts,
            last_error=error,
            created_at=datetime.now(UTC),
        )
        session.add(event)
    return event


async def test_a_failed_event_is_redelivered_once(
    console: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    event = await failed_event(
        session_factory, world.client_id, "https://hooks.example.test/x", 9, "HTTP 503"
    )
    page = await console.get("/console/events")
    assert f'data-event="{event.id}"' in page.text and "HTTP 503" in page.text
    token = csrf_of(page)

    done = await console.post(f"/console/events/{event.id}/redeliver", data={"csrf_token": token})
    assert done.status_code == 303
    async with session_factory() as session:
        assert await session.scalar(select(WebhookEvent.status)) == "pending"
    again = await console.post(f"/console/events/{event.id}/redeliver", data={"csrf_token": token})
    assert again.status_code == 409 and "still being delivered" in again.text
    forged = await console.post(f"/console/events/{event.id}/redeliver", data={})
    assert forged.status_code == 403


async def test_the_overview_counts_a_delivered_message(
    console: httpx.AsyncClient, world: World
) -> None:
    before = await console.get("/console/overview")
    assert before.status_code == 200 and "No messages in the last 24 hours." in before.text
    assert 'data-provider="fake" data-breaker="closed"' in before.text

    await post_message(console, world, to=PHONE, **{"from": world.fake_sender.address})
    await run_worker()

    after = await console.get("/console/overview")
    assert 'data-status="delivered" data-count="1"' in after.text
    assert 'data-label="fake" data-rate="100.0"' in after.text
    assert "<svg" in after.text and "<table>" in after.text


async def test_notices_name_only_known_values(console: httpx.AsyncClient, world: World) -> None:
    """Found by review: `?redelivered=` and `?saved=` were echoed into the notices, so a link
    could make the console say anything."""
    said = "Call +1 900 555 0100 now"
    events = await console.get("/console/events", params={"redelivered": said})
    assert events.status_code == 200 and said not in events.text
    assert 'id="redelivered"' not in events.text
    event_id = uuid.uuid4()
    named = await console.get("/console/events", params={"redelivered": str(event_id)})
    assert f"Event {event_id} is queued for delivery again." in named.text

    sender = f"/console/senders/{world.twilio_sender.id}"
    for bogus in (said, "help/" + said, "fun/en", "help/EN"):
        page = await console.get(sender, params={"saved": bogus})
        assert page.status_code == 200 and "Saved the" not in page.text, bogus
    saved = await console.get(sender, params={"saved": "help/es"})
    assert "Saved the help/es reply." in saved.text


def test_building_the_app_again_leaves_the_console_routers_as_they_were() -> None:
    """`install` reads the console's module-level routers and never changes them: an app built
    again in the same process (the tests build hundreds) must not carry its predecessors'
    routes, which once grew with each app until FastAPI's lifespan merging overflowed the
    stack."""
    routers = [console_routes.router, *console_routes._PAGES]
    before = [len(router.routes) for router in routers]
    for _ in range(3):
        create_app()
    assert [len(router.routes) for router in routers] == before


def _rows(page: httpx.Response, table: str, attribute: str) -> list[str]:
    """The ids a table of the page lists, in order (`data-<attribute>` of its rows)."""
    found = re.search(rf'<table id="{table}">(.*?)</table>', page.text, re.S)
    return re.findall(rf'data-{attribute}="([^"]+)"', found.group(1)) if found else []


def _link(page: httpx.Response, link_id: str) -> str:
    """Where a link of the page leads."""
    found = re.search(rf'<a href="([^"]+)" id="{link_id}">', page.text)
    assert found, f"no {link_id} link"
    return html.unescape(found.group(1))


async def test_each_list_pages_on_and_the_other_lists_stay(
    console: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    """Found by the second review: the "Older history", "More failing endpoints", "Later
    retries" and "Older failed events" links were never followed by a test, and following one
    of the events page's links sent the other two lists back to their first page."""
    params = {"client": world.client_id, "phone": PHONE}
    async with session_factory.begin() as session:
        for sql in (
            """INSERT INTO opt_outs (phone, sender_id, action, source, actor, created_at)
            SELECT :phone, NULL, (ARRAY['opt_out', 'opt_in'])[1 + n % 2], 'api', 'test',
                now() - n * interval '1 minute' FROM generate_series(1, 101) AS n""",
            """INSERT INTO webhook_endpoints (id, client_id, url)
            SELECT gen_random_uuid(), :client, 'https://hooks.example.test/' || n
            FROM generate_series(1, 51) AS n""",
            """INSERT INTO webhook_events (id, type, client_id, endpoint_id, payload, status,
                attempts, created_at, next_attempt_at)
            SELECT gen_random_uuid(), 'message.delivered', :client, e.id, '{}', s.status, 2,
                now() - interval '1 hour', now() + interval '1 hour'
            FROM webhook_endpoints AS e CROSS JOIN (VALUES ('failed'), ('pending')) AS s(status)""",
        ):
            await session.execute(text(sql), params)

    consent = await console.get("/console/consent", params={"phone": PHONE})
    first_history = len(re.findall(r"<time datetime=", consent.text))
    older = await console.get(_link(consent, "older-history"))
    assert (first_history, len(re.findall(r"<time datetime=", older.text))) == (100, 1)
    assert 'id="older-history"' not in older.text

    page = await console.get("/console/events")
    lists = ("endpoints", "endpoint"), ("failed-events", "event"), ("retrying-events", "event")
    first = [_rows(page, table, attribute) for table, attribute in lists]
    assert [len(rows) for rows in first] == [50, 50, 50]
    now = list(first)
    for position, link_id in enumerate(("more-endpoints", "older-failed", "later-retries")):
        page = await console.get(_link(page, link_id))
        assert page.status_code == 200 and 'id="events-error"' not in page.text
        table, attribute = lists[position]
        moved_on = _rows(page, table, attribute)
        assert len(moved_on) == 1 and moved_on[0] not in first[position], link_id
        now[position] = moved_on
        # The list followed moved on; the others stayed on the page they were on.
        assert [_rows(page, t, a) for t, a in lists] == now, link_id
        assert f'id="{link_id}"' not in page.text
