"""Config sections on pydantic v2: frozen, typed, range-checked, unknown keys refused by name.

A section is a class decorated with ``@section("train", error=ConfigError)``: a frozen pydantic dataclass
(``extra="forbid"``, strict types: no ``"5"`` for 5, no ``true`` for 1; ints are accepted for floats; NaN and
infinities are refused) whose fields carry their ranges as ``Annotated[int, Field(ge=1)]``, and whose cross-field
rules are ``@model_validator(mode="after")`` methods raising ``ValueError`` with a message that names the keys.
Constructing one (directly, through ``dataclasses.replace`` or ``build``) raises ``error`` with one line per
problem, each naming the key, the value and what is allowed::

    train.steps = -5 must be >= 1
    unknown key(s) in [train]: step; allowed: batch_size, ... (did you mean steps?)
    redis.password = *** must be a string          # secret fields (Field(repr=False)) are never shown

Secret fields are the ones declared ``Field(repr=False)``: masked in ``repr``, in errors and in ``to_dict``;
URLs in other string values are shown without their credentials (``common.redact``).

Pydantic dataclasses rather than ``BaseModel`` because the sections are used as dataclasses everywhere
(``dataclasses.replace``, ``asdict``, ``fields``) and the same rules then hold for every way a section is made.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import functools
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from typing_extensions import dataclass_transform

from common.jsonable import json_safe
from common.redact import MASK, bound, redact_fields, redact_text

T = TypeVar("T")

SECTION_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_ENV_NAME = re.compile(r"CDM_([A-Z0-9_]+?)__([A-Z0-9_]+)")
_VALUE_SHOWN = 200  # characters of a bad value quoted in an error

# where each value came from, for error messages ("from CDM_TRAIN__STEPS"): set by ``build`` for one call
_NO_ORIGINS: Mapping[str, str] = types.MappingProxyType({})
_ORIGINS: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("cdm_origins", default=_NO_ORIGINS)


def _as_tuple(value: Any) -> Any:
    """TOML and JSON give lists; tuple-typed fields keep their strict item checks."""
    return tuple(value) if isinstance(value, list) else value


AsTuple = BeforeValidator(_as_tuple)
"""Annotate tuple fields with it: ``Annotated[tuple[int, ...], AsTuple]`` accepts a TOML array."""


@dataclass_transform(frozen_default=True, field_specifiers=(Field, dataclasses.field))
def section(name: str, *, error: type[Exception]) -> Callable[[type[T]], type[T]]:
    """Class decorator: a frozen, strict pydantic dataclass named ``[name]`` that raises ``error`` when invalid."""

    def wrap(cls: type[T]) -> type[T]:
        made: Any = pydantic_dataclass(frozen=True, config=SECTION_CONFIG)(cls)
        init = made.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise error(describe(exc, made, _ORIGINS.get())) from None

        made.__init__ = __init__
        made.__repr__ = _repr
        made.__section__ = name
        made.__section_error__ = error
        return typing.cast(type[T], made)

    return wrap


def secret_fields(cls: Any) -> frozenset[str]:
    """Fields declared ``Field(repr=False)``."""
    return frozenset(f.name for f in dataclasses.fields(cls) if not f.repr)


def _repr(self: Any) -> str:
    shown = redact_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, secret_fields(self))
    return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def section_name(cls: Any) -> str:
    """The ``[name]`` of a section class or instance."""
    name: str = cls.__section__
    return name


# ------------------------------------------------------------------------------------------ building sections


def build(cls: type[T], table: object, *, origins: Mapping[str, str] | None = None) -> T:
    """Section ``cls`` from a TOML table (``None`` = the defaults); ``origins`` maps keys to where they came from."""
    name = section_name(cls)
    if table is None:
        return cls()
    if not isinstance(table, Mapping):
        error: type[Exception] = getattr(cls, "__section_error__")  # noqa: B009 (set by @section)
        raise error(f"[{name}] must be a table of keys, got {_show(table)}")
    token = _ORIGINS.set(origins or {})
    try:
        return cls(**{str(k): v for k, v in table.items()})
    finally:
        _ORIGINS.reset(token)


def replace(obj: T, **overrides: Any) -> T:
    """``dataclasses.replace`` that ignores ``None`` overrides (CLI flags that were not given); validated again."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(obj, **given) if given else obj  # type: ignore[type-var]


def to_dict(obj: Any, *, redact: bool = False) -> dict[str, Any]:
    """JSON-able dict of a section (tuples become lists); ``redact`` masks secret fields and URL credentials."""
    out = json_safe(dataclasses.asdict(obj))
    assert isinstance(out, dict)
    return redact_fields(out, secret_fields(obj)) if redact else out


# ------------------------------------------------------------------------------------------ error messages

_RULES: Mapping[str, Callable[[Mapping[str, Any]], str]] = {
    "greater_than_equal": lambda c: f"must be >= {c['ge']}",
    "greater_than": lambda c: f"must be > {c['gt']}",
    "less_than_equal": lambda c: f"must be <= {c['le']}",
    "less_than": lambda c: f"must be < {c['lt']}",
    "literal_error": lambda c: f"is not allowed; choose one of {c['expected']}",
    "int_type": lambda c: "must be an integer",
    "int_from_float": lambda c: "must be an integer",
    "float_type": lambda c: "must be a number",
    "finite_number": lambda c: "must be a finite number (not nan or inf)",
    "bool_type": lambda c: "must be true or false",
    "string_type": lambda c: "must be a string",
    "tuple_type": lambda c: "must be a list",
    "list_type": lambda c: "must be a list",
    "string_too_short": lambda c: "must not be empty" if c["min_length"] == 1 else f"needs >= {c['min_length']} chars",
    "string_too_long": lambda c: f"must be at most {c['max_length']} characters long",
    "too_short": lambda c: f"must have at least {c['min_length']} item(s)",
    "too_long": lambda c: f"must have at most {c['max_length']} item(s)",
    "string_pattern_mismatch": lambda c: f"must match {c['pattern']}",
    "multiple_of": lambda c: f"must be a multiple of {c['multiple_of']}",
}


