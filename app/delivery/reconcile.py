"""Reconciliation: settling messages left `sending` with no known outcome.

A message is `sending` from its claim until the worker records the provider's answer. It stays
there when that answer never came: a read timeout or a 504 (the provider may have the message), a
provider call cut short, or a worker killed mid-call. Once its claim is older than a delivery job
can last (`JOB_TIMEOUT_SECONDS`: past it arq has cancelled the job, or its worker is gone), no
worker will record anything more, so the periodic sweep hands it here. A callback that arrives
first settles it the ordinary way and it never gets here.

Here the message's provider is asked whether it has the message:
- it does: the message is recorded as the provider holds it (`sent`, or already `delivered` ...),
  with the provider's id, through the same path as a status callback;
- it does not: the message is queued again and resubmitted, a new attempt like any other
  (counted in `attempts` and `resubmissions`, with an event saying why), unless it has used all
  of `SEND_MAX_ATTEMPTS`: then it fails as `not_submitted`;
- it cannot be asked (Vonage has no lookup API; the fake without its ledger): resending could
  text the customer twice, so the message waits for the provider's delivery report until
  `UNKNOWN_OUTCOME_GIVE_UP_SECONDS` after its claim, then fails as `outcome_unknown`;
- it does not answer (an error, bad credentials, an outage): asked again later, until
  `UNKNOWN_OUTCOME_GIVE_UP_SECONDS` after the claim; then the message fails as `outcome_unknown`
  like one whose provider cannot be asked (it is never resent blindly).

A resubmission is enqueued under its own job id (`deliver:{id}:r{n}`): the first attempt's job
key may outlive a dead worker, and arq would drop a new job under the same id.

Every decision is a conditional UPDATE on (status = 'sending', attempts = the attempt being
reconciled), so a callback, another reconciler or a late worker racing it changes nothing twice.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.consent.optouts import lock_recipients
from app.db.models import Message, MessageEvent
from app.db.session import SessionFactory, Tx, raw_statement
from app.delivery.pipeline import RetryPolicy
from app.delivery.transitions import (
    apply_status_report,
    fail,
    lock_pending,
    note_repeatable,
    record_status_report,
    resubmit,
    run_raw_transaction,
    run_transaction,
)
from app.events.outbox import EventJob
from app.kernel.settings import Settings
from app.kernel.status import MessageStatus
from app.providers.base import (
    Encoding,
    OutboundSms,
    Provider,
    ProviderError,
    StatusReport,
    Submission,
)

log = logging.getLogger(__name__)

RECONCILE_BATCH: Final = 500
# A provider that could not answer a lookup is asked again after this long.
LOOKUP_RETRY_SECONDS: Final = 15.0


class Decision(StrEnum):
    """What reconciliation did with a message."""

    NOTHING = "nothing"  # not `sending`, or not stale (settled meanwhile)
    SETTLED = "settled"  # the provider has it: recorded as the provider holds it
    RESUBMIT = "resubmit"  # the provider has no record of it: queued again (enqueue it)
    FAILED = "failed"  # given up: attempts used up, or an unknown outcome nobody can resolve
    LATER = "later"  # ask again in `retry_in` seconds


@dataclass(frozen=True, slots=True)
class Reconciled:
    """The decision, when to look again (LATER), and event deliveries to enqueue."""

    decision: Decision
    retry_in: float | None = None
    events: tuple[EventJob, ...] = ()
    # RESUBMIT: the message's resubmission count, which names its new delivery job.
    resubmission: int | None = None


async def stale_claims(
    session_factory: SessionFactory, older_than: timedelta, *, limit: int = RECONCILE_BATCH
) -> list[uuid.UUID]:
    """Ids of `sending` messages claimed longer ago than `older_than` (database clock)."""
    async with session_factory() as session:
        rows = await session.scalars(
            select(Message.id)
            .where(
                Message.status == MessageStatus.SENDING.value,
                Message.claimed_at < func.now() - older_than,
            )
            .order_by(Message.claimed_at)
            .limit(limit)
        )
        return list(rows)


async def reconcile_message(
    message_id: uuid.UUID,
    session_factory: SessionFactory,
    providers: dict[str, Provider],
    policy: RetryPolicy,
    *,
    older_than: timedelta,
    give_up_after: timedelta,
) -> Reconciled:
    """Settle one stale `sending` message with its provider's help (see the module doc)."""
    row = await _message_at_db_time(
        session_factory,
        message_id,
        Message.status == MessageStatus.SENDING.value,
        Message.claimed_at < func.now() - older_than,
    )
    if row is None:
        return Reconciled(Decision.NOTHING)
    message, now = row
    assert message.claimed_at is not None  # the query required it
    provider = providers.get(message.provider)
    waited = now - message.claimed_at
    if provider is None or not provider.can_look_up:
        return await _wait_or_give_up(
            session_factory,
            message,
            waited,
            give_up_after,
            retry_in=(give_up_after - waited).total_seconds(),
            reason=f"{message.provider} cannot be asked",
        )
    try:
        found = await provider.find_submissions(_outbound(message), since=message.claimed_at)
    except Exception as error:  # any failure to ask means "cannot be asked yet"
        detail = error.detail if isinstance(error, ProviderError) else repr(error)
        log.warning(
            "reconciliation lookup failed",
            extra={"message_id": str(message.id), "error": detail},
        )
        # The same rule as a provider that cannot be asked: a lookup failing for good (bad
        # credentials, a provider down for hours) must not leave the message `sending` forever.
        return await _wait_or_give_up(
            session_factory,
            message,
            waited,
            give_up_after,
            retry_in=min(LOOKUP_RETRY_SECONDS, max((give_up_after - waited).total_seconds(), 0)),
            reason=f"{message.provider} could not be asked ({detail[:200]})",
        )
    submission = await _first_unclaimed(session_factory, message, found)
    if submission is not None:
        return await _settle(session_factory, message, submission)
    return await _resubmit_or_fail(session_factory, message, policy)


