"""Prometheus metrics. Each process (API, worker) exposes its own: the API at `/metrics` (with
`METRICS_TOKEN`), the worker on `METRICS_HOST`:`WORKER_METRICS_PORT`; Prometheus adds them up."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

MESSAGES = Counter(
    "smsgate_messages",
    "Messages entering a status (queued = accepted), by provider and sender.",
    ["status", "provider", "sender"],
)
PROVIDER_REQUEST_SECONDS = Histogram(
    "smsgate_provider_request_seconds",
    "Time a provider took to answer a submission, by outcome.",
    ["provider", "outcome"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
WEBHOOK_VERIFICATION_FAILURES = Counter(
    "smsgate_webhook_verification_failures",
    "Provider webhooks refused for a missing or bad signature.",
    ["provider", "kind"],
)
INBOUND_MESSAGES = Counter(
    "smsgate_inbound_messages",
    "Inbound messages stored, by the keyword category they matched ('none' for none).",
    ["provider", "keyword_category"],
)
EVENT_DELIVERY_ATTEMPTS = Counter(
    "smsgate_event_delivery_attempts",
    "Attempts to deliver an event to a client's endpoint, by outcome.",
    ["outcome"],
)
EVENT_DELIVERY_SECONDS = Histogram(
    "smsgate_event_delivery_seconds",
    "Time an endpoint took to answer an event delivery attempt.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0),
)
RATE_LIMIT_DEFERRALS = Counter(
    "smsgate_rate_limit_deferrals",
    "Submissions put off because of a rate limit (`provider_throttled`: the provider said so).",
    ["provider", "reason"],
)
RETENTION_PRUNED = Counter(
    "smsgate_retention_pruned_rows",
    "Rows the retention job deleted (message bodies: redacted), by kind of data.",
    ["kind"],
)
DB_STATEMENTS = Counter(
    "smsgate_db_statements",
    "SQL statements this process sent to PostgreSQL (transaction control not included).",
)
DB_TRANSACTIONS = Counter(
    "smsgate_db_transactions",
    "Transactions this process ended, by outcome.",
    ["outcome"],
)
DEPENDENCY_UP = Gauge(
    "smsgate_dependency_up",
    "1 while this process reaches the dependency, 0 during an outage (app.kernel.outages).",
    ["dependency"],
)
QUEUE_DEPTH = Gauge(
    "smsgate_queue_depth", "Delivery jobs in the arq queue, deferred retries included."
)
OLDEST_QUEUED_AGE = Gauge(
    "smsgate_oldest_queued_message_age_seconds",
    "Age of the oldest message still queued, from its send_at if scheduled (0 when none).",
)
OLDEST_SENDING_AGE = Gauge(
    "smsgate_oldest_sending_message_age_seconds",
    "Age of the oldest claim still `sending` (0 when none): past a job's timeout, an unknown "
    "outcome that reconciliation has not settled.",
)
OLDEST_SENT_AGE = Gauge(
    "smsgate_oldest_sent_message_age_seconds",
    "Time since the oldest `sent` message changed (0 when none): its final report is overdue. "
    "Set by the status-check sweep (every 10 s).",
)
CIRCUIT_OPEN = Gauge(
    "smsgate_circuit_open",
    "1 while the provider's circuit breaker is open (no submissions until a probe succeeds).",
    ["provider"],
)
PROVIDER_PAUSED = Gauge(
    "smsgate_provider_paused_seconds",
    "How much longer every worker holds back from the provider because it throttled us.",
    ["provider"],
)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Serve this process's metrics on `host`:`port` (0: not at all; `METRICS_HOST`, loopback by
    default: they name senders and volumes); a busy port is logged, not fatal (another worker on
    the host serves its own there)."""
    if not port:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as error:
        logging.getLogger(__name__).warning(
            "metrics port busy", extra={"port": port, "error": repr(error)}
        )


def count_status(status: str, provider: str, sender: str, amount: int = 1) -> None:
    """`amount` messages (one, unless a batch) entered `status`."""
    MESSAGES.labels(status=status, provider=provider, sender=sender).inc(amount)
