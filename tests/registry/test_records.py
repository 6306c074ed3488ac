"""registry/records.py: the one codec between typed records and Redis hashes / JSON (no Redis needed)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from registry.errors import RecordError
from registry.records import (
    KEY,
    ChangeEvent,
    CompartmentRecord,
    CompartmentStatus,
    RouterRecord,
    StoredFile,
    Tombstone,
    from_hash,
    from_json,
    to_hash,
    to_json,
)

RECORD = CompartmentRecord(
    compartment_id="shoes@v2",
    source="shoes",
    version=2,
    status=CompartmentStatus.ACTIVE,
    fingerprint="fp",
    lineage={"topic": "t", "offsets": {"0": 5}},
    created_at=1.5,
    updated_at=2.25,
    artifact_uri="file:///a/shoes@v2",
    sha256={"b.safetensors": "bb", "a.json": "aa"},
    prior=0.1,
    class_counts=(3, 0, 4),
    n_samples=7,
    train_metrics={"steps": 10, "final_loss": 0.5},
    retired_reason="",
)


def as_redis_reply(h: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in h.items()}


def test_compartment_hash_format_is_stable() -> None:
    """What is already stored in Redis must stay readable: pin the encoding field by field."""
    assert to_hash(RECORD) == {
        "source": "shoes",
        "version": "2",
        "status": "active",
        "fingerprint": "fp",
        "lineage": '{"offsets": {"0": 5}, "topic": "t"}',
        "created_at": "1.5",
        "updated_at": "2.25",
        "artifact_uri": "file:///a/shoes@v2",
        "sha256": '{"a.json": "aa", "b.safetensors": "bb"}',
        "prior": "0.1",
        "class_counts": "[3, 0, 4]",
        "n_samples": "7",
        "train_metrics": '{"final_loss": 0.5, "steps": 10}',
        "retired_reason": "",
        "files": "{}",  # uploaded files (added with the object store; absent in older records: see below)
    }  # the id is the key, not a field


@pytest.mark.parametrize(
    ("record", "keys"),
    [
        (RECORD, {"compartment_id": "shoes@v2"}),
        (RouterRecord("r1", "file:///r", {"w": "00"}, ("a@v1", "b@v3"), 4, {"accuracy": 0.9}, 3.0), {}),
        (ChangeEvent("17-0", 3, "activated", "shoes@v2", "shoes", 9.5, {"replaced": None}), {"stream_id": "17-0"}),
        (ChangeEvent("18-0", 4, "router", None, None, 9.75, {}), {"stream_id": "18-0"}),
        (Tombstone("shoes", 12.5, 7, "req-1", {"t:0": 41}, ("ab" * 32,), ("shoes@v1",)), {"source": "shoes"}),
        (
            dataclasses.replace(RECORD, files={"unet/w.safetensors": StoredFile("s3://b/w", "bb", 3)}),
            {"compartment_id": "shoes@v2"},
        ),
    ],
)
def test_hash_round_trip(record: Any, keys: dict[str, str]) -> None:
    h = to_hash(record)
    assert all(isinstance(v, str) for v in h.values())
    assert not set(keys) & set(h)
    assert from_hash(type(record), as_redis_reply(h), **keys) == record
    flat = [x for kv in as_redis_reply(h).items() for x in kv]  # HGETALL inside Lua replies with a flat list
    assert from_hash(type(record), flat, **keys) == record


def test_json_round_trip_keeps_json_types() -> None:
    tomb = Tombstone("bags", 12.5, 7, "gdpr-1", {"t:0": 41}, ("ab" * 32,), ("bags@v1", "bags@v2"))
    doc = json.loads(to_json(tomb))
    assert doc == {
        "source": "bags",
        "forgotten_at": 12.5,
        "epoch": 7,
        "request_id": "gdpr-1",
        "through": {"t:0": 41},
        "files_sha256": ["ab" * 32],
        "compartment_ids": ["bags@v1", "bags@v2"],
    }
    assert from_json(Tombstone, to_json(tomb).encode()) == tomb


def test_missing_fields_take_defaults_and_required_ones_are_named() -> None:
    minimal = {"source": "shoes", "version": "1", "status": "training"}
    record = from_hash(CompartmentRecord, minimal, compartment_id="shoes@v1")
    assert (record.fingerprint, record.lineage, record.created_at, record.class_counts) == ("", {}, 0.0, ())
    assert from_hash(RouterRecord, {"router_id": "r", "artifact_uri": "/r"}) == RouterRecord("r", "/r")
    with pytest.raises(RecordError, match="'status'"):
        from_hash(CompartmentRecord, {"source": "shoes", "version": "1"}, compartment_id="shoes@v1")
    with pytest.raises(RecordError, match="'epoch'"):
        from_json(Tombstone, json.dumps({"source": "s", "forgotten_at": 1.0, "request_id": "r"}))


def test_malformed_values_are_named() -> None:
    h = to_hash(RECORD) | {"status": "dormant"}
    with pytest.raises(RecordError, match=r"CompartmentRecord\.status = 'dormant'"):
        from_hash(CompartmentRecord, h, compartment_id="shoes@v2")
    with pytest.raises(RecordError, match=r"CompartmentRecord\.version"):
        from_hash(CompartmentRecord, to_hash(RECORD) | {"version": "two"}, compartment_id="shoes@v2")


@dataclass(frozen=True)
class Extended:
    """A record type the codec has never seen: its field types alone define the encoding."""

    name: str = field(metadata=KEY)
    count: int
    ratio: float
    status: CompartmentStatus
    note: str | None
    ids: tuple[str, ...]
    sizes: tuple[int, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    added_later: float = 0.5  # a new field: one line here, nothing else to edit


def test_a_new_record_or_field_needs_no_codec_code() -> None:
    value = Extended("x", 3, 0.25, CompartmentStatus.RETIRED, None, ("a",), (1, 2), {"k": [1]}, 2.0)
    h = to_hash(value)
    assert h["added_later"] == "2.0" and h["note"] == "" and "name" not in h
    assert from_hash(Extended, h, name="x") == value
    old = {k: v for k, v in h.items() if k != "added_later"}  # written before the field existed
    assert from_hash(Extended, old, name="x") == dataclasses.replace(value, added_later=0.5)
    assert from_json(Extended, to_json(value)) == value


def test_unsupported_field_type_is_refused_by_name() -> None:
    @dataclass(frozen=True)
    class Bad:
        items: list[int]

    with pytest.raises(TypeError, match="list"):
        to_hash(Bad([1]))


def test_files_map_round_trips_and_malformed_ones_are_named() -> None:
    files = {
        "manifest.json": StoredFile("s3://b/p/compartments/shoes@v2/manifest.json", "a" * 64, 120),
        "unet/w.safetensors": StoredFile("s3://b/p/compartments/shoes@v2/unet/w.safetensors", "b" * 64, 4096),
    }
    record = dataclasses.replace(RECORD, files=files)
    h = to_hash(record)
    stored = json.loads(h["files"])["manifest.json"]
    assert stored == {"uri": files["manifest.json"].uri, "sha256": "a" * 64, "size": 120}
    assert from_hash(CompartmentRecord, as_redis_reply(h), compartment_id="shoes@v2") == record
    assert from_json(CompartmentRecord, to_json(record)) == record
    router = RouterRecord("r", "s3://b/p/routers/r", files=files)
    assert from_hash(RouterRecord, to_hash(router)) == router
    assert from_hash(CompartmentRecord, to_hash(RECORD), compartment_id="shoes@v2").files == {}  # written before
    for bad in (
        '["manifest.json"]',
        '{"m": {"uri": "u", "sha256": "s"}}',
        '{"m": {"uri": "u", "sha256": "s", "size": "12"}}',
        '{"m": {"uri": "u", "sha256": "s", "size": true}}',
        '{"m": {"uri": "u", "sha256": "s", "size": 1, "extra": 0}}',
        "{not json",
    ):
        with pytest.raises(RecordError, match=r"CompartmentRecord\.files"):
            from_hash(CompartmentRecord, h | {"files": bad}, compartment_id="shoes@v2")


def test_json_of_the_wrong_shape_is_a_record_error() -> None:
    """Valid JSON of another type (a number for a list, a list for a map) is named like any malformed value."""
    for name, bad in (("class_counts", "5"), ("class_counts", '{"a": 1}'), ("sha256", "[1, 2]"), ("lineage", "3")):
        with pytest.raises(RecordError, match=rf"CompartmentRecord\.{name}"):
            from_hash(CompartmentRecord, to_hash(RECORD) | {name: bad}, compartment_id="shoes@v2")


def test_tombstone_round_trip() -> None:
    tomb = Tombstone("shoes", 1_700_000_000.5, 7, "req-1", {"cdm.sources:0": 41}, ("a" * 64, "b" * 64))
    h = to_hash(tomb)
    assert "source" not in h and json.loads(h["files_sha256"]) == ["a" * 64, "b" * 64]
    assert json.loads(h["through"]) == {"cdm.sources:0": 41}
    assert from_hash(Tombstone, as_redis_reply(h), source="shoes") == tomb
    with pytest.raises(RecordError, match="'forgotten_at'"):
        from_hash(Tombstone, {"epoch": "1"}, source="shoes")
