"""Tenancy with two clients, alpha and beta, each with a sender of its own: neither can send
from, name, read or tell apart the other's senders, opt-outs, inbound messages, messages or keys.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.access.auth import create_api_key
from app.db.models import Client, Message, OptOut, Sender, SenderClient
from app.db.session import SessionFactory
from tests.api.test_inbound import twilio_inbound
from tests.api.test_send import assert_problem
from tests.conftest import ready_keywords
from tests.events.test_emission import events, set_sender_endpoint

ALPHA_SENDER = "+14155550111"
BETA_SENDER = "+14155550122"
CUSTOMER = "+14155550123"
BETA_HOOK = "https://93.184.215.16/beta"


@dataclass
class Tenants:
    """Two clients with a sender each (granted by the admin API), and an admin key."""

    alpha_key: str
    beta_key: str
    admin_key: str
    alpha_sender: uuid.UUID
    beta_sender: uuid.UUID

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}


async def make_sender(session_factory: SessionFactory, address: str) -> uuid.UUID:
    async with session_factory.begin() as session:
        sender = Sender(
            id=uuid.uuid4(),
            address=address,
            kind="long_code",
            provider="fake",
            keywords=ready_keywords(),
            rate_per_second=1000.0,
        )
        session.add(sender)
    return sender.id


@pytest.fixture
async def tenants(api: httpx.AsyncClient, session_factory: SessionFactory) -> Tenants:
    async with session_factory.begin() as session:
        alpha_key = await create_api_key(session, "alpha")
        beta_key = await create_api_key(session, "beta")
        admin_key = await create_api_key(session, "operator", is_admin=True)
    alpha_sender = await make_sender(session_factory, ALPHA_SENDER)
    beta_sender = await make_sender(session_factory, BETA_SENDER)
    tenants = Tenants(alpha_key, beta_key, admin_key, alpha_sender, beta_sender)
    for sender, client in ((alpha_sender, "alpha"), (beta_sender, "beta")):
        granted = await api.put(
            f"/v1/senders/{sender}/clients/{client}", headers=tenants.auth(admin_key)
        )
        assert granted.status_code == 200, granted.text
        assert granted.json() == {"sender_id": str(sender), "clients": [client]}
    return tenants


async def send(
    api: httpx.AsyncClient, key: str, sender: str | None, to: str = CUSTOMER
) -> httpx.Response:
    body: dict[str, Any] = {"to": to, "body": "Your order has shipped."}
    if sender is not None:
        body["from"] = sender
    return await api.post("/v1/messages", json=body, headers={"Authorization": f"Bearer {key}"})


async def count(session_factory: SessionFactory, model: Any) -> int:
    async with session_factory() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


def without(problem: dict[str, Any], address: str) -> dict[str, Any]:
    """A problem body with the address it names blanked out, to compare two refusals."""
    blanked: dict[str, Any] = json.loads(json.dumps(problem).replace(address, "ADDRESS"))
    return blanked


# Senders


async def test_a_client_cannot_send_from_another_clients_sender_nor_tell_it_exists(
    api: httpx.AsyncClient, tenants: Tenants, session_factory: SessionFactory
) -> None:
    others = await send(api, tenants.beta_key, ALPHA_SENDER)
    unknown = await send(api, tenants.beta_key, "+14155550177")
    own = await send(api, tenants.beta_key, BETA_SENDER)

    assert_problem(others, 422, "unknown_sender", field="from")
    assert_problem(unknown, 422, "unknown_sender", field="from")
    assert without(others.json(), ALPHA_SENDER) == without(unknown.json(), "+14155550177")
    assert own.status_code == 202, own.text
    async with session_factory() as session:
        senders = list(await session.scalars(select(Message.from_)))
    assert senders == [BETA_SENDER]


async def test_a_batch_item_from_another_clients_sender_is_refused_alone(
    api: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await api.post(
        "/v1/messages/batch",
        json={
            "messages": [
                {"to": CUSTOMER, "from": ALPHA_SENDER, "body": "Hi"},
                {"to": CUSTOMER, "from": BETA_SENDER, "body": "Hi"},
            ]
        },
        headers=tenants.auth(tenants.beta_key),
    )

    assert response.status_code == 200, response.text
    first, second = response.json()["data"]
    assert (first["status"], first["error"]["code"]) == ("rejected", "unknown_sender")
    assert second["status"] == "accepted"


async def test_a_grant_and_a_revocation_take_effect_at_once_in_the_process_that_made_them(
    api: httpx.AsyncClient, tenants: Tenants, session_factory: SessionFactory
) -> None:
    # Cached refusal first: the sender is in this process's cache, without beta.
    assert_problem(await send(api, tenants.beta_key, ALPHA_SENDER), 422, "unknown_sender")

    granted = await api.put(
        f"/v1/senders/{tenants.alpha_sender}/clients/beta", headers=tenants.auth(tenants.admin_key)
    )
    allowed = await send(api, tenants.beta_key, ALPHA_SENDER)
    revoked = await api.delete(
        f"/v1/senders/{tenants.alpha_sender}/clients/beta",
        headers=tenants.auth(tenants.admin_key),
    )
    refused = await send(api, tenants.beta_key, ALPHA_SENDER)

    assert granted.json()["clients"] == ["alpha", "beta"]
    assert allowed.status_code == 202, allowed.text
    assert revoked.json()["clients"] == ["alpha"]
    assert_problem(refused, 422, "unknown_sender")


async def test_another_process_honours_a_grant_change_within_the_cache_time(
    app_factory: Callable[..., Any], tenants: Tenants, session_factory: SessionFactory
) -> None:
    async with app_factory(lookup_cache_seconds=0.5) as other_process:
        allowed = await send(other_process, tenants.alpha_key, ALPHA_SENDER)
        async with session_factory.begin() as session:  # revoked elsewhere (the CLI, SQL)
            grant = await session.get(
                SenderClient, (tenants.alpha_sender, await client_id("alpha", session))
            )
            await session.delete(grant)
        await asyncio.sleep(0.6)
        refused = await send(other_process, tenants.alpha_key, ALPHA_SENDER)

    assert allowed.status_code == 202, allowed.text
    assert_problem(refused, 422, "unknown_sender")


async def test_a_grant_made_elsewhere_works_at_once(
    api: httpx.AsyncClient, tenants: Tenants, session_factory: SessionFactory
) -> None:
    assert_problem(await send(api, tenants.beta_key, ALPHA_SENDER), 422, "unknown_sender")

    async with session_factory.begin() as session:  # granted by another process (the CLI)
        session.add(
            SenderClient(sender_id=tenants.alpha_sender, client_id=await client_id("beta", session))
        )
    allowed = await send(api, tenants.beta_key, ALPHA_SENDER)

    # The cached sender refused, so it was read again before refusing.
    assert allowed.status_code == 202, allowed.text


async def client_id(name: str, session: Any) -> uuid.UUID:
    found = await session.scalar(select(Client.id).where(Client.name == name))
    assert found is not None
    return uuid.UUID(str(found))


async def test_a_revoked_default_sender_is_no_longer_the_clients_default(
    api: httpx.AsyncClient, tenants: Tenants, session_factory: SessionFactory
) -> None:
    async with session_factory.begin() as session:
        alpha = await session.get(Client, await client_id("alpha", session))
        assert alpha is not None
        alpha.default_sender_id = tenants.alpha_sender
    assert (await send(api, tenants.alpha_key, None)).status_code == 202

    await api.delete(
        f"/v1/senders/{tenants.alpha_sender}/clients/alpha",
        headers=tenants.auth(tenants.admin_key),
    )
    refused = await send(api, tenants.alpha_key, None)

    assert_problem(refused, 422, "no_default_sender", field="from")
    async with session_factory() as session:
        alpha = await session.get(Client, await client_id("alpha", session))
        assert alpha is not None and alpha.default_sender_id is None


async def test_a_client_reads_its_own_senders_only(
    api: httpx.AsyncClient, tenants: Tenants
) -> None:
    listing = await api.get("/v1/senders", headers=tenants.auth(tenants.beta_key))
    others = await api.get(
        f"/v1/senders/{tenants.alpha_sender}", headers=tenants.auth(tenants.beta_key)
    )
    unknown_id = uuid.uuid4()
    unknown = await api.get(f"/v1/senders/{unknown_id}", headers=tenants.auth(tenants.beta_key))
    own = await api.get(
        f"/v1/senders/{tenants.beta_sender}", headers=tenants.auth(tenants.beta_key)
    )
    grants = await api.get(
        f"/v1/senders/{tenants.beta_sender}/clients", headers=tenants.auth(tenants.beta_key)
    )
    everything = await api.get("/v1/senders", headers=tenants.auth(tenants.admin_key))

    assert [s["address"] for s in listing.json()["data"]] == [BETA_SENDER]
    assert_problem(others, 404, "sender_not_found")
    assert_problem(unknown, 404, "sender_not_found")
    assert others.json()["detail"].replace(str(tenants.alpha_sender), "ID") == unknown.json()[
        "detail"
    ].replace(str(unknown_id), "ID")
    assert own.json()["address"] == BETA_SENDER
    assert_problem(grants, 403, "admin_key_required")
    assert {s["address"] for s in everything.json()["data"]} == {ALPHA_SENDER, BETA_SENDER}


async def test_granting_to_an_unknown_client_or_sender_is_a_404(
    api: httpx.AsyncClient, tenants: Tenants, session_factory: SessionFactory
) -> None:
    no_client = await api.put(
        f"/v1/senders/{tenants.alpha_sender}/clients/nobody",
        headers=tenants.auth(tenants.admin_key),
    )
    no_sender = await api.put(
        f"/v1/senders/{uuid.uuid4()}/clients/alpha", headers=tenants.auth(tenants.admin_key)
    )

    assert_problem(no_client, 404, "client_not_found")
    assert_problem(no_sender, 404, "sender_not_found")
    assert await count(session_factory, SenderClient) == 2


# Opt-outs


async def put_opt_out(
    api: httpx.AsyncClient, key: str, sender: uuid.UUID | None = None
) -> httpx.Response:
    params = {"sender_id": str(sender)} if sender else {}
    return await api.put(
        f"/v1/opt-outs/{CUSTOMER}", params=params, headers={"Authorization": f"Bearer {key}"}
    )


async def test_a_client_cannot_opt_a_number_out_of_another_clients_sender(
    api: httpx.AsyncClient, tenants: Tenants, session_factory: SessionFactory
) -> None:
    others = await put_opt_out(api, tenants.beta_key, tenants.alpha_sender)
    unknown_id = uuid.uuid4()
    unknown = await put_opt_out(api, tenants.beta_key, unknown_id)

    assert_problem(others, 404, "sender_not_found")
    assert_problem(unknown, 404, "sender_not_found")
    assert others.json()["detail"].replace(str(tenants.alpha_sender), "ID") == unknown.json()[
        "detail"
    ].replace(str(unknown_id), "ID")
    assert await count(session_factory, OptOut) == 0
    assert (await send(api, tenants.alpha_key, ALPHA_SENDER)).status_code == 202


async def test_a_client_opt_out_without_a_sender_covers_its_own_senders_only(
    api: httpx.AsyncClient, tenants: Tenants, session_factory: SessionFactory
) -> None:
    response = await put_opt_out(api, tenants.beta_key)

    assert response.status_code == 200, response.text
    status = response.json()
    assert status["sender_id"] is None
    assert status["opted_out"] is True
    assert status["senders"] == [{"sender_id": str(tenants.beta_sender), "opted_out": True}]
    async with session_factory() as session:
        rows = (await session.execute(select(OptOut.sender_id, OptOut.actor))).all()
    assert [tuple(row) for row in rows] == [(tenants.beta_sender, "client:beta")]
    # Alpha's sender still reaches the number; beta's does not.
    assert (await send(api, tenants.alpha_key, ALPHA_SENDER)).status_code == 202
    assert_problem(await send(api, tenants.beta_key, BETA_SENDER), 403, "recipient_opted_out")


async def test_repeated_identical_opt_outs_add_no_rows(
    api: httpx.AsyncClient, tenants: Tenants, session_factory: SessionFactory
) -> None:
    for _ in range(3):
        assert (await put_opt_out(api, tenants.beta_key)).status_code == 200
        assert (await put_opt_out(api, tenants.beta_key, tenants.beta_sender)).status_code == 200
    for _ in range(2):
        assert (await put_opt_out(api, tenants.admin_key)).status_code == 200
        lifted = await api.delete(
            f"/v1/opt-outs/{CUSTOMER}", headers=tenants.auth(tenants.admin_key)
        )
        assert lifted.status_code == 200, lifted.text
    for _ in range(2):
        again = await api.delete(
            f"/v1/opt-outs/{CUSTOMER}", headers=tenants.auth(tenants.admin_key)
        )
        assert again.status_code == 200

    async with session_factory() as session:
        rows = (
            await session.execute(select(OptOut.sender_id, OptOut.action).order_by(OptOut.id))
        ).all()
    assert [tuple(row) for row in rows] == [
        (tenants.beta_sender, "opt_out"),
        (None, "opt_out"),
        (None, "opt_in"),
        (None, "opt_out"),
        (None, "opt_in"),
    ]


async def test_a_client_sees_only_the_opt_out_rows_that_concern_its_senders(
    api: httpx.AsyncClient, tenants: Tenants
) -> None:
    assert (await put_opt_out(api, tenants.alpha_key)).status_code == 200
    assert (await put_opt_out(api, tenants.admin_key)).status_code == 200  # service-wide

    beta_view = await api.get(f"/v1/opt-outs/{CUSTOMER}", headers=tenants.auth(tenants.beta_key))
    alpha_view = await api.get(f"/v1/opt-outs/{CUSTOMER}", headers=tenants.auth(tenants.alpha_key))
    admin_view = await api.get(f"/v1/opt-outs/{CUSTOMER}", headers=tenants.auth(tenants.admin_key))

    assert beta_view.status_code == 200, beta_view.text
    # Beta sees the service-wide row (it stops beta's sender too), not who made it, and nothing
    # of alpha's sender.
    assert [(e["sender_id"], e["actor"]) for e in beta_view.json()["history"]] == [(None, None)]
    assert beta_view.json()["senders"] == [
        {"sender_id": str(tenants.beta_sender), "opted_out": True}
    ]
    assert [(e["sender_id"], e["actor"]) for e in alpha_view.json()["history"]] == [
        (None, None),
        (str(tenants.alpha_sender), "client:alpha"),
    ]
    assert "client:alpha" not in beta_view.text and ALPHA_SENDER not in beta_view.text
    assert [e["actor"] for e in admin_view.json()["history"]] == [
        "client:operator",
        "client:alpha",
    ]


async def test_service_wide_opt_ins_and_the_full_list_stay_admin_only(
    api: httpx.AsyncClient, tenants: Tenants, session_factory: SessionFactory
) -> None:
    assert (await put_opt_out(api, tenants.beta_key)).status_code == 200

    opt_in = await api.delete(f"/v1/opt-outs/{CUSTOMER}", headers=tenants.auth(tenants.beta_key))
    own_opt_in = await api.delete(
        f"/v1/opt-outs/{CUSTOMER}",
        params={"sender_id": str(tenants.beta_sender)},
        headers=tenants.auth(tenants.beta_key),
    )
    listing = await api.get("/v1/opt-outs", headers=tenants.auth(tenants.beta_key))
    importing = await api.post(
        "/v1/opt-outs/import",
        content=b"+14155550124\n",
        headers={**tenants.auth(tenants.beta_key), "content-type": "text/csv"},
    )

    for response in (opt_in, own_opt_in, listing, importing):
        assert_problem(response, 403, "admin_key_required")
    assert await count(session_factory, OptOut) == 1


async def test_a_client_without_senders_has_nothing_to_opt_out_of(
    api: httpx.AsyncClient, tenants: Tenants, session_factory: SessionFactory
) -> None:
    async with session_factory.begin() as session:
        lonely_key = await create_api_key(session, "lonely")

    response = await put_opt_out(api, lonely_key)

    assert_problem(response, 422, "no_senders", field="sender_id")
    assert await count(session_factory, OptOut) == 0


# Inbound messages


async def test_a_client_reads_the_inbound_messages_of_its_own_senders_only(
    api: httpx.AsyncClient, tenants: Tenants
) -> None:
    await twilio_inbound(api, "Hello alpha", to=ALPHA_SENDER)
    await twilio_inbound(api, "Hello beta", to=BETA_SENDER)
    await twilio_inbound(api, "Hello nobody", to="+14155550177")

    def bodies(response: httpx.Response) -> list[str]:
        assert response.status_code == 200, response.text
        return [m["body"] for m in response.json()["data"]]

    alpha = await api.get("/v1/inbound", headers=tenants.auth(tenants.alpha_key))
    beta = await api.get("/v1/inbound", headers=tenants.auth(tenants.beta_key))
    beta_naming_alpha = await api.get(
        "/v1/inbound",
        params={"sender_id": str(tenants.alpha_sender)},
        headers=tenants.auth(tenants.beta_key),
    )
    admin = await api.get("/v1/inbound", headers=tenants.auth(tenants.admin_key))

    assert bodies(alpha) == ["Hello alpha"]
    assert bodies(beta) == ["Hello beta"]
    assert bodies(beta_naming_alpha) == []
    assert bodies(admin) == ["Hello nobody", "Hello beta", "Hello alpha"]


# Messages


async def test_a_client_cannot_read_messages_sent_by_another_from_its_sender(
    api: httpx.AsyncClient, tenants: Tenants
) -> None:
    sent = await send(api, tenants.alpha_key, ALPHA_SENDER)
    message_id = sent.json()["id"]

    beta_get = await api.get(f"/v1/messages/{message_id}", headers=tenants.auth(tenants.beta_key))
    beta_list = await api.get("/v1/messages", headers=tenants.auth(tenants.beta_key))
    alpha_get = await api.get(f"/v1/messages/{message_id}", headers=tenants.auth(tenants.alpha_key))

    assert_problem(beta_get, 404, "message_not_found")
    assert beta_list.json()["data"] == []
    assert alpha_get.status_code == 200


# API keys


async def test_a_client_key_cannot_list_make_revoke_or_rotate_keys(
    api: httpx.AsyncClient, tenants: Tenants
) -> None:
    keys = (await api.get("/v1/api-keys", headers=tenants.auth(tenants.admin_key))).json()
    alpha_key_id = next(k["id"] for k in keys["data"] if k["client"] == "alpha")
    auth = tenants.auth(tenants.beta_key)

    refused = [
        await api.get("/v1/api-keys", headers=auth),
        await api.post("/v1/api-keys", json={"client": "beta"}, headers=auth),
        await api.post(f"/v1/api-keys/{alpha_key_id}/revoke", headers=auth),
        await api.post(f"/v1/api-keys/{alpha_key_id}/rotate", headers=auth),
    ]

    for response in refused:
        assert_problem(response, 403, "admin_key_required")
    assert (await send(api, tenants.alpha_key, ALPHA_SENDER)).status_code == 202
    after = (await api.get("/v1/api-keys", headers=tenants.auth(tenants.admin_key))).json()
    assert len(after["data"]) == len(keys["data"])


async def test_a_service_wide_stop_tells_other_senders_endpoints_nothing_of_whose_it_was(
    app_factory: Callable[..., Any], tenants: Tenants, session_factory: SessionFactory
) -> None:
    """With OPT_OUT_SCOPE=service a STOP to alpha's sender opts the number out of every
    sender, and every sender's endpoint hears of it; beta's must not learn alpha's sender
    (the detail names it) nor who acted, as `GET /v1/opt-outs` hides both from beta's key."""
    async with session_factory.begin() as session:
        alpha = await session.get(Sender, tenants.alpha_sender)
        assert alpha is not None
        alpha.provider = "twilio"  # the inbound route below is Twilio's
    await set_sender_endpoint(session_factory, tenants.beta_sender, BETA_HOOK)
    async with app_factory(opt_out_scope="service") as api:
        response = await twilio_inbound(api, "STOP", to=ALPHA_SENDER)
        assert response.status_code in (200, 204), response.text
        seen = await api.get(f"/v1/opt-outs/{CUSTOMER}", headers=tenants.auth(tenants.beta_key))

    assert seen.status_code == 200 and seen.json()["history"][0]["detail"] is None
    to_beta = [data for _, url, data in await events(session_factory) if url == BETA_HOOK]
    assert [(d["opted_out"], d["detail"], d["actor"]) for d in to_beta] == [
        (True, None, "recipient")
    ]