def describe(exc: ValidationError, cls: Any, origins: Mapping[str, str]) -> str:
    """One line per problem of ``exc`` (section ``cls`` failed to validate), each naming the key."""
    name, secrets = section_name(cls), secret_fields(cls)
    errors = exc.errors(include_url=False)
    unknown = sorted(
        str(e["loc"][0]) for e in errors if e["type"] in ("unexpected_keyword_argument", "extra_forbidden") and e["loc"]
    )
    lines = []
    if unknown:
        lines.append(_unknown_keys(name, unknown, sorted(f.name for f in dataclasses.fields(cls)), origins))
    for err in errors:
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            continue
        lines.append(_one(err, name, secrets, origins))
    return "; ".join(dict.fromkeys(lines)) or f"[{name}] is invalid"


def _unknown_keys(name: str, unknown: list[str], allowed: list[str], origins: Mapping[str, str]) -> str:
    shown = ", ".join(f"{k} (from {origins[k]})" if k in origins else k for k in unknown)
    hints = [m for k in unknown for m in difflib.get_close_matches(k, allowed, n=1)]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return f"unknown key(s) in [{name}]: {shown}; allowed: {', '.join(allowed)}{hint}"


def _one(err: Any, name: str, secrets: frozenset[str], origins: Mapping[str, str]) -> str:
    loc = tuple(err["loc"])
    ctx = err.get("ctx") or {}
    if err["type"] in ("value_error", "assertion_error") and not loc:
        return str(ctx.get("error", err["msg"]))  # a cross-field rule: its message names the keys itself
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    where = f"{name}.{key}" if key else name
    top = str(loc[0]) if loc else ""
    value = MASK if top in secrets else _show(err.get("input"))
    origin = f" (from {origins[top]})" if top in origins else ""
    if err["type"] in ("value_error", "assertion_error"):
        rule = str(ctx.get("error", err["msg"]))
    elif err["type"] in ("dataclass_type", "dataclass_args_type", "model_type"):
        return f"[{where}] must be a table of keys, got {value}"
    else:
        rule = _RULES.get(err["type"], lambda c: str(err["msg"]).lower())(ctx)
    return f"{where} = {value}{origin} {rule}"


def _show(value: object) -> str:
    return bound(redact_text(repr(value)), _VALUE_SHOWN)


# ------------------------------------------------------------------------------------------ the environment


def env_tables(
    environ: Mapping[str, str], sections: Mapping[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    """The ``CDM_<SECTION>__<KEY>`` variables of ``environ`` as TOML-like tables, and where each value came from.

    Values are TOML values (``5``, ``0.5``, ``true``, ``[32, 64]``, ``"quoted"``); the value of a string key, and
    any value that is not valid TOML, is taken literally (so a password never needs quoting). An empty value of a
    key that may be unset (``str | None``) unsets it. Variables without ``__`` (``CDM_IMAGE``) are not overrides.

    Returns ``(tables, origins)`` with ``origins[section][key] = "CDM_SECTION__KEY"``.
    Raises ValueError naming the variable for an unknown section or key.
    """
    tables: dict[str, dict[str, Any]] = {}
    origins: dict[str, dict[str, str]] = {}
    for var in sorted(environ):
        match = _ENV_NAME.fullmatch(var)
        if match is None:
            continue
        sec, key = match[1].lower(), match[2].lower()
        cls = sections.get(sec)
        if cls is None:
            raise ValueError(
                f"environment variable {var}: there is no section [{sec}]; sections: {', '.join(sorted(sections))}"
            )
        hints = typing.get_type_hints(cls)
        if key not in hints or key not in {f.name for f in dataclasses.fields(cls)}:
            allowed = sorted(f.name for f in dataclasses.fields(cls))
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean CDM_{match[1]}__{near[0].upper()}?)" if near else ""
            raise ValueError(
                f"environment variable {var}: [{sec}] has no key {key!r}; keys: {', '.join(allowed)}{hint}"
            )
        tables.setdefault(sec, {})[key] = env_value(environ[var], hints[key])
        origins.setdefault(sec, {})[key] = var
    return tables, origins


def env_value(raw: str, tp: Any) -> Any:
    """The value of one override for a field of type ``tp`` (see ``env_tables``)."""
    if raw == "" and _optional(tp):
        return None
    if _textual(tp):
        return raw
    if "\n" in raw or "\r" in raw:
        return raw  # one value only; validation reports the wrong type
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (types.UnionType, typing.Union) else (tp,)


def _optional(tp: Any) -> bool:
    return type(None) in _args(_strip(tp))


def _strip(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def _textual(tp: Any) -> bool:
    """A string, or a choice of strings (Literal), optionally ``| None``."""
    members = [_strip(a) for a in _args(_strip(tp)) if a is not type(None)]
    return bool(members) and all(
        m is str or (typing.get_origin(m) is Literal and all(isinstance(v, str) for v in typing.get_args(m)))
        for m in members
    )


def merge(*docs: Mapping[str, Any]) -> dict[str, Any]:
    """Later documents override earlier ones key by key within each section (a TOML doc of tables)."""
    out: dict[str, Any] = {}
    for doc in docs:
        for sec, table in doc.items():
            if isinstance(table, Mapping) and isinstance(out.get(sec), Mapping):
                out[sec] = {**out[sec], **table}
            else:
                out[sec] = dict(table) if isinstance(table, Mapping) else table
    return out
