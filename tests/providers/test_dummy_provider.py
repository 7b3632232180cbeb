"""Providers are data: a provider defined here (adapter, settings, registry entry) is usable
end to end — senders, the worker, both webhooks, the OpenAPI document — with no other file
changed; unregistered, its name is refused everywhere."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar

import httpx
import pytest
from pydantic import BaseModel
from sqlalchemy import select

from app.db.models import InboundMessage, Message, Sender
from app.db.session import SessionFactory
from app.kernel.errors import ValidationFailed
from app.kernel.status import MessageStatus
from app.providers.base import (
    Accepted,
    CallbackRequest,
    InboundSms,
    InvalidCallback,
    OutboundSms,
    Provider,
    StatusReport,
)
from app.providers.registry import PROVIDERS, ProviderContext, ProviderEntry, Webhooks
from app.senders.service import SenderKind, create_sender
from tests.api.test_send import assert_problem
from tests.conftest import World, ready_keywords
from tests.test_end_to_end import run_worker

SECRET = "dummy-secret-from-the-environment"
ADDRESS = "+14155550177"
CUSTOMER = "+14155550123"
STATUSES = {"ok": MessageStatus.DELIVERED, "ko": MessageStatus.UNDELIVERED}


class DummySettings(BaseModel):
    """`DUMMY__*`: read through the registry entry like any provider's."""

    secret: str = ""


class DummyProvider(Provider):
    """Accepts everything; callbacks are signed with a shared secret in a header."""

    name = "dummy"
    submitted: ClassVar[list[OutboundSms]] = []

    def __init__(self, settings: DummySettings) -> None:
        self._secret = settings.secret

    async def send(self, sms: OutboundSms) -> Accepted:
        self.submitted.append(sms)
        return Accepted(provider_message_id=f"dummy-{sms.message_id.hex}")

    def verify_callback(self, request: CallbackRequest) -> bool:
        return bool(self._secret) and request.headers.get("x-dummy-signature") == self._secret

    def parse_status_callback(self, request: CallbackRequest) -> StatusReport:
        try:
            provider_status = request.params["status"]
            return StatusReport(
                provider_message_id=request.params["id"],
                provider_status=provider_status,
                status=STATUSES.get(provider_status),
                raw=dict(request.params),
            )
        except KeyError as error:
            raise InvalidCallback(f"missing {error}") from None

    def parse_inbound(self, request: CallbackRequest) -> InboundSms:
        params = request.params
        return InboundSms(
            provider_message_id=params["id"],
            from_=params["from"],
            to=params["to"],
            body=params["text"],
        )


def _build(settings: DummySettings, context: ProviderContext) -> Provider | None:
    return DummyProvider(settings) if settings.secret else None


ENTRY = ProviderEntry(
    "dummy", DummySettings, _build, Webhooks(status=("POST",), inbound=("GET", "POST"))
)


@pytest.fixture
def dummy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[OutboundSms]]:
    """The dummy provider registered (configured from `DUMMY__SECRET`), then unregistered."""
    monkeypatch.setenv("DUMMY__SECRET", SECRET)
    DummyProvider.submitted = []
    PROVIDERS.register(ENTRY)
    try:
        yield DummyProvider.submitted
    finally:
        PROVIDERS.unregister("dummy")


@pytest.fixture
async def dummy_api(
    dummy: list[OutboundSms], app_factory: Callable[..., Any], session_factory: SessionFactory
) -> AsyncIterator[httpx.AsyncClient]:
    """The app, started once the dummy provider is registered (it builds its adapters then)."""
    async with app_factory() as client:
        yield client


def signed() -> dict[str, str]:
    return {"X-Dummy-Signature": SECRET}


async def create_dummy_sender(api: httpx.AsyncClient, world: World) -> dict[str, Any]:
    admin = world.auth(world.admin_key)
    created = await api.post(
        "/v1/senders",
        json={
            "address": ADDRESS,
            "kind": "long_code",
            "provider": "dummy",
            "fallback_provider": "fake",
            "keywords": ready_keywords(),
        },
        headers=admin,
    )
    assert created.status_code == 201, created.text
    sender: dict[str, Any] = created.json()
    granted = await api.put(f"/v1/senders/{sender['id']}/clients/shop", headers=admin)
    assert granted.status_code in (200, 201, 204), granted.text
    return sender


