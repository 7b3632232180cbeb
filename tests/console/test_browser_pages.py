"""The console's conversation, consent, senders, events and overview pages in a real headless
Chromium against a running service (real PostgreSQL and Redis): an inbound STOP posted through
the signed Twilio webhook shows in the conversation, the number is opted back in from the
consent page (and the API agrees), the overview's chart changes as a message ends undelivered, a
reply's cost updates as it is typed, a failed event is redelivered. Every page is screenshot
to the artifacts (tests/console/conftest.py), at 1280 and 360 px."""

from __future__ import annotations

import uuid

import httpx
from playwright.async_api import Page, expect

from app.db.models import WebhookEvent
from app.db.session import SessionFactory
from tests.api.test_status_callbacks import sent_message, twilio_callback, twilio_signature
from tests.conftest import World
from tests.console.conftest import PageShot
from tests.console.test_messages import delivered
from tests.console.test_pages import failed_event

FAKE_SENDER = "+14155550199"  # the fake provider's sender: its messages get delivered
CUSTOMER = "+14155550123"


async def inbound(console_url: str, body: str, to: str = FAKE_SENDER) -> None:
    """A customer's text, posted to the running service's Twilio webhook, signed."""
    path = "/v1/webhooks/twilio/inbound"
    params = {
        "MessageSid": "SM" + uuid.uuid4().hex,
        "AccountSid": "AC" + "0123456789abcdef" * 2,
        "From": CUSTOMER,
        "To": to,
        "Body": body,
        "NumSegments": "1",
    }
    async with httpx.AsyncClient(base_url=console_url) as client:
        answer = await client.post(
            path,
            data=params,
            headers={"X-Twilio-Signature": twilio_signature(console_url + path, params)},
        )
    assert answer.status_code == 200, answer.text


async def opted_out(api: httpx.AsyncClient, world: World) -> bool:
    answer = await api.get(
        f"/v1/opt-outs/{CUSTOMER}",
        params={"sender_id": str(world.fake_sender.id)},
        headers=world.auth(world.admin_key),
    )
    assert answer.status_code == 200, answer.text
    return bool(answer.json()["opted_out"])


async def test_an_inbound_stop_in_the_conversation_then_opted_back_in(
    api: httpx.AsyncClient,
    world: World,
    console_url: str,
    signed_in: Page,
    page_shot: PageShot,
) -> None:
    page = signed_in
    await delivered(api, world)
    await inbound(console_url, "STOP")
    assert await opted_out(api, world)

    await page.get_by_role("link", name="Conversations", exact=True).click()
    await page.get_by_label("Number").fill("(415) 555-0123")
    await page.get_by_label("Sender").select_option(label=f"{FAKE_SENDER} (fake)")
    await page.get_by_role("button", name="Show").click()
    turns = page.locator("ol.turns > li")
    await expect(turns).to_have_count(3)
    await expect(turns.nth(0)).to_have_attribute("data-kind", "regular")
    await expect(turns.nth(1)).to_have_attribute("data-keyword", "STOP")
    await expect(turns.nth(1)).to_contain_text("keyword STOP (opt_out)")
    await expect(turns.nth(2)).to_contain_text("Our reply")
    await page_shot("conversations")
    await page_shot("conversations", width=360)

    await page.get_by_role("link", name="Consent", exact=True).click()
    await page.get_by_label("Number").fill("(415) 555-0123")
    await page.get_by_label("Number").press("Enter")
    state = page.locator(f'#states tr[data-sender="{FAKE_SENDER}"]')
    await expect(state).to_have_attribute("data-state", "opted_out")
    await expect(page.locator("#history")).to_contain_text("recipient")
    await page_shot("consent")
    await page.get_by_label("Opt in (send again)").check()
    await page.get_by_label("For").select_option(label=FAKE_SENDER)
    await page.get_by_label("Reason (recorded, with your key's name)").fill("called support")
    await page.get_by_role("button", name="Record").click()

    await expect(page.locator("#consent-done")).to_have_text("Recorded.")
    await expect(state).to_have_attribute("data-state", "opted_in")
    await expect(page.locator("#history tbody tr").first).to_contain_text("called support")
    await expect(page.locator("#history tbody tr").first).to_contain_text("operator:")
    await page_shot("consent-opted-in")
    await page_shot("consent-opted-in", width=360)
    assert not await opted_out(api, world)


