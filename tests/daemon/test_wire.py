"""Wire format v1: round trips and every reject reason (pure unit tests, no broker)."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from cdm.data import SourceData, fingerprint, load_digits, npz_bytes, validate_arrays
from daemon.config import MAX_CHUNKS_PER_SOURCE, MIN_MESSAGE_BYTES, DaemonConfig
from daemon.wire import (
    DEFAULT_MAX_CHUNKS,
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_REF_BYTES,
    DLQ_MIN_RECORD_BYTES,
    MAX_SEQ,
    REASONS,
    Chunk,
    ClaimCheck,
    ControlCommand,
    Origin,
    Seal,
    WireError,
    WireMessage,
    decode_control,
    decode_source_message,
    encode_chunk,
    encode_chunk_bytes,
    encode_chunk_ref,
    encode_control,
    encode_dlq,
    encode_seal,
    record_size_bound,
    sha256_hex,
    validate_source_id,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"


def record(
    message: WireMessage, *, topic: str = "cdm.sources", offset: int = 7, headers: list | None = None
) -> ConsumerRecord:
    hdrs = message.headers if headers is None else headers
    return ConsumerRecord(
        topic, 0, 0, offset, 0, 0, message.key, message.value, hdrs, None,
        len(message.key or b""), len(message.value or b""), -1,
    )  # fmt: skip


def with_header(message: WireMessage, name: str, value: bytes | None) -> list[tuple[str, bytes]]:
    """The message's headers with ``name`` replaced (or removed when value is None)."""
    out = [(k, v) for k, v in message.headers if k != name]
    return out if value is None else [*out, (name, value)]


def rejects(reason: str, rec: ConsumerRecord, **kwargs: object) -> WireError:
    with pytest.raises(WireError) as info:
        if rec.topic == "cdm.control":
            decode_control(rec)
        else:
            decode_source_message(rec, **kwargs)  # type: ignore[arg-type]
    assert info.value.reason == reason, info.value
    return info.value


def raw_npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits() -> SourceData:
    return load_digits().subset(np.arange(40))


# ------------------------------------------------------------------------------------------------ round trips


def test_chunk_round_trip(digits: SourceData) -> None:
    msg = encode_chunk("shoes", 3, digits)
    assert msg.key == b"shoes"
    headers = dict(msg.headers)
    assert headers["cdm-version"] == b"1" and headers["cdm-kind"] == b"chunk" and headers["cdm-seq"] == b"3"
    assert headers["cdm-sha256"] == sha256_hex(msg.value or b"").encode()
    got = decode_source_message(record(msg))
    assert isinstance(got, Chunk)
    assert (got.source, got.seq, got.ref) == ("shoes", 3, None)
    assert fingerprint(got.data) == fingerprint(digits)


def test_unlabelled_chunk_round_trip() -> None:
    data = validate_arrays(np.zeros((5, 4, 4, 3), np.uint8), ids=np.arange(100, 105))
    got = decode_source_message(record(encode_chunk("rgb", 0, data)))
    assert isinstance(got, Chunk) and got.data.labels is None and got.data.ids.tolist() == [100, 101, 102, 103, 104]


def test_seal_round_trip() -> None:
    seal = Seal(source="a.b-c_1", chunks=4, fingerprint="ab" * 32, n_samples=100)
    assert decode_source_message(record(encode_seal(seal))) == seal


@pytest.mark.parametrize(
    "command",
    [
        ControlCommand(op="forget-source", source="shoes", request_id="r-1"),
        ControlCommand(op="forget-samples", source="shoes", sample_ids=(3, 17, -1, 2**62)),
        ControlCommand(op="retrain-router"),
    ],
)
def test_control_round_trip(command: ControlCommand) -> None:
    msg = encode_control(command)
    assert decode_control(record(msg, topic="cdm.control")) == command
    assert json.loads(msg.value or b"")["version"] == 1


def test_control_without_headers_is_accepted() -> None:
    msg = encode_control(ControlCommand(op="retrain-router"))
    assert decode_control(record(msg, topic="cdm.control", headers=[])).op == "retrain-router"


