"""The Twilio-compatible Messages API, driven by the official `twilio` SDK against `smsgate
serve` on the test database: create, fetch, list with paging, cancel, each error code, every
response body checked against Twilio's own OpenAPI document, and a status callback the SDK's
`RequestValidator` accepts."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
from redis.asyncio import Redis
from sqlalchemy import select, text
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client as TwilioClient

from app.db.models import Message, MessageEvent, OptOut, WebhookEvent
from app.db.session import SessionFactory
from app.delivery.transitions import record_status_report
from app.events.delivery import build_events_http_client, deliver_event
from app.kernel.settings import EventsSettings
from app.kernel.status import MessageStatus
from app.main import create_app
from app.providers.base import StatusReport
from app.twilio_api.vocabulary import issue_credentials
from tests.conftest import TEST_REDIS_URL, World, make_settings, owned_database_url
from tests.processes import (
    clean_env,
    free_port,
    run_smsgate,
    start_smsgate,
    stop,
    wait_http_ok,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MESSAGES = "/2010-04-01/Accounts/{AccountSid}/Messages.json"
MESSAGE = "/2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json"
# Twilio's error body (the OpenAPI document describes no error responses).
ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "message", "more_info", "status"],
    "properties": {
        "code": {"type": "integer"},
        "message": {"type": "string"},
        "more_info": {"type": "string", "pattern": r"^https://www\.twilio\.com/docs/errors/\d+$"},
        "status": {"type": "integer"},
    },
}
SID = re.compile(r"^SM[0-9a-f]{32}$")
RECIPIENT = "+14155550123"
SENDER = "+14155550100"  # world's Twilio sender, shop's default


def _json_schema(node: Any) -> Any:
    """An OpenAPI 3.0 schema as JSON Schema: references inlined, `nullable` as a null type."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        raise AssertionError(f"the extracts inline every reference; found {name}")
    converted = {key: _json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") and "type" in node:
        converted["type"] = [node["type"], "null"]
    return converted


def _extract(name: str) -> Any:
    """A response schema from the extracts of Twilio's OpenAPI document in tests/fixtures (kept
    equal to the document by `.ci/run` when ../shared holds it), references inlined."""
    return json.loads((FIXTURES / f"twilio_{name}.json").read_text())["response_schema"]


# Twilio's document gives ListMessage, FetchMessage and UpdateMessage (POST to one message) and
# CreateMessage their schemas; the Message resource is the same for fetch and update.
_RESPONSES: dict[tuple[str, str, str], str] = {
    (MESSAGES, "post", "201"): "create_message",
    (MESSAGES, "get", "200"): "list_messages",
    (MESSAGE, "get", "200"): "fetch_message",
    (MESSAGE, "post", "200"): "fetch_message",
}


def _response_schema(path: str, method: str, status: str) -> Any:
    return _json_schema(_extract(_RESPONSES[(path, method, status)]))


def _operation(method: str, url: str) -> str:
    path = urlsplit(url).path
    return MESSAGES if path.endswith("/Messages.json") else MESSAGE


class RecordingHttpClient(TwilioHttpClient):  # type: ignore[misc]
    """The SDK's own HTTP client (requests, real sockets), keeping every exchange so the tests
    can check each body against the OpenAPI document; `extra_headers` go on the next request."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[tuple[str, str, Response]] = []
        self.extra_headers: dict[str, str] = {}

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Response:
        headers = dict(kwargs.pop("headers", None) or {})
        headers.update(self.extra_headers)
        self.extra_headers = {}
        response = super().request(method, url, *args, headers=headers, **kwargs)
        self.exchanges.append((method, url, response))
        return response

    def check_bodies(self) -> int:
        """Validate every recorded body: successes against Twilio's schema for the operation,
        errors against Twilio's error shape. Returns how many were checked."""
        for method, url, response in self.exchanges:
            body = json.loads(response.text)
            if response.status_code < 400:
                schema = _response_schema(
                    _operation(method, url), method.lower(), str(response.status_code)
                )
            else:
                schema = ERROR_SCHEMA
                assert body["status"] == response.status_code
            jsonschema.validate(body, schema)
        return len(self.exchanges)


_OPEN: list[RecordingHttpClient] = []


def sdk(base_url: str, account_sid: str, token: str) -> tuple[TwilioClient, RecordingHttpClient]:
    """The official SDK client, pointed at the service instead of api.twilio.com."""
    http = RecordingHttpClient()
    _OPEN.append(http)
    client = TwilioClient(account_sid, token, http_client=http)
    client.api.base_url = base_url
    return client, http


@pytest.fixture(autouse=True)
def _close_sdk_sessions() -> Iterator[None]:
    yield
    while _OPEN:
        session = _OPEN.pop().session
        if session is not None:
            session.close()


@pytest.fixture(scope="module")
def server(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`smsgate serve` on the test database, for the module (it caches nothing: tests empty
    the tables); http callbacks to loopback allowed."""
    port = free_port()
    env = clean_env(
        DATABASE_URL=owned_database_url(),
        REDIS_URL=TEST_REDIS_URL,
        DB_POOL_SIZE="4",
        PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
        LOG_LEVEL="WARNING",
        LOOKUP_CACHE_SECONDS="0",
        EVENTS__ALLOW_HTTP="true",
        EVENTS__ALLOWED_NETWORKS='["127.0.0.0/8"]',
    )
    log = tmp_path_factory.mktemp("twilio") / "api.log"
    api = start_smsgate("serve", "--port", str(port), env=env, log=log)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", api, log, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(api)


@pytest.fixture
def live(server: str, world: World, redis: Redis) -> str:
    """The server, with `world` in emptied tables and an emptied Redis."""
    return server


@pytest.fixture
async def shop(session_factory: SessionFactory, world: World) -> tuple[str, str]:
    """The `shop` client's Twilio account SID and auth token."""
    async with session_factory.begin() as session:
        return await issue_credentials(session, "shop")


@pytest.fixture
async def other_shop(session_factory: SessionFactory, world: World) -> tuple[str, str]:
    """The `other-shop` client's."""
    async with session_factory.begin() as session:
        return await issue_credentials(session, "other-shop")


def _raises(call: Any) -> TwilioRestException:
    with pytest.raises(TwilioRestException) as caught:
        call()
    return caught.value


async def test_create_then_fetch_through_the_sdk(
    live: str, shop: tuple[str, str], world: World, session_factory: SessionFactory
) -> None:
    client, http = sdk(live, *shop)

    created = client.messages.create(to=RECIPIENT, from_=SENDER, body="Your order has shipped.")

    assert SID.match(created.sid)
    assert created.status == "queued"
    assert created.account_sid == shop[0]
    assert (created.to, created.from_) == (RECIPIENT, SENDER)
    assert created.body == "Your order has shipped."
    assert created.num_segments == "1" and created.direction == "outbound-api"
    assert created.price is None and created.error_code is None and created.date_sent is None
    assert isinstance(created.date_created, datetime)  # the SDK parsed the RFC 2822 date
    assert created.uri == f"/2010-04-01/Accounts/{shop[0]}/Messages/{created.sid}.json"
    fetched = client.messages(created.sid).fetch()
    assert (fetched.sid, fetched.status, fetched.body) == (created.sid, "queued", created.body)
    assert fetched.date_created == created.date_created
    # The same message the JSON API reads: its id is the SID's hex, stored once for the client.
    async with session_factory() as session:
        message = await session.get(Message, uuid.UUID(hex=created.sid[2:]))
    assert message is not None
    assert (message.client_id, message.api, message.to) == (world.client_id, "twilio", RECIPIENT)
    assert http.check_bodies() == 2


async def test_unknown_parameters_are_ignored_as_twilio_ignores_them(
    live: str, shop: tuple[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=live, auth=shop) as raw:
        answer = await raw.post(
            f"/2010-04-01/Accounts/{shop[0]}/Messages.json",
            data={"To": RECIPIENT, "Body": "hi", "ProvideFeedback": "true", "Foo": "bar"},
        )

    assert answer.status_code == 201, answer.text
    jsonschema.validate(answer.json(), _response_schema(MESSAGES, "post", "201"))
    assert answer.json()["from"] == SENDER


async def test_list_pages_follow_next_page_uri(live: str, shop: tuple[str, str]) -> None:
    client, http = sdk(live, *shop)
    sids = [
        client.messages.create(to=f"+1415555012{n}", from_=SENDER, body=f"message {n}").sid
        for n in range(5)
    ]
    http.exchanges.clear()

    listed = client.messages.list(page_size=2)

    assert [message.sid for message in listed] == sids[::-1]  # newest first, all of them
    urls = [url for _, url, _ in http.exchanges]
    assert len(urls) == 3 and "PageToken=" not in urls[0]
    assert all("PageToken=" in url for url in urls[1:])
    first = json.loads(http.exchanges[0][2].text)
    assert (first["page"], first["page_size"], first["start"], first["end"]) == (0, 2, 0, 1)
    assert first["next_page_uri"].startswith(f"/2010-04-01/Accounts/{shop[0]}/Messages.json?")
    assert "Page=1" in first["next_page_uri"] and first["previous_page_uri"] is None
    last = json.loads(http.exchanges[2][2].text)
    assert last["page"] == 2 and len(last["messages"]) == 1 and last["next_page_uri"] is None
    page = client.messages.page(page_size=3)
    assert [m.sid for m in page] == sids[:1:-1] and page.next_page_url is not None
    assert [m.sid for m in page.next_page()] == sids[1::-1]
    assert http.check_bodies() == 5


async def test_list_filters(live: str, shop: tuple[str, str]) -> None:
    client, http = sdk(live, *shop)
    one = client.messages.create(to="+14155550121", from_=SENDER, body="one").sid
    two = client.messages.create(to="+14155550122", from_=SENDER, body="two").sid
    today = datetime.now(UTC).date()

    assert [m.sid for m in client.messages.list(to="+14155550122")] == [two]
    assert [m.sid for m in client.messages.list(from_=SENDER)] == [two, one]
    assert [m.sid for m in client.messages.list(from_="+14155550199")] == []
    assert [m.sid for m in client.messages.list(date_sent=today)] == [two, one]
    assert client.messages.list(date_sent=today - timedelta(days=1)) == []
    assert len(client.messages.list(date_sent_after=datetime.now(UTC) - timedelta(hours=1))) == 2
    assert client.messages.list(date_sent_before=datetime.now(UTC) - timedelta(hours=1)) == []
    assert [m.sid for m in client.messages.list(date_sent_before=today)] == [two, one]
    assert http.check_bodies() == 10


async def test_cancel_a_queued_message(
    live: str, shop: tuple[str, str], session_factory: SessionFactory
) -> None:
    client, http = sdk(live, *shop)
    sid = client.messages.create(to=RECIPIENT, from_=SENDER, body="never mind").sid

    canceled = client.messages(sid).update(status="canceled")

    assert canceled.status == "canceled" and canceled.error_code is None
    assert client.messages(sid).fetch().status == "canceled"
    async with session_factory() as session:
        message = await session.get(Message, uuid.UUID(hex=sid[2:]))
        history = list(
            await session.scalars(
                select(MessageEvent).where(MessageEvent.message_id == uuid.UUID(hex=sid[2:]))
            )
        )
    assert message is not None and message.status == "canceled"
    assert [(event.status, event.source) for event in history] == [
        ("queued", "api"),
        ("canceled", "api"),
    ]
    # Once it has left the queue (canceled, or claimed by an attempt), 30409.
    again = _raises(lambda: client.messages(sid).update(status="canceled"))
    assert (again.code, again.status) == (30409, 400)
    assert http.check_bodies() == 4


async def test_a_claimed_message_cannot_be_canceled(
    live: str, shop: tuple[str, str], session_factory: SessionFactory
) -> None:
    client, http = sdk(live, *shop)
    sid = client.messages.create(to=RECIPIENT, from_=SENDER, body="on its way").sid
    async with session_factory.begin() as session:  # an attempt took it
        await session.execute(
            text("UPDATE messages SET status = 'sending' WHERE id = :id"),
            {"id": uuid.UUID(hex=sid[2:])},
        )

    refused = _raises(lambda: client.messages(sid).update(status="canceled"))

    assert (refused.code, refused.status) == (30409, 400)
    assert client.messages(sid).fetch().status == "sending"
    other = _raises(lambda: client.messages(sid).update(status="delivered"))
    assert (other.code, other.status) == (60200, 400)
    http.check_bodies()


@pytest.mark.parametrize(
    ("arguments", "code"),
    [
        ({"to": "+1415", "body": "hi"}, 21211),  # not a phone number
        ({"to": "not a number", "body": "hi"}, 21211),
        ({"to": "", "body": "hi"}, 21604),  # To missing
        ({"to": RECIPIENT}, 21602),  # Body missing
        ({"to": RECIPIENT, "body": "a" * 1601 * 2}, 21617),  # over the segment limit
        ({"to": RECIPIENT, "body": "a" * 10_001}, 21617),  # over any limit
        ({"to": RECIPIENT, "body": "a\x00b"}, 60200),  # a NUL: invalid, not too long
        ({"to": RECIPIENT, "body": "hi", "from_": "+14155559999"}, 21606),  # not a sender
        ({"to": RECIPIENT, "body": "hi", "from_": "x" * 30}, 21212),  # not even an address
        ({"to": RECIPIENT, "body": "hi", "status_callback": "not a url"}, 21609),
        ({"to": RECIPIENT, "body": "hi", "send_at": datetime(2030, 1, 1)}, 60200),
        ({"to": RECIPIENT, "body": "hi", "media_url": ["https://x.test/a.png"]}, 60200),
        ({"to": RECIPIENT, "body": "hi", "validity_period": 0}, 90007),
        ({"to": "+447400123456", "body": "hi"}, 21408),  # GB: not a permitted country
    ],
)
async def test_refusals_carry_twilios_codes(
    live: str, shop: tuple[str, str], arguments: dict[str, Any], code: int
) -> None:
    client, http = sdk(live, *shop)

    error = _raises(lambda: client.messages.create(**arguments))

    assert (error.code, error.status) == (code, 400)
    assert error.msg
    assert http.check_bodies() == 1


async def test_over_the_clients_rate_limit_is_20429_with_retry_after(
    live: str, shop: tuple[str, str], world: World
) -> None:
    async with httpx.AsyncClient(base_url=live) as admin:
        limited = await admin.put(
            "/v1/clients/shop/traffic",
            json={"messages_per_minute": 1},
            headers=world.auth(world.admin_key),
        )
        assert limited.status_code == 200, limited.text
    async with httpx.AsyncClient(base_url=live, auth=shop) as raw:
        if 60 - time.time() % 60 < 3:  # both sends in one minute
            await asyncio.sleep(3.5)
        url = f"/2010-04-01/Accounts/{shop[0]}/Messages.json"
        first = await raw.post(url, data={"To": RECIPIENT, "Body": "hi"})
        second = await raw.post(url, data={"To": RECIPIENT, "Body": "hi"})

    assert first.status_code == 201, first.text
    # An accepted send carries the quota's headers, as a /v1 send does.
    assert first.headers["RateLimit-Policy"] == '"messages-minute";q=1;w=60'
    assert first.headers["RateLimit"].startswith('"messages-minute";r=0;t=')
    assert second.status_code == 429 and second.json()["code"] == 20429
    jsonschema.validate(second.json(), ERROR_SCHEMA)
    assert 1 <= int(second.headers["Retry-After"]) <= 60
    assert second.headers["RateLimit-Policy"] == '"messages-minute";q=1;w=60'


async def test_an_accepted_send_without_limits_carries_no_ratelimit_headers_nor_on_a_replay(
    live: str, shop: tuple[str, str], world: World
) -> None:
    async with httpx.AsyncClient(base_url=live, auth=shop) as raw:
        url = f"/2010-04-01/Accounts/{shop[0]}/Messages.json"
        unlimited = await raw.post(url, data={"To": RECIPIENT, "Body": "hi"})
        assert unlimited.status_code == 201, unlimited.text
        assert "RateLimit" not in unlimited.headers
        async with httpx.AsyncClient(base_url=live) as admin:
            limited = await admin.put(
                "/v1/clients/shop/traffic",
                json={"messages_per_day": 100},
                headers=world.auth(world.admin_key),
            )
            assert limited.status_code == 200, limited.text
        token = {"I-Twilio-Idempotency-Token": "headers-1"}
        first = await raw.post(url, data={"To": RECIPIENT, "Body": "hi"}, headers=token)
        again = await raw.post(url, data={"To": RECIPIENT, "Body": "hi"}, headers=token)

    assert first.status_code == 201, first.text
    assert first.headers["RateLimit-Policy"] == '"messages-day";q=100;w=86400'
    assert first.headers["RateLimit"].startswith('"messages-day";r=99;t=')
    # A replay counts nothing and says nothing of the quota (as on /v1).
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "RateLimit" not in again.headers


async def test_send_at_is_refused_pointing_at_the_v1_api(live: str, shop: tuple[str, str]) -> None:
    async with httpx.AsyncClient(base_url=live, auth=shop) as raw:
        url = f"/2010-04-01/Accounts/{shop[0]}/Messages.json"
        refused = await raw.post(
            url,
            data={"To": RECIPIENT, "Body": "hi", "SendAt": "2030-01-01T00:00:00Z"},
        )

    assert refused.status_code == 400 and refused.json()["code"] == 60200
    message = refused.json()["message"]
    assert "does not schedule" not in message
    assert "send_at" in message and "/v1/messages" in message


async def test_unsubscribed_recipient_is_21610(
    live: str, shop: tuple[str, str], session_factory: SessionFactory
) -> None:
    async with session_factory.begin() as session:
        session.add(OptOut(phone=RECIPIENT, sender_id=None, action="opt_out", source="api"))
    client, http = sdk(live, *shop)

    error = _raises(lambda: client.messages.create(to=RECIPIENT, from_=SENDER, body="hi"))

    assert (error.code, error.status) == (21610, 400)
    async with session_factory() as session:
        assert await session.scalar(select(Message.id)) is None  # nothing stored
    http.check_bodies()


async def test_without_from_the_default_sender_is_used_and_without_one_the_pool_or_21612(
    live: str, shop: tuple[str, str], other_shop: tuple[str, str]
) -> None:
    client, http = sdk(live, *shop)
    assert client.messages.create(to=RECIPIENT, body="hi").from_ == SENDER
    # other-shop has no default sender: its pool (two US long codes) serves US numbers only.
    other, other_http = sdk(live, *other_shop)
    pooled = other.messages.create(to=RECIPIENT, body="hi").from_

    error = _raises(lambda: other.messages.create(to="+33612345678", body="hi"))

    assert pooled in {"+14155550100", "+14155550199"}
    assert (error.code, error.status) == (21612, 400)
    http.check_bodies()
    other_http.check_bodies()


async def test_authentication_failures_are_20003(
    live: str, shop: tuple[str, str], other_shop: tuple[str, str]
) -> None:
    for account_sid, token in (
        (shop[0], "0" * 32),  # wrong token
        (shop[0], other_shop[1]),  # another client's token
        ("AC" + uuid.uuid4().hex, shop[1]),  # no such account
        ("not-an-account-sid", shop[1]),
    ):
        client, http = sdk(live, account_sid, token)
        error = _raises(lambda c=client: c.messages.create(to=RECIPIENT, body="hi"))
        assert (error.code, error.status) == (20003, 401)
        http.check_bodies()
    # The account in the path must be the one authenticated.
    async with httpx.AsyncClient(base_url=live) as raw:
        answer = await raw.get(f"/2010-04-01/Accounts/{other_shop[0]}/Messages.json", auth=shop)
        assert answer.status_code == 401 and answer.json()["code"] == 20003
        jsonschema.validate(answer.json(), ERROR_SCHEMA)
        anonymous = await raw.get(f"/2010-04-01/Accounts/{shop[0]}/Messages.json")
        assert anonymous.status_code == 401 and anonymous.json()["code"] == 20003
        garbled = await raw.get(
            f"/2010-04-01/Accounts/{shop[0]}/Messages.json",
            headers={"Authorization": "Basic !!not-base64!!"},
        )
        assert garbled.status_code == 401 and garbled.json()["code"] == 20003


async def test_other_clients_messages_are_not_found(
    live: str, shop: tuple[str, str], other_shop: tuple[str, str]
) -> None:
    client, http = sdk(live, *shop)
    other, other_http = sdk(live, *other_shop)
    sid = client.messages.create(to=RECIPIENT, body="mine").sid

    for call in (
        lambda: other.messages(sid).fetch(),
        lambda: other.messages(sid).update(status="canceled"),
        lambda: client.messages("SM" + uuid.uuid4().hex).fetch(),
        lambda: client.messages("MM" + uuid.uuid4().hex).fetch(),
    ):
        error = _raises(call)
        assert (error.code, error.status) == (20404, 404)
    assert other.messages.list() == []
    assert client.messages(sid).fetch().status == "queued"  # not canceled by the other
    http.check_bodies()
    other_http.check_bodies()


async def test_idempotency_token_replays_the_first_response(
    live: str, shop: tuple[str, str], session_factory: SessionFactory
) -> None:
    client, http = sdk(live, *shop)
    http.extra_headers = {"I-Twilio-Idempotency-Token": "order-1042"}
    first = client.messages.create(to=RECIPIENT, body="once")
    http.extra_headers = {"I-Twilio-Idempotency-Token": "order-1042"}

    again = client.messages.create(to=RECIPIENT, body="once")

    assert again.sid == first.sid
    assert http.exchanges[1][2].headers.get("Idempotent-Replayed") == "true"
    http.extra_headers = {"I-Twilio-Idempotency-Token": "order-1042"}
    reused = _raises(lambda: client.messages.create(to=RECIPIENT, body="different"))
    assert reused.status == 400
    async with session_factory() as session:
        assert len(list(await session.scalars(select(Message.id)))) == 1
    http.check_bodies()


async def test_a_v1_request_naming_the_same_key_never_replays_the_twilio_answer(
    live: str, shop: tuple[str, str], world: World, session_factory: SessionFactory
) -> None:
    """Both APIs store keys per client; the Twilio one is prefixed, and its fingerprint marked,
    so /v1 with `Idempotency-Key: twilio:<token>` and the same message is a reused key (422),
    not the Twilio resource replayed."""
    client, http = sdk(live, *shop)
    http.extra_headers = {"I-Twilio-Idempotency-Token": "abc"}
    first = client.messages.create(to=RECIPIENT, body="once")

    async with httpx.AsyncClient(base_url=live) as v1:
        answer = await v1.post(
            "/v1/messages",
            json={"to": RECIPIENT, "body": "once"},
            headers={**world.auth(), "Idempotency-Key": "twilio:abc"},
        )

    assert answer.status_code == 422, answer.text
    assert "sid" not in answer.json() and first.sid.startswith("SM")
    async with session_factory() as session:
        assert len(list(await session.scalars(select(Message.id)))) == 1


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict[str, str], dict[str, str]]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        fields = dict(parse_qsl(self.rfile.read(length).decode()))
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.received.append((self.path, headers, fields))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


async def test_status_callback_is_signed_as_twilio_signs(
    live: str, shop: tuple[str, str], session_factory: SessionFactory
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/twilio/status?order=1042"
    try:
        client, http = sdk(live, *shop)
        sid = client.messages.create(to=RECIPIENT, body="hi", status_callback=url).sid
        client.messages(sid).update(status="canceled")  # a status change: one callback
        async with session_factory() as session:
            event = await session.scalar(select(WebhookEvent))
        assert event is not None and event.format == "twilio"

        events = EventsSettings(allow_http=True, allowed_networks=["127.0.0.0/8"])
        async with build_events_http_client(events) as http_client:
            outcome = await deliver_event(event.id, session_factory, http_client, events)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

    assert outcome.status is not None and outcome.status.value == "delivered"
    ((path, headers, fields),) = _Receiver.received
    assert path == "/twilio/status?order=1042"
    assert headers["content-type"] == "application/x-www-form-urlencoded"
    assert fields == {
        "AccountSid": shop[0],
        "ApiVersion": "2010-04-01",
        "From": SENDER,
        "MessageSid": sid,
        "MessageStatus": "canceled",
        "SmsSid": sid,
        "SmsStatus": "canceled",
        "To": RECIPIENT,
    }
    validator = RequestValidator(shop[1])
    assert validator.validate(url, fields, headers["x-twilio-signature"])
    assert not RequestValidator("0" * 32).validate(url, fields, headers["x-twilio-signature"])
    http.check_bodies()


async def test_a_providers_report_reaches_the_status_callback_with_its_error_code(
    live: str, shop: tuple[str, str], session_factory: SessionFactory
) -> None:
    """The delivery pipeline is /v1's: a provider's report moves the message, and its event
    goes out in Twilio's form (here with Twilio's error code)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/status"
    try:
        client, http = sdk(live, *shop)
        sid = client.messages.create(to=RECIPIENT, body="hi", status_callback=url).sid
        message_id = uuid.UUID(hex=sid[2:])
        async with session_factory.begin() as session:  # the worker submitted it
            await session.execute(
                text("UPDATE messages SET status = 'sent', claimed_at = now() WHERE id = :id"),
                {"id": message_id},
            )
        report = StatusReport(
            provider_message_id="SM" + "f" * 32,
            provider_status="undelivered",
            status=MessageStatus.UNDELIVERED,
            message_id=message_id,
            error_code="30003",
            error_message="Unreachable destination handset",
        )
        assert await record_status_report(session_factory, "twilio", report)
        async with session_factory() as session:
            event = await session.scalar(select(WebhookEvent))
        assert event is not None and event.format == "twilio"
        events = EventsSettings(allow_http=True, allowed_networks=["127.0.0.0/8"])
        async with build_events_http_client(events) as http_client:
            await deliver_event(event.id, session_factory, http_client, events)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

    ((_, headers, fields),) = _Receiver.received
    assert (fields["MessageStatus"], fields["ErrorCode"]) == ("undelivered", "30003")
    assert RequestValidator(shop[1]).validate(url, fields, headers["x-twilio-signature"])
    fetched = client.messages(sid).fetch()
    assert (fetched.status, fetched.error_code) == ("undelivered", 30003)
    assert fetched.error_message == "Unreachable destination handset"
    assert fetched.date_sent is not None
    http.check_bodies()


async def test_a_status_callback_to_a_private_address_is_refused(
    live: str, shop: tuple[str, str]
) -> None:
    """The SSRF rules of our own events: 10.0.0.0/8 is not in the allowed networks."""
    client, http = sdk(live, *shop)

    error = _raises(
        lambda: client.messages.create(
            to=RECIPIENT, body="hi", status_callback="http://10.1.2.3/status"
        )
    )

    assert (error.code, error.status) == (21609, 400)
    http.check_bodies()


async def test_admin_issues_credentials_and_a_new_token_replaces_the_old(
    live: str, world: World
) -> None:
    async with httpx.AsyncClient(base_url=live, headers=world.auth(world.admin_key)) as admin:
        first = (await admin.post("/v1/twilio-credentials", json={"client": "shop"})).json()
        second = await admin.post("/v1/twilio-credentials", json={"client": "shop"})
        missing = await admin.post("/v1/twilio-credentials", json={"client": "nobody"})
        by_client = await admin.post(
            "/v1/twilio-credentials",
            json={"client": "shop"},
            headers=world.auth(world.client_key),
        )
    assert second.status_code == 201 and missing.status_code == 404
    assert by_client.status_code == 403
    assert first["account_sid"] == "AC" + world.client_id.hex
    new = second.json()
    assert new["account_sid"] == first["account_sid"] and new["auth_token"] != first["auth_token"]

    client, _ = sdk(live, new["account_sid"], new["auth_token"])
    assert client.messages.list() == []
    stale, _ = sdk(live, first["account_sid"], first["auth_token"])
    assert _raises(lambda: stale.messages.create(to=RECIPIENT, body="hi")).code == 20003


async def test_the_command_line_issues_credentials(live: str, world: World) -> None:
    env = clean_env(DATABASE_URL=owned_database_url(), REDIS_URL=TEST_REDIS_URL)

    result = await asyncio.to_thread(run_smsgate, "twilio-credentials", "--client", "shop", env=env)
    unknown = await asyncio.to_thread(
        run_smsgate, "twilio-credentials", "--client", "nobody", env=env
    )

    assert result.returncode == 0, result.stderr
    fields = dict(line.split("\t") for line in result.stdout.splitlines())
    assert fields["account_sid"] == "AC" + world.client_id.hex
    client, _ = sdk(live, fields["account_sid"], fields["auth_token"])
    assert client.messages.list() == []
    assert unknown.returncode == 1 and "nobody" in unknown.stderr


async def test_twilio_credentials_are_stored_encrypted(
    session_factory: SessionFactory, shop: tuple[str, str]
) -> None:
    async with session_factory() as session:
        stored = await session.scalar(text("SELECT auth_token FROM twilio_credentials"))
    assert stored is not None and stored.startswith("aesgcm1$") and shop[1] not in stored


def test_schema_conversion_rejects_what_twilio_would_not_send() -> None:
    """The checks above are not vacuous: a body off Twilio's schema fails them."""
    schema = _response_schema(MESSAGE, "get", "200")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"sid": "XX123", "status": "queued"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"num_segments": 1}, schema)  # a string in Twilio's document
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"status": "expired"}, schema)  # not in Twilio's vocabulary


def test_openapi_documents_twilios_answers() -> None:
    spec = create_app(make_settings()).openapi()
    operations = [
        (path, method, operation)
        for path, item in spec["paths"].items()
        if path.startswith("/2010-04-01/")
        for method, operation in item.items()
    ]

    assert {(path, method) for path, method, _ in operations} == {
        (MESSAGES, "post"),
        (MESSAGES, "get"),
        (MESSAGE, "get"),
        (MESSAGE, "post"),
    }
    for _, _, operation in operations:
        assert "422" not in operation["responses"]  # parameters are refused with a Twilio 400
        error = operation["responses"]["400"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/TwilioErrorBody"}
        assert operation["security"] == [{"HTTPBasic": []}]
    create = spec["paths"][MESSAGES]["post"]
    assert "application/x-www-form-urlencoded" in create["requestBody"]["content"]
    example = spec["components"]["schemas"]["TwilioMessage"]["examples"][0]
    jsonschema.validate(example, _response_schema(MESSAGES, "post", "201"))
