"""What may reach a log line, an error message or a status page: secrets masked, sizes bounded.

* ``redact_url(url)``: ``redis://user:pass@host`` -> ``redis://user:***@host``; a lone userinfo
  (``https://token@host``) and secret query parameters (``?password=...``) become ``***`` too.
* ``redact_text(text)``: every URL inside free text (an exception message, a log line) redacted.
* ``redact_fields(mapping, secrets)``: a config-like mapping with the named secret fields as ``***`` and every
  string value through ``redact_text``.
* ``bound(text, limit)``: at most ``limit`` characters, cut with a marker that gives the original length
  (a 1 MB record key logs about ``limit`` characters, not megabytes).
* ``safe(value, limit)``: ``bound(redact_text(str(value)))``: the one call for a detail of unknown origin.
* ``RedactingFilter``: a logging filter that applies ``safe`` to every record (message, arguments and traceback),
  installed on the handlers of the service commands, so what slips through the call sites is still masked.

Stdlib only: every package (the library, the registry, the services) imports it.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, Final

MASK: Final = "***"
DETAIL_LIMIT: Final = 1000  # characters of one detail (an exception message, a key, a source id) in a log line
LOG_LIMIT: Final = 16_000  # characters of one whole log record (message and traceback)
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s'\"<>()\[\]{},;]+")
_SECRET_PARAMS: Final = frozenset({"password", "passwd", "pass", "secret", "token", "access_token", "key", "auth"})


def redact_url(url: str) -> str:
    """``url`` without its secrets: the password of its userinfo (or a lone userinfo) and secret query values."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an invalid IPv6 literal: mask everything between the scheme and the host
        return re.sub(r"://[^/@]*@", f"://{MASK}@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if sep and user else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = "&".join(f"{k}={MASK if k.lower() in _SECRET_PARAMS else v}" for k, v in pairs)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (cheap when there is none)."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def bound(text: str, limit: int = DETAIL_LIMIT) -> str:
    """At most about ``limit`` characters: longer text is cut and ends with ``…[N chars]`` (N = its length)."""
    if len(text) <= limit:
        return text
    marker = f"…[{len(text)} chars]"
    return text[: max(0, limit - len(marker))] + marker


def safe(value: object, limit: int = DETAIL_LIMIT) -> str:
    """``value`` as text fit for a log line or an error message: URLs redacted, at most ``limit`` characters.

    Bytes are shown by ``repr`` of their first bytes only (a huge key is never decoded or copied whole).
    """
    if isinstance(value, bytes | bytearray | memoryview):
        shown = max(1, limit // 4 - 8)  # a byte's repr takes up to 4 characters
        head = repr(bytes(value[:shown]))
        text = head if len(value) <= shown else f"{head}…[{len(value)} bytes]"
        return redact_text(text)
    text = value if isinstance(value, str) else str(value)
    # bound before redacting (redaction is linear, but a 5 MB string need not be scanned), then again after
    return bound(redact_text(bound(text, limit * 4)), limit)


def redact_fields(values: Mapping[str, Any], secrets: Iterable[str]) -> dict[str, Any]:
    """``values`` with each field named in ``secrets`` shown as ``***`` (when set) and URLs in strings redacted."""
    hidden = frozenset(secrets)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in hidden and value not in (None, ""):
            out[key] = MASK
        elif isinstance(value, str):
            out[key] = redact_text(value)
        else:
            out[key] = value
    return out


class RedactingFilter(logging.Filter):
    """Redacts URLs and bounds the size of every record it sees (message, arguments, traceback).

    Install it on handlers (``install_log_redaction``); a filter on a logger would miss its children's records.
    """

    def __init__(self, limit: int = LOG_LIMIT) -> None:
        super().__init__()
        self.limit = limit
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception as exc:  # a bad format string must not lose the record
            message = f"{record.msg!r} (unformattable log arguments: {type(exc).__name__})"
        record.msg, record.args = safe(message, self.limit), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = safe(record.exc_text, self.limit)
        if record.stack_info:
            record.stack_info = safe(record.stack_info, self.limit)
        return True


def install_log_redaction(logger: logging.Logger | None = None, limit: int = LOG_LIMIT) -> RedactingFilter:
    """Add one ``RedactingFilter`` to every handler of ``logger`` (default: the root logger); returns it."""
    target = logger or logging.getLogger()
    flt = RedactingFilter(limit)
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(flt)
    return flt
