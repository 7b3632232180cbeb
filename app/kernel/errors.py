"""Errors the API reports, rendered as RFC 9457 `application/problem+json`.

ServiceError                    base: `status`, stable machine-readable `code`, human `title`
├── Unauthorized (401)          missing or unknown API key
├── Forbidden (403)             a valid key without the right (admin endpoints)
├── NotFound (404)              the resource does not exist for this client
├── Conflict (409)              e.g. an Idempotency-Key whose first request is still in flight
├── ValidationFailed (422)      input that parses but breaks a rule; names the field
├── PolicyRefusal (403)         a valid request the service refuses, e.g. recipient opted out
├── TooManyRequests (429)       over a client's rate limit or quota; carries Retry-After
└── Unavailable (503)           a dependency is down; carries Retry-After

Each subclass fixes its status; `code` varies per case. Domain code raises these; one handler in
`app.main` renders them, and `problem_responses()` documents them in OpenAPI.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from app.kernel.text import storable

PROBLEM_JSON = "application/problem+json"


class FieldError(BaseModel):
    """One invalid input field and why."""

    field: str = Field(examples=["to"])
    reason: str = Field(examples=["not a valid phone number for its region"])


class Problem(BaseModel):
    """RFC 9457 problem details, with our stable `code` and per-field `errors`."""

    type: str = Field(default="about:blank", examples=["about:blank"])
    title: str = Field(examples=["Invalid request"])
    status: int = Field(examples=[422])
    detail: str | None = Field(default=None, examples=["'to' is not a valid phone number"])
    code: str = Field(examples=["validation_error"])
    errors: list[FieldError] | None = None


class ServiceError(Exception):
    """Base of every error the API turns into a problem+json response."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    # A typical (code, detail) pair, shown as the example in the OpenAPI document.
    example: ClassVar[tuple[str, str]] = ("internal_error", "something went wrong")

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # A detail may quote the client's input; it must be storable (an idempotent batch keeps
        # its refused items' problems in the database) and printable.
        detail = storable(detail)
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    def to_problem(self) -> Problem:
        """The response body for this error."""
        return Problem(
            title=self.title,
            status=self.status,
            detail=self.detail,
            code=self.code,
            errors=self.errors,
        )


class Unauthorized(ServiceError):
    """No valid API key."""

    status = 401
    title = "Unauthorized"
    example = ("invalid_api_key", "the API key is unknown or revoked")


class Forbidden(ServiceError):
    """The key is valid but may not do this."""

    status = 403
    title = "Forbidden"
    example = ("admin_key_required", "this endpoint needs an admin API key")


class NotFound(ServiceError):
    """No such resource for this client."""

    status = 404
    title = "Not found"
    example = ("message_not_found", "no message with id 5b0e8f0a-3c2d-4c55-9a51-0c6d2f1c9f10")


class Conflict(ServiceError):
    """The request conflicts with one in progress or with current state."""

    status = 409
    title = "Conflict"
    example = (
        "idempotency_key_in_use",
        "a request with this Idempotency-Key is still being processed; retry shortly",
    )


class ValidationFailed(ServiceError):
    """Input that breaks a rule; `errors` names each field."""

    status = 422
    title = "Invalid request"
    example = ("validation_error", "to: cannot receive SMS: it is a fixed-line number")

    @classmethod
    def for_field(cls, code: str, field: str, reason: str) -> ValidationFailed:
        """A validation error about one field."""
        return cls(code, f"{field}: {reason}", errors=[FieldError(field=field, reason=reason)])

    @classmethod
    def from_pydantic(
        cls, items: Iterable[Mapping[str, Any]], *, request: bool = True, whole: str = "body"
    ) -> ValidationFailed:
        """Pydantic's errors as one `validation_error` naming each field. With `request`, the
        locations start with the part of the request (FastAPI's 'body', 'query', ...), which is
        dropped; an error about the whole input (an empty location) names `whole`."""
        errors = [_field_error(item, request=request, whole=whole) for item in items]
        detail = "; ".join(f"{error.field}: {error.reason}" for error in errors)
        return cls("validation_error", detail, errors=errors)


class PolicyRefusal(ServiceError):
    """A well-formed request the service refuses to carry out (compliance rules)."""

    status = 403
    title = "Refused"
    example = ("recipient_opted_out", "+14155550123 has opted out of messages from +14155550100")


class TooManyRequests(ServiceError):
    """Over the client's rate limit (`rate_limited`) or daily quota (`quota_exceeded`)."""

    status = 429
    title = "Too many requests"
    example = (
        "rate_limited",
        "over your limit of 100 messages per minute; retry after 12 s",
    )


