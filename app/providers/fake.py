"""The built-in provider: accepts every message and reports it delivered a moment later.

It lets the service run end to end without credentials. Its delivery report travels the same
path as a real provider's callback (`parse_status_callback` then `apply_status_report`), carried
by a deferred job instead of an HTTP request.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping

from app.domain.status import MessageStatus
from app.providers.base import (
    Accepted,
    CallbackRequest,
    InboundSms,
    InvalidCallback,
    OutboundSms,
    Provider,
    StatusReport,
)
from app.settings import FakeProviderSettings

ReportScheduler = Callable[[Mapping[str, str], float], Awaitable[None]]

_STATUS_MAP: dict[str, MessageStatus] = {
    "delivered": MessageStatus.DELIVERED,
    "undelivered": MessageStatus.UNDELIVERED,
    "failed": MessageStatus.FAILED,
}


class FakeProvider(Provider):
    """Accepts everything; schedules a `delivered` report `delivery_delay_seconds` later."""

    name = "fake"

    def __init__(
        self, settings: FakeProviderSettings, schedule_report: ReportScheduler | None = None
    ) -> None:
        self._delay = settings.delivery_delay_seconds
        self._schedule_report = schedule_report

    async def send(self, sms: OutboundSms) -> Accepted:
        """Accept the message and schedule its delivery report."""
        provider_message_id = f"fake-{uuid.uuid4().hex}"
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
