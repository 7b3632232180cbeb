"""The built-in provider: accepts every message and reports it delivered a moment later.

It lets the service run end to end without credentials. Its delivery report travels the same
path as a real provider's callback (`parse_status_callback` then `apply_status_report`), carried
by a deferred job instead of an HTTP request.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Protocol

from pydantic import BaseModel

from app.kernel.status import MessageStatus
from app.providers.base import (
    Accepted,
    CallbackRequest,
    InboundSms,
    InvalidCallback,
    OutboundSms,
    Provider,
    StatusReport,
    Submission,
)

FAKE_ID_PREFIX = "fake-"

ReportScheduler = Callable[[Mapping[str, str], float], Awaitable[None]]


class FakeLedger(Protocol):
    """What the fake "provider" remembers of the messages it accepted (the worker keeps it in
    Redis, so every worker sees it), so that reconciliation can ask it as it asks Twilio."""

    async def remember(self, message_id: uuid.UUID, provider_message_id: str) -> None:
        """Note that the fake accepted `message_id` as `provider_message_id`."""

    async def recall(self, message_id: uuid.UUID) -> str | None:
        """The id the fake gave `message_id`, if it accepted it."""


_STATUS_MAP: dict[str, MessageStatus] = {
    "delivered": MessageStatus.DELIVERED,
    "undelivered": MessageStatus.UNDELIVERED,
    "failed": MessageStatus.FAILED,
}


class FakeProviderSettings(BaseModel):
    """The built-in provider that accepts everything and reports delivery later: `FAKE__*`."""

    delivery_delay_seconds: float = 1.0


class FakeProvider(Provider):
    """Accepts everything; schedules a `delivered` report `delivery_delay_seconds` later."""

    name = "fake"

    def __init__(
        self,
        settings: FakeProviderSettings,
        schedule_report: ReportScheduler | None = None,
        ledger: FakeLedger | None = None,
    ) -> None:
        self._delay = settings.delivery_delay_seconds
        self._schedule_report = schedule_report
        self._ledger = ledger

    @property
    def can_look_up(self) -> bool:
        """The fake can be asked when it keeps a ledger."""
        return self._ledger is not None

    async def find_submissions(self, sms: OutboundSms, since: datetime) -> list[Submission]:
        """The message, if the fake's ledger says it was accepted (reported `delivered`)."""
        if self._ledger is None:
            return await super().find_submissions(sms, since)
        provider_message_id = await self._ledger.recall(sms.message_id)
        if provider_message_id is None:
            return []
        return [Submission(provider_message_id, "delivered", MessageStatus.DELIVERED)]

    @property
    def can_fetch_status(self) -> bool:
        """The fake delivers everything it accepted."""
        return True

    async def fetch_status(self, provider_message_id: str) -> StatusReport | None:
        """`delivered` for an id the fake gave out (it accepts and delivers everything)."""
        if not provider_message_id.startswith(FAKE_ID_PREFIX):
            return None
        return StatusReport(
            provider_message_id=provider_message_id,
            provider_status="delivered",
            status=MessageStatus.DELIVERED,
            raw={"provider_message_id": provider_message_id, "status": "delivered"},
        )

    async def send(self, sms: OutboundSms) -> Accepted:
        """Accept the message and schedule its delivery report."""
        provider_message_id = f"{FAKE_ID_PREFIX}{uuid.uuid4().hex}"
        if self._ledger is not None:
            await self._ledger.remember(sms.message_id, provider_message_id)
        if self._schedule_report is not None:
            await self._schedule_report(
                {
                    "message_id": str(sms.message_id),
                    "provider_message_id": provider_message_id,
                    "status": "delivered",
                },
                self._delay,
            )
        return Accepted(provider_message_id=provider_message_id)

    def verify_callback(self, request: CallbackRequest) -> bool:
        """The fake takes no HTTP callbacks: its reports come from our own queue."""
        return False

    def parse_inbound(self, request: CallbackRequest) -> InboundSms:
        """The fake receives no messages over HTTP."""
        raise InvalidCallback("the fake provider has no inbound webhook")

    def parse_status_callback(self, request: CallbackRequest) -> StatusReport:
        """Read a report the fake scheduled."""
        try:
            provider_status = request.params["status"]
            message_id = uuid.UUID(request.params["message_id"])
            provider_message_id = request.params["provider_message_id"]
        except (KeyError, ValueError) as error:
            raise InvalidCallback(f"malformed fake report: {error}") from None
        return StatusReport(
            provider_message_id=provider_message_id,
            provider_status=provider_status,
            status=_STATUS_MAP.get(provider_status),
            message_id=message_id,
            raw=dict(request.params),
        )
