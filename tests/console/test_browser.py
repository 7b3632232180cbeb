"""The console in a real headless Chromium against a running service (real PostgreSQL and
Redis): sign in, find a delivered message by a national-format number, open its timeline, show
its body; refusals (a client key, no session, a forged form, an expired session, a revoked key)
and sign-out. Each page's screenshot goes to the artifacts (tests/console/conftest.py)."""

from __future__ import annotations

import logging

import httpx
import pytest
from playwright.async_api import Page, expect
from sqlalchemy import func, update

from app.db.models import ApiKey, ConsoleSession
from app.db.session import SessionFactory
from tests.conftest import World
from tests.console.conftest import PageShot, sign_in_with
from tests.console.test_messages import BODY, delivered


async def test_find_a_delivered_message_by_its_national_number_and_read_its_timeline(
    api: httpx.AsyncClient,
    world: World,
    console_url: str,
    page: Page,
    page_shot: PageShot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    message_id = await delivered(api, world)
    await delivered(api, world, to="+14155550124")  # not this one
    await page.goto(f"{console_url}/console/sign-in")
    await page_shot("sign-in")
    await sign_in_with(page, console_url, world.admin_key)

    await page.get_by_role("link", name="Messages", exact=True).click()
    await page.get_by_label("Number").fill("(415) 555-0123")
    await page.get_by_label("Status").select_option("delivered")
    await page.get_by_role("button", name="Search").click()
    rows = page.locator("tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("+14155550123")
    await page_shot("messages")
    await page_shot("messages", width=360)

    await rows.first.get_by_role("link").click()
    await expect(page).to_have_url(f"{console_url}/console/messages/{message_id}")
    timeline = page.locator("ol.timeline > li strong")
    await expect(timeline).to_have_text(
        ["Status: queued", "Status: sending", "Status: sent", "Status: delivered"]
    )
    await expect(page.get_by_text(BODY)).to_have_count(0)
    await page_shot("message")
    await page_shot("message", width=360)

    caplog.set_level(logging.INFO, logger="app.console")
    await page.get_by_role("button", name="Show body").click()
    await expect(page.locator("#message-body")).to_have_text(BODY)
    await page_shot("message-body")
    assert [r.message_id for r in caplog.records if r.getMessage() == "message body shown"] == [  # type: ignore[attr-defined]
        message_id
    ]


async def test_a_client_key_cannot_sign_in(
    world: World, console_url: str, page: Page, page_shot: PageShot
) -> None:
    await sign_in_with(page, console_url, world.client_key)

    await expect(page.get_by_role("alert")).to_contain_text("cannot sign in")
    assert page.url.endswith("/console/sign-in")
    await page_shot("sign-in-refused")
    await page.goto(f"{console_url}/console/messages")
    assert "/console/sign-in" in page.url


async def test_without_a_session_every_page_leads_to_sign_in_and_back(
    world: World, console_url: str, page: Page
) -> None:
    await page.goto(f"{console_url}/console/messages?status=delivered")
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

    await page.get_by_label("Admin API key").fill(world.admin_key)
    await page.get_by_role("button", name="Sign in").click()

    await expect(page.get_by_role("heading", name="Messages")).to_be_visible()
    assert page.url == f"{console_url}/console/messages"


async def test_a_form_without_the_sessions_token_is_refused_and_changes_nothing(
    api: httpx.AsyncClient,
    world: World,
    console_url: str,
    signed_in: Page,
    page_shot: PageShot,
    session_factory: SessionFactory,
) -> None:
    message_id = await delivered(api, world)
    # The browser's own cookies, as a page on another site would make it send them.
    request = signed_in.request
    forms: list[dict[str, str | float | bool]] = [{}, {"csrf_token": "forged"}]
    for form in forms:
        answer = await request.post(f"{console_url}/console/messages/{message_id}/body", form=form)
        assert answer.status == 403 and BODY not in await answer.text()
        out = await request.post(f"{console_url}/console/sign-out", form=form)
        assert out.status == 403
    await signed_in.set_content(await answer.text())
    await page_shot("forbidden")

    await signed_in.goto(f"{console_url}/console/messages")
    await expect(signed_in.get_by_role("heading", name="Messages")).to_be_visible()


@pytest.mark.parametrize("ended_by", ["expiry", "revocation"])
async def test_an_expired_session_or_a_revoked_key_sends_back_to_sign_in(
    world: World,
    console_url: str,
    signed_in: Page,
    session_factory: SessionFactory,
    ended_by: str,
) -> None:
    async with session_factory.begin() as session:
        if ended_by == "expiry":
            await session.execute(update(ConsoleSession).values(expires_at=func.now()))
        else:
            await session.execute(
                update(ApiKey).where(ApiKey.is_admin).values(revoked_at=func.now())
            )

    await signed_in.get_by_role("link", name="Messages", exact=True).click()

    await expect(signed_in.get_by_role("heading", name="Sign in")).to_be_visible()


async def test_sign_out(console_url: str, signed_in: Page, page_shot: PageShot) -> None:
    await page_shot("overview-placeholder")
    await signed_in.get_by_role("button", name="Sign out").click()

    await expect(signed_in.get_by_role("heading", name="Sign in")).to_be_visible()
    await signed_in.goto(f"{console_url}/console/messages")
    await expect(signed_in.get_by_role("heading", name="Sign in")).to_be_visible()


async def test_keyboard_focus_is_visible(console_url: str, signed_in: Page) -> None:
    await signed_in.keyboard.press("Tab")  # the skip link first
    skip = signed_in.get_by_role("link", name="Skip to content")
    await expect(skip).to_be_focused()
    await signed_in.keyboard.press("Tab")
    outline = await signed_in.evaluate(
        "() => getComputedStyle(document.activeElement).outlineStyle"
    )
    assert outline == "solid"
