"""``/ui`` on ``cdm serve``: the status page of the caller's sources, behind the API's bearer tokens.

How a caller gets in:

* a browser: ``GET /ui`` without a token answers 401 with a sign-in form; ``POST /ui/login`` with the token
  (the one used with the API, from ``cdm token create``) checks it and stores it in the cookie ``cdm_ui`` (HttpOnly,
  SameSite=Strict, Path=/ui, Secure over HTTPS, ``COOKIE_MAX_AGE_S``); ``POST /ui/logout`` clears it. The cookie
  is read by ``/ui`` alone: it never authenticates ``/v1`` (so no API call can be forged from another site);
* a script or a reverse proxy: ``Authorization: Bearer <token>`` on ``GET /ui``, as on the API;
* with ``[serve] anonymous_principal`` set, a request without a token sees that principal's sources.

The page shows only the caller's sources: those its grants match (tables, history, receipts) and those it may
sample (the grid). A token that is wrong answers 401 (the form again); when the token cannot be checked because
the registry is down the answer is 503 with an explanation (nothing can be shown without knowing the caller);
once the caller is known, a registry failure leaves a 200 page with an error banner.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Sequence

import redis
from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from api.auth import Authenticator, Principal
from api.errors import ApiError
from api.ui.collect import StatusPage, refresh_of
from api.ui.render import HEADERS, html, status_page
from common.redact import safe
from registry.acl import AccessView

log = logging.getLogger(__name__)

COOKIE = "cdm_ui"
COOKIE_PATH = "/ui"
COOKIE_MAX_AGE_S = 12 * 3600
MAX_TOKEN_CHARS = 512  # a form field longer than any token is refused before it is looked up
MAX_FORM_BYTES = 4096  # the sign-in form's body


def build_ui_router(page: StatusPage, auth: Authenticator) -> APIRouter:
    """``GET /ui``, ``GET|POST /ui/login``, ``POST /ui/logout`` (not in the OpenAPI schema: they are pages)."""
    router = APIRouter(include_in_schema=False)

    def login_page(message: str = "", status_code: int = 200) -> Response:
        return html("login.html", status_code, message=message, cookie_hours=COOKIE_MAX_AGE_S // 3600)

    def unavailable(message: str) -> Response:
        return html("unavailable.html", 503, {"Retry-After": "5"}, title="cdm serve", message=message, refresh_s=10)

    @router.get("/ui")
    def ui(request: Request) -> Response:
        # 1. who is calling: the Authorization header, else the sign-in cookie, else anonymous (if allowed)
        header = request.headers.get("authorization")
        cookie = request.cookies.get(COOKIE)
        from_cookie = header is None and bool(cookie)
        try:
            principal = auth.authenticate(f"Bearer {cookie}" if from_cookie else header)
        except ApiError as exc:
            if exc.status != 401:
                raise
            message = (
                "your saved token is no longer valid (revoked or unknown); sign in with a current one"
                if from_cookie
                else ("" if header is None else exc.message)
            )
            response = login_page(message, 401)
            if from_cookie:
                response.delete_cookie(COOKIE, path=COOKIE_PATH)
            return response
        except redis.RedisError as exc:
            log.error("status page: cannot check a token, the registry is unreachable: %s", exc)
            return unavailable(
                "The status page cannot check your token: the registry (Redis) is unreachable "
                f"({safe(exc, 200)}). Nothing is shown without knowing who is asking; this page retries by itself."
            )
        request.state.principal = principal.name

        # 2. the page, over the caller's sources only
        def access_of(sources: Sequence[str]) -> AccessView:
            return auth.view(principal, sources)

        return status_page(
            page.collect(
                refresh_s=refresh_of(request.query_params.get("refresh")),
                access_of=access_of,
                principal=_shown(principal),
                logout=from_cookie,
                list_daemons=False,
            )
        )

    @router.get("/ui/login")
    def login_form() -> Response:
        return login_page()

    @router.post("/ui/login")
    async def login(request: Request) -> Response:
        if not _same_origin(request):
            return login_page("sign-in refused: the form was sent from another site", 403)
        declared = request.headers.get("content-length", "")
        if not declared.isdigit() or int(declared) > MAX_FORM_BYTES:
            return login_page(f"send the sign-in form (at most {MAX_FORM_BYTES} bytes, with a Content-Length)", 413)
        form = await request.form(max_files=0, max_fields=4)
        try:
            raw = form.get("token")
            token = raw.strip() if isinstance(raw, str) else ""
        finally:
            await form.close()
        if not token or len(token) > MAX_TOKEN_CHARS:
            return login_page("paste your bearer token (cdm token create PRINCIPAL prints one)", 401)
        try:
            auth.authenticate(f"Bearer {token}")
        except ApiError as exc:
            return login_page(exc.message, exc.status)
        except redis.RedisError as exc:
            return unavailable(f"cannot check the token now: the registry (Redis) is unreachable ({safe(exc, 200)})")
        response = RedirectResponse("/ui", status_code=303, headers=HEADERS)
        response.set_cookie(
            COOKIE,
            token,
            max_age=COOKIE_MAX_AGE_S,
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @router.post("/ui/logout")
    def logout() -> Response:
        response = RedirectResponse("/ui/login", status_code=303, headers=HEADERS)
        response.delete_cookie(COOKIE, path=COOKIE_PATH)
        return response

    return router


def _shown(principal: Principal) -> str:
    return f"{principal.name} (anonymous)" if principal.anonymous else principal.name


def _same_origin(request: Request) -> bool:
    """A browser's ``Origin`` (sent with every form POST) names this host; requests without one (curl) pass."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin != "null" and urllib.parse.urlsplit(origin).netloc == host