def claim(tmp_path: Path, payload: bytes, seq: int = 0, name: str = "c.npz") -> ClaimCheck:
    path = tmp_path / "claims" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return ClaimCheck(uri=path.as_uri(), sha256=sha256_hex(payload), size=len(payload), seq=seq)


def test_chunk_ref_round_trip(tmp_path: Path, digits: SourceData) -> None:
    ref = claim(tmp_path, npz_bytes(digits), seq=2)
    got = decode_source_message(record(encode_chunk_ref("shoes", ref)), claim_check_root=tmp_path / "claims")
    assert isinstance(got, Chunk) and got.ref == ref and got.seq == 2 and got.sha256 == ref.sha256
    assert fingerprint(got.data) == fingerprint(digits)


def test_source_id_validation() -> None:
    for good in ["a", "A-z_0.9", "x" * 64, "a.", "_x", "-x"]:
        assert validate_source_id(good) == good
    for bad in ["", "x" * 65, ".", "..", ".hidden", ".tmp-x", "a/b", "a b", "ü", None, 3]:
        with pytest.raises(WireError) as info:
            validate_source_id(bad)
        assert info.value.reason == "bad-key"


# ------------------------------------------------------------------------------------------------ rejects


def test_bad_version(digits: SourceData) -> None:
    msg = encode_chunk("s", 0, digits)
    rejects("bad-version", record(msg, headers=with_header(msg, "cdm-version", b"2")))
    rejects("bad-version", record(msg, headers=with_header(msg, "cdm-version", None)))
    ctl = encode_control(ControlCommand(op="retrain-router"))
    rejects("bad-version", record(WireMessage(None, b'{"version": 2, "op": "retrain-router"}'), topic="cdm.control"))
    rejects("bad-version", record(ctl, topic="cdm.control", headers=with_header(ctl, "cdm-version", b"0")))


def test_bad_kind(digits: SourceData) -> None:
    msg = encode_chunk("s", 0, digits)
    rejects("bad-kind", record(msg, headers=with_header(msg, "cdm-kind", b"blob")))
    rejects("bad-kind", record(msg, headers=with_header(msg, "cdm-kind", None)))
    ctl = encode_control(ControlCommand(op="retrain-router"))
    rejects("bad-kind", record(ctl, topic="cdm.control", headers=with_header(ctl, "cdm-kind", b"chunk")))
    rejects("bad-kind", record(ctl))  # a control command on the sources topic


@pytest.mark.parametrize("key", [None, b"", b"a/b", b"..", b"x" * 65, b"\xff\xfe"])
def test_bad_key(digits: SourceData, key: bytes | None) -> None:
    msg = encode_chunk("s", 0, digits)
    rejects("bad-key", record(WireMessage(key, msg.value, msg.headers)))


def test_bad_key_in_control() -> None:
    value = b'{"version": 1, "op": "forget-source", "source": "../etc"}'
    rejects("bad-key", record(WireMessage(None, value), topic="cdm.control"))


def test_bad_header(tmp_path: Path, digits: SourceData) -> None:
    msg = encode_chunk("s", 0, digits)
    rejects("bad-header", record(msg, headers=with_header(msg, "cdm-seq", None)))
    rejects("bad-header", record(msg, headers=with_header(msg, "cdm-seq", b"-1")))
    rejects("bad-header", record(msg, headers=with_header(msg, "cdm-seq", b"one")))
    rejects("bad-header", record(msg, headers=with_header(msg, "cdm-sha256", None)))
    rejects("bad-header", record(msg, headers=with_header(msg, "cdm-sha256", b"xyz")))
    rejects("bad-header", record(msg, headers=[*msg.headers, ("cdm-seq", b"0")]))  # repeated
    ref = claim(tmp_path, npz_bytes(digits), seq=1)
    ref_msg = encode_chunk_ref("s", ref)
    rejects("bad-header", record(ref_msg, headers=with_header(ref_msg, "cdm-seq", b"2")), claim_check_root=tmp_path)


