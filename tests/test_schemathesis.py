"""schemathesis against `smsgate serve` on the test PostgreSQL and Redis: every operation of the
OpenAPI document, with generated valid and invalid input (`--mode all`), once with an admin key
and once with a client key. No answer may be a 5xx or a status the document does not list.

Bounded: a few examples per operation and a time budget per run, so that the two runs together
stay well under two minutes on a two-core machine.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.conftest import TEST_REDIS_URL as REDIS_URL
from tests.conftest import World, owned_database_url
from tests.processes import clean_env, free_port, start_smsgate, stop, wait_http_ok

MAX_EXAMPLES = 6
SECONDS_PER_RUN = 40


@pytest.fixture
def live_api(world: World, redis: Redis, tmp_path: Path) -> Iterator[str]:
    """`smsgate serve` on the test database (with `world`'s keys), as production runs it."""
    port = free_port()
    env = clean_env(
        DATABASE_URL=owned_database_url(),
        REDIS_URL=REDIS_URL,
        DB_POOL_SIZE="4",
        PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
        LOG_LEVEL="WARNING",
    )
    log = tmp_path / "api.log"
    api = start_smsgate("serve", "--port", str(port), env=env, log=log)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", api, log, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(api)


def schemathesis(api: str, key: str, report: Path) -> subprocess.CompletedProcess[str]:
    """One bounded schemathesis run with `key`."""
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("st")), "run", f"{api}/openapi.json",
            "--checks", "not_a_server_error,status_code_conformance",
            "--mode", "all",
            "--max-examples", str(MAX_EXAMPLES),
            "--max-time", str(SECONDS_PER_RUN),
            "--phases", "examples,coverage,fuzzing",
            "--seed", "1042",
            # Nothing kept between runs (no .schemathesis/ in the work tree).
            "--generation-database", "none",
            # One worker thread: with two, hypothesis describing its filter lambdas calls
            # ast.parse in both at once, and CPython 3.11.7's AST recursion-depth check is not
            # thread-safe ("SystemError: AST constructor recursion depth mismatch"). The time
            # budget, not the threads, bounds the run: it takes as long either way.
            "--workers", "1",
            "--request-timeout", "10",
            "--header", f"Authorization: Bearer {key}",
            "--no-color",
            "--report", "junit", "--report-junit-path", str(report),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS_PER_RUN + 60,
    )  # fmt: skip


@pytest.mark.parametrize("role", ["admin", "client"])
async def test_no_operation_answers_5xx_or_an_undocumented_status(
    live_api: str, world: World, role: str, tmp_path: Path
) -> None:
    key = world.admin_key if role == "admin" else world.client_key
    report = tmp_path / "junit.xml"

    result = await asyncio.to_thread(schemathesis, live_api, key, report)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    assert report.exists() and "<testcase" in report.read_text()  # operations were exercised
