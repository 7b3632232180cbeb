"""Errors the API reports, rendered as RFC 9457 `application/problem+json`.

ServiceError                    base: `status`, stable machine-readable `code`, human `title`
├── Unauthorized (401)          missing or unknown API key
├── Forbidden (403)             a valid key without the right (admin endpoints)
├── NotFound (404)              the resource does not exist for this client
├── Conflict (409)              e.g. an Idempotency-Key whose first request is still in flight
├── ValidationFailed (422)      input that parses but breaks a rule; names the field
├── PolicyRefusal (403)         a valid request the service refuses, e.g. recipient opted out
└── Unavailable (503)           a dependency is down; carries Retry-After

Each subclass fixes its status; `code` varies per case. Domain code raises these; one handler in
`app.main` renders them, and `problem_responses()` documents them in OpenAPI.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

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

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
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


class Forbidden(ServiceError):
    """The key is valid but may not do this."""

    status = 403
    title = "Forbidden"


class NotFound(ServiceError):
    """No such resource for this client."""

    status = 404
    title = "Not found"


class Conflict(ServiceError):
    """The request conflicts with one in progress or with current state."""

    status = 409
    title = "Conflict"


class ValidationFailed(ServiceError):
    """Input that breaks a rule; `errors` names each field."""

    status = 422
    title = "Invalid request"

    @classmethod
    def for_field(cls, code: str, field: str, reason: str) -> ValidationFailed:
        """A validation error about one field."""
        return cls(code, f"{field}: {reason}", errors=[FieldError(field=field, reason=reason)])


class PolicyRefusal(ServiceError):
    """A well-formed request the service refuses to carry out (compliance rules)."""

    status = 403
    title = "Refused"


class Unavailable(ServiceError):
    """A dependency the request needs is down; retry later."""

    status = 503
    title = "Service unavailable"


def problem_responses(*errors: type[ServiceError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the given error classes."""
    responses: dict[int | str, dict[str, Any]] = {}
    for error in errors:
        responses[error.status] = {
            "model": Problem,
            "description": error.title,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    return responses