def test_oversized(tmp_path: Path, digits: SourceData) -> None:
    msg = encode_chunk("s", 0, digits)
    rejects("oversized", record(msg), max_value_bytes=len(msg.value or b"") - 1)
    assert isinstance(decode_source_message(record(msg), max_value_bytes=len(msg.value or b"")), Chunk)
    # a zip bomb: 64 MiB of zeros compresses to ~64 KiB
    bomb = npz_bytes(validate_arrays(np.zeros((1024, 256, 256), np.uint8)))
    assert len(bomb) < 1 << 20
    rejects("oversized", record(encode_chunk_bytes("s", 0, bomb)), max_decoded_bytes=16 << 20)
    ref = claim(tmp_path, npz_bytes(digits))
    rejects("oversized", record(encode_chunk_ref("s", ref)), claim_check_root=tmp_path, max_ref_bytes=ref.size - 1)


def test_bad_npz() -> None:
    rejects("bad-npz", record(encode_chunk_bytes("s", 0, b"not a zip at all")))
    npy = io.BytesIO()
    np.save(npy, np.zeros((2, 4, 4), np.uint8))
    rejects("bad-npz", record(encode_chunk_bytes("s", 0, npy.getvalue())))
    pickled = io.BytesIO()
    np.savez(pickled, images=np.array([{"x": 1}], dtype=object))
    rejects("bad-npz", record(encode_chunk_bytes("s", 0, pickled.getvalue())))
    rejects("bad-npz", record(encode_chunk_bytes("s", 0, raw_npz(labels=np.zeros(2, np.int64)))))
    extra = raw_npz(images=np.zeros((2, 4, 4), np.uint8), secret=np.zeros(2))
    rejects("bad-npz", record(encode_chunk_bytes("s", 0, extra)))
    truncated = npz_bytes(validate_arrays(np.zeros((2, 4, 4), np.uint8)))[:-30]
    rejects("bad-npz", record(encode_chunk_bytes("s", 0, truncated)))
    seal = encode_seal(Seal("s", 1, "0" * 64, 1))
    rejects("bad-npz", record(WireMessage(b"s", None, [*with_header(seal, "cdm-kind", b"chunk"), ("cdm-seq", b"0")])))


@pytest.mark.parametrize(
    "arrays",
    [
        {"images": np.zeros((2, 4, 4), np.int32)},  # wrong dtype
        {"images": np.zeros((2, 4), np.uint8)},  # wrong rank
        {"images": np.zeros((2, 4, 4, 2), np.uint8)},  # two channels
        {"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(3, np.int64)},  # length
        {"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, -1])},  # range
        {"images": np.zeros((2, 4, 4), np.uint8), "ids": np.array([5, 5])},  # repeated ids
    ],
)
def test_bad_shape(arrays: dict[str, np.ndarray]) -> None:
    rejects("bad-shape", record(encode_chunk_bytes("s", 0, raw_npz(**arrays))))


def test_nan() -> None:
    images = np.full((2, 4, 4), 0.5, np.float32)
    images[1, 2, 2] = np.nan
    rejects("nan", record(encode_chunk_bytes("s", 0, raw_npz(images=images))))
    labels = np.array([0.0, np.inf])
    rejects("nan", record(encode_chunk_bytes("s", 0, raw_npz(images=np.zeros((2, 4, 4), np.uint8), labels=labels))))


def test_hash_mismatch(tmp_path: Path, digits: SourceData) -> None:
    msg = encode_chunk("s", 0, digits)
    rejects("hash-mismatch", record(msg, headers=with_header(msg, "cdm-sha256", b"0" * 64)))
    seal = encode_seal(Seal("s", 1, "0" * 64, 1))
    rejects("hash-mismatch", record(seal, headers=with_header(seal, "cdm-sha256", b"1" * 64)))
    ref = claim(tmp_path, npz_bytes(digits))
    path = Path(ref.uri.removeprefix("file://"))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))  # same size, different content
    rejects("hash-mismatch", record(encode_chunk_ref("s", ref)), claim_check_root=tmp_path)
    path.write_bytes(b"short")
    rejects("hash-mismatch", record(encode_chunk_ref("s", ref)), claim_check_root=tmp_path)


