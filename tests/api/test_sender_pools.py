"""Sender pools: a send without `from` by a client without a default sender gets a sender
serving the recipient's country, the same one for the same recipient over time, new recipients
spread across the pool by rate (README, "Sender pools")."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from app.access.auth import create_api_key
from app.db.models import Message, SenderAffinity
from app.db.retention import prune
from app.db.session import SessionFactory
from app.kernel.metrics import DB_STATEMENTS
from app.kernel.settings import PumpingSettings, RetentionSettings, TrafficSettings
from tests.api.test_send import assert_problem
from tests.conftest import World, ready_keywords

pytestmark = pytest.mark.network_guard

BATCH = "/v1/messages/batch"
US_LOW, US_MID, TOLL_FREE, FRENCH_ID = "+14155550101", "+12125550102", "+18445550100", "ACMEFR"
RATES = {US_LOW: 1.0, US_MID: 2.0, TOLL_FREE: 3.0}
FRANCE = "+33612345678"
CANADA = "+16135550123"
GERMANY = "+4915123456789"


@dataclass
class Pool:
    """A client ("pooled", no default sender) and the senders granted to it, by address."""

    key: str
    senders: dict[str, str]

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


async def add_sender(
    api: httpx.AsyncClient, world: World, address: str, kind: str, **more: Any
) -> str:
    body = {"address": address, "kind": kind, "provider": "fake", "keywords": ready_keywords()}
    created = await api.post(
        "/v1/senders", json={**body, **more}, headers=world.auth(world.admin_key)
    )
    assert created.status_code == 201, created.text
    sender_id: str = created.json()["id"]
    granted = await api.put(
        f"/v1/senders/{sender_id}/clients/pooled", headers=world.auth(world.admin_key)
    )
    assert granted.status_code == 200, granted.text
    return sender_id


@pytest.fixture
async def api(app_factory: Callable[..., Any]) -> AsyncIterator[httpx.AsyncClient]:
    """The app permitting Germany and Belgium too (so a send there reaches the pool's own
    refusal, judged after the service's destination list), with the pumping alarm off (the
    sequential numbers below would raise it, and its event is a statement of its own)."""
    permitted = TrafficSettings(permitted_countries=["US", "CA", "FR", "DE", "BE"])
    async with app_factory(traffic=permitted, pumping=PumpingSettings(action="off")) as client:
        yield client


@pytest.fixture
async def pool(api: httpx.AsyncClient, world: World, session_factory: SessionFactory) -> Pool:
    """Two US long codes (their own country by default), a toll-free number set to serve the
    US and Canada, and an alphanumeric ID set to serve France."""
    async with session_factory.begin() as session:
        key = await create_api_key(session, "pooled")
    senders = {
        US_LOW: await add_sender(api, world, US_LOW, "long_code", rate_per_second=1.0),
        US_MID: await add_sender(api, world, US_MID, "long_code", rate_per_second=2.0),
        TOLL_FREE: await add_sender(
            api, world, TOLL_FREE, "long_code", rate_per_second=3.0, countries=["us", "CA"]
        ),
        FRENCH_ID: await add_sender(api, world, FRENCH_ID, "alphanumeric", countries=["FR"]),
    }
    return Pool(key, senders)


async def send(api: httpx.AsyncClient, pool: Pool, to: str, **more: Any) -> httpx.Response:
    body = {"to": to, "body": "Your code is 1042.", **more}
    return await api.post("/v1/messages", json=body, headers=pool.auth())


async def send_batch(api: httpx.AsyncClient, pool: Pool, recipients: list[str]) -> list[Any]:
    messages = [{"to": to, "body": "Your order has shipped."} for to in recipients]
    response = await api.post(BATCH, json={"messages": messages}, headers=pool.auth())
    assert response.status_code == 200, response.text
    data: list[Any] = response.json()["data"]
    return data


def us_number(n: int) -> str:
    return f"+1415555{1000 + n:04d}"


async def test_senders_show_the_countries_they_serve(
    api: httpx.AsyncClient, world: World, pool: Pool
) -> None:
    listing = await api.get("/v1/senders", headers=pool.auth())

    served = {s["address"]: (s["countries"], s["served_countries"]) for s in listing.json()["data"]}
    assert served == {
        US_LOW: (None, ["US"]),
        US_MID: (None, ["US"]),
        TOLL_FREE: (["CA", "US"], ["CA", "US"]),
        FRENCH_ID: (["FR"], ["FR"]),
    }
    bad = await api.post(
        "/v1/senders",
        json={"address": "ACMEXX", "kind": "alphanumeric", "provider": "fake", "countries": ["XX"]},
        headers=world.auth(world.admin_key),
    )
    assert_problem(bad, 422, "invalid_sender", field="countries")


async def test_sticky_selection_over_a_thousand_sends_spread_by_rate(
    api: httpx.AsyncClient, pool: Pool, session_factory: SessionFactory
) -> None:
    recipients = [us_number(n) for n in range(450)]
    # 1,000 sends: every recipient in batches, then again in reverse, then 100 single sends.
    order = recipients + recipients[::-1][:450]
    chosen: dict[str, set[str]] = {}
    for start in range(0, len(order), 100):
        for entry, to in zip(
            await send_batch(api, pool, order[start : start + 100]),
            order[start : start + 100],
            strict=True,
        ):
            assert entry["status"] == "accepted", entry
            chosen.setdefault(to, set()).add(entry["message"]["from"])
    for to in recipients[::4][:100]:
        response = await send(api, pool, to)
        assert response.status_code == 202, response.text
        chosen[to].add(response.json()["from"])

    assert all(len(senders) == 1 for senders in chosen.values()), "a recipient changed sender"
    shares = Counter(next(iter(senders)) for senders in chosen.values())
    total_rate = sum(RATES.values())
    for address, rate in RATES.items():  # 450 recipients: each share within ~4 sigma
        assert abs(shares[address] / len(recipients) - rate / total_rate) < 0.08, shares
    async with session_factory() as session:
        stored = Counter(await session.scalars(select(Message.sender_id)))
        kept = await session.scalar(select(func.count()).select_from(SenderAffinity))
    assert sum(stored.values()) == 1000
    assert kept == len(recipients)
    assert set(map(str, stored)) <= {pool.senders[address] for address in RATES}


async def test_routes_by_destination_country(
    api: httpx.AsyncClient, pool: Pool, session_factory: SessionFactory
) -> None:
    france = await send(api, pool, FRANCE)
    canada = await send(api, pool, CANADA)
    us = await send(api, pool, "+14155550123")

    assert france.status_code == 202, france.text
    async with session_factory() as session:
        stored = await session.get(Message, uuid.UUID(france.json()["id"]))
    assert stored is not None
    assert (france.json()["from"], str(stored.sender_id), stored.from_) == (
        FRENCH_ID,
        pool.senders[FRENCH_ID],
        FRENCH_ID,
    )
    assert canada.json()["from"] == TOLL_FREE  # the only sender serving Canada
    assert us.json()["from"] in RATES


async def test_no_sender_for_the_destination_is_refused_naming_the_country(
    api: httpx.AsyncClient, pool: Pool, session_factory: SessionFactory
) -> None:
    refused = await send(api, pool, GERMANY)
    batch = await send_batch(api, pool, [GERMANY, FRANCE])

    assert_problem(refused, 422, "no_sender_for_destination", field="from")
    assert "country DE" in refused.json()["errors"][0]["reason"]
    assert batch[0]["status"] == "rejected"
    assert batch[0]["error"]["code"] == "no_sender_for_destination"
    assert batch[1]["status"] == "accepted"
    async with session_factory() as session:
        recipients = list(await session.scalars(select(SenderAffinity.recipient)))
        messages = list(await session.scalars(select(Message.to)))
    assert recipients == [FRANCE] and messages == [FRANCE]


async def test_a_revoked_sender_loses_its_recipients_who_then_stick_to_the_new_one(
    api: httpx.AsyncClient, world: World, pool: Pool
) -> None:
    recipients = [us_number(n) for n in range(60)]
    before = {
        e["message"]["to"]: e["message"]["from"] for e in await send_batch(api, pool, recipients)
    }
    gone = TOLL_FREE
    moved = [to for to, sender in before.items() if sender == gone]
    assert moved, before

    revoked = await api.delete(
        f"/v1/senders/{pool.senders[gone]}/clients/pooled", headers=world.auth(world.admin_key)
    )
    assert revoked.status_code == 200, revoked.text
    after = {
        e["message"]["to"]: e["message"]["from"] for e in await send_batch(api, pool, recipients)
    }
    # The toll-free number comes back: the moved recipients stay where they went.
    granted = await api.put(
        f"/v1/senders/{pool.senders[gone]}/clients/pooled", headers=world.auth(world.admin_key)
    )
    assert granted.status_code == 200, granted.text
    again = {
        e["message"]["to"]: e["message"]["from"] for e in await send_batch(api, pool, recipients)
    }

    assert all(after[to] != gone for to in recipients)
    assert {to: after[to] for to in recipients if to not in moved} == {
        to: before[to] for to in recipients if to not in moved
    }
    assert again == after
    canada = await send(api, pool, CANADA)  # only the toll-free number served Canada
    assert canada.status_code == 202 and canada.json()["from"] == TOLL_FREE


async def test_without_a_pool_a_send_without_from_is_refused_as_before(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    async with session_factory.begin() as session:
        key = await create_api_key(session, "no-senders")
    response = await api.post(
        "/v1/messages",
        json={"to": "+14155550123", "body": "hi"},
        headers={"Authorization": f"Bearer {key}"},
    )

    assert_problem(response, 422, "no_default_sender", field="from")


async def test_explicit_from_and_the_default_sender_work_as_before(
    api: httpx.AsyncClient, world: World, pool: Pool, session_factory: SessionFactory
) -> None:
    # `from` names a sender serving the US only: a French recipient is still sent to.
    named = await send(api, pool, FRANCE, **{"from": US_LOW})
    # The shop has a default sender and the same senders granted: the default wins.
    default = await api.post(
        "/v1/messages", json={"to": FRANCE, "body": "hi"}, headers=world.auth()
    )

    assert named.status_code == 202 and named.json()["from"] == US_LOW
    assert default.status_code == 202 and default.json()["from"] == world.twilio_sender.address
    async with session_factory() as session:
        kept = await session.scalar(select(func.count()).select_from(SenderAffinity))
    assert kept == 0


async def test_a_pool_sender_without_keyword_replies_is_passed_over(
    api: httpx.AsyncClient, world: World, pool: Pool
) -> None:
    incomplete = await add_sender(api, world, "+33755550123", "long_code", keywords={"custom": []})
    detail = await api.get(f"/v1/senders/{incomplete}", headers=world.auth(world.admin_key))
    assert detail.json()["served_countries"] == ["FR"] and detail.json()["missing_replies"]

    recipients = [FRANCE, "+33612345679", "+33612345670", "+33612345671", "+33612345672"]
    senders = {e["message"]["from"] for e in await send_batch(api, pool, recipients)}
    revoked = await api.delete(
        f"/v1/senders/{pool.senders[FRENCH_ID]}/clients/pooled",
        headers=world.auth(world.admin_key),
    )
    assert revoked.status_code == 200
    refused = await send(api, pool, "+33612345673")

    assert senders == {FRENCH_ID}
    assert_problem(refused, 403, "sender_keywords_incomplete")


async def test_choices_unused_past_their_period_are_pruned_and_made_afresh(
    api: httpx.AsyncClient, pool: Pool, session_factory: SessionFactory
) -> None:
    old, recent = us_number(1), us_number(2)
    first = {
        e["message"]["to"]: e["message"]["from"] for e in await send_batch(api, pool, [old, recent])
    }
    async with session_factory.begin() as session:
        await session.execute(
            update(SenderAffinity)
            .where(SenderAffinity.recipient == old)
            .values(last_used_at=func.now() - timedelta(days=396))
        )

    pruned = await prune(session_factory, RetentionSettings(), 24)
    async with session_factory() as session:
        left = list(await session.scalars(select(SenderAffinity.recipient)))
    again = await send(api, pool, old)

    assert pruned["sender_affinity"] == 1
    assert left == [recent]
    # Routed afresh: the hash gives the same sender while the pool is unchanged.
    assert again.status_code == 202 and again.json()["from"] == first[old]
    async with session_factory() as session:
        kept = await session.scalar(
            select(SenderAffinity.sender_id).where(SenderAffinity.recipient == old)
        )
    assert str(kept) == pool.senders[first[old]]


async def test_patching_countries_changes_the_pool_at_once(
    api: httpx.AsyncClient, world: World, pool: Pool
) -> None:
    belgium = "+32470123456"
    refused = await send(api, pool, belgium)
    url = f"/v1/senders/{pool.senders[FRENCH_ID]}"
    widened = await api.patch(
        url, json={"countries": ["FR", "be"]}, headers=world.auth(world.admin_key)
    )
    routed = await send(api, pool, belgium)
    described = await api.patch(
        url, json={"description": "FR"}, headers=world.auth(world.admin_key)
    )
    reset = await api.patch(url, json={"countries": None}, headers=world.auth(world.admin_key))
    after_reset = await send(api, pool, FRANCE)

    assert_problem(refused, 422, "no_sender_for_destination", field="from")
    assert "country BE" in refused.json()["detail"]
    assert widened.json()["served_countries"] == ["BE", "FR"]
    assert routed.status_code == 202 and routed.json()["from"] == FRENCH_ID
    assert described.json()["countries"] == ["BE", "FR"]  # omitted: unchanged
    assert (reset.json()["countries"], reset.json()["served_countries"]) == (None, [])
    assert_problem(after_reset, 422, "no_sender_for_destination", field="from")


def statements() -> float:
    return float(DB_STATEMENTS._value.get())


async def test_a_pooled_request_is_one_more_statement_whatever_its_size(
    api: httpx.AsyncClient, pool: Pool
) -> None:
    assert (await send(api, pool, FRANCE)).status_code == 202  # the key and pool are now cached
    assert (await send(api, pool, FRANCE, **{"from": US_LOW})).status_code == 202  # and US_LOW
    counts = []
    for run in (
        lambda: send(api, pool, us_number(1)),
        lambda: send_batch(api, pool, [us_number(n) for n in range(250)] + [FRANCE]),
        lambda: send(api, pool, us_number(2), **{"from": US_LOW}),
    ):
        before = statements()
        await run()
        counts.append(statements() - before)

    # A single pooled send, a pooled batch of 251: the choice, then the insert. Named: the insert.
    assert counts == [2, 2, 1]


async def test_concurrent_first_sends_to_one_recipient_agree(
    api: httpx.AsyncClient, pool: Pool, session_factory: SessionFactory
) -> None:
    recipients = [us_number(n) for n in range(30)]
    singles, batches = await asyncio.gather(
        asyncio.gather(*(send(api, pool, to) for to in recipients * 2)),
        asyncio.gather(*(send_batch(api, pool, recipients[::-1]) for _ in range(3))),
    )

    assert all(response.status_code == 202 for response in singles)
    chosen: dict[str, set[str]] = {}
    for response in singles:
        chosen.setdefault(response.json()["to"], set()).add(response.json()["from"])
    for batch in batches:
        for entry in batch:
            chosen[entry["message"]["to"]].add(entry["message"]["from"])
    assert all(len(senders) == 1 for senders in chosen.values())
    async with session_factory() as session:
        kept = dict(
            (
                await session.execute(select(SenderAffinity.recipient, SenderAffinity.sender_id))
            ).all()
        )
    assert {to: pool.senders[next(iter(s))] for to, s in chosen.items()} == {
        to: str(sender_id) for to, sender_id in kept.items()
    }


async def test_a_message_refused_before_its_sender_keeps_no_choice(
    api: httpx.AsyncClient, world: World, pool: Pool, session_factory: SessionFactory
) -> None:
    # France is served by the pool and permitted by the service, but not to this client; a
    # body over the segment limit is refused as well: neither message may pick (and keep) a
    # sender, so a later send to the same recipient is not bound by a refused one's choice.
    narrowed = await api.put(
        "/v1/clients/pooled/traffic",
        json={"permitted_countries": ["US"]},
        headers=world.auth(world.admin_key),
    )
    assert narrowed.status_code == 200, narrowed.text

    refused = await send(api, pool, FRANCE)
    too_long = await send(api, pool, US_LOW, body="x" * 160 * 11)
    messages = [
        {"to": FRANCE, "body": "Your order has shipped."},
        {"to": CANADA, "body": "Your order has shipped."},
        {"to": US_MID, "body": "Your order has shipped."},
    ]
    batch = await api.post(BATCH, json={"messages": messages}, headers=pool.auth())

    assert_problem(refused, 403, "destination_not_permitted")
    assert_problem(too_long, 422, "too_many_segments", field="body")
    codes = [entry.get("error", {}).get("code") for entry in batch.json()["data"]]
    assert codes == ["destination_not_permitted", "destination_not_permitted", None]
    async with session_factory() as session:
        kept = list(await session.scalars(select(SenderAffinity.recipient)))
    assert kept == [US_MID]  # only the accepted message's choice