async def _resubmit_or_fail(
    session_factory: SessionFactory, message: Message, policy: RetryPolicy
) -> Reconciled:
    """The provider has no record of the message: submit it again, if attempts are left."""
    if message.attempts >= policy.max_attempts:
        return await _fail(
            session_factory,
            message,
            "not_submitted",
            f"gave up after {message.attempts} attempts: {message.provider} has no record of "
            f"attempt {message.attempts}, whose outcome was unknown",
        )
    return await _resubmit(session_factory, message)


async def _message_at_db_time(
    session_factory: SessionFactory, message_id: uuid.UUID, *criteria: ColumnElement[bool]
) -> tuple[Message, datetime] | None:
    """The message, if it still meets `criteria`, with the database's clock (one read)."""
    async with session_factory() as session:
        row = (
            await session.execute(
                select(Message, func.now()).where(Message.id == message_id, *criteria)
            )
        ).one_or_none()
    if row is None:
        return None
    return row[0], row[1]


def _outbound(message: Message) -> OutboundSms:
    """The message as it was submitted, for a provider's lookup."""
    return OutboundSms(
        message_id=message.id,
        to=message.to,
        sender=message.from_,
        body=message.body,
        encoding=Encoding(message.encoding),
    )


async def _wait_or_give_up(
    session_factory: SessionFactory,
    message: Message,
    waited: timedelta,
    give_up_after: timedelta,
    *,
    retry_in: float,
    reason: str,
) -> Reconciled:
    """Look again in `retry_in` seconds, or, once the claim is `give_up_after` old, fail the
    message as `outcome_unknown` (never resent: the provider may have it)."""
    if waited < give_up_after:
        # The lookup and its answer in the history: one row per attempt, counting the asks.
        detail = (
            f"outcome of attempt {message.attempts} still unknown: {reason}; "
            f"looking again in {retry_in:.0f}s"
        )

        async def work(session: AsyncSession) -> None:
            await note_repeatable(
                session,
                message.id,
                detail,
                key=f"reconcile attempt {message.attempts}",
                source="reconcile",
            )

        await run_transaction(session_factory, work)
        return Reconciled(Decision.LATER, retry_in)
    return await _fail(
        session_factory,
        message,
        "outcome_unknown",
        f"the outcome of attempt {message.attempts} is unknown and {reason}; "
        f"no delivery report came within {give_up_after}",
    )