async def test_the_overview_chart_changes_when_a_message_ends_undelivered(
    api: httpx.AsyncClient,
    world: World,
    console_url: str,
    signed_in: Page,
    page_shot: PageShot,
    session_factory: SessionFactory,
) -> None:
    """Found by the second review: both states of this test were 100 % delivered, so the chart
    itself was never seen to change. The second message ends undelivered, through Twilio's
    signed status callback."""
    page = signed_in
    await delivered(api, world)
    await page.goto(f"{console_url}/console/overview")
    row = page.locator('#by-status tr[data-status="delivered"]')
    await expect(row).to_have_attribute("data-count", "1")
    await expect(page.locator("#by-status svg.bar")).to_have_count(1)
    await expect(row.locator("rect.fill")).to_have_attribute("width", "100.00")
    await page_shot("overview-before")

    message_id = await sent_message(session_factory, world)
    answer = await twilio_callback(api, message_id, "undelivered", ErrorCode="30003")
    assert answer.status_code == 204, answer.text
    await page.reload()

    await expect(row).to_have_attribute("data-count", "1")
    await expect(row.locator("rect.fill")).to_have_attribute("width", "50.00")
    undelivered = page.locator('#by-status tr[data-status="undelivered"]')
    await expect(undelivered.locator("rect.fill")).to_have_attribute("width", "50.00")
    await expect(undelivered.get_by_role("cell").nth(1)).to_have_text("50.0 %")
    await expect(page.locator("#by-status svg.bar")).to_have_count(2)
    twilio = page.locator('#by-provider tr[data-label="twilio"]')
    await expect(twilio).to_have_attribute("data-rate", "0.0")
    await expect(twilio.locator("rect.fill")).to_have_attribute("width", "0.00")
    await expect(page.locator('#by-provider tr[data-label="fake"]')).to_have_attribute(
        "data-rate", "100.0"
    )
    await expect(page.locator('#providers tr[data-provider="fake"]')).to_have_attribute(
        "data-breaker", "closed"
    )
    await page_shot("overview")
    await page_shot("overview", width=360)


async def test_a_reply_shows_its_cost_as_it_is_typed(
    world: World, console_url: str, signed_in: Page, page_shot: PageShot
) -> None:
    page = signed_in
    await page.get_by_role("link", name="Senders", exact=True).click()
    await expect(page.locator("#senders tbody tr")).to_have_count(3)
    await page_shot("senders")
    await page.get_by_role("link", name=FAKE_SENDER).click()
    cost = page.locator("#cost-opt_out-fr")

    await page.locator("#reply-opt_out-fr").fill("Désabonné. Répondez ARRÊT.")
    await expect(cost).to_contain_text("UCS-2, 1 segment")
    await expect(cost).to_contain_text("not in GSM-7: Ê")
    await page.locator("#reply-opt_out-fr").fill("x" * 161)
    await expect(cost).to_contain_text("GSM-7, 2 segments (161 septets)")
    await page_shot("sender")
    await page_shot("sender", width=360)


async def test_a_failed_event_is_redelivered_from_the_events_page(
    world: World,
    console_url: str,
    signed_in: Page,
    page_shot: PageShot,
    session_factory: SessionFactory,
) -> None:
    event = await failed_event(
        session_factory,
        world.client_id,
        "https://hooks.example.test/orders",
        12,
        "HTTP 503 Service Unavailable",
    )
    page = signed_in
    await page.get_by_role("link", name="Events", exact=True).click()
    await expect(page.locator("#endpoints")).to_contain_text("https://hooks.example.test/orders")
    await page_shot("events")
    await page_shot("events", width=360)

    await page.get_by_role("button", name=f"Redeliver event {event.id}").click()

    await expect(page.locator("#redelivered")).to_contain_text(str(event.id))
    await expect(page.locator(f'#failed-events tr[data-event="{event.id}"]')).to_have_count(0)
    async with session_factory() as session:
        status = await session.get(WebhookEvent, event.seq)
    assert status is not None and status.status == "pending"


