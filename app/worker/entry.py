"""`smsgate worker`: run the SMS or the events worker, or report whether one is alive."""

from __future__ import annotations

import asyncio
import sys
from typing import Literal

from arq.worker import check_health

from app.kernel.logs import configure_logging
from app.kernel.settings import get_settings

Queue = Literal["sms", "events"]


def run(queue: Queue, *, check: bool = False) -> None:
    """Run `queue`'s worker until it is stopped; with `check`, exit 0 if a worker of that queue
    recorded its health recently, else 1."""
    from app.worker.events import EventsWorkerSettings
    from app.worker.resilience import ResilientWorker, run_worker
    from app.worker.tasks import WorkerSettings, run_delivery_worker

    worker_settings = EventsWorkerSettings if queue == "events" else WorkerSettings
    settings = get_settings()
    configure_logging(
        settings.log_level, settings.log_format, redact=not settings.log_message_bodies
    )
    if check:
        healthy = check_health(worker_settings) == 0  # type: ignore[arg-type]
        sys.stdout.write("healthy\n" if healthy else "no worker reported recently\n")
        raise SystemExit(0 if healthy else 1)
    # uvloop, as uvicorn uses for the API (arq takes the current loop).
    import uvloop

    asyncio.set_event_loop(uvloop.new_event_loop())
    if queue == "events":
        # Outlives Redis and PostgreSQL outages, as the delivery worker does.
        run_worker(worker_settings, ResilientWorker)
    else:
        run_delivery_worker()
