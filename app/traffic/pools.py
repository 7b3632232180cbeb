"""Sender pools: the sender of a message sent without `from` by a client without a default
sender (README, "Sender pools").

A client's pool is the senders granted to it that serve at least one destination country
(`app.senders.service.served_countries`). For a recipient, the candidates are those serving the
recipient's country and ready to send (keyword replies configured). The choice is sticky: the
sender last picked for (client, recipient) is kept while it is still a candidate, so replies and
STOP land on the number that wrote to them; otherwise (a new recipient, or its sender left the
pool) the recipient gets the candidate that weighted rendezvous hashing of its number gives, a
sender being chosen in proportion to its `rate_per_second`, and that choice is kept from then on.
Rendezvous hashing moves only the recipients of a sender that leaves, and needs no shared state.

The kept choices are in `sender_affinity`, read and written by one autocommitted statement per
request (`_CHOOSE_SQL`), run only when some message of the request is routed by the pool.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Final

import phonenumbers

from app.access.auth import Principal
from app.access.lookups import Lookups, SenderInfo
from app.db.pg import Database, fetch
from app.kernel.errors import PROBLEM_JSON, ServiceError, ValidationFailed
from app.senders.service import no_default_sender

# A kept choice's `last_used_at` is written at most this often (retention reads it in days).
TOUCH_INTERVAL_SECONDS: Final = 3600

# Per distinct recipient: the kept sender if it is still allowed, else the rendezvous pick; the
# choice is upserted (recipients in order, so concurrent batches lock rows in one order).
_CHOOSE_SQL: Final = f"""
WITH wanted AS (
    SELECT * FROM unnest($2::text[], $3::uuid[], $4::text[]) AS wanted(recipient, pick, allowed)
), chosen AS (
    SELECT wanted.recipient, COALESCE(kept.sender_id, wanted.pick) AS sender_id,
           kept.sender_id AS kept_id, kept.last_used_at
    FROM wanted LEFT JOIN sender_affinity AS kept
        ON kept.client_id = $1 AND kept.recipient = wanted.recipient
        AND kept.sender_id = ANY(wanted.allowed::uuid[])
), saved AS (
    INSERT INTO sender_affinity (client_id, recipient, sender_id, last_used_at)
    SELECT $1, recipient, sender_id, now() FROM chosen
    WHERE kept_id IS NULL
        OR last_used_at < now() - make_interval(secs => {TOUCH_INTERVAL_SECONDS})
    ORDER BY recipient
    ON CONFLICT (client_id, recipient) DO UPDATE
        SET sender_id = excluded.sender_id, last_used_at = excluded.last_used_at
)
SELECT recipient, sender_id FROM chosen
"""


def uses_pool(principal: Principal, sender: str | None) -> bool:
    """Whether a message's sender comes from the pool: no `from`, and no default sender."""
    return sender is None and principal.default_sender_id is None


def destination_country(phone: str) -> str | None:
    """The ISO country of an E.164 number (its region; None if it has none, e.g. +800)."""
    try:
        region = phonenumbers.region_code_for_number(phonenumbers.parse(phone, None))
    except phonenumbers.NumberParseException:
        return None
    return region if region and region != "ZZ" else None


def no_sender_for_destination(country: str | None) -> ValidationFailed:
    """The refusal of a message without `from` whose country no sender of the pool serves."""
    where = f"country {country}" if country else "a number with no country"
    return ValidationFailed.for_field(
        "no_sender_for_destination",
        "from",
        f"required: none of your senders serves {where}; name one in `from`, or ask an "
        "administrator to add a sender serving it to your pool",
    )


def documented(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """`problem_responses` with the pool's refusal among the 422 examples of a send."""
    error = no_sender_for_destination("DE")
    examples = responses[422]["content"][PROBLEM_JSON]["examples"]
    examples[error.code] = {
        "summary": "No sender of your pool serves the recipient's country",
        "value": error.to_problem().model_dump(mode="json", exclude_none=True),
    }
    return responses


def rendezvous(recipient: str, candidates: Sequence[SenderInfo]) -> SenderInfo:
    """The candidate weighted rendezvous hashing gives `recipient`: each sender's chance is
    its rate's share of the candidates' rates; the same inputs always give the same answer."""

    def score(sender: SenderInfo) -> float:
        digest = hashlib.blake2b(recipient.encode() + sender.id.bytes, digest_size=8).digest()
        unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
        return -sender.rate_per_second / math.log(unit)

    return max(candidates, key=lambda sender: (score(sender), sender.id))


def _candidates(
    pool: Sequence[SenderInfo], country: str | None
) -> Sequence[SenderInfo] | ServiceError:
    """The senders that may write to a recipient in `country`, or why none may."""
    serving = [sender for sender in pool if country is not None and country in sender.countries]
    if not serving:
        return no_sender_for_destination(country)
    ready = [sender for sender in serving if sender.refusal() is None]
    return ready or serving[0].refusal() or no_sender_for_destination(country)


async def choose_senders(
    db: Database, lookups: Lookups, principal: Principal, recipients: Iterable[str]
) -> dict[str, SenderInfo | ServiceError]:
    """Each recipient's sender from the client's pool (kept or newly picked and kept), or its
    refusal; one statement for all of them."""
    wanted = sorted(set(recipients))
    if not wanted:
        return {}
    pool = [sender for sender in await lookups.pool(principal.client_id) if sender.countries]
    if not pool:  # no pool at all: a send without `from` is refused as it always was
        return dict.fromkeys(wanted, no_default_sender())
    result: dict[str, SenderInfo | ServiceError] = {}
    routed: dict[str, Sequence[SenderInfo]] = {}
    for recipient in wanted:
        candidates = _candidates(pool, destination_country(recipient))
        if isinstance(candidates, ServiceError):
            result[recipient] = candidates
        else:
            routed[recipient] = candidates
    if routed:
        result.update(await _keep(db, principal.client_id, routed))
    return result


async def _keep(
    db: Database, client_id: uuid.UUID, routed: dict[str, Sequence[SenderInfo]]
) -> dict[str, SenderInfo]:
    """Run `_CHOOSE_SQL`: each recipient's kept candidate, else its rendezvous pick."""
    recipients = list(routed)
    picks = [rendezvous(recipient, routed[recipient]).id for recipient in recipients]
    allowed = [
        "{" + ",".join(str(sender.id) for sender in routed[recipient]) + "}"
        for recipient in recipients
    ]
    async with db.connection() as connection:
        rows = await fetch(
            connection, _CHOOSE_SQL, client_id, recipients, picks, allowed, autocommit=True
        )
    by_id = {sender.id: sender for senders in routed.values() for sender in senders}
    return {row["recipient"]: by_id[row["sender_id"]] for row in rows}