async def test_a_registered_provider_sends_and_takes_webhooks(
    dummy_api: httpx.AsyncClient,
    dummy: list[OutboundSms],
    world: World,
    session_factory: SessionFactory,
) -> None:
    sender = await create_dummy_sender(dummy_api, world)
    accepted = await dummy_api.post(
        "/v1/messages",
        json={"to": CUSTOMER, "from": ADDRESS, "body": "Your order has shipped."},
        headers=world.auth(),
    )
    assert accepted.status_code == 202, accepted.text
    message_id = accepted.json()["id"]

    await run_worker()

    assert sender["provider"] == "dummy"
    assert [(str(sms.message_id), sms.sender, sms.to) for sms in dummy] == [
        (message_id, ADDRESS, CUSTOMER)
    ]
    sent = (await dummy_api.get(f"/v1/messages/{message_id}", headers=world.auth())).json()
    assert sent["status"] == "sent"
    provider_message_id = f"dummy-{uuid.UUID(message_id).hex}"
    assert sent["provider_message_id"] == provider_message_id

    unsigned = await dummy_api.post(
        "/v1/webhooks/dummy/status", data={"id": provider_message_id, "status": "ok"}
    )
    report = await dummy_api.post(
        "/v1/webhooks/dummy/status",
        data={"id": provider_message_id, "status": "ok"},
        headers=signed(),
    )

    assert_problem(unsigned, 403, "invalid_signature")
    assert report.status_code == 204, report.text
    async with session_factory() as session:
        message = await session.get(Message, uuid.UUID(message_id))
        assert message is not None
        assert message.status == MessageStatus.DELIVERED.value


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_registered_provider_records_inbound_messages(
    dummy_api: httpx.AsyncClient, world: World, session_factory: SessionFactory, method: str
) -> None:
    await create_dummy_sender(dummy_api, world)
    params = {"id": f"in-{method}", "from": CUSTOMER, "to": ADDRESS, "text": "Where is it?"}

    if method == "GET":
        response = await dummy_api.get(
            "/v1/webhooks/dummy/inbound", params=params, headers=signed()
        )
    else:
        response = await dummy_api.post("/v1/webhooks/dummy/inbound", data=params, headers=signed())
    wrong_method = await dummy_api.get("/v1/webhooks/dummy/status", headers=signed())

    assert response.status_code == 204, response.text
    async with session_factory() as session:
        stored = (
            await session.scalars(select(InboundMessage).where(InboundMessage.provider == "dummy"))
        ).all()
    assert [(row.provider_message_id, row.from_, row.body) for row in stored] == [
        (f"in-{method}", CUSTOMER, "Where is it?")
    ]
    # Its entry takes status reports by POST only.
    assert_problem(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["allow"] == "POST"


async def test_the_openapi_document_lists_registered_providers(
    dummy_api: httpx.AsyncClient,
) -> None:
    document = (await dummy_api.get("/openapi.json")).json()

    sender_in = document["components"]["schemas"]["SenderIn"]["properties"]
    status_parameters = document["paths"]["/v1/webhooks/{provider}/status"]["post"]["parameters"]
    assert sender_in["provider"]["enum"] == ["dummy", "fake", "twilio", "vonage"]
    assert status_parameters[0]["schema"]["enum"] == ["dummy", "twilio", "vonage"]


async def test_an_unregistered_provider_is_refused(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    admin = world.auth(world.admin_key)
    body = {"address": ADDRESS, "kind": "long_code", "keywords": ready_keywords()}

    as_provider = await api.post("/v1/senders", json={**body, "provider": "dummy"}, headers=admin)
    as_fallback = await api.post(
        "/v1/senders",
        json={**body, "provider": "fake", "fallback_provider": "dummy"},
        headers=admin,
    )
    patched = await api.patch(
        f"/v1/senders/{world.fake_sender.id}", json={"provider": "dummy"}, headers=admin
    )
    status = await api.post("/v1/webhooks/dummy/status", data={"id": "x"}, headers=signed())
    inbound = await api.get("/v1/webhooks/dummy/inbound", headers=signed())
    fake_status = await api.post("/v1/webhooks/fake/status", data={"id": "x"})

    assert_problem(as_provider, 422, "validation_error", field="provider")
    assert_problem(as_fallback, 422, "validation_error", field="fallback_provider")
    assert_problem(patched, 422, "validation_error", field="provider")
    assert_problem(status, 404, "unknown_provider")
    assert_problem(inbound, 404, "unknown_provider")
    # The fake is registered but takes no HTTP webhooks: no such URL, as before.
    assert_problem(fake_status, 404, "unknown_provider")
    async with session_factory() as session:
        assert await session.scalar(select(Sender).where(Sender.address == ADDRESS)) is None


async def test_the_senders_domain_refuses_an_unregistered_provider(
    session_factory: SessionFactory,
) -> None:
    """The same check without the API (`smsgate seed-senders` goes through it)."""
    async with session_factory() as session:
        with pytest.raises(ValidationFailed) as refused:
            await create_sender(
                session,
                address=ADDRESS,
                kind=SenderKind.LONG_CODE,
                provider="dummy",
                description=None,
                default_region="US",
            )

    assert refused.value.code == "invalid_sender"
    assert [error.field for error in refused.value.errors or []] == ["provider"]


async def test_a_sender_whose_provider_was_unregistered_stays_editable(
    dummy_api: httpx.AsyncClient, world: World
) -> None:
    sender = await create_dummy_sender(dummy_api, world)
    admin = world.auth(world.admin_key)
    PROVIDERS.unregister("dummy")
    try:
        described = await dummy_api.patch(
            f"/v1/senders/{sender['id']}", json={"description": "retired"}, headers=admin
        )
        moved = await dummy_api.patch(
            f"/v1/senders/{sender['id']}", json={"provider": "dummy"}, headers=admin
        )
    finally:
        PROVIDERS.register(ENTRY)

    assert described.status_code == 200, described.text
    assert (described.json()["provider"], described.json()["description"]) == ("dummy", "retired")
    # A name the request supplies is still judged.
    assert_problem(moved, 422, "validation_error", field="provider")


async def test_other_methods_are_answered_from_the_registry(api: httpx.AsyncClient) -> None:
    vonage = await api.put("/v1/webhooks/vonage/status")
    twilio = await api.delete("/v1/webhooks/twilio/inbound")
    unknown = await api.put("/v1/webhooks/nope/status")
    other_path = await api.put("/v1/webhooks/twilio/elsewhere")

    assert_problem(vonage, 405, "method_not_allowed")
    assert vonage.headers["allow"] == "GET, POST"
    assert_problem(twilio, 405, "method_not_allowed")
    assert twilio.headers["allow"] == "POST"
    assert_problem(unknown, 404, "unknown_provider")
    assert other_path.status_code == 404
