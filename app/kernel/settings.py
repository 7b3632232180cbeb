"""Configuration, read once from the environment (and an optional `.env` file).

Nested groups use `__` in variable names: `EVENTS__ALLOW_HTTP` sets `settings.events.allow_http`.
Each provider's group (`TWILIO__AUTH_TOKEN`, ...) is declared by its adapter, not here: the
provider registry asks `Settings.section` for it by name, so adding a provider touches no
kernel file. Every variable is listed with its default in README.md.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import phonenumbers
from pydantic import (
    BaseModel,
    Field,
    IPvAnyNetwork,
    PrivateAttr,
    SecretStr,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict


class EventsSettings(BaseModel):
    """Events out: signed webhooks to clients' endpoints (README, "Events out")."""

    # http:// endpoints are refused unless this is set (development: nothing to terminate TLS).
    allow_http: bool = False
    # Loopback and private networks are refused as destinations, except these (a JSON list of
    # CIDRs, e.g. ["127.0.0.0/8", "::1/128"] for receivers on a developer's machine).
    allowed_networks: list[IPvAnyNetwork] = Field(default_factory=list)
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    # One attempt (DNS, connect, send, response) never takes longer than this.
    timeout_seconds: float = Field(default=15.0, gt=0)
    # At most this much of a response body is read (and kept with the attempt).
    max_response_bytes: int = Field(default=4096, ge=0, le=1024 * 1024)
    retry_base_delay_seconds: float = Field(default=5.0, gt=0)
    retry_max_delay_seconds: float = Field(default=7200.0, gt=0)
    # A failing event is retried for this long after its first attempt, then given up.
    retry_window_seconds: int = Field(default=86400, ge=0)
    # Attempts in flight to one endpoint at once, across all event workers.
    max_in_flight_per_endpoint: int = Field(default=4, ge=1)
    # And per owner (a client, or a sender) across all its endpoints: a client giving every
    # message its own callback_url must not take every slot either.
    max_in_flight_per_owner: int = Field(default=8, ge=1)
    # After a rotation, the previous signing secret keeps signing for this long.
    secret_grace_seconds: int = Field(default=86400, ge=0)


class RetentionSettings(BaseModel):
    """How long each kind of data lives (README, "Retention"); pruned by the worker's retention
    job in small batches. A period left empty (`RETENTION__OPT_OUT_HISTORY_DAYS=`) keeps that
    kind for ever. Idempotency keys live `IDEMPOTENCY_TTL_HOURS`."""

    # A settled message's body (order numbers, codes, names) is replaced by "" after this; the
    # message itself, its status and its timestamps stay.
    message_body_days: int | None = Field(default=30, ge=1)
    # A settled message's history (`GET /v1/messages/{id}`'s `history`) after this.
    message_event_days: int | None = Field(default=90, ge=1)
    # Delivered or given-up events (with their attempts), and callback-URL endpoints no event
    # uses any more.
    webhook_event_days: int | None = Field(default=30, ge=1)
    # Delivery attempts of events that are kept longer.
    webhook_attempt_days: int | None = Field(default=14, ge=1)
    # Parts of long inbound messages (assembled, or whose other parts never came).
    inbound_part_days: int | None = Field(default=7, ge=1)
    # The opt-out history is the proof of consent: kept unless set. The row that decides a
    # number's current state is kept whatever its age.
    opt_out_history_days: int | None = Field(default=None, ge=1)
    # A sender pool's kept choice for a recipient not written to (nor refused) for this long:
    # the recipient's next message is routed afresh (README, "Sender pools").
    sender_affinity_days: int | None = Field(default=395, ge=1)
    # Rows per statement (each batch is its own short transaction) and batches per kind per run.
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    max_batches_per_run: int = Field(default=100, ge=1)


class ConsoleSettings(BaseModel):
    """The operator console (`/console`; README, "Operator console")."""

    # A signed-in session ends this long after sign-in, used or not (then sign in again).
    session_hours: float = Field(default=8.0, gt=0, le=24 * 30)


