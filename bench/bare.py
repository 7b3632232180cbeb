"""The accept rate's baseline: a bare FastAPI endpoint that parses the same request model
(`SendMessageRequest`, phone-number validation included) and answers 202, served by uvicorn
exactly as `smsgate serve` serves the service (same options, same logging)."""

from __future__ import annotations

import argparse

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from app.sending.schemas import SendMessageRequest


def create_app() -> FastAPI:
    """One route, no database, no queue."""
    app = FastAPI()

    @app.post("/v1/messages", status_code=202)
    async def send_message(request: SendMessageRequest) -> JSONResponse:
        return JSONResponse({"to": request.to, "status": "queued"}, status_code=202)

    return app


def main() -> None:
    """`python -m bench.bare --port P --workers N`, like `smsgate serve`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    import uvicorn

    from app.kernel.logs import logging_config
    from app.kernel.settings import get_settings
    from app.web.server import uvicorn_options

    settings = get_settings()
    uvicorn.run(
        "bench.bare:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        log_config=logging_config(
            settings.log_level, settings.log_format, redact=not settings.log_message_bodies
        ),
        **uvicorn_options(settings),
    )


if __name__ == "__main__":
    main()
