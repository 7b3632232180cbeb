"""Outages of a dependency (PostgreSQL, Redis) as the logs and metrics tell them.

During an outage every request and job that needs the dependency fails the same expected way
(a 503, a retry, a job put off): that is back-pressure, not a fault of each request. So the
first failure logs one warning ("postgresql unavailable"), further ones are only counted (a
reminder with the counts at most once a minute while it lasts), and the return logs one warning
with how long it lasted and how many failures it cost. `smsgate_dependency_up` says the same
to the metrics.

A process learns of the return either from the next success (`recovered`) or, when it was
given a `probe`, by trying the dependency in the background with back-off (at most
`PROBE_MAX_SECONDS` apart) until it answers, so it reports ready again within seconds of the
return even when nothing else runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
import asyncpg
import httpx
from redis.exceptions import RedisError
from sqlalchemy import exc

from app.kernel.logs import describe_error
from app.kernel.metrics import DEPENDENCY_UP

log = logging.getLogger(__name__)

# While an outage lasts, a reminder with the counts at most this often.
REMIND_SECONDS: Final = 60.0
# The probe's back-off: from the first to the last, doubling.
PROBE_FIRST_SECONDS: Final = 0.2
PROBE_MAX_SECONDS: Final = 2.0
# SQLSTATEs that say PostgreSQL is unavailable rather than the statement wrong: connection
# exceptions (08), shutting down or starting up (57P01-57P03; not 57014, a statement cancelled
# or timed out), out of resources (53, too many connections among them).
_UNAVAILABLE_SQLSTATES: Final = ("08", "57P", "53")

Probe = Callable[[], Awaitable[object]]


class Outage:
    """One dependency's state in this process: up, or down since when, with counts."""

    def __init__(
        self,
        dependency: str,
        *,
        probe: Probe | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dependency = dependency
        self._clock = clock
        self.probe = probe
        self.since: float | None = None
        self.failures = 0
        self._reminded = 0.0
        self._probing: asyncio.Task[None] | None = None
        DEPENDENCY_UP.labels(dependency=dependency).set(1)

    @property
    def down(self) -> bool:
        """Whether the dependency is known to be unavailable now."""
        return self.since is not None

    def failed(self, error: BaseException, **context: object) -> None:
        """One more failure: a warning if it starts an outage, else counted (and a reminder
        at most every `REMIND_SECONDS`)."""
        now = self._clock()
        self.failures += 1
        if self.since is None:
            self.since = self._reminded = now
            DEPENDENCY_UP.labels(dependency=self.dependency).set(0)
            log.warning(
                f"{self.dependency} unavailable",
                extra={"dependency": self.dependency, **describe_error(error), **context},
            )
            self._start_probe()
        elif now - self._reminded >= REMIND_SECONDS:
            self._reminded = now
            log.warning(
                f"{self.dependency} still unavailable",
                extra={
                    "dependency": self.dependency,
                    "failures": self.failures,
                    "seconds": round(now - self.since, 1),
                    **describe_error(error),
                },
            )

    def recovered(self) -> None:
        """The dependency answered: end the outage (one warning with its counts), if any."""
        if self.since is None:
            return
        seconds = self._clock() - self.since
        log.warning(
            f"{self.dependency} available again",
            extra={
                "dependency": self.dependency,
                "failures": self.failures,
                "seconds": round(seconds, 1),
            },
        )
        self.since = None
        self.failures = 0
        DEPENDENCY_UP.labels(dependency=self.dependency).set(1)

    def _start_probe(self) -> None:
        if self.probe is None or (self._probing is not None and not self._probing.done()):
            return
        try:
            self._probing = asyncio.get_running_loop().create_task(self._probe_until_back())
        except RuntimeError:  # no loop (a synchronous caller): the next success will tell
            self._probing = None

    async def _probe_until_back(self) -> None:
        assert self.probe is not None
        pause = PROBE_FIRST_SECONDS
        while self.down:
            await asyncio.sleep(pause)
            try:
                await self.probe()
            except Exception:  # still down: counted by those who need it, not by the probe
                pause = min(pause * 2, PROBE_MAX_SECONDS)
                continue
            self.recovered()

    async def close(self) -> None:
        """Stop the probe (on shutdown)."""
        if self._probing is not None and not self._probing.done():
            self._probing.cancel()
            await asyncio.gather(self._probing, return_exceptions=True)


def unavailable_dependency(error: BaseException) -> str | None:
    """Which dependency `error` says is unavailable (`redis`, `postgresql`), or None for any
    other error (a bug, a refused statement: those stay errors)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RedisError):
            return "redis"
        if isinstance(current, exc.DBAPIError):
            sqlstate = str(getattr(current.orig, "sqlstate", None) or "")
            if current.connection_invalidated or sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
                return "postgresql"
        if isinstance(current, exc.TimeoutError):  # the pool: no connection came back
            return "postgresql"
        if isinstance(current, asyncpg.PostgresError):
            if str(current.sqlstate).startswith(_UNAVAILABLE_SQLSTATES):
                return "postgresql"
        if isinstance(current, asyncpg.InternalClientError):
            return "postgresql"
        if isinstance(current, asyncpg.InterfaceError):
            # Only a closed connection; the rest (a wrong argument count, "another operation is
            # in progress") are bugs, and stay errors.
            return "postgresql" if "connection is closed" in str(current) else None
        if isinstance(current, httpx.HTTPError | aiohttp.ClientError):
            return None  # a provider's or an endpoint's failure, whatever socket error it wraps
        if isinstance(current, ConnectionError):
            # A refused or dropped connection; Redis's are RedisErrors, so this is the
            # database's (asyncpg raises the socket's own error when it cannot connect).
            return "postgresql"
        current = current.__cause__ or current.__context__
    return None


# Redis as this process sees it (every client of a process talks to the same Redis): told of
# failures by whoever meets one, and of the return by the next command that succeeds.
REDIS: Final = Outage("redis")