async def _first_unclaimed(
    session_factory: SessionFactory, message: Message, found: list[Submission]
) -> Submission | None:
    """The oldest candidate no other message of ours holds (two identical bodies to the same
    number are told apart by the ids already recorded)."""
    if not found:
        return None
    async with session_factory() as session:
        taken = set(
            await session.scalars(
                select(Message.provider_message_id).where(
                    Message.provider == message.provider,
                    Message.provider_message_id.in_([s.provider_message_id for s in found]),
                    Message.id != message.id,
                )
            )
        )
    return next((s for s in found if s.provider_message_id not in taken), None)


async def _settle(
    session_factory: SessionFactory, message: Message, submission: Submission
) -> Reconciled:
    report = StatusReport(
        provider_message_id=submission.provider_message_id,
        provider_status=submission.provider_status,
        # A status we do not map (none today) still means the provider has it.
        status=submission.status or MessageStatus.SENT,
        message_id=message.id,
        raw={
            "source": "reconciliation",
            "provider_message_id": submission.provider_message_id,
            "status": submission.provider_status,
        },
    )

    async def work(tx: Tx) -> bool:
        # The recipient's lock before the row's, as everywhere (the report may record nothing
        # of the kind today, but the order must not depend on it).
        session = await tx.session()
        await lock_recipients(session, [message.to])
        if not await lock_pending(session, message):
            return False
        session.add(
            MessageEvent(
                message_id=message.id,
                status=None,
                applied=False,
                source="reconcile",
                detail=(
                    f"attempt {message.attempts} found at {message.provider} as "
                    f"{submission.provider_message_id} ({submission.provider_status})"
                ),
            )
        )
        await session.flush()  # the note before the report's row
        await apply_status_report(tx, message.provider, report)
        return True

    settled, events = await run_raw_transaction(session_factory, work)
    if not settled:
        return Reconciled(Decision.NOTHING)
    log.info(
        "unknown outcome settled: the provider has the message",
        extra={
            "message_id": str(message.id),
            "provider_message_id": submission.provider_message_id,
        },
    )
    return Reconciled(Decision.SETTLED, events=events)


async def _resubmit(session_factory: SessionFactory, message: Message) -> Reconciled:
    detail = (
        f"{message.provider} has no record of attempt {message.attempts}, whose outcome was "
        "unknown: submitting again"
    )

    async def work(session: AsyncSession) -> int | None:
        return await resubmit(session, message, detail)

    requeued, _ = await run_transaction(session_factory, work)
    if requeued is None:
        return Reconciled(Decision.NOTHING)
    log.warning("unknown outcome: resubmitting", extra={"message_id": str(message.id)})
    return Reconciled(Decision.RESUBMIT, resubmission=requeued)


async def _fail(
    session_factory: SessionFactory, message: Message, code: str, detail: str
) -> Reconciled:
    async def work(session: AsyncSession) -> bool:
        return await fail(
            session,
            message,
            error_code=code,
            detail=detail,
            source="reconcile",
            event_code=code,
            note_if_moved_on=False,
        )

    failed, events = await run_transaction(session_factory, work)
    if not failed:
        return Reconciled(Decision.NOTHING)
    log.warning("unknown outcome: given up", extra={"message_id": str(message.id), "code": code})
    return Reconciled(Decision.FAILED, events=events)


# --- Status checks: `sent` messages whose final report never came. -------------------------
#
# A provider that took a message reports its final status in a callback; a lost callback
# (Twilio does not retry them, e.g. while our API answered 503 during a PostgreSQL restart)
# would leave the message `sent` forever. The periodic status-check sweep picks `sent` messages
# at providers that can be asked (`can_fetch_status`: Twilio, the fake; not Vonage, whose
# messages keep waiting for their receipts) whose check is due: never checked and without news
# for `STATUS_CHECK_AFTER_SECONDS`, or past their `next_check_at`. Picking one schedules its next
# check at once, with back-off (each wait twice the one before, at most
# `STATUS_CHECK_MAX_INTERVAL_SECONDS`), so a message the provider keeps reporting as `sent` is
# asked about less and less often and never crowds out newer ones (the longest-due go first).
# News goes through `apply_status_report`, the path callbacks take. A message without news for
# `STATUS_CHECK_HORIZON_HOURS` is not checked again: why is recorded on it (`status_detail`).

