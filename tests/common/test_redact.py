"""common/redact.py: URLs without credentials, secret fields masked, details and log lines bounded."""

from __future__ import annotations

import io
import logging

import pytest

from common.redact import (
    MASK,
    RedactingFilter,
    bound,
    install_log_redaction,
    redact_fields,
    redact_text,
    redact_url,
    safe,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:pass@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:pass@host:6379/0", "redis://***@host:6379/0"),
        ("rediss://default:p%40ss@r.svc:6380/1", "rediss://default:***@r.svc:6380/1"),
        ("https://ghp_token@github.example/x", "https://***@github.example/x"),
        ("redis://host:6379/0?password=pw&db=2", "redis://host:6379/0?password=***&db=2"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("http://u:p@[::1", "http://***@[::1"),  # urlsplit refuses it: still masked
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_text_finds_every_url() -> None:
    text = "Error 111 connecting to redis://cdm:hunter2@10.0.0.1:6379/0. also 'rediss://a:b@c:1/2', fine http://x/y"
    out = redact_text(text)
    assert "hunter2" not in out and ":b@" not in out
    assert "redis://cdm:***@10.0.0.1:6379/0." in out and "'rediss://a:***@c:1/2'" in out and "http://x/y" in out
    assert redact_text("no url here") == "no url here"


def test_bound_and_safe_cut_with_the_original_length() -> None:
    assert bound("short", 10) == "short"
    cut = bound("k" * 1_000_000, 100)
    assert len(cut) == 100 and cut.endswith("…[1000000 chars]")
    key = b"\xff" * 1_000_000  # a 1 MB record key
    shown = safe(key, 200)
    assert len(shown) < 300 and shown.endswith("…[1000000 bytes]")
    assert len(safe("x" * 5_000_000)) <= 1000
    assert safe(ValueError("redis://u:pw@h/0 down")) == "redis://u:***@h/0 down"


def test_redact_fields() -> None:
    values = {"password": "pw", "url": "redis://u:pw@h/0", "token": None, "n": 3}
    assert redact_fields(values, {"password", "token"}) == {
        "password": MASK,
        "url": "redis://u:***@h/0",
        "token": None,
        "n": 3,
    }


def test_the_log_filter_redacts_and_bounds_every_record() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("test-redact")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        install_log_redaction(logger, limit=2000)
        install_log_redaction(logger, limit=2000)  # idempotent
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        logger.warning("connecting to %s", "redis://cdm:hunter2@h:1/0")
        logger.warning("bad key %r", b"k" * 1_000_000)
        try:
            raise ConnectionError("cannot reach rediss://cdm:hunter2@h:1/0")
        except ConnectionError:
            logger.exception("failed")
        logger.warning("unformattable %d", "x")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "hunter2" not in text
    assert "redis://cdm:***@h:1/0" in text and "rediss://cdm:***@h:1/0" in text
    assert len(text) < 8000  # a 1 MB key logs about 2 KB, not megabytes
    assert "unformattable" in text
