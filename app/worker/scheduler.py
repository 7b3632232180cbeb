"""The scheduler: every worker moves due `scheduled` messages to `queued` and hands them to the
delivery feed, so a scheduled message leaves within about a poll interval of its `send_at`.

PostgreSQL is the only record of what is scheduled (app.traffic.schedule): a worker that was down
when a message fell due promotes it when it starts; a Redis that lost everything loses nothing
scheduled. Each pass is one statement (app.delivery.transitions.promote_scheduled: conditional,
`FOR UPDATE SKIP LOCKED`, so workers polling together never promote a message twice, nor wait on
each other), in chunks of `PROMOTE_CHUNK` until none is due, with the database's clock. The push
to the feed comes after the commit; if it fails, the message is `queued` and due, and the sweep
enqueues it (`SWEEP_GRACE_SECONDS`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from app.db.session import SessionFactory
from app.delivery.transitions import promote_scheduled
from app.kernel.outages import Outage, unavailable_dependency
from app.worker.queue import Queue, push_ready

log = logging.getLogger(__name__)

# The most messages one statement promotes (a bounded transaction, a bounded push).
PROMOTE_CHUNK: Final = 500
# After an error (the database down), wait this long before the next pass.
ERROR_BACKOFF_SECONDS: Final = 1.0


class Scheduler:
    """One worker's loop over due scheduled messages."""

    def __init__(
        self,
        session_factory: SessionFactory,
        queue: Queue,
        *,
        poll_seconds: float,
        db_outage: Outage | None = None,
        chunk: int = PROMOTE_CHUNK,
    ) -> None:
        self._sessions = session_factory
        self._queue = queue
        self._poll = poll_seconds
        self._chunk = chunk
        self._db_outage = db_outage
        self._stopping = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start polling in the background."""
        if self._loop is None:
            self._loop = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        """Stop polling; a pass under way finishes (its push too)."""
        self._stopping.set()
        if self._loop is not None:
            await self._loop
            self._loop = None

    async def promote_due(self) -> int:
        """One pass: promote and hand over every due message, a chunk at a time; how many."""
        promoted = 0
        while not self._stopping.is_set():
            ids = await promote_scheduled(self._sessions, self._chunk)
            if ids:
                await push_ready(self._queue, ids)
                log.info("scheduled messages due", extra={"count": len(ids)})
            promoted += len(ids)
            if len(ids) < self._chunk:
                break
        return promoted

    async def _run(self) -> None:
        while not self._stopping.is_set():
            pause = self._poll
            try:
                await self.promote_due()
                if self._db_outage is not None:
                    self._db_outage.recovered()
            except Exception as error:  # the loop must outlive an outage: the rows wait
                if self._db_outage is not None and unavailable_dependency(error) == "postgresql":
                    self._db_outage.failed(error, action="scheduler")
                else:
                    log.exception("scheduler: promotion failed")
                pause = ERROR_BACKOFF_SECONDS
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=pause)
            except TimeoutError:
                pass
