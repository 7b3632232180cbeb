"""Rendering the console's pages: Jinja2 templates from `templates/`, autoescaped."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from markupsafe import Markup

TEMPLATES: Final = Path(__file__).parent / "templates"
STATIC: Final = Path(__file__).parent / "static"

# The sections in the nav, in order: (name, title, path).
NAV: Final = (
    ("overview", "Overview", "/console/overview"),
    ("messages", "Messages", "/console/messages"),
    ("conversations", "Conversations", "/console/conversations"),
    ("consent", "Consent", "/console/consent"),
    ("senders", "Senders", "/console/senders"),
    ("events", "Events", "/console/events"),
)

# Pages hold customers' data: never cached, never framed, scripts only from the console itself.
SECURITY_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

_environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(
    request: Request, template: str, *, status_code: int = 200, **context: Any
) -> HTMLResponse:
    """The page `template` rendered with `context`. Pass `operator=` on signed-in pages: its
    CSRF token fills `csrf_field()` in forms and the nav (with sign-out) is shown."""
    operator = context.pop("operator", None)
    csrf_token = context.pop("csrf_token", None) or getattr(operator, "csrf_token", "")

    def csrf_field() -> Markup:
        return Markup('<input type="hidden" name="csrf_token" value="{}">').format(csrf_token)

    html = _environment.get_template(template).render(
        request=request,
        nav=NAV,
        section=context.pop("section", None),
        operator=operator,
        csrf_field=csrf_field,
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def see_other(path: str) -> RedirectResponse:
    """The answer to a form that did something: the browser GETs `path` next."""
    return RedirectResponse(path, status_code=303, headers=SECURITY_HEADERS)