class TrafficSettings(BaseModel):
    """Traffic control (README, "Destination permissions" and "Quotas and rate limits")."""

    # Destination countries (ISO 3166 alpha-2) any client may send to; an admin may narrow a
    # client's further (`PUT /v1/clients/{client}/traffic`). Widen it with a JSON list:
    # TRAFFIC__PERMITTED_COUNTRIES='["US","CA","FR","GB"]'.
    permitted_countries: list[str] = Field(default_factory=lambda: ["US", "CA", "FR"])
    # Personal numbers ("follow-me" ranges such as the UK's 070) cost premium-like termination
    # fees and are a favourite of SMS pumping; refused unless this is set.
    allow_personal_numbers: bool = False
    # Every client's limits unless an admin sets its own; 0: unlimited (no Redis call at all
    # when every limit of a client is 0). Windows are fixed: the UTC minute, the UTC day.
    messages_per_minute: int = Field(default=0, ge=0)
    segments_per_minute: int = Field(default=0, ge=0)
    messages_per_day: int = Field(default=0, ge=0)
    segments_per_day: int = Field(default=0, ge=0)
    # With Redis unreachable (or slower than the timeout), sends are accepted unchecked (true)
    # or refused with 503 `quota_unavailable` (false).
    quota_fail_open: bool = True
    quota_timeout_seconds: float = Field(default=0.5, gt=0)

    @field_validator("permitted_countries")
    @classmethod
    def _upper(cls, countries: list[str]) -> list[str]:
        """Codes as ISO writes them (upper case), each one a region of the numbering plan
        ("UK" is not: the United Kingdom is "GB")."""
        codes = [code.upper() for code in countries]
        unknown = [code for code in codes if code not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"not ISO 3166 alpha-2 country codes: {', '.join(unknown)}")
        return codes


Section = TypeVar("Section", bound=BaseModel)

_CONFIG = SettingsConfigDict(
    env_file=".env", env_nested_delimiter="__", extra="ignore", case_sensitive=False
)


class PumpingSettings(BaseModel):
    """The SMS pumping alarm (README, "SMS pumping defence"): many distinct numbers in one number
    range, per client, within a short window, well above that client's usual count there."""

    # `off`: no check (no Redis call); `alert`: a metric, a log line and a
    # `traffic.pumping_suspected` event, the messages go out; `hold`: the same, and the messages
    # of a suspicious range are stored `held` until an admin releases or cancels them.
    action: Literal["off", "alert", "hold"] = "alert"
    # The window distinct numbers are counted over: a bot fills a form in seconds, a burst of
    # real sign-ups is spread over minutes.
    window_seconds: int = Field(default=60, ge=10, le=3600)
    # A range is the country calling code and this many leading digits of the national number
    # (+1 415 5…, +44 7911…): the block a bot walks through when it picks numbers in sequence.
    range_digits: int = Field(default=4, ge=1, le=8)
    # Never fire below this many distinct numbers in one range in one window, whatever the
    # baseline: a new client's first burst of sign-ups has no baseline at all.
    min_distinct: int = Field(default=50, ge=2)
    # Fire above this multiple of the client's usual count in that range per window.
    baseline_multiple: float = Field(default=5.0, ge=1.0)
    # How fast the usual count follows the traffic: half of its weight is the last day's.
    baseline_half_life_hours: float = Field(default=24.0, gt=0)
    # A held message no admin released or canceled within this many days is canceled by the
    # retention job (as an admin's cancel: `message.canceled`): a hold is not a queue.
    held_max_days: int = Field(default=7, ge=1)
    # The check's Redis call waits at most this long; then the messages go out unjudged.
    timeout_seconds: float = Field(default=0.5, gt=0)


