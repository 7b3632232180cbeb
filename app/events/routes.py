"""/v1/events: the events we sent (or are sending) you, their attempts, and redelivery; and the
event payloads themselves, documented as OpenAPI `webhooks`."""

from __future__ import annotations

import copy
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Response

from app.events import outbox as domain
from app.events.outbox import (
    EventStatus,
    EventType,
    InboundEventPayload,
    MessageEventPayload,
    OptOutEventPayload,
    PumpingEventPayload,
)
from app.events.schemas import AttemptList, AttemptOut, EventOut, EventPage
from app.kernel.errors import Conflict, NotFound, Unauthorized, ValidationFailed, problem_responses
from app.web.deps import PrincipalDep, SessionDep
from app.web.params import LimitQuery, SequenceCursorQuery

router = APIRouter(prefix="/v1/events", tags=["events"])

EventIdPath = Annotated[
    uuid.UUID,
    Path(description="The event's id.", examples=["7c9e6679-7425-40de-944b-e07fc1f90ae7"]),
]


@router.get(
    "",
    response_model=EventPage,
    responses=problem_responses(Unauthorized, ValidationFailed),
)
async def list_events(
    session: SessionDep,
    principal: PrincipalDep,
    type: Annotated[
        EventType | None,
        Query(description="Only events of this type.", examples=["message.failed"]),
    ] = None,
    status: Annotated[
        EventStatus | None,
        Query(description="Only events in this delivery state.", examples=["failed"]),
    ] = None,
    message_id: Annotated[
        uuid.UUID | None,
        Query(
            description="Only this message's events.",
            examples=["5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f10"],
        ),
    ] = None,
    limit: LimitQuery = 20,
    cursor: SequenceCursorQuery = None,
) -> EventPage:
    """Your events, newest first (admin keys: every event, senders' included)."""
    page = await domain.list_events(
        session,
        principal,
        domain.EventFilter(type=type, status=status, message_id=message_id),
        limit=limit,
        cursor=cursor,
    )
    return EventPage(
        data=[EventOut.of(view) for view in page.items],
        has_more=page.next_cursor is not None,
        next_cursor=page.next_cursor,
    )


@router.get(
    "/{event_id}", response_model=EventOut, responses=problem_responses(Unauthorized, NotFound)
)
async def get_event(
    event_id: EventIdPath, session: SessionDep, principal: PrincipalDep
) -> EventOut:
    """One event: its payload and where its delivery is."""
    return EventOut.of(await domain.get_event(session, principal, event_id))


@router.get(
    "/{event_id}/attempts",
    response_model=AttemptList,
    responses=problem_responses(Unauthorized, NotFound),
)
async def list_attempts(
    event_id: EventIdPath, session: SessionDep, principal: PrincipalDep
) -> AttemptList:
    """Every delivery attempt of an event: outcome, response status, latency."""
    attempts = await domain.list_attempts(session, principal, event_id)
    return AttemptList(data=[AttemptOut.model_validate(attempt) for attempt in attempts])


@router.post(
    "/{event_id}/redeliver",
    status_code=202,
    response_model=EventOut,
    responses={
        **problem_responses(Unauthorized, NotFound, Conflict),
        202: {"description": "Queued for delivery now, with a fresh retry window."},
    },
)
async def redeliver_event(
    event_id: EventIdPath, session: SessionDep, principal: PrincipalDep
) -> EventOut:
    """Send a failed (or delivered) event again, with the same id."""
    return EventOut.of(await domain.redeliver(session, principal, event_id))


# ---- The events themselves, as OpenAPI webhooks (what your endpoint receives) ----

webhooks = APIRouter(tags=["events"])

WebhookIdHeader = Annotated[
    str,
    Header(
        alias="webhook-id",
        description="The event id: the same on every retry. Dedupe on it.",
        examples=["7c9e6679-7425-40de-944b-e07fc1f90ae7"],
    ),
]
WebhookTimestampHeader = Annotated[
    str,
    Header(
        alias="webhook-timestamp",
        description="The attempt's time, Unix seconds. Refuse one more than 5 minutes off.",
        examples=["1795687203"],
    ),
]
WebhookSignatureHeader = Annotated[
    str,
    Header(
        alias="webhook-signature",
        description="Space-separated `v1,<base64>` HMAC-SHA256 signatures of "
        "`{webhook-id}.{webhook-timestamp}.{raw body}`, one per valid secret (two during a "
        "rotation): accept the request if any matches one of your secrets.",
        examples=["v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4="],
    ),
]
_ANSWERS: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "description": "Not delivered. 410 Gone disables the endpoint; 408 and 429 are retried; "
        "any other 3xx or 4xx fails the event at once (redeliver it by API)."
    },
    "5XX": {"description": "Retried with exponential backoff for about a day."},
}


async def message_event(
    payload: MessageEventPayload,
    webhook_id: WebhookIdHeader,
    webhook_timestamp: WebhookTimestampHeader,
    webhook_signature: WebhookSignatureHeader,
) -> Response:
    """Documentation only."""
    return Response(status_code=204)


async def inbound_event(
    payload: InboundEventPayload,
    webhook_id: WebhookIdHeader,
    webhook_timestamp: WebhookTimestampHeader,
    webhook_signature: WebhookSignatureHeader,
) -> Response:
    """Documentation only."""
    return Response(status_code=204)


async def pumping_event(
    payload: PumpingEventPayload,
    webhook_id: WebhookIdHeader,
    webhook_timestamp: WebhookTimestampHeader,
    webhook_signature: WebhookSignatureHeader,
) -> Response:
    """Documentation only."""
    return Response(status_code=204)


