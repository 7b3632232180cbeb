"""/docs and /redoc render in a real headless Chromium with no network beyond loopback: every
operation and every webhook is on the rendered page. A page that loads its scripts from a CDN,
as FastAPI's default does, stays blank under the same block (the control: the block works).

Needs Debian's `chromium` (or `CHROMIUM=/path`); `./scripts/test` installs it when it can.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from app.main import create_app
from tests.processes import free_port

# Everything but loopback (bypassed by default) goes to a proxy nobody listens on, and no
# name but 127.0.0.1 resolves.
NETWORK_BLOCKED = (
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def chromium() -> str:
    """The browser to drive: $CHROMIUM, else Debian's `chromium` on PATH."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not found:
        pytest.fail("no chromium: `apt-get install chromium` (./scripts/test does it as root)")
    return found


def rendered(url: str) -> str:
    """The page's DOM after its scripts ran (virtual time lets the fetches and rendering end)."""
    result = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",  # tests run as root in CI
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            *NETWORK_BLOCKED,
            "--virtual-time-budget=30000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _serve(app: FastAPI) -> Iterator[str]:
    port = free_port()
    # No lifespan: the docs need neither PostgreSQL nor Redis.
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, lifespan="off", ws="none", log_level="error"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def ours() -> Iterator[str]:
    """Our API's docs, served on a free port."""
    yield from _serve(create_app())


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    """The document the pages render."""
    return create_app().openapi()


def test_swagger_ui_renders_every_operation_and_the_webhooks(
    ours: str, spec: dict[str, Any]
) -> None:
    page = rendered(f"{ours}/docs")

    missing = [path for path in spec["paths"] if f'data-path="{path}"' not in page]
    assert missing == []
    assert "<h2>Webhooks" in page
    hooks = [name for name in spec["webhooks"] if f'data-path="{name}"' not in page]
    assert len(spec["webhooks"]) == 10 and hooks == []


def test_redoc_renders_every_operation_and_the_webhooks(ours: str, spec: dict[str, Any]) -> None:
    page = rendered(f"{ours}/redoc")

    operations = [
        (operation["tags"][0], operation["operationId"])
        for item in [*spec["paths"].values(), *spec["webhooks"].values()]
        for operation in item.values()
    ]
    missing = [op for tag, op in operations if f'id="tag/{tag}/operation/{op}"' not in page]
    assert len(operations) > 40 and missing == []
    # Each webhook is marked as one.
    assert page.count("> Webhook <") == len(spec["webhooks"])


def test_a_page_loading_its_scripts_from_a_cdn_stays_blank_under_the_same_block() -> None:
    default = FastAPI(title="control")  # FastAPI's own /docs: scripts from a CDN

    @default.get("/ping")
    def ping() -> str:
        return "pong"

    for base in _serve(default):
        page = rendered(f"{base}/docs")
        assert 'id="swagger-ui"' in page  # the page itself loaded...
        assert 'data-path="/ping"' not in page  # ...but nothing rendered in it
