"""The status pages as HTML: Jinja2 templates shipped in the package (api/ui/templates), no build step.

Pages are self-contained (inline CSS, the sample grid as a ``data:`` URI, no script), and every response carries a
Content-Security-Policy that forbids anything else, so a page can never load an asset from elsewhere.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jinja2
from starlette.responses import HTMLResponse

from api.ui.model import Page
from cdm.viz import source_colour_hex

CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: with it Chromium sends "Origin: null" on the sign-in form, which the same-origin check refuses
    "Referrer-Policy": "same-origin",
}


@functools.cache
def environment() -> jinja2.Environment:
    """The templates' environment (built on first use, not at import): HTML autoescaped, undefined names fail."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("api.ui", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=when, ago=ago, duration=duration, number=number, colour=source_colour_hex)
    return env


def html(template: str, status_code: int = 200, headers: dict[str, str] | None = None, **context: Any) -> HTMLResponse:
    """``template`` rendered with ``context`` as an HTML response with the pages' security headers."""
    body = environment().get_template(template).render(**context)
    return HTMLResponse(body, status_code=status_code, headers={**HEADERS, **(headers or {})})


def status_page(page: Page, status_code: int = 200) -> HTMLResponse:
    return html("status.html", status_code, page=page)


# ---------------------------------------------------------------------------------------------- filters


def when(ts: float | None) -> str:
    """Unix seconds as ``2026-01-31 12:00:00 UTC``; "—" for none."""
    if not ts:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def ago(ts: float | None, now: float) -> str:
    """``ts`` relative to ``now``: "12 s ago", "3 min ago", "5 h ago", "2 d ago"."""
    if not ts:
        return "—"
    return duration(max(0.0, now - ts)) + " ago"


def duration(seconds: float | None) -> str:
    """Seconds as "12 s", "3 min 20 s", "2 h 05 min", "3 d 4 h"; "—" for none."""
    if seconds is None:
        return "—"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86_400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86_400} d {s % 86_400 // 3600} h"


def number(value: float | None, digits: int = 4) -> str:
    """A float with ``digits`` significant digits; "—" for none."""
    if value is None:
        return "—"
    return f"{value:.{digits}g}"