async def opt_out_event(
    payload: OptOutEventPayload,
    webhook_id: WebhookIdHeader,
    webhook_timestamp: WebhookTimestampHeader,
    webhook_signature: WebhookSignatureHeader,
) -> Response:
    """Documentation only."""
    return Response(status_code=204)


_MESSAGE_EVENTS = {
    EventType.MESSAGE_SENT: "The provider accepted the message.",
    EventType.MESSAGE_DELIVERED: "The handset received the message.",
    EventType.MESSAGE_UNDELIVERED: "The carrier could not deliver it (`error_code` says why).",
    EventType.MESSAGE_FAILED: (
        "It could not be sent, or the provider reported it failed. `error_code` "
        "`partially_sent`: the provider accepted only some parts of a long message, which may "
        "have reached the phone; do not resend it blindly."
    ),
    EventType.MESSAGE_EXPIRED: "Its `validity_period` ended before it could be sent.",
    EventType.MESSAGE_CANCELED: "Not sent: the recipient opted out after it was accepted.",
    EventType.MESSAGE_REJECTED: "The provider or carrier rejected it.",
}
# What each event's `data` looks like after its change: the status, and for the unhappy ones
# an error (a Twilio code for carrier outcomes, ours for the rest) and, when nothing reached the
# provider, no provider id.
_MESSAGE_EXAMPLE_DATA: dict[EventType, dict[str, Any]] = {
    EventType.MESSAGE_SENT: {"status": "sent"},
    EventType.MESSAGE_DELIVERED: {"status": "delivered"},
    EventType.MESSAGE_UNDELIVERED: {
        "status": "undelivered",
        "error_code": "30003",
        "error_message": "Unreachable destination handset",
    },
    EventType.MESSAGE_FAILED: {
        "status": "failed",
        "provider_message_id": None,
        "error_code": "21408",
        "error_message": "Permission to send an SMS has not been enabled for the region "
        "indicated by the 'To' number",
    },
    EventType.MESSAGE_EXPIRED: {
        "status": "expired",
        "provider_message_id": None,
        "error_code": None,
        "error_message": "validity period ended before sending",
    },
    EventType.MESSAGE_CANCELED: {
        "status": "canceled",
        "provider_message_id": None,
        "error_code": "recipient_opted_out",
        "error_message": "recipient opted out after the message was accepted",
    },
    EventType.MESSAGE_REJECTED: {
        "status": "rejected",
        "provider_message_id": None,
        "error_code": "21211",
        "error_message": "The 'To' number is not a valid phone number.",
    },
}


def message_event_example(event_type: EventType) -> dict[str, Any]:
    """The payload example for one `message.*` event: its own `type` and matching `data`."""
    extra: Any = MessageEventPayload.model_config["json_schema_extra"]
    example: dict[str, Any] = copy.deepcopy(extra["examples"][0])
    example["type"] = event_type.value
    example["data"].update(_MESSAGE_EXAMPLE_DATA[event_type])
    return example


for _type, _summary in _MESSAGE_EVENTS.items():
    webhooks.add_api_route(
        _type.value,
        message_event,
        methods=["POST"],
        status_code=204,
        summary=_type.value,
        description=f"{_summary} Sent to the message's `callback_url`, else to your default "
        "endpoint, signed with your secrets. Answer any 2xx.",
        response_description="Acknowledged (any 2xx).",
        responses=_ANSWERS,
        operation_id=f"event_{_type.value.replace('.', '_')}",
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {
                        "examples": {
                            _type.value: {
                                "summary": f"A {_type.value} event",
                                "value": message_event_example(_type),
                            }
                        }
                    }
                }
            }
        },
    )
webhooks.add_api_route(
    EventType.INBOUND_RECEIVED.value,
    inbound_event,
    methods=["POST"],
    status_code=204,
    summary=EventType.INBOUND_RECEIVED.value,
    description="A customer texted a sender something that is not a keyword. Sent to the "
    "sender's endpoint, signed with the sender's secrets. Answer any 2xx.",
    response_description="Acknowledged (any 2xx).",
    responses=_ANSWERS,
    operation_id="event_inbound_received",
)
webhooks.add_api_route(
    EventType.OPT_OUT_CHANGED.value,
    opt_out_event,
    methods=["POST"],
    status_code=204,
    summary=EventType.OPT_OUT_CHANGED.value,
    description="A number opted out of a sender or back in (keyword, API or provider error). "
    "Sent to the sender's endpoint (every sender's, for a service-wide change), signed with "
    "the sender's secrets. Answer any 2xx.",
    response_description="Acknowledged (any 2xx).",
    responses=_ANSWERS,
    operation_id="event_opt_out_changed",
)
webhooks.add_api_route(
    EventType.TRAFFIC_PUMPING_SUSPECTED.value,
    pumping_event,
    methods=["POST"],
    status_code=204,
    summary=EventType.TRAFFIC_PUMPING_SUSPECTED.value,
    description="Many distinct numbers of one range in a short window, well above your usual "
    'count there: it looks like SMS pumping (README, "SMS pumping defence"). Once per range '
    "and window, to the client's default endpoint, signed with the client's secrets. With the "
    "`hold` action the range's messages are `held` until an admin releases or cancels them. "
    "Answer any 2xx.",
    response_description="Acknowledged (any 2xx).",
    responses=_ANSWERS,
    operation_id="event_traffic_pumping_suspected",
)
