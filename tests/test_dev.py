"""`smsgate dev` from nothing: embedded PostgreSQL and Redis, a message delivered end to end through
the fake provider, and nothing left running after Ctrl-C."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import (
    alive,
    children_of,
    clean_env,
    free_port,
    processes_using,
    run_smsgate,
    start_smsgate,
    wait_for,
    wait_http_ok,
)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data directory with a short path (PostgreSQL's socket lives in it: 107 bytes at most)."""
    path = Path(tempfile.mkdtemp(prefix="smsgate-dev-"))
    yield path
    # Should the test fail half-way, stop the servers it started before removing their files.
    run_smsgate("services", "stop", "--data", str(path), env=clean_env())
    shutil.rmtree(path, ignore_errors=True)


def test_dev_starts_everything_sends_a_message_and_stops_without_leftovers(
    data_dir: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    port = free_port()
    log = tmp_path / "dev.log"
    # No DATABASE_URL or REDIS_URL: it starts embedded ones, with their data in DEV_DATA_DIR.
    env = clean_env(DEV_DATA_DIR=str(data_dir), FAKE__DELIVERY_DELAY_SECONDS="0.2")
    dev = start_smsgate("dev", "--port", str(port), env=env, log=log)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base_url}/healthz", dev, log, timeout=120)
        wait_for(lambda: "Ctrl-C stops it" in log.read_text(), 10, "the banner")
        output = log.read_text()
        key_file = data_dir / "dev-api-key"
        raw_key = key_file.read_text().strip()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert f"API docs:  {base_url}/docs" in output
        assert f"API key:   {raw_key}" in output
        assert f"curl -s {base_url}/v1/messages -H 'Authorization: Bearer {raw_key}'" in output
        assert "Running upgrade" in output  # migration progress
        assert "the API, an SMS worker and an events worker" in output
        # Lines for a person, and the banner stays the last thing on the screen while idle
        # (no routine cron or health lines after it; a sweep runs every 5 s).
        assert not [line for line in output.splitlines() if line.startswith("{")]
        time.sleep(6)
        after_banner = log.read_text().split("    export DATABASE_URL=", 1)[1].splitlines()[1:]
        # (this test's own readiness probe may land just after it)
        assert [line for line in after_banner if line and "GET /healthz" not in line] == []
        assert (data_dir / "dev-api-url").read_text() == f"{base_url}\n"

        api_and_worker = children_of(dev.pid)
        postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        redis = int((data_dir / "redis" / "redis.pid").read_text())
        servers = [postmaster, *children_of(postmaster), redis]
        # The API, the SMS worker and the events worker.
        assert len(api_and_worker) == 3 and all(map(alive, servers))

        # The key and the API's URL (not on port 8000) are found in DEV_DATA_DIR, as a
        # developer's `smsgate send` would find them.
        sent = run_smsgate(
            "send", "--to", "(415) 555-0123", "--body", "Hello from the dev test", "--wait",
            env=clean_env(DEV_DATA_DIR=str(data_dir)),
        )  # fmt: skip

        assert sent.returncode == 0, sent.stderr + log.read_text()
        message = json.loads(sent.stdout)
        assert message["status"] == "delivered"
        assert (message["from"], message["provider"]) == ("+14155550100", "fake")
        assert [event["status"] for event in message["history"]] == [
            "queued",
            "sending",
            "sent",
            "delivered",
        ]

        dev.send_signal(signal.SIGINT)
        assert dev.wait(60) == 0, log.read_text()
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait(10)

    assert "Stopped." in log.read_text()
    assert not (data_dir / "dev-api-url").exists()  # no stale URL for the next `send`
    left = [pid for pid in [*api_and_worker, *servers] if alive(pid)]
    assert left == [], log.read_text()
    assert processes_using(data_dir) == []
    print(f"dev mode test: {time.monotonic() - started:.1f} s")  # noqa: T201


def test_dev_reuses_its_data_and_key_and_uses_urls_from_the_environment(
    data_dir: Path, tmp_path: Path
) -> None:
    """With DATABASE_URL and REDIS_URL pointing at servers that already run, dev uses those (the
    same path, other URLs), keeps the API key it made, and leaves the servers running."""
    services = run_smsgate("services", "start", "--data", str(data_dir), env=clean_env())
    assert services.returncode == 0, services.stderr
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in services.stdout.splitlines()
    )
    urls = {name: value.strip("'") for name, value in exports.items()}
    key_dir = tmp_path / "dev-data"
    key_dir.mkdir()
    (key_dir / "dev-api-key").write_text("sk_not_a_key_we_know\n")
    port = free_port()
    log = tmp_path / "dev.log"
    env = clean_env(
        DEV_DATA_DIR=str(key_dir), DATABASE_URL=urls["DATABASE_URL"], REDIS_URL=urls["REDIS_URL"]
    )
    first_key = ""
    for run in range(2):
        dev = start_smsgate("dev", "--port", str(port), env=env, log=log)
        try:
            wait_http_ok(f"http://127.0.0.1:{port}/healthz", dev, log, timeout=60)
            key = (key_dir / "dev-api-key").read_text().strip()
            assert key.startswith("sk_")
            if run == 0:
                first_key = key
            else:
                assert key == first_key  # kept, not replaced on every start
            dev.send_signal(signal.SIGTERM)
            assert dev.wait(60) == 0, log.read_text()
        finally:
            if dev.poll() is None:
                dev.kill()
                dev.wait(10)

    output = log.read_text()
    assert "PostgreSQL: DATABASE_URL" in output and "Redis: REDIS_URL" in output
    assert output.count("Created the development sender") == 1
    assert not (key_dir / "postgres").exists()  # nothing embedded was started for it
    # The servers it did not start are still running.
    postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    assert alive(postmaster)
    stopped = run_smsgate("services", "stop", "--data", str(data_dir), env=clean_env())
    assert stopped.stderr == "Redis: stopped\nPostgreSQL: stopped\n"
    assert not alive(postmaster)


def test_dev_reports_an_unreachable_database_and_exits(tmp_path: Path) -> None:
    env = clean_env(
        DEV_DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/smsgate",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
    )

    result = run_smsgate("dev", "--port", str(free_port()), env=env)

    assert result.returncode == 1
    assert "Connect call failed" in result.stderr or "refused" in result.stderr
    assert result.stdout.endswith("Stopped after an error.\n")