class Settings(BaseSettings):
    """The service's whole configuration."""

    model_config = _CONFIG

    # Groups named at run time (a provider's `TWILIO__*`), given or read once, by name.
    _sections: dict[str, BaseModel] = PrivateAttr(default_factory=dict)

    def section(self, name: str, model: type[Section]) -> Section:
        """The group `name` (variables `NAME__FIELD`), as given to `with_sections` or else read
        from the environment and `.env` on first use, exactly as a nested field would be."""
        found = self._sections.get(name)
        if not isinstance(found, model):
            found = _read_section(name, model)
            self._sections[name] = found
        return found

    def with_sections(self, **sections: BaseModel) -> Settings:
        """A copy with these groups given instead of read (tests, tools)."""
        copy = self.model_copy()
        copy._sections = {**self._sections, **sections}
        return copy

    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/smsgate"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The externally reachable base URL of this service; providers' callbacks are built on it and
    # Twilio signs the full URL, so it must match what Twilio calls exactly.
    public_base_url: str = "http://localhost:8000"
    default_region: str = Field(default="US", min_length=2, max_length=2)
    max_segments: int = Field(default=10, ge=1, le=255)
    idempotency_ttl_hours: int = Field(default=24, ge=24)
    # Connections each API process keeps open, in each of its two pools (asyncpg for the send
    # path, SQLAlchemy for the rest): fixed, and at least the expected concurrency, so that load
    # never opens new connections (each costs PostgreSQL about 2 ms of CPU).
    db_pool_size: int = Field(default=32, ge=1, le=500)
    # API keys and senders are cached per process for this long (0: not at all): a revoked key
    # or a changed sender is honoured for at most this long by the other API processes.
    lookup_cache_seconds: float = Field(default=5.0, ge=0)
    # Provider calls: the connect timeout is short because a failed connect is safe to retry.
    provider_connect_timeout_seconds: float = 3.0
    provider_read_timeout_seconds: float = 10.0
    send_max_attempts: int = Field(default=6, ge=1)
    # Messages one delivery worker has between claim and provider answer at once (and its HTTP
    # connections per provider host).
    worker_concurrency: int = Field(default=100, ge=1, le=1000)
    retry_base_delay_seconds: float = 2.0
    retry_max_delay_seconds: float = 300.0
    # A queued message untouched for this long is enqueued again by the sweep.
    sweep_grace_seconds: int = 30
    # How often each worker looks for scheduled messages whose send_at has come (one indexed
    # statement; a scheduled message leaves within about this of its time).
    scheduler_poll_seconds: float = Field(default=0.5, gt=0, le=10)
    # Circuit breaker per provider (app.delivery.circuit): this many timeouts, connection errors
    # or 5xx within the window open it for `circuit_open_seconds`, then one probe may go.
    circuit_failure_threshold: int = Field(default=5, ge=1)
    circuit_window_seconds: float = Field(default=30.0, gt=0)
    circuit_open_seconds: float = Field(default=30.0, gt=0)
    # After a 429 without Retry-After, no worker calls that provider for this long.
    throttle_pause_seconds: float = Field(default=1.0, ge=0)
    # A message whose submission had an unknown outcome at a provider that cannot be asked
    # (Vonage), or whose lookup keeps failing, waits this long after its claim for the provider's
    # report, then fails as `outcome_unknown` (it is never resent blindly).
    unknown_outcome_give_up_seconds: int = Field(default=900, ge=0)
    # A `sent` message without news for this long (its final callback may be lost) is checked
    # with its provider, if the provider can be asked (Twilio, fake), at most once per period.
    status_check_after_seconds: int = Field(default=600, ge=1)
    # Each further check of a message that still reads `sent` waits twice as long as the one
    # before (from `status_check_after_seconds`), at most this long between two checks ...
    status_check_max_interval_seconds: int = Field(default=6 * 3600, ge=1)
    # ... and checks stop once the message has had no news for this long (recorded on the
    # message as its `status_detail`; a report that arrives later is still applied).
    status_check_horizon_hours: float = Field(default=72.0, gt=0)
    # Provider lookups the status checks make per minute at most (all workers together): after
    # an outage the overdue messages are asked about at this pace, spread evenly.
    status_check_rate_per_minute: int = Field(default=300, ge=1, le=60_000)
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # Message bodies are customers' data: kept out of logs unless an operator turns this on.
    log_message_bodies: bool = False
    # `/metrics` on the API answers only requests carrying `Authorization: Bearer <this>`; empty,
    # it is off (404): the metrics name senders and their volumes.
    metrics_token: SecretStr = SecretStr("")
    # The address the workers' metrics servers listen on: loopback unless a scraper elsewhere
    # must reach them (a container's own address, say; never a public one).
    metrics_host: str = "127.0.0.1"
    # The worker serves its Prometheus metrics here (0: not at all). The API serves /metrics.
    worker_metrics_port: int = Field(default=9101, ge=0, le=65535)
    # The same for the events worker (`smsgate worker --queue events`).
    events_worker_metrics_port: int = Field(default=9102, ge=0, le=65535)
    # The largest request body accepted (a bulk opt-out import is the largest legitimate one).
    max_request_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    # The HTTP edge (`smsgate serve`; README, "HTTP limits"): the request line and headers of a
    # request together (431 above it), how long they may take to arrive, how long its body may
    # take after them, how long an idle keep-alive connection is kept, and how many
    # connections and requests one API process holds at once (503 above it).
    http_max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    http_header_timeout_seconds: float = Field(default=10.0, gt=0)
    http_body_timeout_seconds: float = Field(default=30.0, gt=0)
    http_keep_alive_seconds: float = Field(default=5.0, gt=0)
    http_max_concurrency: int = Field(default=1000, ge=1)
    # The key signing secrets (`whsec_…`) are encrypted with in the database: 32 bytes, base64
    # (`smsgate generate-secrets-key`). Older keys, comma-separated, are still read (rotation,
    # README "Secrets at rest"). `smsgate dev` makes one of its own; nothing else has a default.
    secrets_key: SecretStr = SecretStr("")
    secrets_previous_keys: SecretStr = SecretStr("")
    # A sender may send only once its opt-out and help replies are configured; with this set,
    # the built-in English and French replies count as configured.
    accept_default_keyword_replies: bool = False
    # Whether a STOP to one sender opts the recipient out of that sender or of every sender.
    opt_out_scope: Literal["sender", "service"] = "sender"
    # Where `smsgate dev` and `smsgate services` keep the embedded servers' data and the
    # development API key (relative to the working directory).
    dev_data_dir: Path = Path(".data")

    events: EventsSettings = EventsSettings()
    retention: RetentionSettings = RetentionSettings()
    traffic: TrafficSettings = TrafficSettings()
    pumping: PumpingSettings = PumpingSettings()
    console: ConsoleSettings = ConsoleSettings()

    @model_validator(mode="after")
    def _segment_limits_fit_a_message(self) -> Settings:
        """A segment limit below MAX_SEGMENTS would refuse the longest messages the service
        accepts forever, whatever the client waits: a configuration error, said at startup."""
        for name in ("segments_per_minute", "segments_per_day"):
            value = getattr(self.traffic, name)
            if 0 < value < self.max_segments:
                raise ValueError(
                    f"TRAFFIC__{name.upper()}={value} is below MAX_SEGMENTS={self.max_segments}: "
                    "a message of that many segments could never be sent; set at least "
                    f"{self.max_segments} (or 0 for unlimited), or lower MAX_SEGMENTS"
                )
        return self


@lru_cache
def _section_reader(name: str, model: type[BaseModel]) -> type[BaseSettings]:
    """A settings class with the one nested field `name`: the same sources and `__` parsing as
    `Settings` itself, so `NAME__FIELD` means what it would as a field of `Settings`."""
    fields: dict[str, Any] = {name: (model, Field(default_factory=model))}
    reader: type[BaseSettings] = create_model(
        f"{model.__name__}Reader", __base__=_SectionReaderBase, **fields
    )
    return reader


class _SectionReaderBase(BaseSettings):
    model_config = _CONFIG


def _read_section(name: str, model: type[Section]) -> Section:
    value = getattr(_section_reader(name, model)(), name)
    assert isinstance(value, model)
    return value


def provider_call_budget_seconds(settings: Settings) -> float:
    """The longest one provider call can take: pool wait + connect, then write + read."""
    return (
        2 * settings.provider_connect_timeout_seconds + 2 * settings.provider_read_timeout_seconds
    )


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, parsed on first use."""
    return Settings()
