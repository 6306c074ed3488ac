"""Helpers every package may import (stdlib and pydantic only, no first-party imports).

jsonable.py  json_safe: nested values as plain JSON types
names.py     the one source-name rule (wire, spool, artifact keys, registry, ACLs, offline store)
redact.py    URLs without credentials, secret fields masked, details bounded: for logs, errors, status pages
settings.py  config sections on pydantic v2 (frozen, strict, range-checked), their error messages, env overrides
"""
