"""The console's request dependencies: the signed-in operator, and the CSRF check of forms."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Form, Request

from app.console.sessions import COOKIE, Operator, signed_in, tokens_match
from app.web.deps import SessionDep, SessionFactoryDep


class SignInRequired(Exception):
    """No valid session: the browser is sent to the sign-in page (then back to `path`)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class CsrfRejected(Exception):
    """A form without the session's CSRF token: a 403 page, and nothing was done."""


def _signed_in_or_away(request: Request, operator: Operator | None) -> Operator:
    if operator is None:
        raise SignInRequired(request.url.path)
    return operator


async def require_operator(request: Request, session: SessionDep) -> Operator:
    """The signed-in operator, or `SignInRequired`."""
    return _signed_in_or_away(request, await signed_in(session, request.cookies.get(COOKIE)))


OperatorDep = Annotated[Operator, Depends(require_operator)]


async def operator_without_transaction(request: Request, sessions: SessionFactoryDep) -> Operator:
    """The signed-in operator, looked up in a transaction of its own that ends here: for a page
    that then reads Redis (no network call may run while a transaction is open)."""
    async with sessions.begin() as session:
        operator = await signed_in(session, request.cookies.get(COOKIE))
    return _signed_in_or_away(request, operator)


QuietOperatorDep = Annotated[Operator, Depends(operator_without_transaction)]


async def require_csrf(
    operator: OperatorDep, csrf_token: Annotated[str | None, Form()] = None
) -> Operator:
    """The signed-in operator of a form whose hidden `csrf_token` is the session's, or
    `CsrfRejected`."""
    if not tokens_match(operator.csrf_token, csrf_token):
        raise CsrfRejected
    return operator


CsrfOperatorDep = Annotated[Operator, Depends(require_csrf)]


def is_https(request: Request, public_base_url: str) -> bool:
    """Whether the browser reached us over https: the request's scheme (uvicorn applies
    `X-Forwarded-Proto` from trusted proxies) or an https `PUBLIC_BASE_URL`."""
    return request.url.scheme == "https" or public_base_url.startswith("https://")
