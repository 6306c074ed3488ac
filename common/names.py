"""The one source-name rule: what the wire accepts is what the spool, the artifact keys, the registry, the ACLs and
the offline store accept.

A source name is 1-64 characters of ``[A-Za-z0-9._-]`` not starting with ``.``: it becomes a file name (spool,
offline store), a key segment (artifact store, Redis) and part of a compartment id ``<source>@v<version>``, so no
hidden or temporary file name, no ``.``/``..``, no ``/``, no ``@``.
"""

from __future__ import annotations

import re
from typing import Final, TypeGuard

SOURCE_NAME_MAX: Final = 64
SOURCE_NAME_PATTERN: Final = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{SOURCE_NAME_MAX - 1}}}")
SOURCE_NAME_RULE: Final = f"1-{SOURCE_NAME_MAX} characters of [A-Za-z0-9._-], not starting with '.'"


def is_source_name(value: object) -> TypeGuard[str]:
    """True when ``value`` is a string that follows the source-name rule."""
    return isinstance(value, str) and SOURCE_NAME_PATTERN.fullmatch(value) is not None


def check_source_name(value: object) -> str:
    """``value`` if it is a source name, else ValueError naming it and the rule (callers re-raise as their own
    error type)."""
    if not is_source_name(value):
        raise ValueError(f"source name {value!r:.100} is not allowed; use {SOURCE_NAME_RULE}")
    return value
