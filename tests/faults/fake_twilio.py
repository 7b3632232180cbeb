"""A local stand-in for Twilio's Messages API that records every submission it receives.

Run as its own process: `python -m tests.faults.fake_twilio --port P --auth-token T
--callback-targets http://127.0.0.1:A,http://127.0.0.1:B`. It speaks the parts of the API the
service uses: CreateMessage (`POST .../Messages.json`), ListMessage (`GET .../Messages.json` with
`To`, `From`, `DateSent>`, `PageSize`, `Page`), and signed `StatusCallback`s (`delivered`, sent to
the API processes in turn and retried until one answers 2xx, for up to two minutes).

Faults, set with `POST /_faults` (JSON): probabilities `p500`, `p429`, `p_hang` (hold the
request past the client's read timeout and create nothing), `p_slow_created` (create the message,
then answer only after the client gave up: the classic unknown outcome), `outage_seconds` (every
submission answered 503 for that long), `latency` (seconds before each answer). `GET /_records`
returns every submission and every created message.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import itertools
import random
import time
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

HANG_SECONDS = 4.0  # longer than the suite's provider read timeout
CALLBACK_RETRY_SECONDS = 120.0


class FakeTwilio:
    """State and behaviour of the fake; one per process."""

    def __init__(self, auth_token: str, callback_targets: list[str]) -> None:
        self.auth_token = auth_token
        self.targets = itertools.cycle(callback_targets)
        self.submissions: list[dict[str, Any]] = []
        self.created: dict[str, dict[str, Any]] = {}
        self.faults: dict[str, float] = {}
        self.outage_until = 0.0
        self.callbacks_sent = 0
        self.http = httpx.AsyncClient(timeout=5.0)
        self.tasks: set[asyncio.Task[None]] = set()

    async def create(self, request: Request) -> Response:
        form = {key: str(value) for key, value in (await request.form()).items()}
        callback = form.get("StatusCallback", "")
        message_id = (parse_qs(urlsplit(callback).query).get("message_id") or [""])[0]
        record: dict[str, Any] = {
            "t": time.time(),
            "message_id": message_id,
            "to": form.get("To"),
            "from": form.get("From"),
            "sid": None,
        }
        self.submissions.append(record)
        roll = random.random()
        p500, p429 = self.faults.get("p500", 0.0), self.faults.get("p429", 0.0)
        p_hang, p_slow = self.faults.get("p_hang", 0.0), self.faults.get("p_slow_created", 0.0)
        if time.monotonic() < self.outage_until:
            record["outcome"] = "503"
            return JSONResponse({"code": 20503, "message": "Service unavailable"}, 503)
        if roll < p500:
            record["outcome"] = "500"
            return JSONResponse({"code": 20500, "message": "Internal server error"}, 500)
        roll -= p500
        if roll < p429:
            record["outcome"] = "429"
            return JSONResponse(
                {"code": 20429, "message": "Too many requests"}, 429, headers={"Retry-After": "1"}
            )
        roll -= p429
        if roll < p_hang:
            record["outcome"] = "hang"
            await asyncio.sleep(HANG_SECONDS)
            return JSONResponse({"code": 20500, "message": "too late"}, 500)
        roll -= p_hang
        sid = "SM" + uuid.uuid4().hex
        now = datetime.now(UTC)
        message = {
            "sid": sid,
            "account_sid": request.path_params["account_sid"],
            "api_version": "2010-04-01",
            "to": form.get("To"),
            "from": form.get("From"),
            "body": form.get("Body"),
            "status": "sent",
            "direction": "outbound-api",
            "date_created": format_datetime(now, usegmt=True),
            "date_sent": format_datetime(now, usegmt=True),
            "date_updated": format_datetime(now, usegmt=True),
            "num_segments": "1",
            "num_media": "0",
            "error_code": None,
            "error_message": None,
            "_message_id": message_id,
            "_created": now.timestamp(),
        }
        self.created[sid] = message
        record["sid"] = sid
        task = asyncio.create_task(self._callback(callback, message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if roll < p_slow:
            record["outcome"] = "slow_created"
            await asyncio.sleep(HANG_SECONDS)
        else:
            record["outcome"] = "created"
            await asyncio.sleep(self.faults.get("latency", 0.0))
        body = {key: value for key, value in message.items() if not key.startswith("_")}
        return JSONResponse({**body, "status": "queued"}, 201)

    async def list(self, request: Request) -> Response:
        query = request.query_params
        messages = sorted(self.created.values(), key=lambda m: m["_created"], reverse=True)
        if "To" in query:
            messages = [m for m in messages if m["to"] == query["To"]]
        if "From" in query:
            messages = [m for m in messages if m["from"] == query["From"]]
        if "DateSent>" in query:
            since = datetime.fromisoformat(query["DateSent>"]).replace(tzinfo=UTC).timestamp()
            messages = [m for m in messages if m["_created"] >= since]
        size = int(query.get("PageSize", "50"))
        page = int(query.get("Page", "0"))
        chunk = messages[page * size : (page + 1) * size]
        more = len(messages) > (page + 1) * size
        path = request.url.path
        return JSONResponse(
            {
                "messages": [
                    {key: value for key, value in m.items() if not key.startswith("_")}
                    for m in chunk
                ],
                "page": page,
                "page_size": size,
                "start": page * size,
                "end": page * size + len(chunk) - 1,
                "uri": f"{path}?{request.url.query}",
                "first_page_uri": f"{path}?PageSize={size}&Page=0",
                "previous_page_uri": None,
                "next_page_uri": f"{path}?PageSize={size}&Page={page + 1}&PageToken=PA{page + 1}"
                if more
                else None,
            }
        )

    async def _callback(self, url: str, message: dict[str, Any]) -> None:
        """Report `delivered` like Twilio's StatusCallback, retried until acknowledged."""
        await asyncio.sleep(random.uniform(0.2, 1.0))
        params = {
            "MessageSid": message["sid"],
            "SmsSid": message["sid"],
            "AccountSid": message["account_sid"],
            "MessageStatus": "delivered",
            "To": message["to"],
            "From": message["from"],
            "ApiVersion": "2010-04-01",
        }
        payload = url + "".join(name + params[name] for name in sorted(params))
        signature = base64.b64encode(
            hmac.new(self.auth_token.encode(), payload.encode(), hashlib.sha1).digest()
        ).decode()
        parts = urlsplit(url)
        deadline = time.monotonic() + CALLBACK_RETRY_SECONDS
        while time.monotonic() < deadline:
            target = urlsplit(next(self.targets))
            call = urlunsplit(parts._replace(scheme=target.scheme, netloc=target.netloc))
            try:
                response = await self.http.post(
                    call, data=params, headers={"X-Twilio-Signature": signature}
                )
                if response.is_success:
                    message["status"] = "delivered"
                    self.callbacks_sent += 1
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)

    async def set_faults(self, request: Request) -> Response:
        faults = await request.json()
        outage = float(faults.pop("outage_seconds", 0.0))
        if outage:
            self.outage_until = time.monotonic() + outage
        self.faults.update({key: float(value) for key, value in faults.items()})
        return JSONResponse({"faults": self.faults})

    async def records(self, request: Request) -> Response:
        return JSONResponse(
            {
                "submissions": self.submissions,
                "created": [
                    {"sid": m["sid"], "message_id": m["_message_id"], "status": m["status"]}
                    for m in self.created.values()
                ],
                "callbacks_sent": self.callbacks_sent,
                "callbacks_pending": len(self.tasks),
            }
        )


def build_app(fake: FakeTwilio) -> Starlette:
    """The fake's HTTP routes."""
    path = "/2010-04-01/Accounts/{account_sid}/Messages.json"
    return Starlette(
        routes=[
            Route(path, fake.create, methods=["POST"]),
            Route(path, fake.list, methods=["GET"]),
            Route("/_faults", fake.set_faults, methods=["POST"]),
            Route("/_records", fake.records, methods=["GET"]),
        ]
    )


def main() -> None:
    """Serve until terminated."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--auth-token", required=True)
    parser.add_argument("--callback-targets", required=True)
    args = parser.parse_args()
    fake = FakeTwilio(args.auth_token, args.callback_targets.split(","))
    uvicorn.run(
        build_app(fake), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