STATUS_CHECK_SOURCE: Final = "status_check"
# How often the sweep runs (the cron in app.worker.tasks): each run takes this share of a
# minute's `STATUS_CHECK_RATE_PER_MINUTE`.
STATUS_CHECK_SWEEP_SECONDS: Final = 10
# Checks stopped: a `next_check_at` that is never due.
NEVER: Final = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class CheckSchedule:
    """When `sent` messages are asked about: first `after` their last news, then with back-off
    up to `max_interval` between two checks, and no more once `horizon` passed without news."""

    after: timedelta
    max_interval: timedelta = timedelta(hours=6)
    horizon: timedelta = timedelta(hours=72)

    @classmethod
    def from_settings(cls, settings: Settings) -> CheckSchedule:
        """The schedule the settings describe."""
        return cls(
            after=timedelta(seconds=settings.status_check_after_seconds),
            max_interval=timedelta(seconds=settings.status_check_max_interval_seconds),
            horizon=timedelta(hours=settings.status_check_horizon_hours),
        )

    def interval(self, checks: int) -> timedelta:
        """The wait before the next check of a message already checked `checks` times."""
        wait: timedelta = self.after * 2 ** min(checks, 20)
        return min(wait, self.max_interval)

    def check_offsets(self) -> list[timedelta]:
        """When a message that stays `sent` is asked about, counted from its last news: the
        last check is the first at or past the horizon (it records why the checks stop)."""
        offsets = [self.after]
        while offsets[-1] < self.horizon:
            offsets.append(offsets[-1] + self.interval(len(offsets) - 1))
        return offsets

    def lookups_per_day(self) -> list[int]:
        """How many lookups such a message costs on each day after its last news."""
        days = [int(offset / timedelta(days=1)) for offset in self.check_offsets()]
        return [days.count(day) for day in range(days[-1] + 1)]


# One statement: pick the longest-due messages (skipping rows another transaction holds) and
# schedule each one's next check, so the next sweep does not pick them again while their job
# waits; `ix_messages_sent_check` serves the selection. `updated_at` is left alone: a check is
# not news, and the horizon counts from the last news.
_PICK_DUE = """
WITH due AS (
    SELECT id, coalesce(next_check_at, updated_at + $2::interval) AS due_at
    FROM messages
    WHERE status = 'sent'
      AND provider = ANY($1::text[])
      AND provider_message_id IS NOT NULL
      AND ((next_check_at IS NULL AND updated_at < now() - $2::interval)
           OR next_check_at <= now())
    ORDER BY due_at
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
UPDATE messages AS m
SET next_check_at = now() + least($2::interval * power(2, least(m.status_checks, 20)),
                                  $3::interval)
FROM due
WHERE m.id = due.id
RETURNING m.id, due.due_at
"""


async def overdue_sent(
    session_factory: SessionFactory,
    provider_names: Collection[str],
    schedule: CheckSchedule,
    *,
    limit: int,
) -> list[uuid.UUID]:
    """Ids of `sent` messages at `provider_names` whose status check is due, the longest-due
    first, at most `limit`; each one's next check is scheduled (with back-off) as it is picked."""
    if not provider_names or limit < 1:
        return []
    rows = await raw_statement(
        session_factory,
        _PICK_DUE,
        list(provider_names),
        schedule.after,
        schedule.max_interval,
        limit,
    )
    return [row["id"] for row in sorted(rows, key=lambda row: row["due_at"])]


async def oldest_sent_age(session_factory: SessionFactory) -> float:
    """Seconds since the oldest `sent` message changed (0 when none), by the database clock."""
    async with session_factory() as session:
        age = await session.scalar(
            select(func.extract("epoch", func.now() - func.min(Message.updated_at))).where(
                Message.status == MessageStatus.SENT.value
            )
        )
    return float(age or 0.0)


