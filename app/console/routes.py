"""The console's routes: sign-in and sign-out, its stylesheet, and every section's router
(`_PAGES`); `install(app)` mounts them all, outside the OpenAPI document."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from app.console import (
    consent_pages,
    conversations_pages,
    events_pages,
    messages_pages,
    overview_pages,
    senders_pages,
)
from app.console.deps import CsrfOperatorDep, CsrfRejected, SignInRequired, is_https
from app.console.sessions import (
    COOKIE,
    SIGN_IN_COOKIE,
    SignInRefused,
    new_token,
    sign_in,
    sign_out,
    tokens_match,
)
from app.console.templating import SECURITY_HEADERS, STATIC, render, see_other
from app.web.deps import SessionDep, SettingsDep

router = APIRouter(prefix="/console", include_in_schema=False)

# Every section's router.
_PAGES = (
    overview_pages.router,
    messages_pages.router,
    conversations_pages.router,
    consent_pages.router,
    senders_pages.router,
    events_pages.router,
)

_HOME = "/console/overview"


def _safe_next(path: str | None) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    if path and path.startswith("/console/") and not path.startswith("/console//"):
        return path
    return _HOME


@router.get("")
@router.get("/")
async def home() -> RedirectResponse:
    """The console opens on its overview."""
    return see_other(_HOME)


@router.get("/static/console.css")
async def stylesheet() -> FileResponse:
    """The console's one stylesheet (no session needed: the sign-in page uses it)."""
    return FileResponse(STATIC / "console.css", media_type="text/css")


@router.get("/sign-in")
async def sign_in_form(
    request: Request, settings: SettingsDep, next: str | None = None
) -> HTMLResponse:
    """The sign-in form: an admin API key."""
    return _sign_in_page(request, settings.public_base_url, next, None, status_code=200)


def _sign_in_page(
    request: Request,
    public_base_url: str,
    next_path: str | None,
    error: str | None,
    *,
    status_code: int,
) -> HTMLResponse:
    token = new_token()
    response = render(
        request,
        "sign_in.html",
        status_code=status_code,
        csrf_token=token,
        next_path=_safe_next(next_path),
        error=error,
    )
    response.set_cookie(
        SIGN_IN_COOKIE,
        token,
        path="/console/sign-in",
        httponly=True,
        samesite="strict",
        secure=is_https(request, public_base_url),
    )
    return response


@router.post("/sign-in")
async def submit_sign_in(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    api_key: Annotated[str, Form()] = "",
    csrf_token: Annotated[str | None, Form()] = None,
    next: Annotated[str | None, Form()] = None,
) -> Response:
    """Exchange an admin API key for a session cookie."""
    if not tokens_match(request.cookies.get(SIGN_IN_COOKIE, ""), csrf_token):
        raise CsrfRejected
    try:
        token, operator = await sign_in(session, api_key, settings.console.session_hours)
    except SignInRefused:
        error = "That key cannot sign in: it is unknown, revoked, expired or not an admin key."
        return _sign_in_page(request, settings.public_base_url, next, error, status_code=401)
    response = see_other(_safe_next(next))
    response.set_cookie(
        COOKIE,
        token,
        expires=operator.expires_at,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=is_https(request, settings.public_base_url),
    )
    response.delete_cookie(SIGN_IN_COOKIE, path="/console/sign-in")
    return response


@router.post("/sign-out")
async def submit_sign_out(
    request: Request, session: SessionDep, operator: CsrfOperatorDep
) -> RedirectResponse:
    """End the session."""
    await sign_out(session, request.cookies.get(COOKIE))
    response = see_other("/console/sign-in")
    response.delete_cookie(COOKIE, path="/console")
    return response


async def _to_sign_in(request: Request, error: Exception) -> Response:
    """No session: to the sign-in page, then back."""
    assert isinstance(error, SignInRequired)
    path = error.path if request.method == "GET" else None
    target = "/console/sign-in" + (f"?next={path}" if path and path != _HOME else "")
    response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(COOKIE, path="/console")
    return response


async def _csrf_rejected(request: Request, _: Exception) -> Response:
    """A form that did not come from a console page of this session: nothing was done."""
    return render(request, "forbidden.html", status_code=403)


def install(app: FastAPI) -> None:
    """Mount the console on `app`. The module's routers are only read here, never changed: an
    app built again in the same process (the tests build hundreds) gets the same routes, not
    its predecessors' twice over."""
    app.include_router(router)
    for page in _PAGES:
        app.include_router(page, prefix="/console", include_in_schema=False)
    app.add_exception_handler(SignInRequired, _to_sign_in)
    app.add_exception_handler(CsrfRejected, _csrf_rejected)