def test_bad_ref(tmp_path: Path, digits: SourceData) -> None:
    payload = npz_bytes(digits)
    root = tmp_path / "claims"
    ref = claim(tmp_path, payload)

    def ref_to(uri: str) -> ConsumerRecord:
        return record(encode_chunk_ref("s", ClaimCheck(uri, ref.sha256, ref.size, 0)))

    rejects("bad-ref", record(encode_chunk_ref("s", ref)), claim_check_root=None)  # claim checks disabled
    for uri in ["http://example.com/c.npz", "s3://bucket/c.npz", "file://otherhost" + ref.uri[7:], "c.npz"]:
        rejects("bad-ref", ref_to(uri), claim_check_root=root)
    outside = tmp_path / "outside.npz"
    outside.write_bytes(payload)
    rejects("bad-ref", ref_to(outside.as_uri()), claim_check_root=root)
    rejects("bad-ref", ref_to(root.as_uri() + "/../outside.npz"), claim_check_root=root)
    (root / "link.npz").symlink_to(outside)
    rejects("bad-ref", ref_to((root / "link.npz").as_uri()), claim_check_root=root)  # escapes via symlink
    rejects("bad-ref", ref_to((root / "missing.npz").as_uri()), claim_check_root=root)
    (root / "dir.npz").mkdir()
    rejects("bad-ref", ref_to((root / "dir.npz").as_uri()), claim_check_root=root)
    os.mkfifo(root / "fifo.npz")
    rejects("bad-ref", ref_to((root / "fifo.npz").as_uri()), claim_check_root=root)  # must not block


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"[1, 2]",
        b"\xff\xfe",
        b'{"chunks": 1, "fingerprint": "' + b"0" * 64 + b'"}',  # missing n_samples
        b'{"chunks": 1, "fingerprint": "' + b"0" * 64 + b'", "n_samples": 1, "extra": 1}',
        b'{"chunks": true, "fingerprint": "' + b"0" * 64 + b'", "n_samples": 1}',
        b'{"chunks": 0, "fingerprint": "' + b"0" * 64 + b'", "n_samples": 1}',
        b'{"chunks": 1, "fingerprint": "abc", "n_samples": 1}',
        b'{"chunks": 1, "fingerprint": "' + b"0" * 64 + b'", "n_samples": NaN}',
    ],
)
def test_bad_json_seal(value: bytes) -> None:
    headers = [("cdm-version", b"1"), ("cdm-kind", b"seal")]
    rejects("bad-json", record(WireMessage(b"s", value, headers)))


@pytest.mark.parametrize(
    "obj",
    [
        {"version": 1, "op": "forget-source"},  # no source
        {"version": 1, "op": "forget-source", "source": "s", "sample_ids": [1]},  # not allowed here
        {"version": 1, "op": "forget-samples", "source": "s"},  # no sample_ids
        {"version": 1, "op": "forget-samples", "source": "s", "sample_ids": []},
        {"version": 1, "op": "forget-samples", "source": "s", "sample_ids": [1.5]},
        {"version": 1, "op": "forget-samples", "source": "s", "sample_ids": [True]},
        {"version": 1, "op": "forget-samples", "source": "s", "sample_ids": [2**63]},
        {"version": 1, "op": "retrain-router", "source": "s"},
        {"version": 1, "op": "retrain-router", "colour": "blue"},
        {"version": 1, "op": "retrain-router", "request_id": "has space"},
        {"version": 1, "op": "retrain-router", "request_id": ""},
    ],
)
def test_bad_json_control(obj: dict[str, object]) -> None:
    rejects("bad-json", record(WireMessage(None, json.dumps(obj).encode()), topic="cdm.control"))


def test_bad_json_chunk_ref(tmp_path: Path) -> None:
    headers = [("cdm-version", b"1"), ("cdm-kind", b"chunk-ref"), ("cdm-seq", b"0")]
    for value in [b"{}", b'{"uri": 5, "sha256": "' + b"0" * 64 + b'", "size": 1, "seq": 0}']:
        rec = record(WireMessage(b"s", value, [*headers, ("cdm-sha256", sha256_hex(value).encode())]))
        rejects("bad-json", rec, claim_check_root=tmp_path)


@pytest.mark.parametrize("op", ["delete", "", None, 3])
def test_bad_op(op: object) -> None:
    rejects("bad-op", record(WireMessage(None, json.dumps({"version": 1, "op": op}).encode()), topic="cdm.control"))


