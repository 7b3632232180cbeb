"""A local stand-in for Twilio's Messages API, for the benchmark.

It answers `POST /2010-04-01/Accounts/{AccountSid}/Messages.json` as Twilio documents it (201 and
a Message resource, JSON), optionally after a delay, and remembers when each of our messages
arrived (our id rides in the StatusCallback URL). Status callbacks (`delivered`, signed with
X-Twilio-Signature) are held until the benchmark asks for them (`POST /control/callbacks`), so a
measured window holds only the work being measured.

Plain asyncio with a small HTTP/1.1 parser (keep-alive, Content-Length bodies): a framework's
per-request cost here would be charged to the service and to its baseline alike, but would
shrink the machine both of them share.

Control endpoints (JSON): `GET /control/stats`, `GET /control/receipts`, `POST /control/reset`,
`POST /control/delay?ms=N`, `POST /control/callbacks` (sends every held callback, answers when
done).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx

MESSAGES_SUFFIX = "/Messages.json"
CALLBACK_CONCURRENCY = 16
MAX_HEADER_BYTES = 64 * 1024


@dataclass
class FakeTwilio:
    """What the fake remembers between requests."""

    account_sid: str
    auth_token: str
    delay: float = 0.0
    # (our message id, time.time() on arrival), in arrival order
    receipts: list[tuple[str, float]] = field(default_factory=list)
    # (StatusCallback URL, form) per accepted message, until sent
    held_callbacks: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    callbacks_sent: int = 0
    callbacks_failed: int = 0
    # Across resets: every message id seen, and how many arrived more than once (sent twice).
    seen: set[str] = field(default_factory=set)
    duplicates: int = 0

    async def create_message(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Twilio's CreateMessage: 201 with the new Message resource."""
        if path != f"/2010-04-01/Accounts/{self.account_sid}{MESSAGES_SUFFIX}":
            return 404, {"code": 20404, "message": "The requested resource was not found"}
        to, sender, body = form.get("To"), form.get("From"), form.get("Body")
        if not to or not sender or body is None:
            return 400, {"code": 21604, "message": "A 'To' phone number is required."}
        arrived = time.time()
        if self.delay:
            await asyncio.sleep(self.delay)
        sid = "SM" + secrets.token_hex(16)
        callback = form.get("StatusCallback", "")
        message_id = parse_qs(urlsplit(callback).query).get("message_id", [""])[0]
        self.receipts.append((message_id, arrived))
        if message_id:
            self.duplicates += message_id in self.seen
            self.seen.add(message_id)
        if callback:
            self.held_callbacks.append(
                (
                    callback,
                    {
                        "AccountSid": self.account_sid,
                        "ApiVersion": "2010-04-01",
                        "From": sender,
                        "MessageSid": sid,
                        "MessageStatus": "delivered",
                        "SmsSid": sid,
                        "SmsStatus": "delivered",
                        "To": to,
                    },
                )
            )
        now = formatdate(usegmt=True)
        return 201, {
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": sender,
            "messaging_service_sid": None,
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {"media": f"{path[: -len('.json')]}/{sid}/Media.json"},
            "to": to,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }

    def signature(self, url: str, form: dict[str, str]) -> str:
        """X-Twilio-Signature as Twilio documents it: HMAC-SHA1 of the URL and sorted params."""
        payload = url + "".join(name + form[name] for name in sorted(form))
        digest = hmac.new(self.auth_token.encode(), payload.encode(), hashlib.sha1).digest()
        return base64.b64encode(digest).decode()

    async def send_callbacks(self) -> dict[str, int]:
        """Deliver every held status callback, a few at a time, as Twilio would."""
        held, self.held_callbacks = self.held_callbacks, []
        limit = asyncio.Semaphore(CALLBACK_CONCURRENCY)
        limits = httpx.Limits(max_connections=CALLBACK_CONCURRENCY)
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:

            async def send(url: str, form: dict[str, str]) -> None:
                async with limit:
                    headers = {"X-Twilio-Signature": self.signature(url, form)}
                    for _ in range(3):  # Twilio retries a failed callback too
                        try:
                            response = await client.post(url, data=form, headers=headers)
                        except httpx.TransportError:
                            continue
                        if response.status_code < 300:
                            self.callbacks_sent += 1
                            return
                    self.callbacks_failed += 1

            await asyncio.gather(*(send(url, form) for url, form in held))
        return {"sent": self.callbacks_sent, "failed": self.callbacks_failed}

    def stats(self) -> dict[str, Any]:
        """Submissions so far: how many, how many distinct, first and last arrival."""
        ids = [message_id for message_id, _ in self.receipts]
        return {
            "received": len(ids),
            "distinct": len(set(ids)),
            "first": self.receipts[0][1] if self.receipts else None,
            "last": self.receipts[-1][1] if self.receipts else None,
            "held_callbacks": len(self.held_callbacks),
            "seen": len(self.seen),
            "duplicates": self.duplicates,
        }

    async def control(self, method: str, target: str) -> tuple[int, Any]:
        """The benchmark's own requests."""
        parts = urlsplit(target)
        if parts.path == "/control/stats":
            return 200, self.stats()
        if parts.path == "/control/receipts":
            return 200, self.receipts
        if method == "POST" and parts.path == "/control/reset":
            self.receipts = []
            return 200, {}
        if method == "POST" and parts.path == "/control/delay":
            self.delay = float(dict(parse_qsl(parts.query))["ms"]) / 1000
            return 200, {"delay": self.delay}
        if method == "POST" and parts.path == "/control/callbacks":
            return 200, await self.send_callbacks()
        return 404, {"error": "no such control"}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One keep-alive connection: requests in, responses out, until the client closes."""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if len(head) > MAX_HEADER_BYTES:
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if target.startswith("/control/"):
                    status, payload = await self.control(method, target)
                elif method == "POST" and target.endswith(MESSAGES_SUFFIX):
                    form = dict(parse_qsl(body.decode(), keep_blank_values=True))
                    status, payload = await self.create_message(target, form)
                else:
                    status, payload = 404, {"code": 20404, "message": "not found"}
                data = json.dumps(payload).encode()
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(data)}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
        finally:
            writer.close()


async def serve(port: int, account_sid: str, auth_token: str) -> None:
    """Listen on 127.0.0.1:`port` until killed."""
    fake = FakeTwilio(account_sid=account_sid, auth_token=auth_token)
    server = await asyncio.start_server(fake.handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    """`python -m bench.fake_twilio --port P --account-sid AC... --auth-token T`"""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--account-sid", required=True)
    parser.add_argument("--auth-token", required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.account_sid, args.auth_token))


if __name__ == "__main__":
    main()
