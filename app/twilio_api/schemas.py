"""The Twilio-compatible API's bodies, as Twilio's OpenAPI document describes them (for our
OpenAPI document: the routes answer the dicts `app.twilio_api.vocabulary` builds)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_SID = "SM5b0e8f0a3c2d4c559a510c6d2f1c9f10"
_ACCOUNT = "AC0f8e5c1e2b7a4d579a0c7c1d2e3f4a5b"
_URI = f"/2010-04-01/Accounts/{_ACCOUNT}/Messages/{_SID}.json"

MESSAGE_EXAMPLE: dict[str, Any] = {
    "account_sid": _ACCOUNT,
    "api_version": "2010-04-01",
    "body": "Your order #1042 has shipped.",
    "date_created": "Thu, 26 Nov 2026 10:00:00 +0000",
    "date_sent": None,
    "date_updated": "Thu, 26 Nov 2026 10:00:00 +0000",
    "direction": "outbound-api",
    "error_code": None,
    "error_message": None,
    "from": "+14155550100",
    "messaging_service_sid": None,
    "num_media": "0",
    "num_segments": "1",
    "price": None,
    "price_unit": None,
    "sid": _SID,
    "status": "queued",
    "subresource_uris": {},
    "to": "+14155550123",
    "uri": _URI,
}


class TwilioMessage(BaseModel):
    """Twilio's Message resource (`api.v2010.account.message`) for one of our messages."""

    model_config = ConfigDict(
        populate_by_name=True, json_schema_extra={"examples": [MESSAGE_EXAMPLE]}
    )

    account_sid: str = Field(description="`AC` + your client's id in hex.")
    api_version: str
    body: str | None
    date_created: str | None = Field(description="RFC 2822, GMT.")
    date_sent: str | None = Field(
        description="When it was handed to the provider (its last attempt); null before."
    )
    date_updated: str | None
    direction: str = Field(description="Always `outbound-api`.")
    error_code: int | None = Field(description="Twilio's error code, when it failed.")
    error_message: str | None
    from_: str | None = Field(alias="from")
    messaging_service_sid: str | None = Field(description="Always null: no messaging services.")
    num_media: str = Field(description="Always `0`: no MMS.")
    num_segments: str
    price: str | None = Field(description="Always null: the service does not price messages.")
    price_unit: str | None
    sid: str = Field(description="`SM` + the message's id (as `/v1/messages`) in hex.")
    status: str = Field(
        description="queued, sending, sent, delivered, undelivered, failed (also an expired or "
        "rejected message) or canceled."
    )
    subresource_uris: dict[str, str] = Field(description="Empty: no media, no feedback.")
    to: str | None
    uri: str


class TwilioMessagePage(BaseModel):
    """A page of `GET Messages.json`, newest first (`ListMessageResponse`)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "messages": [MESSAGE_EXAMPLE],
                    "end": 0,
                    "first_page_uri": f"/2010-04-01/Accounts/{_ACCOUNT}/Messages.json?"
                    "PageSize=1&Page=0",
                    "next_page_uri": f"/2010-04-01/Accounts/{_ACCOUNT}/Messages.json?"
                    "PageSize=1&Page=1&PageToken=MjAyNi0xMS0yNlQxMDowMDowMCswMDowMHw1YjBl",
                    "previous_page_uri": None,
                    "page": 0,
                    "page_size": 1,
                    "start": 0,
                    "uri": f"/2010-04-01/Accounts/{_ACCOUNT}/Messages.json?PageSize=1",
                }
            ]
        }
    )

    messages: list[TwilioMessage]
    end: int
    first_page_uri: str
    next_page_uri: str | None = Field(description="Null on the last page.")
    previous_page_uri: str | None = Field(description="Always null: pages go forward only.")
    page: int
    page_size: int
    start: int
    uri: str


class TwilioErrorBody(BaseModel):
    """An error, as Twilio writes it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "code": 21211,
                    "message": "To: not a valid phone number",
                    "more_info": "https://www.twilio.com/docs/errors/21211",
                    "status": 400,
                }
            ]
        }
    )

    code: int = Field(description="Twilio's error code (README, 'Coming from Twilio').")
    message: str
    more_info: str
    status: int


class TwilioCredentialsIn(BaseModel):
    """Whose Twilio credentials to issue."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"client": "billing"}]}
    )

    client: str = Field(min_length=1, max_length=200, description="An existing client's name.")


class TwilioCredentialsOut(BaseModel):
    """A client's Twilio credentials: the SDK's username and password. The token is shown in
    this response only; issuing again replaces it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "client": "billing",
                    "account_sid": _ACCOUNT,
                    "auth_token": "6f1c2d3e4a5b6c7d8e9f0a1b2c3d4e5f",
                }
            ]
        }
    )

    client: str
    account_sid: str
    auth_token: str


class CreateMessageForm(BaseModel):
    """Twilio's CreateMessage parameters that the service reads; any other is ignored, as
    Twilio ignores unknown parameters."""

    model_config = ConfigDict(
        extra="ignore",
        populate_by_name=True,
        json_schema_extra={
            "examples": [
                {
                    "To": "+14155550123",
                    "From": "+14155550100",
                    "Body": "Your order #1042 has shipped.",
                    "StatusCallback": "https://example.com/twilio/status",
                }
            ]
        },
    )

    to: str | None = Field(default=None, alias="To", description="The recipient (21211, 21604).")
    from_: str | None = Field(
        default=None,
        alias="From",
        description="One of your senders (21606); without it, your default sender (21603).",
    )
    body: str | None = Field(default=None, alias="Body", description="The text (21602, 21617).")
    status_callback: str | None = Field(
        default=None,
        alias="StatusCallback",
        description="Where status changes are POSTed in Twilio's form, signed with "
        "X-Twilio-Signature under your auth token; checked as our callback URLs are (21609).",
    )
    validity_period: str | None = Field(
        default=None,
        alias="ValidityPeriod",
        description="Seconds during which it may still be sent (1 to 604800; 90007); then it "
        "fails (30036).",
    )
    messaging_service_sid: str | None = Field(
        default=None,
        alias="MessagingServiceSid",
        description="Ignored: there are no messaging services; without `From` your default "
        "sender sends.",
    )
    send_at: str | None = Field(
        default=None, alias="SendAt", description="Refused (60200): no scheduled sends."
    )
    schedule_type: str | None = Field(
        default=None, alias="ScheduleType", description="Refused (60200): no scheduled sends."
    )
    media_url: list[str] | None = Field(
        default=None, alias="MediaUrl", description="Refused (60200): SMS text only."
    )
    content_sid: str | None = Field(
        default=None, alias="ContentSid", description="Refused (60200): no content templates."
    )


class UpdateMessageForm(BaseModel):
    """Twilio's UpdateMessage parameters: only `Status=canceled` is supported."""

    model_config = ConfigDict(
        extra="ignore",
        populate_by_name=True,
        json_schema_extra={"examples": [{"Status": "canceled"}]},
    )

    status: str | None = Field(
        default=None, alias="Status", description="`canceled` (a message still queued)."
    )
    body: str | None = Field(
        default=None, alias="Body", description="Refused (60200): no redaction."
    )
