"""The registry's typed records and the one codec between them and Redis hashes or JSON documents.

Every record is a frozen dataclass. Its field types alone define how it is stored, so adding a field is one
edit (the dataclass)::

    str             as is                     int     decimal text
    float           repr (round-trips)        StrEnum its value
    str | None      "" for None               dict    JSON, sorted keys
    tuple[X, ...]   JSON list                 dict[str, D]  JSON object of D's fields (D a flat dataclass)

In JSON documents numbers, lists and objects keep their JSON types. A field declared with
``metadata=KEY`` is not stored in the hash: it is part of the Redis key or the stream entry id and is passed to
``from_hash`` by the caller. A field missing from a stored record takes its dataclass default; a field without a
default must be present (``RecordError`` names it), so the defaults also say which fields a record needs.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from registry.errors import RecordError

R = TypeVar("R")

KEY: Mapping[str, bool] = types.MappingProxyType({"registry_key": True})  # field metadata: not in the hash


class RoutingKind(StrEnum):
    """How samplers compose the active compartments (``ns:routing``; ``cdm.config.RoutingKind`` names the same)."""

    LEARNT = "learnt"  # a router trained on every source (a RouterRecord is needed to serve)
    DENSITY = "density"  # training-free SuperDiff density weights (serves as soon as a compartment is active)
    HEADS = "heads"  # per-source router heads stored in each compartment (serves the compartments that have one)


class CompartmentStatus(StrEnum):
    TRAINING = "training"
    ACTIVE = "active"
    RETIRED = "retired"


@dataclass(frozen=True)
class StoredFile:
    """One uploaded artifact file (field for field ``cdm.artifacts.StoredFile``; the registry does not import cdm)."""

    uri: str  # file:///abs/root/key or s3://bucket/prefix/key, inside the artifact store
    sha256: str  # hex digest of its bytes, verified by readers before anything decodes them
    size: int  # bytes


@dataclass(frozen=True)
class CompartmentRecord:
    """One compartment as stored in ``ns:compartment:{id}``."""

    compartment_id: str = field(metadata=KEY)  # "<source>@v<version>" (the key, not a hash field)
    source: str
    version: int  # 1, 2, ... per source; never reused
    status: CompartmentStatus
    fingerprint: str = ""  # cdm.data.fingerprint of the data it is trained on
    lineage: dict[str, Any] = field(default_factory=dict)  # where the data came from: topic, partitions, offsets
    created_at: float = 0.0  # unix seconds (the registry's clock)
    updated_at: float = 0.0
    artifact_uri: str = ""  # the artifact's prefix URI (file:///.../compartments/<id> or s3://.../compartments/<id>)
    sha256: dict[str, str] = field(default_factory=dict)  # artifact file -> sha256 hex (derived from ``files``)
    prior: float = 0.0  # prior weight of the compartment in the composition
    class_counts: tuple[int, ...] = ()  # samples per class
    n_samples: int = 0
    train_metrics: dict[str, Any] = field(default_factory=dict)  # e.g. final_loss, steps, seconds
    retired_reason: str = ""  # why it was retired ("replaced by x@v2", "forgotten: ...")
    files: dict[str, StoredFile] = field(default_factory=dict)  # relative path -> uploaded file (set on activation)


@dataclass(frozen=True)
class RouterRecord:
    """The active router, stored in ``ns:router``."""

    router_id: str  # unique per trained router
    artifact_uri: str  # the artifact's prefix URI (where config + safetensors + manifest are)
    sha256: dict[str, str] = field(default_factory=dict)  # artifact file -> sha256 hex (derived from ``files``)
    compartment_ids: tuple[str, ...] = ()  # the router's logit order (K outputs)
    trained_at_epoch: int = 0  # registry epoch of the snapshot it was trained on
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. held-out accuracy per noise level
    created_at: float = 0.0
    files: dict[str, StoredFile] = field(default_factory=dict)  # relative path -> uploaded file


@dataclass(frozen=True)
class RegistrySnapshot:
    """The composition at one epoch, read atomically."""

    epoch: int
    compartments: tuple[CompartmentRecord, ...]  # the active ones, sorted by compartment id
    router: RouterRecord | None
    routing: RoutingKind = RoutingKind.LEARNT  # how to compose them (``ns:routing``)

    @property
    def compartment_ids(self) -> tuple[str, ...]:
        return tuple(c.compartment_id for c in self.compartments)

    def by_source(self) -> dict[str, CompartmentRecord]:
        return {c.source: c for c in self.compartments}


@dataclass(frozen=True)
class Tombstone:
    """A forgotten source, stored in ``ns:tombstone:{source}`` and written in the forget transaction.

    Every replica honours it: a source record read from Kafka with a timestamp at or before ``forgotten_at``, or
    at or below the ``through`` offset of its partition, is ignored (and committed); staged data of the source
    from before it is dropped instead of trained; readers purge the ``files_sha256`` from their caches.
    """

    source: str = field(metadata=KEY)  # the key, not a hash field
    forgotten_at: float  # unix seconds (the registry's clock)
    epoch: int  # registry epoch after the forget
    request_id: str  # the forget request that wrote it
    through: dict[str, Any] = field(default_factory=dict)  # "topic:partition" -> last forgotten offset
    files_sha256: tuple[str, ...] = ()  # sha256 of every forgotten artifact file (compartments, routers, data)
    compartment_ids: tuple[str, ...] = ()  # compartments this request retired


@dataclass(frozen=True)
class ChangeEvent:
    """One entry of the change-log stream ``ns:changes``."""

    stream_id: str = field(metadata=KEY)  # "<ms>-<seq>" (the entry id); pass the last one seen to ``changes``
    epoch: int  # registry epoch after this change
    kind: str  # "training", "activated", "retired", "forgotten", "router", "routing"
    compartment_id: str | None = None
    source: str | None = None
    at: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DaemonInfo:
    """A live daemon (its heartbeat key exists)."""

    daemon_id: str
    info: dict[str, Any]  # what it reported (host, pid, version, current work, ...)
    ttl_s: float  # seconds until the heartbeat expires unless refreshed


# --------------------------------------------------------------------------------------------- codec


def text(value: Any) -> str:
    """A Redis reply value (bytes or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def routing_kind(raw: Any) -> RoutingKind:
    """The stored ``ns:routing`` value (bytes, str, or None / "" when unset = learnt) as a RoutingKind."""
    value = text(raw) if raw is not None else ""
    if not value:
        return RoutingKind.LEARNT
    try:
        kind: RoutingKind = _codec(RoutingKind).from_text(value)
        return kind
    except ValueError as exc:
        allowed = [k.value for k in RoutingKind]
        raise RecordError(f"stored routing kind {value!r} is not one of {allowed}") from exc


def decode_hash(raw: Any) -> dict[str, str]:
    """HGETALL reply (dict, or flat list from Lua) with bytes or str -> dict[str, str]."""
    if isinstance(raw, Mapping):
        return {text(k): text(v) for k, v in raw.items()}
    items = list(raw or [])
    return {text(items[i]): text(items[i + 1]) for i in range(0, len(items), 2)}


@dataclass(frozen=True)
class _Codec:
    """How one field type is written to a hash (text) and to a JSON document, and read back."""

    to_text: Callable[[Any], str]
    from_text: Callable[[str], Any]
    to_json: Callable[[Any], Any]
    from_json: Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


def _dict_text(value: Any) -> str:
    return json.dumps(dict(value), sort_keys=True)


def _json_object(raw: str) -> dict[str, Any]:
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
    return doc


def _json_list(raw: str) -> list[Any]:
    doc = json.loads(raw)
    if not isinstance(doc, list):
        raise ValueError(f"expected a JSON list, got {type(doc).__name__}")
    return doc


def _codec(tp: Any) -> _Codec:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is str:
        return _Codec(str, str, str, str)
    if tp is int:
        return _Codec(lambda v: str(int(v)), int, int, int)
    if tp is float:
        return _Codec(lambda v: repr(float(v)), float, float, float)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _Codec(lambda v: str(tp(v).value), tp, lambda v: tp(v).value, tp)
    if origin in (types.UnionType, typing.Union) and set(args) == {str, type(None)}:
        return _Codec(lambda v: v or "", lambda s: s or None, _same, _same)
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return _record_map_codec(args[1])
    if origin is dict:
        return _Codec(_dict_text, _json_object, dict, dict)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in (str, int, float):
        item: Callable[[Any], Any] = args[0]
        return _Codec(
            lambda v: json.dumps([item(x) for x in v]),
            lambda s: tuple(item(x) for x in _json_list(s)),
            lambda v: [item(x) for x in v],
            lambda v: tuple(item(x) for x in v),
        )
    raise TypeError(f"no registry codec for field type {tp!r}; use str, int, float, StrEnum, dict or tuple[X, ...]")


def _record_map_codec(item: Any) -> _Codec:
    """``dict[str, D]`` for a flat dataclass D of str/int/float fields: a JSON object of JSON objects."""
    names = {f.name: typing.get_type_hints(item)[f.name] for f in dataclasses.fields(item)}

    def dump(value: Any) -> dict[str, dict[str, Any]]:
        return {str(k): {n: getattr(v, n) for n in names} for k, v in dict(value).items()}

    def load(doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise ValueError(f"expected a JSON object of {item.__name__} objects, got {type(doc).__name__}")
        out = {}
        for key, fields in doc.items():
            if not isinstance(fields, dict) or set(fields) != set(names):
                raise ValueError(f"{key!r}: expected an object with exactly the fields {sorted(names)}")
            for n, tp in names.items():  # bool is an int in Python, never a valid size
                if not isinstance(fields[n], tp) or isinstance(fields[n], bool):
                    raise ValueError(f"{key!r}: {n} = {fields[n]!r} is not a {tp.__name__}")
            out[key] = item(**fields)
        return out

    return _Codec(lambda v: json.dumps(dump(v), sort_keys=True), lambda s: load(json.loads(s)), dump, load)


@dataclass(frozen=True)
class _Field:
    name: str
    codec: _Codec
    stored: bool  # False for KEY fields
    has_default: bool


_FIELDS: dict[type, tuple[_Field, ...]] = {}  # per record class, derived once


def _field_codecs(cls: type) -> tuple[_Field, ...]:
    """Each field of the record class ``cls`` with its text/JSON codec (derived from its type hints, cached)."""
    if cls in _FIELDS:
        return _FIELDS[cls]
    hints = typing.get_type_hints(cls)
    _FIELDS[cls] = tuple(
        _Field(
            name=f.name,
            codec=_codec(hints[f.name]),
            stored=not f.metadata.get("registry_key", False),
            has_default=f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )
    return _FIELDS[cls]


def to_hash(record: Any) -> dict[str, str]:
    """The Redis hash of ``record`` (every field except the ``KEY`` ones)."""
    return {f.name: f.codec.to_text(getattr(record, f.name)) for f in _field_codecs(type(record)) if f.stored}


def from_hash(cls: type[R], raw: Any, **key_fields: Any) -> R:
    """``cls`` from a hash reply (dict or flat list, bytes or str); ``key_fields`` gives the ``KEY`` fields."""
    h = decode_hash(raw)
    kwargs: dict[str, Any] = {}
    for f in _field_codecs(cls):
        if not f.stored:
            kwargs[f.name] = key_fields[f.name]
        elif f.name in h:
            try:
                kwargs[f.name] = f.codec.from_text(h[f.name])
            except (ValueError, TypeError) as exc:  # JSON of the wrong shape raises either
                raise RecordError(f"{cls.__name__}.{f.name} = {h[f.name]!r} cannot be decoded: {exc}") from exc
        elif not f.has_default:
            raise RecordError(f"stored {cls.__name__} {key_fields or ''} lacks the field {f.name!r}")
    return cls(**kwargs)


def to_json(record: Any) -> str:
    """``record`` as a JSON object (sorted keys) with JSON-typed values."""
    return json.dumps(
        {f.name: f.codec.to_json(getattr(record, f.name)) for f in _field_codecs(type(record))}, sort_keys=True
    )


def from_json(cls: type[R], raw: str | bytes) -> R:
    """``cls`` from ``to_json``'s output."""
    doc = json.loads(raw)
    kwargs: dict[str, Any] = {}
    for f in _field_codecs(cls):
        if f.name in doc:
            kwargs[f.name] = f.codec.from_json(doc[f.name])
        elif not f.has_default:
            raise RecordError(f"stored {cls.__name__} JSON lacks the field {f.name!r}")
    return cls(**kwargs)