# ------------------------------------------------------------------------------------------------ dead letters


def test_dlq_copy_keeps_original_and_adds_reason(digits: SourceData) -> None:
    msg = encode_chunk("s", 0, digits)
    rec = record(msg, headers=[*with_header(msg, "cdm-sha256", b"0" * 64), ("trace-id", b"t1")], offset=41)
    error = rejects("hash-mismatch", rec)
    dlq = encode_dlq(rec, error)
    assert dlq.key == rec.key and dlq.value == rec.value
    headers = dict(dlq.headers)
    assert headers["trace-id"] == b"t1" and headers["cdm-kind"] == b"chunk"
    assert headers["cdm-dlq-reason"] == b"hash-mismatch"
    assert b"sha256" in headers["cdm-dlq-detail"]
    assert (headers["cdm-dlq-topic"], headers["cdm-dlq-partition"], headers["cdm-dlq-offset"]) == (
        b"cdm.sources",
        b"0",
        b"41",
    )
    assert Origin.of(rec) == Origin("cdm.sources", 0, 41)


def test_dlq_copy_omits_a_value_that_would_not_fit(digits: SourceData) -> None:
    rec = record(encode_chunk("s", 0, digits))
    size = len(rec.value)
    error = rejects("oversized", rec, max_value_bytes=100)
    dlq = encode_dlq(rec, error, max_record_bytes=size)  # value fits alone, not with key and headers
    assert dlq.value is None
    assert dict(dlq.headers)["cdm-dlq-value-omitted"] == str(size).encode()
    kept = encode_dlq(rec, error, max_record_bytes=size + 4096)
    assert kept.value == rec.value and "cdm-dlq-value-omitted" not in dict(kept.headers)


def test_record_size_bound_is_an_upper_bound_of_kafka_python_s_estimate() -> None:
    from kafka.record.default_records import DefaultRecordBatchBuilder

    for key, value, headers in [
        (None, None, []),
        (b"k" * 64, b"v" * 100_000, [("cdm-version", b"1"), ("x" * 200, b"y" * 300)]),
        (b"k", b"", [(f"h{i}", b"") for i in range(50)]),
    ]:
        want = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        assert want <= record_size_bound(key, value, headers) <= want + 64 + 10 * len(headers)


def test_every_reason_is_documented() -> None:
    text = DOC.read_text()
    documented = set(re.findall(r"^\| `([a-z-]+)` \|", text, flags=re.M))
    assert set(REASONS) <= documented, set(REASONS) - documented


def test_zip_bomb_guard_reads_declared_sizes() -> None:
    # the guard trusts zipfile's declared member sizes, which zipfile itself enforces when reading
    bomb = npz_bytes(validate_arrays(np.zeros((64, 64, 64), np.uint8)))
    with zipfile.ZipFile(io.BytesIO(bomb)) as archive:
        declared = sum(i.file_size for i in archive.infolist())
    rejects("oversized", record(encode_chunk_bytes("s", 0, bomb)), max_decoded_bytes=declared - 1)
    assert isinstance(
        decode_source_message(record(encode_chunk_bytes("s", 0, bomb)), max_decoded_bytes=declared), Chunk
    )


# ------------------------------------------------------------------------------------------------ issue 8
# Each of these records made the decoder raise something other than WireError (which stopped ingestion for
# good), or cost unbounded memory or time, on main before the fix; the comment names what happened.

CENTRAL_DIR, LOCAL_HEADER = b"PK\x01\x02", b"PK\x03\x04"


def patch_zip(raw: bytes, *, method: int | None = None, flags: int | None = None, size: int | None = None) -> bytes:
    """Rewrite the compression method, flag bits or uncompressed size in every local and central header."""
    out = bytearray(raw)
    fields = {LOCAL_HEADER: {"flags": 6, "method": 8, "size": 22}, CENTRAL_DIR: {"flags": 8, "method": 10, "size": 24}}
    for signature, offsets in fields.items():
        at = out.find(signature)
        while at >= 0:
            for name, value in (("flags", flags), ("method", method), ("size", size)):
                if value is not None:
                    struct.pack_into("<I" if name == "size" else "<H", out, at + offsets[name], value)
            at = out.find(signature, at + 4)
    return bytes(out)


