"""Sections not built yet: each answers a page saying so (replaced section by section)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.console.deps import OperatorDep
from app.console.templating import NAV, render

router = APIRouter()

_TITLES = {name: title for name, title, _ in NAV}


def _placeholder(name: str) -> None:
    async def page(request: Request, operator: OperatorDep) -> HTMLResponse:
        return render(
            request, "placeholder.html", operator=operator, section=name, title=_TITLES[name]
        )

    page.__doc__ = f"The {_TITLES[name]} section (not built yet)."
    router.add_api_route(f"/{name}", page, methods=["GET"], name=f"console_{name}")


for _name in ("overview", "conversations", "consent", "senders", "events"):
    _placeholder(_name)
