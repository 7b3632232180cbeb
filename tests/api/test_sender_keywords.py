"""/v1/senders keyword configuration; a sender cannot send until its replies are configured, and
cannot drop the built-in opt-out and help keywords."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.db.models import Sender
from app.db.session import SessionFactory
from tests.api.test_send import assert_problem, message_count, send
from tests.conftest import REPLIES, World, ready_keywords

# Every test here runs under the guard: no network call inside a transaction.
pytestmark = pytest.mark.network_guard

ADDRESS = "+14155550177"

BUILTIN_KEYWORDS: dict[str, Any] = {
    "opt_out": {
        "keywords": {
            "en": ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"],
            "fr": ["ARRET", "ARRETE", "DESABONNER"],
        },
        "replies": {},
    },
    "opt_in": {"keywords": {"en": ["START", "YES", "UNSTOP"]}, "replies": {}},
    "help": {"keywords": {"en": ["HELP", "INFO"], "fr": ["AIDE"]}, "replies": {}},
    "custom": [],
}

OPT_OUT_EN = ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"]


async def create(api: httpx.AsyncClient, world: World, **fields: Any) -> dict[str, Any]:
    body = {"address": ADDRESS, "kind": "long_code", "provider": "fake", **fields}
    response = await api.post("/v1/senders", json=body, headers=world.auth(world.admin_key))
    assert response.status_code == 201, response.text
    sender: dict[str, Any] = response.json()
    granted = await api.put(
        f"/v1/senders/{sender['id']}/clients/shop", headers=world.auth(world.admin_key)
    )
    assert granted.status_code == 200, granted.text
    return sender


async def patch(
    api: httpx.AsyncClient, world: World, sender_id: str, **fields: Any
) -> httpx.Response:
    return await api.patch(
        f"/v1/senders/{sender_id}", json=fields, headers=world.auth(world.admin_key)
    )


async def get(api: httpx.AsyncClient, world: World, sender_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/senders/{sender_id}", headers=world.auth(world.admin_key))
    assert response.status_code == 200, response.text
    sender: dict[str, Any] = response.json()
    return sender


async def send_from_it(api: httpx.AsyncClient, world: World) -> httpx.Response:
    return await send(api, world, **{"from": ADDRESS})


async def stored_keywords(session_factory: SessionFactory, sender_id: str) -> dict[str, Any]:
    async with session_factory() as session:
        sender = await session.get(Sender, sender_id)
        assert sender is not None
        return dict(sender.keywords)


async def test_a_new_sender_gets_the_builtin_sets_and_may_not_send_yet(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    sender = await create(api, world)

    assert sender["keywords"] == BUILTIN_KEYWORDS
    assert sender["missing_replies"] == ["help/en", "help/fr", "opt_out/en", "opt_out/fr"]
    assert await stored_keywords(session_factory, sender["id"]) == BUILTIN_KEYWORDS
    assert (await get(api, world, sender["id"]))["missing_replies"] == sender["missing_replies"]

    response = await send_from_it(api, world)

    assert_problem(response, 403, "sender_keywords_incomplete")
    detail = response.json()["detail"]
    assert ADDRESS in detail
    assert detail.endswith("missing: help/en, help/fr, opt_out/en, opt_out/fr")
    assert await message_count(session_factory) == 0


async def test_configuring_every_reply_lets_the_sender_send(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    sender = await create(api, world)

    response = await patch(api, world, sender["id"], keywords=ready_keywords())

    assert response.status_code == 200, response.text
    updated = response.json()
    assert updated["missing_replies"] == []
    assert updated["keywords"]["opt_out"]["replies"] == REPLIES["opt_out"]
    assert updated["keywords"]["help"]["replies"] == REPLIES["help"]
    assert updated["keywords"]["opt_out"]["keywords"] == BUILTIN_KEYWORDS["opt_out"]["keywords"]
    assert (await get(api, world, sender["id"]))["missing_replies"] == []
    accepted = await send_from_it(api, world)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["from"] == ADDRESS
    assert await message_count(session_factory) == 1


async def test_replies_in_one_language_only_leave_the_other_missing(
    api: httpx.AsyncClient, world: World
) -> None:
    sender = await create(api, world)
    english_replies = {
        "opt_out": {**BUILTIN_KEYWORDS["opt_out"], "replies": {"en": "Unsubscribed."}},
        "help": {**BUILTIN_KEYWORDS["help"], "replies": {"en": "Reply STOP to stop."}},
    }

    response = await patch(api, world, sender["id"], keywords=english_replies)

    assert response.status_code == 200, response.text
    # The French keywords are still there, so French replies are still needed.
    assert response.json()["missing_replies"] == ["help/fr", "opt_out/fr"]
    refused = await send_from_it(api, world)
    assert_problem(refused, 403, "sender_keywords_incomplete")
    assert refused.json()["detail"].endswith("missing: help/fr, opt_out/fr")


async def test_a_new_language_needs_its_own_reply(api: httpx.AsyncClient, world: World) -> None:
    sender = await create(api, world, keywords=ready_keywords())
    opt_out = {**BUILTIN_KEYWORDS["opt_out"]["keywords"], "es": ["ALTO"]}

    response = await patch(
        api,
        world,
        sender["id"],
        keywords=ready_keywords(opt_out={"keywords": opt_out, "replies": REPLIES["opt_out"]}),
    )

    assert response.status_code == 200, response.text
    assert response.json()["missing_replies"] == ["opt_out/es"]
    refused = await send_from_it(api, world)
    assert_problem(refused, 403, "sender_keywords_incomplete")
    assert refused.json()["detail"].endswith("missing: opt_out/es")

    replies = {**REPLIES["opt_out"], "es": "Baja de ACME confirmada."}
    response = await patch(
        api,
        world,
        sender["id"],
        keywords=ready_keywords(opt_out={"keywords": opt_out, "replies": replies}),
    )

    assert response.status_code == 200, response.text
    assert response.json()["missing_replies"] == []
    assert (await send_from_it(api, world)).status_code == 202


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        # The French opt-out keywords removed, to run English-only.
        (
            ready_keywords(opt_out={"keywords": {"en": OPT_OUT_EN}, "replies": REPLIES["opt_out"]}),
            "opt_out must keep its built-in keywords; missing: ARRET, ARRETE, DESABONNER",
        ),
        # The French help keyword removed.
        (
            ready_keywords(help={"keywords": {"en": ["HELP", "INFO"]}, "replies": REPLIES["help"]}),
            "help must keep its built-in keywords; missing: AIDE",
        ),
        # STOP removed from opt-out and taken over by a custom keyword.
        (
            ready_keywords(
                opt_out={
                    "keywords": {"en": OPT_OUT_EN[1:], "fr": ["ARRET", "ARRETE", "DESABONNER"]},
                    "replies": REPLIES["opt_out"],
                },
                custom=[{"keyword": "STOP", "reply": "Open 9-5, Mon-Fri."}],
            ),
            "opt_out must keep its built-in keywords; missing: STOP",
        ),
        # ARRET moved from opt-out into opt-in.
        (
            ready_keywords(
                opt_out={
                    "keywords": {"en": OPT_OUT_EN, "fr": ["ARRETE", "DESABONNER"]},
                    "replies": REPLIES["opt_out"],
                },
                opt_in={
                    "keywords": {"en": ["START", "YES", "UNSTOP"], "fr": ["ARRET"]},
                    "replies": REPLIES["opt_in"],
                },
            ),
            "opt_out must keep its built-in keywords; missing: ARRET",
        ),
        # Every help keyword removed.
        (
            ready_keywords(help={"keywords": {}, "replies": REPLIES["help"]}),
            "help must keep its built-in keywords; missing: AIDE, HELP, INFO",
        ),
    ],
)
async def test_removing_a_builtin_opt_out_or_help_keyword_is_a_422(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    keywords: dict[str, Any],
    message: str,
) -> None:
    sender = await create(api, world, keywords=ready_keywords())

    response = await patch(api, world, sender["id"], keywords=keywords)

    assert_problem(response, 422, "validation_error", field="keywords")
    assert message in response.json()["detail"]
    # Nothing changed: the sender keeps its configuration and may still send.
    assert await stored_keywords(session_factory, sender["id"]) == ready_keywords()
    assert (await get(api, world, sender["id"]))["keywords"] == ready_keywords()
    assert (await send_from_it(api, world)).status_code == 202


async def test_creating_a_sender_without_the_french_opt_out_keywords_is_a_422(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    keywords = ready_keywords(opt_out={"keywords": {"en": OPT_OUT_EN}, "replies": {"en": "Bye."}})

    response = await api.post(
        "/v1/senders",
        json={"address": ADDRESS, "kind": "long_code", "provider": "fake", "keywords": keywords},
        headers=world.auth(world.admin_key),
    )

    assert_problem(response, 422, "validation_error", field="keywords")
    assert "missing: ARRET, ARRETE, DESABONNER" in response.json()["detail"]
    async with session_factory() as session:
        assert await session.scalar(select(Sender).where(Sender.address == ADDRESS)) is None


async def test_removing_an_opt_in_keyword_is_allowed(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    sender = await create(api, world, keywords=ready_keywords())
    keywords = ready_keywords(
        opt_in={"keywords": {"en": ["START", "UNSTOP"]}, "replies": REPLIES["opt_in"]}
    )

    response = await patch(api, world, sender["id"], keywords=keywords)

    assert response.status_code == 200, response.text
    assert response.json()["keywords"]["opt_in"]["keywords"] == {"en": ["START", "UNSTOP"]}
    assert response.json()["missing_replies"] == []
    assert await stored_keywords(session_factory, sender["id"]) == keywords
    assert (await send_from_it(api, world)).status_code == 202


async def test_a_sender_created_with_its_replies_may_send_at_once(
    api: httpx.AsyncClient, world: World
) -> None:
    sender = await create(api, world, keywords=ready_keywords())

    assert sender["missing_replies"] == []
    accepted = await send_from_it(api, world)
    assert accepted.status_code == 202, accepted.text


async def test_clearing_the_replies_stops_a_ready_sender_again(
    api: httpx.AsyncClient, world: World
) -> None:
    sender = await create(api, world, keywords=ready_keywords())
    assert (await send_from_it(api, world)).status_code == 202

    response = await patch(api, world, sender["id"], keywords={})

    assert response.json()["missing_replies"] == ["help/en", "help/fr", "opt_out/en", "opt_out/fr"]
    assert_problem(await send_from_it(api, world), 403, "sender_keywords_incomplete")


@pytest.mark.parametrize(
    ("keywords", "duplicate"),
    [
        (ready_keywords(custom=[{"keyword": "stop", "reply": "Hours: 9-5"}]), "'STOP'"),
        (
            ready_keywords(
                help={
                    "keywords": {"en": ["HELP", "INFO", "START"], "fr": ["AIDE"]},
                    "replies": REPLIES["help"],
                }
            ),
            "'START'",
        ),
        (
            ready_keywords(
                custom=[
                    {"keyword": "Hours", "reply": "9-5"},
                    {"keyword": "HOURS!", "reply": "9 to 5"},
                ]
            ),
            "'HOURS'",
        ),
    ],
)
async def test_a_keyword_used_twice_is_a_422(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    keywords: dict[str, Any],
    duplicate: str,
) -> None:
    sender = await create(api, world, keywords=ready_keywords())

    response = await patch(api, world, sender["id"], keywords=keywords)

    assert_problem(response, 422, "validation_error", field="keywords")
    assert duplicate in response.json()["detail"]
    assert "appears twice" in response.json()["detail"]
    # Nothing changed: the sender keeps its configuration and may still send.
    assert await stored_keywords(session_factory, sender["id"]) == ready_keywords()
    assert (await send_from_it(api, world)).status_code == 202


async def test_creating_a_sender_with_a_duplicate_keyword_is_a_422(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    response = await api.post(
        "/v1/senders",
        json={
            "address": ADDRESS,
            "kind": "long_code",
            "provider": "fake",
            "keywords": ready_keywords(custom=[{"keyword": "Stop", "reply": "no"}]),
        },
        headers=world.auth(world.admin_key),
    )

    assert_problem(response, 422, "validation_error", field="keywords")
    async with session_factory() as session:
        assert await session.scalar(select(Sender).where(Sender.address == ADDRESS)) is None


async def test_configured_keywords_come_back_normalised(
    api: httpx.AsyncClient, world: World, session_factory: SessionFactory
) -> None:
    sender = await create(api, world)
    keywords = ready_keywords(
        opt_out={
            "keywords": {
                "en": [
                    "stop",
                    "Stopall",
                    " Unsubscribe. ",
                    "cancel",
                    "End",
                    "QUIT",
                    "revoke!",
                    "OptOut",
                ],
                "fr": ["arrêt", "«Arrêté»", "Désabonner!"],
            },
            "replies": REPLIES["opt_out"],
        },
        custom=[{"keyword": "Horaires ?", "reply": "Du lundi au vendredi.", "language": "fr"}],
    )

    response = await patch(api, world, sender["id"], keywords=keywords)

    assert response.status_code == 200, response.text
    config = response.json()["keywords"]
    assert config["opt_out"]["keywords"] == {
        "en": ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"],
        "fr": ["ARRET", "ARRETE", "DESABONNER"],
    }
    assert config["custom"] == [
        {"keyword": "HORAIRES", "reply": "Du lundi au vendredi.", "language": "fr"}
    ]
    stored = await stored_keywords(session_factory, sender["id"])
    assert stored["opt_out"]["keywords"]["fr"] == ["ARRET", "ARRETE", "DESABONNER"]
    assert stored["custom"][0]["keyword"] == "HORAIRES"


async def test_accepted_default_replies_let_a_sender_without_replies_send(
    app_factory: Callable[..., Any], world: World, session_factory: SessionFactory
) -> None:
    async with app_factory(accept_default_keyword_replies=True) as api:
        sender = await create(api, world)

        assert sender["keywords"] == BUILTIN_KEYWORDS  # nothing configured...
        assert sender["missing_replies"] == []  # ...but the built-in replies are accepted
        assert (await get(api, world, sender["id"]))["missing_replies"] == []
        accepted = await send_from_it(api, world)
        assert accepted.status_code == 202, accepted.text

    # Without that setting, the same sender is refused.
    async with app_factory() as api:
        assert (await get(api, world, sender["id"]))["missing_replies"] == [
            "help/en",
            "help/fr",
            "opt_out/en",
            "opt_out/fr",
        ]
        assert_problem(await send_from_it(api, world), 403, "sender_keywords_incomplete")
    assert await message_count(session_factory) == 1


@pytest.mark.parametrize(
    ("custom", "field"),
    [
        ({"keyword": "HOURS"}, "keywords.custom.0.reply"),
        ({"keyword": "HOURS", "reply": ""}, "keywords.custom.0.reply"),
        ({"keyword": "HOURS", "reply": "   "}, "keywords.custom.0.reply"),
    ],
)
async def test_a_custom_keyword_without_a_reply_is_a_422(
    api: httpx.AsyncClient,
    world: World,
    session_factory: SessionFactory,
    custom: dict[str, str],
    field: str,
) -> None:
    sender = await create(api, world, keywords=ready_keywords())

    response = await patch(api, world, sender["id"], keywords=ready_keywords(custom=[custom]))

    assert_problem(response, 422, "validation_error", field=field)
    assert (await stored_keywords(session_factory, sender["id"]))["custom"] == []
