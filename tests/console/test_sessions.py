"""The console's sessions and CSRF over plain HTTP (no browser): cookie flags, refusals, expiry,
revocation, sign-out, and forms without the session's token."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import func, select, update

from app.db.models import ApiKey, ConsoleSession
from app.db.session import SessionFactory
from tests.conftest import World

pytestmark = pytest.mark.usefixtures("world")


def csrf_of(page: httpx.Response) -> str:
    """The hidden CSRF token of the page's (first) form."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, page.text[:500]
    return found.group(1)


async def sign_in(api: httpx.AsyncClient, key: str, **headers: str) -> httpx.Response:
    """Fill and submit the sign-in form as a browser would."""
    form = await api.get("/console/sign-in", headers=headers)
    return await api.post(
        "/console/sign-in",
        data={"api_key": key, "csrf_token": csrf_of(form), "next": "/console/messages"},
        headers=headers,
    )


async def sessions(session_factory: SessionFactory) -> int:
    async with session_factory() as session:
        return int(await session.scalar(select(func.count()).select_from(ConsoleSession)) or 0)


async def test_no_session_redirects_to_sign_in(api: httpx.AsyncClient) -> None:
    for path in ("/console/messages", "/console/overview", "/console/consent"):
        answer = await api.get(path)
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/console/sign-in")
    assert (await api.get("/console/messages")).headers["location"] == (
        "/console/sign-in?next=/console/messages"
    )


async def test_admin_key_signs_in_with_a_strict_httponly_secure_cookie(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    answer = await sign_in(api, world.admin_key)

    assert answer.status_code == 303 and answer.headers["location"] == "/console/messages"
    cookie = next(
        value
        for name, value in answer.headers.multi_items()
        if name == "set-cookie" and value.startswith("smsgate_console=")
    ).lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" in cookie
    assert "path=/console" in cookie and "expires=" in cookie
    page = await api.get("/console/messages")
    assert page.status_code == 200 and "Sign out" in page.text
    assert page.headers["cache-control"] == "no-store"
    # Only the token's hash is stored.
    token = api.cookies["smsgate_console"]
    async with session_factory() as session:
        stored = await session.scalar(select(ConsoleSession.token_hash))
    assert stored is not None and token.encode() not in stored and len(stored) == 32


async def test_secure_flag_follows_the_scheme(
    app_factory: object, world: World, session_factory: SessionFactory
) -> None:
    async with app_factory(public_base_url="http://localhost:8000") as api:  # type: ignore[operator]
        api.base_url = httpx.URL("http://localhost:8000")
        plain = await sign_in(api, world.admin_key)
        assert "secure" not in plain.headers["set-cookie"].lower()
        api.cookies.clear()
        # Behind a TLS-terminating proxy the request says https: uvicorn applies the header
        # (trusted proxies); in-process, the scheme stands for it.
        api.base_url = httpx.URL("https://localhost:8000")
        proxied = await sign_in(api, world.admin_key)
        assert "secure" in proxied.headers["set-cookie"].lower()


@pytest.mark.parametrize("which", ["client", "revoked", "unknown"])
async def test_keys_that_cannot_sign_in(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, which: str
) -> None:
    key = {"client": world.client_key, "revoked": world.admin_key, "unknown": "sk_nope"}[which]
    if which == "revoked":
        async with session_factory.begin() as session:
            await session.execute(update(ApiKey).values(revoked_at=func.now()))

    answer = await sign_in(api, key)

    assert answer.status_code == 401 and "cannot sign in" in answer.text
    assert "smsgate_console" not in api.cookies
    assert await sessions(session_factory) == 0
    assert (await api.get("/console/messages")).status_code == 303


async def test_sign_in_form_needs_its_csrf_token(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await api.get("/console/sign-in")
    for token in (None, "forged"):
        data = {"api_key": world.admin_key} | ({"csrf_token": token} if token else {})
        answer = await api.post("/console/sign-in", data=data)
        assert answer.status_code == 403
    assert await sessions(session_factory) == 0


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_sign_out_without_the_sessions_token_is_refused(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, token: str | None
) -> None:
    await sign_in(api, world.admin_key)
    answer = await api.post("/console/sign-out", data={"csrf_token": token} if token else {})
    assert answer.status_code == 403 and "Nothing was changed" in answer.text
    assert await sessions(session_factory) == 1
    assert (await api.get("/console/messages")).status_code == 200


async def test_sign_out_ends_the_session(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await sign_in(api, world.admin_key)
    token = api.cookies["smsgate_console"]
    page = await api.get("/console/messages")

    answer = await api.post("/console/sign-out", data={"csrf_token": csrf_of(page)})

    assert answer.status_code == 303 and answer.headers["location"] == "/console/sign-in"
    assert await sessions(session_factory) == 0
    # Even the old cookie, replayed, no longer opens anything.
    api.cookies.set("smsgate_console", token, domain="sms.example.test", path="/console")
    assert (await api.get("/console/messages")).status_code == 303


async def test_an_expired_session_sends_back_to_sign_in(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await sign_in(api, world.admin_key)
    async with session_factory.begin() as session:
        await session.execute(
            update(ConsoleSession).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert (await api.get("/console/messages")).status_code == 303


async def test_revoking_the_key_ends_its_session_at_the_next_request(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    await sign_in(api, world.admin_key)
    assert (await api.get("/console/messages")).status_code == 200
    async with session_factory.begin() as session:
        await session.execute(update(ApiKey).where(ApiKey.is_admin).values(revoked_at=func.now()))
    assert (await api.get("/console/messages")).status_code == 303


async def test_session_length_is_a_setting(
    app_factory: object, world: World, session_factory: SessionFactory
) -> None:
    async with app_factory(console={"session_hours": 1}) as api:  # type: ignore[operator]
        await sign_in(api, world.admin_key)
    async with session_factory() as session:
        row = await session.scalar(select(ConsoleSession))
    assert row is not None
    assert timedelta(minutes=59) < row.expires_at - row.created_at < timedelta(minutes=61)


async def test_the_console_is_not_in_the_openapi_document(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    assert not [path for path in spec["paths"] if path.startswith("/console")]