class Unavailable(ServiceError):
    """A dependency the request needs is down; retry later."""

    status = 503
    title = "Service unavailable"
    example = (
        "service_unavailable",
        "the database is unreachable; nothing was stored, retry later",
    )


def _field_error(item: Mapping[str, Any], *, request: bool, whole: str) -> FieldError:
    """One pydantic error as {field, reason}."""
    location = [str(part) for part in item.get("loc", ())]
    if request and location and location[0] in ("body", "query", "path", "header"):
        location = location[1:]
    reason = str(item.get("msg", "invalid")).removeprefix("Value error, ")
    # A location may hold the client's own dict keys (metadata), NUL and lone surrogates included.
    return FieldError(field=storable(".".join(location) or whole), reason=storable(reason))


def problem_responses(*errors: type[ServiceError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the given error classes, one per status code."""
    by_status: dict[int, list[type[ServiceError]]] = {}
    for error in errors:
        by_status.setdefault(error.status, []).append(error)
    responses: dict[int | str, dict[str, Any]] = {}
    for status, classes in by_status.items():
        examples = {
            error.example[0]: {
                "summary": error.title,
                "value": {
                    "type": "about:blank",
                    "title": error.title,
                    "status": status,
                    "code": error.example[0],
                    "detail": error.example[1],
                },
            }
            for error in classes
        }
        responses[status] = {
            "model": Problem,
            "description": " / ".join(error.title for error in classes),
            "content": {PROBLEM_JSON: {"examples": examples}},
        }
    return responses


def problem_json_only(openapi: dict[str, Any]) -> dict[str, Any]:
    """Errors are served as problem+json only: drop the JSON twin FastAPI adds to error responses,
    and describe FastAPI's own request-validation 422 as the Problem our handler renders."""
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for path in openapi.get("paths", {}).values():
        for operation in path.values():
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                json_twin = content.get("application/json", {}).get("schema", {})
                if json_twin.get("$ref", "").endswith("/HTTPValidationError"):
                    content.pop("application/json")
                    content[PROBLEM_JSON] = {
                        "schema": problem_ref,
                        "example": {
                            "type": "about:blank",
                            "title": "Invalid request",
                            "status": 422,
                            "code": "validation_error",
                            "detail": "limit: Input should be less than or equal to 100",
                            "errors": [
                                {
                                    "field": "limit",
                                    "reason": "Input should be less than or equal to 100",
                                }
                            ],
                        },
                    }
                    response["description"] = "Invalid request"
                elif PROBLEM_JSON in content and "application/json" in content:
                    content[PROBLEM_JSON].setdefault(
                        "schema", content.pop("application/json")["schema"]
                    )
    schemas = openapi.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return openapi


# Answers any operation can give before (or beside) its own logic: the HTTP edge (app.web.limits,
# app.web.server), the body parser, and the database's availability.
_EDGE_RESPONSES: dict[int, tuple[str, str, str]] = {
    400: (
        "Bad Request",
        "bad_request",
        "the body cannot be parsed: malformed, not UTF-8, too deeply nested JSON, or a form "
        "over the parser's limits",
    ),
    413: (
        "Content Too Large",
        "request_too_large",
        "the request body is larger than 5242880 bytes",
    ),
    431: (
        "Request Header Fields Too Large",
        "request_header_fields_too_large",
        "the request line and headers are over 16384 bytes",
    ),
    503: (
        "Service unavailable",
        "service_unavailable",
        "the database is unreachable; nothing was stored, retry later",
    ),
}


def document_edge_responses(openapi: dict[str, Any]) -> dict[str, Any]:
    """Add the statuses every operation can answer with to each one's `responses`: 413 and 431
    (the HTTP edge, for any request), 400 (a body that cannot be parsed) where a body is read,
    503 (PostgreSQL unavailable) where the database is used (everywhere but `/healthz`)."""
    for path, item in openapi.get("paths", {}).items():
        for method, operation in item.items():
            statuses = [413, 431]
            if method in ("post", "put", "patch"):
                statuses.append(400)
            if path != "/healthz":
                statuses.append(503)
            responses = operation.setdefault("responses", {})
            for status in statuses:
                if str(status) in responses:
                    continue
                title, code, detail = _EDGE_RESPONSES[status]
                example = {
                    "type": "about:blank",
                    "title": title,
                    "status": status,
                    "code": code,
                    "detail": detail,
                }
                responses[str(status)] = {
                    "description": title,
                    "content": {
                        PROBLEM_JSON: {
                            "schema": {"$ref": "#/components/schemas/Problem"},
                            "example": example,
                        }
                    },
                }
    return openapi