# The elements reaching past 360 px, for the failure message.
PAST_THE_EDGE = """[...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > 360.5).slice(-6)
    .map(e => `${e.tagName} ${e.id} ${Math.round(e.getBoundingClientRect().right)}px`)"""


async def _overflow(page: Page) -> int:
    """How far the page is wider than its viewport (0: no horizontal scrolling)."""
    width: int = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    return width


async def test_no_page_scrolls_sideways_at_360_px(
    api: httpx.AsyncClient,
    world: World,
    console_url: str,
    signed_in: Page,
    session_factory: SessionFactory,
) -> None:
    """Found by the second review: "works from 360 px wide" was only seen in screenshots.
    Every page, with rows in its tables, fits 360 px (its wide tables scroll inside
    themselves)."""
    message_id = await delivered(api, world)
    await inbound(console_url, "STOP")
    await failed_event(
        session_factory,
        world.client_id,
        "https://hooks.example.test/a-rather-long-path/for/order-events?team=fulfilment",
        12,
        "HTTP 503 Service Unavailable from the receiver's load balancer",
    )
    page = signed_in
    await page.set_viewport_size({"width": 360, "height": 800})
    sender = world.fake_sender.id
    paths = [
        "/console/overview",
        "/console/messages",
        "/console/messages?number=%28415%29+555-0123",
        f"/console/messages/{message_id}",
        f"/console/conversations?phone=%2B14155550123&sender_id={sender}",
        "/console/consent?phone=%2B14155550123",
        "/console/senders",
        f"/console/senders/{sender}",
        "/console/events",
    ]
    wide: dict[str, tuple[int, list[str]]] = {}
    for path in paths:
        await page.goto(console_url + path)
        assert "/console/sign-in" not in page.url, path
        assert await page.evaluate("window.innerWidth") == 360
        if (over := await _overflow(page)) > 0:
            wide[path] = (over, await page.evaluate(PAST_THE_EDGE))
    await page.goto(f"{console_url}/console/messages/{uuid.uuid4()}")  # the not-found page
    if (over := await _overflow(page)) > 0:
        wide["not found"] = (over, await page.evaluate(PAST_THE_EDGE))
    assert wide == {}, f"wider than 360 px by: {wide}"


async def _tab_to(page: Page, selector: str) -> None:
    """Press Tab until the focused element matches `selector` (as a keyboard user would)."""
    for _ in range(60):
        await page.keyboard.press("Tab")
        if await page.evaluate("s => document.activeElement?.matches(s) ?? false", selector):
            return
    raise AssertionError(f"Tab never reached {selector}")


async def test_sign_in_search_and_open_a_message_with_the_keyboard_alone(
    api: httpx.AsyncClient, world: World, console_url: str, page: Page
) -> None:
    """Found by the second review: the keyboard path was claimed, not tested. Only Tab, typing
    and Enter: no click, no fill."""
    message_id = await delivered(api, world)
    await page.goto(f"{console_url}/console/sign-in")
    await _tab_to(page, "#api_key")
    await page.keyboard.type(world.admin_key)
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(f"{console_url}/console/overview")

    await _tab_to(page, 'nav a[href="/console/messages"]')
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(f"{console_url}/console/messages")
    await _tab_to(page, 'input[name="number"]')
    await page.keyboard.type("(415) 555-0123")
    await page.keyboard.press("Enter")
    await expect(page.locator("tbody tr")).to_have_count(1)

    await _tab_to(page, f'a[href="/console/messages/{message_id}"]')
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(f"{console_url}/console/messages/{message_id}")
    await expect(page.locator("ol.timeline > li").last).to_contain_text("Status: delivered")
