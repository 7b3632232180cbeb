"""The operator console: server-rendered pages under `/console` for admins (README, "Operator
console"). A capability on top: it reads other capabilities' services; only `app.main` imports
it (`routes.install(app)`).

How a page is added:
1. Its queries in a plain module here (`app/console/<section>.py`): async functions taking the
   request's `AsyncSession` and returning dataclasses; templates never query.
2. Its handlers in `app/console/<section>_pages.py` (not `*_routes.py`: the whole console is a
   layer above the capabilities, and `app.console.routes` is its one module `app.main` mounts):
   an `APIRouter()` whose handlers take
   `operator: OperatorDep` (signed in, or redirected to the sign-in page) and
   `session: SessionDep` (app.web.deps: the request's one transaction), call one function and
   answer `render(request, "<section>.html", operator=operator, ...)` (app.console.templating).
   A POST handler takes `operator: CsrfOperatorDep` instead: its form must carry the hidden
   `{{ csrf_field() }}` (a missing or wrong token is a 403 page, and nothing is done), and it
   answers with a 303 redirect (`see_other`) or a page.
3. Its router added to `_PAGES` in `app/console/routes.py` (the paths are relative to
   `/console`: `@router.get("/consent")`).
4. Its template `app/console/templates/<section>.html`: `{% extends "base.html" %}`, a `title`
   block and a `content` block; the nav entry is already in base.html (`section` names the
   current one). Styles go in `static/console.css` (AA contrast, 360 px wide, visible focus).
5. A browser test in `tests/console/` (the `console` fixtures: a running server, a signed-in
   page, `page_shot(name)` for the screenshots).
"""