def npz_with_npy_header(shape: tuple[int, ...], *, compression: int = zipfile.ZIP_STORED) -> bytes:
    """A valid 2x4x4 uint8 archive whose .npy header then claims ``shape`` (header length kept)."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 4, 4), np.uint8))
    npy = buf.getvalue()
    length = struct.unpack("<H", npy[8:10])[0]
    header = npy[10 : 10 + length].decode("latin1").replace("(2, 4, 4)", repr(shape)).rstrip()
    npy = npy[:10] + (header + " " * (length - 1 - len(header)) + "\n").encode("latin1") + npy[10 + length :]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as archive:
        archive.writestr("images.npy", npy)
    return out.getvalue()


def peak_traced_bytes(fn: object) -> int:
    tracemalloc.start()
    try:
        fn()  # type: ignore[operator]
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def control_value(value: bytes) -> ConsumerRecord:
    return record(WireMessage(None, value), topic="cdm.control")


def seal_value(value: bytes) -> ConsumerRecord:
    return record(WireMessage(b"s", value, [("cdm-version", b"1"), ("cdm-kind", b"seal")]))


def test_deeply_nested_json_is_bad_json() -> None:
    # main: RecursionError out of json.loads
    deep = b"[" * 100_000 + b"]" * 100_000
    rejects("bad-json", control_value(deep))
    rejects("bad-json", control_value(b'{"version": 1, "op": "retrain-router", "request_id": ' + deep + b"}"))
    rejects("bad-json", seal_value(b'{"chunks": ' + deep + b', "fingerprint": "' + b"0" * 64 + b'", "n_samples": 1}'))
    value = b'{"uri": ' + deep + b', "sha256": "' + b"0" * 64 + b'", "size": 1, "seq": 0}'
    headers = [("cdm-version", b"1"), ("cdm-kind", b"chunk-ref"), ("cdm-seq", b"0")]
    rejects("bad-json", record(WireMessage(b"s", value, [*headers, ("cdm-sha256", sha256_hex(value).encode())])))
    # nesting that json parses but no v1 value has (and whose repr in a detail could still recurse)
    error = rejects(
        "bad-json",
        control_value(
            b'{"version": 1, "op": "forget-samples", "source": "s", "sample_ids": ' + b"[" * 900 + b"]" * 900 + b"}"
        ),
    )
    assert "nests deeper than 2" in error.detail
    assert decode_control(control_value(b'{"version": 1, "op": "forget-samples", "source": "s", "sample_ids": [1]}'))


@pytest.mark.parametrize("shape", [(2**40, 4, 4), (2**32, 2**32, 16), (2, 4, 5), (2, 4, 3)])
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_npy_header_is_checked_against_the_member_size_before_allocating(
    shape: tuple[int, ...], compression: int
) -> None:
    # main: MemoryError ("Unable to allocate 16.0 TiB") for (2**40, 4, 4), out of the second np.load in _npz_reason
    raw = npz_with_npy_header(shape, compression=compression)
    peak = peak_traced_bytes(lambda: rejects("bad-npz", record(encode_chunk_bytes("s", 0, raw))))
    assert peak < 1 << 20
    error = rejects("bad-npz", record(encode_chunk_bytes("s", 0, raw)))
    assert f"declares shape {shape}" in error.detail


@pytest.mark.parametrize("method", [1, 6, 9, 12, 14, 19, 93, 98, 99, 0xFFFF])
def test_compression_methods_other_than_stored_and_deflated_are_bad_npz(method: int) -> None:
    # main: NotImplementedError("That compression method is not supported") for e.g. 1, 6, 9, 99
    raw = patch_zip(raw_npz(images=np.zeros((2, 4, 4), np.uint8)), method=method)
    error = rejects("bad-npz", record(encode_chunk_bytes("s", 0, raw)))
    assert f"compression method {method}" in error.detail


@pytest.mark.parametrize("flag", [0x0001, 0x0020, 0x0040, 0x2000, 0x0002, 0x0004, 0x0010, 0x8000])
def test_zip_flags_numpy_does_not_write_are_bad_npz(flag: int) -> None:
    # main: RuntimeError ("is encrypted, password required") for 0x1, NotImplementedError for 0x20 and 0x40
    raw = patch_zip(raw_npz(images=np.zeros((2, 4, 4), np.uint8)), flags=flag)
    error = rejects("bad-npz", record(encode_chunk_bytes("s", 0, raw)))
    assert "zip flags" in error.detail


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_bzip2_and_lzma_bombs_are_refused_without_decompressing(method: int) -> None:
    # main: a ~100-byte bzip2 member declaring 144 bytes was decompressed whole (32 MiB here; 400 MB in the issue)
    npy = io.BytesIO()
    np.save(npy, np.zeros((2, 4, 4), np.uint8))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=method) as archive:
        archive.writestr("images.npy", npy.getvalue() + b"\0" * (32 << 20))
    bomb = patch_zip(out.getvalue(), size=len(npy.getvalue()))  # the declared size is a lie
    assert len(bomb) < 16 << 10
    peak = peak_traced_bytes(
        lambda: rejects("bad-npz", record(encode_chunk_bytes("s", 0, bomb)), max_decoded_bytes=1 << 20)
    )
    assert peak < 1 << 20


def test_archives_numpy_writes_are_read(digits: SourceData) -> None:
    # what np.savez writes to a pipe (flag 0x0008, sizes in a data descriptor), Fortran order, big-endian ids
    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: object) -> int:
            chunk = bytes(b)  # type: ignore[call-overload]
            self.data += chunk
            return len(chunk)

    pipe = Pipe()
    np.savez_compressed(pipe, images=digits.images, labels=digits.labels, ids=digits.ids)
    with zipfile.ZipFile(io.BytesIO(bytes(pipe.data))) as archive:
        assert all(info.flag_bits & 0x8 for info in archive.infolist())
    got = decode_source_message(record(encode_chunk_bytes("s", 0, bytes(pipe.data))))
    assert isinstance(got, Chunk) and fingerprint(got.data) == fingerprint(digits)
    odd = raw_npz(images=np.asfortranarray(digits.images), labels=digits.labels, ids=digits.ids.astype(">i8"))
    got = decode_source_message(record(encode_chunk_bytes("s", 0, odd)))
    assert isinstance(got, Chunk) and fingerprint(got.data) == fingerprint(digits)


def test_large_zip_directories_and_repeated_members_are_bad_npz() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i in range(2000):  # each entry becomes a ZipInfo object before anything else can be checked
            archive.writestr(f"m{i}.npy", b"")
    error = rejects("bad-npz", record(encode_chunk_bytes("s", 0, out.getvalue())))
    assert "central directory" in error.detail
    twice = io.BytesIO()
    with zipfile.ZipFile(twice, "w") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("images.npy", b"")
        archive.writestr("images.npy", b"")
    assert "repeat" in rejects("bad-npz", record(encode_chunk_bytes("s", 0, twice.getvalue()))).detail


@pytest.mark.parametrize("uri", ["file://[::1/x.npz", "file:///\ud800.npz", "file:///a%ED%A0%80"])
def test_claim_check_uri_that_cannot_be_parsed_or_named_is_bad_ref(tmp_path: Path, uri: str) -> None:
    # main: ValueError ("Invalid IPv6 URL") out of urlsplit; UnicodeEncodeError for a lone surrogate
    rejects("bad-ref", record(encode_chunk_ref("s", ClaimCheck(uri, "0" * 64, 10, 0))), claim_check_root=tmp_path)


def test_seal_chunks_and_seq_are_bounded() -> None:
    # main: a seal of 10**9 chunks and a chunk at seq 999999999 were accepted (a billion-element list, an
    # idle-seal job looping every 5 s under the spool lock)
    fingerprint_hex = "0" * 64
    huge = json.dumps({"chunks": 10**9, "fingerprint": fingerprint_hex, "n_samples": 1}).encode()
    error = rejects("too-many-chunks", seal_value(huge))
    assert str(DEFAULT_MAX_CHUNKS) in error.detail and "max_chunks_per_source" in error.detail
    msg = encode_chunk_bytes("s", MAX_SEQ, b"not even read")
    rejects("too-many-chunks", record(msg))
    # configurable; checked before the value is parsed or a claim-check file is looked for
    seal = encode_seal(Seal("s", 4, fingerprint_hex, 1))
    assert isinstance(decode_source_message(record(seal), max_chunks=4), Seal)
    rejects("too-many-chunks", record(encode_seal(Seal("s", 5, fingerprint_hex, 1))), max_chunks=4)
    rejects("too-many-chunks", record(encode_chunk_bytes("s", 4, b"x")), max_chunks=4)
    rejects("bad-npz", record(encode_chunk_bytes("s", 3, b"x")), max_chunks=4)
    rejects("too-many-chunks", record(encode_chunk_ref("s", ClaimCheck("file:///x", "0" * 64, 1, 4))), max_chunks=4)


def test_limits_default_to_the_config_defaults() -> None:
    cfg = DaemonConfig()
    assert (cfg.max_decoded_bytes, cfg.max_claim_check_bytes, cfg.max_chunks_per_source) == (
        DEFAULT_MAX_DECODED_BYTES,
        DEFAULT_MAX_REF_BYTES,
        DEFAULT_MAX_CHUNKS,
    )
    assert MIN_MESSAGE_BYTES == DLQ_MIN_RECORD_BYTES and MAX_CHUNKS_PER_SOURCE == MAX_SEQ + 1


def test_wire_error_details_are_bounded() -> None:
    # main: a 1 MB key was quoted whole in the detail (and in every log line of it)
    error = rejects(
        "bad-key", record(WireMessage(b"k" * 1_000_000, b"", [("cdm-version", b"1"), ("cdm-kind", b"seal")]))
    )
    assert len(error.detail) <= 1000 and len(str(error)) <= 1100


def dlq_size(message: WireMessage) -> int:
    return record_size_bound(message.key, message.value, message.headers)


def test_dlq_copy_drops_foreign_headers_before_the_value() -> None:
    # main: 100 foreign headers of 1000 bytes made a ~100 KB copy that the dead-letter producer refused
    value = b"v" * 1000
    headers = [("cdm-version", b"1"), ("cdm-kind", b"chunk"), *((f"trace-{i}", b"y" * 1000) for i in range(100))]
    rec = record(WireMessage(b"s", value, headers))
    dlq = encode_dlq(rec, WireError("bad-npz", "x"), max_record_bytes=MIN_MESSAGE_BYTES)
    assert dlq_size(dlq) <= MIN_MESSAGE_BYTES
    got = dict(dlq.headers)
    assert dlq.value == value and dlq.key == b"s" and got["cdm-kind"] == b"chunk"
    assert got["cdm-dlq-headers-omitted"] == b"100" and not any(k.startswith("trace-") for k, _ in dlq.headers)
    # a large value with a few small foreign headers: only the value goes
    rec = record(WireMessage(b"s", b"v" * 100_000, [("trace-id", b"t1")]))
    dlq = encode_dlq(rec, WireError("oversized", "x"), max_record_bytes=MIN_MESSAGE_BYTES)
    assert dlq.value is None and dict(dlq.headers)["trace-id"] == b"t1"
    assert "cdm-dlq-headers-omitted" not in dict(dlq.headers)


def test_dlq_copy_of_huge_key_and_cdm_headers_still_fits() -> None:
    headers = [(f"cdm-x-{i}", b"y" * 1000) for i in range(50)]
    rec = record(WireMessage(b"k" * 50_000, b"v" * 50_000, headers))
    dlq = encode_dlq(rec, WireError("bad-key", "d" * 5000), max_record_bytes=MIN_MESSAGE_BYTES)
    assert dlq_size(dlq) <= MIN_MESSAGE_BYTES
    got = dict(dlq.headers)
    assert dlq.key is None and dlq.value is None
    assert (got["cdm-dlq-key-omitted"], got["cdm-dlq-value-omitted"], got["cdm-dlq-headers-omitted"]) == (
        b"50000",
        b"50000",
        b"50",
    )
    assert got["cdm-dlq-reason"] == b"bad-key" and len(got["cdm-dlq-detail"].decode()) <= 1000