async def check_status(
    message_id: uuid.UUID,
    session_factory: SessionFactory,
    providers: dict[str, Provider],
    schedule: CheckSchedule,
) -> Reconciled:
    """Ask the provider for the status of one overdue `sent` message and record what it says:
    SETTLED when that moved it (through `apply_status_report`), else NOTHING (the check is
    recorded and counted; once the message has had no news for the schedule's horizon, its
    checks stop, and why is written on it)."""
    row = await _message_at_db_time(
        session_factory,
        message_id,
        Message.status == MessageStatus.SENT.value,
        Message.updated_at < func.now() - schedule.after,
    )
    if row is None:
        return Reconciled(Decision.NOTHING)
    message, now = row
    if message.provider_message_id is None:
        return Reconciled(Decision.NOTHING)
    provider = providers.get(message.provider)
    if provider is None or not provider.can_fetch_status:
        return Reconciled(Decision.NOTHING)
    report, outcome = await _fetch_status(provider, message, message.provider_message_id)
    if report is not None and report.status not in (None, MessageStatus.SENT):
        return await _recover(session_factory, message, report)
    await _record_check(session_factory, message, now, schedule, report, outcome)
    return Reconciled(Decision.NOTHING)


async def _fetch_status(
    provider: Provider, message: Message, provider_message_id: str
) -> tuple[StatusReport | None, str]:
    """The provider's report on the message (None when it has none or could not be asked), and
    the check's outcome in words."""
    report: StatusReport | None = None
    try:
        report = await provider.fetch_status(provider_message_id)
    except Exception as error:  # asked again at the next check
        detail = error.detail if isinstance(error, ProviderError) else repr(error)
        log.warning("status check failed", extra={"message_id": str(message.id), "error": detail})
        outcome = f"{message.provider} could not be asked: {detail[:200]}"
    else:
        if report is None:
            outcome = f"{message.provider} has no status for {message.provider_message_id}"
        else:
            outcome = f"{message.provider} holds it as {report.provider_status}"
    return report, outcome


async def _recover(
    session_factory: SessionFactory, message: Message, report: StatusReport
) -> Reconciled:
    """Record the news a check found, as a callback would have."""
    applied, events = await record_status_report(
        session_factory, message.provider, replace(report, message_id=message.id)
    )
    if applied:
        log.info(
            "lost report recovered by a status check",
            extra={"message_id": str(message.id), "status": report.provider_status},
        )
        return Reconciled(Decision.SETTLED, events=events)
    return Reconciled(Decision.NOTHING, events=events)


async def _record_check(
    session_factory: SessionFactory,
    message: Message,
    now: datetime,
    schedule: CheckSchedule,
    report: StatusReport | None,
    outcome: str,
) -> None:
    """Count a check without news and schedule the next one (or stop them at the horizon)."""
    checks = message.status_checks + 1
    changes: dict[str, Any] = {
        "status_checks": Message.status_checks + 1,
        # From the check itself (the sweep's pick scheduled it too, for a job that never ran).
        "next_check_at": func.now() + schedule.interval(message.status_checks),
        "updated_at": Message.updated_at,  # a check is not news
    }
    if now - message.updated_at >= schedule.horizon:
        hours = schedule.horizon.total_seconds() / 3600
        stopped = (
            f"status checks stopped: no final report within {hours:g} hours of the last news "
            f"({checks} checks; the last: {outcome})"
        )
        changes |= {"next_check_at": NEVER, "status_detail": stopped[:1000]}
        outcome = stopped
        log.warning(
            "status checks stopped at the horizon",
            extra={"message_id": str(message.id), "checks": checks},
        )
    async with session_factory.begin() as session:
        await session.execute(
            update(Message)
            .where(Message.id == message.id, Message.status == MessageStatus.SENT.value)
            .values(**changes)
        )
        session.add(
            MessageEvent(
                message_id=message.id,
                status=None,
                applied=False,
                source=STATUS_CHECK_SOURCE,
                provider_status=report.provider_status if report is not None else None,
                detail=outcome,
            )
        )
