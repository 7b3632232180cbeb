"""/v1/senders: admin only; create, validate per kind, conflict, list, get, patch."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.db.models import Message, Sender
from app.db.session import SessionFactory
from tests.api.test_send import assert_problem
from tests.conftest import World


async def create(api: httpx.AsyncClient, world: World, **body: Any) -> httpx.Response:
    return await api.post("/v1/senders", json=body, headers=world.auth(world.admin_key))


async def stored_senders(session_factory: SessionFactory) -> dict[str, tuple[str, str, str | None]]:
    """Every sender in the database as address -> (kind, provider, description)."""
    async with session_factory() as session:
        rows = await session.execute(
            select(Sender.address, Sender.kind, Sender.provider, Sender.description)
        )
        return {
            address: (kind, provider, description) for address, kind, provider, description in rows
        }


async def load_sender(session_factory: SessionFactory, sender_id: uuid.UUID | str) -> Sender:
    async with session_factory() as session:
        sender = await session.get(Sender, uuid.UUID(str(sender_id)))
        assert sender is not None
        return sender


WORLD_ADDRESSES = {"+14155550100", "ACME", "+14155550199"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/senders", {"address": "54321", "kind": "short_code", "provider": "fake"}),
        ("PATCH", "/v1/senders/{id}", {"provider": "fake"}),
        ("GET", "/v1/senders/{id}/clients", None),
        ("PUT", "/v1/senders/{id}/clients/other-shop", None),
        ("DELETE", "/v1/senders/{id}/clients/shop", None),
    ],
)
async def test_every_sender_endpoint_but_reading_needs_an_admin_key(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    url = path.format(id=world.twilio_sender.id)

    anonymous = await api.request(method, url, json=body)
    client = await api.request(method, url, json=body, headers=world.auth())
    other_client = await api.request(
        method, url, json=body, headers=world.auth(world.other_client_key)
    )

    assert_problem(anonymous, 401, "missing_api_key")
    assert_problem(client, 403, "admin_key_required")
    assert_problem(other_client, 403, "admin_key_required")
    # Nothing was created or changed by the refused requests.
    assert await stored_senders(session_factory) == {
        "+14155550100": ("long_code", "twilio", None),
        "ACME": ("alphanumeric", "vonage", None),
        "+14155550199": ("long_code", "fake", None),
    }


async def test_creates_a_long_code_normalised_to_e164(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    response = await create(
        api,
        world,
        address="(415) 555-0142",
        kind="long_code",
        provider="vonage",
        description="US support line",
    )

    assert response.status_code == 201, response.text
    sender = response.json()
    assert set(sender) == {
        "id",
        "address",
        "kind",
        "provider",
        "fallback_provider",
        "rate_per_second",
        "description",
        "countries",
        "served_countries",
        "keywords",
        "missing_replies",
        "created_at",
        "updated_at",
    }
    assert sender["address"] == "+14155550142"  # national format read in the default region (US)
    assert sender["kind"] == "long_code"
    assert sender["provider"] == "vonage"
    assert (sender["rate_per_second"], sender["fallback_provider"]) == (1.0, None)
    assert sender["description"] == "US support line"
    assert (sender["countries"], sender["served_countries"]) == (None, ["US"])
    stored = await load_sender(session_factory, sender["id"])
    assert (stored.address, stored.kind, stored.provider, stored.description) == (
        "+14155550142",
        "long_code",
        "vonage",
        "US support line",
    )
    assert datetime.fromisoformat(sender["created_at"]) == stored.created_at
    assert datetime.fromisoformat(sender["updated_at"]) == stored.updated_at


@pytest.mark.parametrize(
    ("address", "kind", "provider"),
    [
        ("54321", "short_code", "twilio"),
        ("123", "short_code", "fake"),
        ("12345678", "short_code", "vonage"),
        ("Shop 24", "alphanumeric", "vonage"),
        ("A", "alphanumeric", "twilio"),
        ("ElevenChars", "alphanumeric", "fake"),
        ("+447911123456", "long_code", "twilio"),  # a UK mobile in E.164 already
    ],
)
async def test_creates_short_codes_and_alphanumeric_ids_as_given(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    address: str,
    kind: str,
    provider: str,
) -> None:
    response = await create(api, world, address=address, kind=kind, provider=provider)

    assert response.status_code == 201, response.text
    sender = response.json()
    assert (sender["address"], sender["kind"], sender["provider"]) == (address, kind, provider)
    assert sender["description"] is None
    uuid.UUID(sender["id"])
    assert (await stored_senders(session_factory))[address] == (kind, provider, None)


@pytest.mark.parametrize(
    ("address", "kind", "reason"),
    [
        ("+33142685300", "long_code", "fixed-line"),
        ("(415) 555", "long_code", "impossible number"),
        ("+15555550123", "long_code", "invalid number"),
        ("not a number", "long_code", "not a phone number"),
        ("12", "short_code", "3 to 8 digits"),
        ("123456789", "short_code", "3 to 8 digits"),
        ("12a45", "short_code", "3 to 8 digits"),
        ("+12345", "short_code", "3 to 8 digits"),
        ("TwelveChars1", "alphanumeric", "1 to 11"),
        ("12345", "alphanumeric", "with a letter"),
        ("ACME!", "alphanumeric", "letters, digits or spaces"),
        ("Café", "alphanumeric", "letters, digits or spaces"),
    ],
)
async def test_refuses_an_address_that_does_not_fit_its_kind(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    address: str,
    kind: str,
    reason: str,
) -> None:
    response = await create(api, world, address=address, kind=kind, provider="twilio")

    assert_problem(response, 422, "invalid_sender", field="address")
    assert reason in response.json()["errors"][0]["reason"]
    assert set(await stored_senders(session_factory)) == WORLD_ADDRESSES


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"address": "54321", "kind": "short_code", "provider": "plivo"}, "provider"),
        ({"address": "54321", "kind": "toll_free", "provider": "twilio"}, "kind"),
        ({"address": "54321", "kind": "short_code"}, "provider"),
        ({"address": "54321", "provider": "twilio"}, "kind"),
        ({"kind": "short_code", "provider": "twilio"}, "address"),
        ({"address": "", "kind": "short_code", "provider": "twilio"}, "address"),
        (
            {
                "address": "54321",
                "kind": "short_code",
                "provider": "twilio",
                "id": str(uuid.uuid4()),
            },
            "id",
        ),
        (
            {
                "address": "54321",
                "kind": "short_code",
                "provider": "twilio",
                "description": "d" * 201,
            },
            "description",
        ),
    ],
)
async def test_malformed_create_requests_name_the_field(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    body: dict[str, Any],
    field: str,
) -> None:
    response = await create(api, world, **body)

    assert_problem(response, 422, "validation_error", field=field)
    assert set(await stored_senders(session_factory)) == WORLD_ADDRESSES


@pytest.mark.parametrize(
    ("address", "kind", "provider", "existing"),
    [
        ("+14155550100", "long_code", "vonage", "+14155550100"),
        # The same number in national format is the same address once normalised.
        ("415-555-0100", "long_code", "fake", "+14155550100"),
        ("ACME", "alphanumeric", "twilio", "ACME"),
    ],
)
async def test_refuses_a_duplicate_address_and_keeps_the_first(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    address: str,
    kind: str,
    provider: str,
    existing: str,
) -> None:
    response = await create(
        api, world, address=address, kind=kind, provider=provider, description="duplicate"
    )

    assert_problem(response, 409, "sender_exists")
    assert existing in response.json()["detail"]
    assert await stored_senders(session_factory) == {
        "+14155550100": ("long_code", "twilio", None),
        "ACME": ("alphanumeric", "vonage", None),
        "+14155550199": ("long_code", "fake", None),
    }


async def test_a_duplicate_created_through_the_api_is_refused_too(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    first = await create(api, world, address="54321", kind="short_code", provider="twilio")
    second = await create(api, world, address="54321", kind="short_code", provider="vonage")

    assert first.status_code == 201, first.text
    assert_problem(second, 409, "sender_exists")
    stored = await load_sender(session_factory, first.json()["id"])
    assert (stored.address, stored.provider) == ("54321", "twilio")
    async with session_factory() as session:
        count = await session.scalar(
            select(func.count()).select_from(Sender).where(Sender.address == "54321")
        )
    assert count == 1


async def test_lists_every_sender_oldest_first(api: httpx.AsyncClient, world: World) -> None:
    created = await create(api, world, address="54321", kind="short_code", provider="fake")
    assert created.status_code == 201, created.text

    response = await api.get("/v1/senders", headers=world.auth(world.admin_key))

    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 4
    assert {sender["address"] for sender in data} == WORLD_ADDRESSES | {"54321"}
    # The three from the fixture were created in one earlier transaction; the new one is last.
    assert data[-1] == created.json()
    by_address = {sender["address"]: sender for sender in data}
    assert by_address["+14155550100"]["id"] == str(world.twilio_sender.id)
    assert by_address["ACME"]["id"] == str(world.vonage_sender.id)
    assert by_address["ACME"]["kind"] == "alphanumeric"
    assert by_address["ACME"]["provider"] == "vonage"
    assert by_address["+14155550199"]["id"] == str(world.fake_sender.id)


async def test_gets_one_sender_by_id(api: httpx.AsyncClient, world: World) -> None:
    response = await api.get(
        f"/v1/senders/{world.vonage_sender.id}", headers=world.auth(world.admin_key)
    )

    assert response.status_code == 200, response.text
    sender = response.json()
    assert sender["id"] == str(world.vonage_sender.id)
    assert sender["address"] == "ACME"
    assert sender["kind"] == "alphanumeric"
    assert sender["provider"] == "vonage"
    assert sender["description"] is None


async def test_get_of_a_created_sender_returns_what_create_returned(
    api: httpx.AsyncClient, world: World
) -> None:
    created = await create(
        api, world, address="Shop 24", kind="alphanumeric", provider="fake", description="promo"
    )

    response = await api.get(
        f"/v1/senders/{created.json()['id']}", headers=world.auth(world.admin_key)
    )

    assert response.status_code == 200, response.text
    assert response.json() == created.json()


async def test_an_unknown_sender_is_404(api: httpx.AsyncClient, world: World) -> None:
    unknown = uuid.uuid4()

    got = await api.get(f"/v1/senders/{unknown}", headers=world.auth(world.admin_key))
    patched = await api.patch(
        f"/v1/senders/{unknown}", json={"provider": "fake"}, headers=world.auth(world.admin_key)
    )

    assert_problem(got, 404, "sender_not_found")
    assert str(unknown) in got.json()["detail"]
    assert_problem(patched, 404, "sender_not_found")


@pytest.mark.parametrize("method", ["GET", "PATCH"])
async def test_a_malformed_sender_id_is_422(
    api: httpx.AsyncClient, world: World, method: str
) -> None:
    response = await api.request(
        method,
        "/v1/senders/not-a-uuid",
        json={"provider": "fake"} if method == "PATCH" else None,
        headers=world.auth(world.admin_key),
    )

    assert_problem(response, 422, "validation_error", field="sender_id")


async def test_patch_changes_provider_and_description_and_bumps_updated_at(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    before = await load_sender(session_factory, world.twilio_sender.id)

    response = await api.patch(
        f"/v1/senders/{world.twilio_sender.id}",
        json={"provider": "vonage", "description": "moved to Vonage"},
        headers=world.auth(world.admin_key),
    )

    assert response.status_code == 200, response.text
    sender = response.json()
    assert sender["id"] == str(world.twilio_sender.id)
    assert sender["address"] == "+14155550100"
    assert sender["kind"] == "long_code"
    assert sender["provider"] == "vonage"
    assert sender["description"] == "moved to Vonage"
    assert datetime.fromisoformat(sender["created_at"]) == before.created_at
    assert datetime.fromisoformat(sender["updated_at"]) > before.updated_at
    after = await load_sender(session_factory, world.twilio_sender.id)
    assert (after.provider, after.description) == ("vonage", "moved to Vonage")
    assert after.updated_at > before.updated_at
    assert datetime.fromisoformat(sender["updated_at"]) == after.updated_at
    assert after.created_at == before.created_at


async def test_patch_leaves_omitted_fields_as_they_are(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    first = await api.patch(
        f"/v1/senders/{world.fake_sender.id}",
        json={"description": "test traffic"},
        headers=world.auth(world.admin_key),
    )
    second = await api.patch(
        f"/v1/senders/{world.fake_sender.id}",
        json={"provider": "twilio"},
        headers=world.auth(world.admin_key),
    )

    assert first.status_code == 200, first.text
    assert (first.json()["provider"], first.json()["description"]) == ("fake", "test traffic")
    assert second.status_code == 200, second.text
    assert (second.json()["provider"], second.json()["description"]) == ("twilio", "test traffic")
    assert (await stored_senders(session_factory))["+14155550199"] == (
        "long_code",
        "twilio",
        "test traffic",
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"address": "+14155550111"}, "address"),
        ({"provider": "fake", "address": "+14155550111"}, "address"),
        ({"kind": "short_code"}, "kind"),
        ({"provider": "fake", "created_at": "2020-01-01T00:00:00Z"}, "created_at"),
        ({"provider": "plivo"}, "provider"),
        ({"description": "d" * 201}, "description"),
    ],
)
async def test_a_patch_that_is_not_allowed_changes_nothing(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    body: dict[str, Any],
    field: str,
) -> None:
    before = await load_sender(session_factory, world.twilio_sender.id)

    response = await api.patch(
        f"/v1/senders/{world.twilio_sender.id}", json=body, headers=world.auth(world.admin_key)
    )

    assert_problem(response, 422, "validation_error", field=field)
    after = await load_sender(session_factory, world.twilio_sender.id)
    assert (after.address, after.kind, after.provider, after.description) == (
        "+14155550100",
        "long_code",
        "twilio",
        None,
    )
    assert after.updated_at == before.updated_at
    assert after.created_at == before.created_at


async def test_a_message_sent_after_a_provider_change_goes_to_the_new_provider(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    before = await api.post(
        "/v1/messages", json={"to": "+14155550123", "body": "before"}, headers=world.auth()
    )
    patched = await api.patch(
        f"/v1/senders/{world.twilio_sender.id}",
        json={"provider": "fake"},
        headers=world.auth(world.admin_key),
    )
    # Once from the client's default sender, once naming it.
    after_default = await api.post(
        "/v1/messages", json={"to": "+14155550123", "body": "after"}, headers=world.auth()
    )
    after_named = await api.post(
        "/v1/messages",
        json={"to": "+14155550123", "body": "after", "from": "+14155550100"},
        headers=world.auth(),
    )

    assert before.status_code == 202, before.text
    assert before.json()["provider"] == "twilio"
    assert patched.status_code == 200, patched.text
    for response in (after_default, after_named):
        assert response.status_code == 202, response.text
        assert response.json()["from"] == "+14155550100"
        assert response.json()["provider"] == "fake"
    async with session_factory() as session:
        rows = await session.execute(select(Message.id, Message.provider))
        providers = dict(rows.all())
    assert providers == {
        uuid.UUID(before.json()["id"]): "twilio",  # already accepted: keeps its provider
        uuid.UUID(after_default.json()["id"]): "fake",
        uuid.UUID(after_named.json()["id"]): "fake",
    }


@pytest.mark.parametrize("rate", [True, False, "5"])
async def test_a_rate_must_be_a_number_not_a_boolean(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory, rate: Any
) -> None:
    created = await create(
        api, world, address="54321", kind="short_code", provider="fake", rate_per_second=rate
    )
    patched = await api.patch(
        f"/v1/senders/{world.fake_sender.id}",
        json={"rate_per_second": rate},
        headers=world.auth(world.admin_key),
    )

    assert_problem(created, 422, "validation_error", field="rate_per_second")
    assert_problem(patched, 422, "validation_error", field="rate_per_second")
    assert (await load_sender(session_factory, world.fake_sender.id)).rate_per_second == 1000.0
