"""Workers that outlive Redis and PostgreSQL outages (arq's `Worker`, extended, not forked).

arq gives up in two places when Redis goes away: picking up a job (`start_jobs` watches the job's
key in a pipeline, which redis-py never retries) and starting one (`run_job`'s first pipeline,
whose error `_poll_iteration` re-raises); either ends `Worker.main`, and the process exits. Here
both are caught: the worker pauses with back-off (at most `PAUSE_MAX_SECONDS`), returns the job
slot the failed pickup had taken, and polls again; the job itself stays in Redis (or, with Redis
restarted empty, in PostgreSQL for the sweeps).

A job that meets an unavailable dependency (app.kernel.outages) is put off (`Retry`, logged by arq
at info) or, for a periodic job, skipped until its next run, instead of failing with a traceback.

While Redis or PostgreSQL is down the worker does not refresh its health key (after a
PostgreSQL failure it deletes it), so `smsgate worker --check` reports it not ready; the key is
written again at the first poll after the return. Each outage is one warning when it starts and
one with its counts when it ends (app.kernel.outages).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from datetime import timedelta
from typing import Any, Final

from arq import Retry
from arq.cron import CronJob
from arq.worker import Worker, get_kwargs
from redis.exceptions import RedisError

from app.db.session import ping
from app.kernel.outages import REDIS, Outage, unavailable_dependency

log = logging.getLogger(__name__)

# After a failed pickup: the first pause, doubling up to the last. Kept short so that the
# worker resumes within seconds of Redis's return.
PAUSE_FIRST_SECONDS: Final = 0.1
PAUSE_MAX_SECONDS: Final = 1.0
# A job that met an unavailable dependency runs again this much later.
DEPENDENCY_RETRY_SECONDS: Final = 2.0


class ResilientWorker(Worker):
    """arq's worker that stays up through Redis and PostgreSQL outages (see the module doc).
    Its `ctx["db_outage"]` tracks PostgreSQL for this worker; `on_startup` gives it a probe."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.db_outage = Outage("postgresql")
        self.ctx["db_outage"] = self.db_outage
        self._pause = PAUSE_FIRST_SECONDS
        self._health_withdrawn = False
        for function in self.functions.values():
            function.coroutine = _guarded(
                function.coroutine, function.name, self, periodic=isinstance(function, CronJob)
            )

    def outage(self, dependency: str) -> Outage:
        """The tracker of `dependency` (`redis` or `postgresql`)."""
        return REDIS if dependency == "redis" else self.db_outage

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as error:
            REDIS.failed(error, action="job pickup")
            await asyncio.sleep(self._pause)
            self._pause = min(self._pause * 2, PAUSE_MAX_SECONDS)
            return
        self._pause = PAUSE_FIRST_SECONDS
        REDIS.recovered()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's `start_jobs`, one job at a time, so that a pickup cut short by Redis gives back
        the slot it had taken (arq would keep it, and after `max_jobs` such failures pick up
        nothing ever again)."""
        for job_id in job_ids:
            counted = self.job_counter
            before = self.tasks.get(job_id.decode())
            try:
                await super().start_jobs([job_id])
            except BaseException:
                if self.job_counter > counted and self.tasks.get(job_id.decode()) is before:
                    self.job_counter -= 1
                    self.sem.release()
                raise

    async def record_health(self) -> None:
        """arq's health record, withheld while PostgreSQL is down (`--check` then fails)."""
        if self.db_outage.down:
            if not self._health_withdrawn:
                self._health_withdrawn = True
                try:
                    await self.pool.delete(self.health_check_key)
                except (RedisError, OSError) as error:
                    REDIS.failed(error, action="health record")
            return
        if self._health_withdrawn:
            self._health_withdrawn = False
            self._last_health_check = 0  # written again at once
        await super().record_health()


def _guarded(coroutine: Any, name: str, worker: ResilientWorker, *, periodic: bool) -> Any:
    """`coroutine`, except that an unavailable dependency puts the job off (a periodic job is
    skipped until its next run) and counts in that dependency's outage, without a traceback."""

    @functools.wraps(coroutine)
    async def run(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        try:
            result = await coroutine(ctx, *args, **kwargs)
        except Retry:
            raise
        except Exception as error:
            dependency = unavailable_dependency(error)
            if dependency is None:
                raise
            worker.outage(dependency).failed(error, job=name)
            if periodic:
                return None
            raise Retry(defer=timedelta(seconds=DEPENDENCY_RETRY_SECONDS)) from error
        worker.db_outage.recovered()
        return result

    return run


def watch_database(ctx: dict[str, Any]) -> None:
    """On startup, once `ctx["engine"]` exists: PostgreSQL's outage tracker probes it (a worker
    not built by `ResilientWorker`, a test's, gets a tracker of its own)."""
    outage = ctx.setdefault("db_outage", Outage("postgresql"))
    outage.probe = lambda: ping(ctx["engine"])


async def stop_watching_database(ctx: dict[str, Any]) -> None:
    """On shutdown, before the engine is disposed: stop the probe."""
    outage: Outage | None = ctx.get("db_outage")
    if outage is not None:
        await outage.close()


def run_worker(settings_cls: type, worker_cls: type[Worker] = ResilientWorker) -> None:
    """arq's `run_worker` with a worker class of ours (`ResilientWorker` by default)."""
    worker_cls(**get_kwargs(settings_cls)).run()  # type: ignore[arg-type]
