"""Property tests of the wire decoders (issue 8): every record, whatever its key, headers and value, either
decodes or raises the wire's own WireError, and its dead-letter copy always fits the size limit.

The records are structured, not only random bytes: valid .npz payloads and JSON values, then mutated
(truncated, bit-flipped, other zip compression methods and flags, lying zip sizes, .npy headers with huge
shapes or odd dtypes, deeply nested JSON, huge integers, unicode, duplicate and foreign headers, odd keys).
Hypothesis runs derandomized, so each CI run generates the same records; the counts are printed and asserted.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.consumer.fetcher import ConsumerRecord

from cdm.data import load_npz_bytes
from cdm.errors import DataError
from daemon.wire import (
    DLQ_MIN_RECORD_BYTES,
    REASONS,
    WireError,
    decode_control,
    decode_source_message,
    encode_dlq,
    record_size_bound,
    sha256_hex,
)

pytestmark = pytest.mark.slow

N_SOURCE = 12_000  # cdm.sources records
N_CONTROL = 4_000  # cdm.control records
N_DLQ = 1_000  # records with large keys, values and headers, for the dead-letter size property
LIMIT = 1 << 20  # max_value_bytes, max_decoded_bytes and max_ref_bytes of the fuzzed decoder
DLQ_LIMIT = DLQ_MIN_RECORD_BYTES  # the smallest kafka.max_message_bytes the config allows


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,  # the same records on every run: CI is deterministic
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


def make_record(topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, Any]]) -> ConsumerRecord:
    return ConsumerRecord(
        topic, 0, 0, 7, 0, 0, key, value, headers, None, len(key or b""), len(value or b""), -1,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ .npz values

LOCAL, CENTRAL = b"PK\x03\x04", b"PK\x01\x02"
# field offsets in a local file header / central directory entry
FLAGS = {LOCAL: 6, CENTRAL: 8}
METHOD = {LOCAL: 8, CENTRAL: 10}
SIZES = {LOCAL: (18, 22), CENTRAL: (20, 24)}  # compressed, uncompressed


def patch_all(raw: bytes, signature: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(raw)
    at = out.find(signature)
    while at >= 0:
        if at + offset + struct.calcsize(fmt) <= len(out):
            struct.pack_into(fmt, out, at + offset, value)
        at = out.find(signature, at + 4)
    return bytes(out)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npy_with_header(header: str, data: bytes, version: int) -> bytes:
    """An .npy member with an arbitrary header text (length field kept consistent)."""
    text = header.encode("latin1", "replace") if version < 3 else header.encode("utf-8", "surrogatepass")
    length = struct.pack("<H", len(text) % 65536) if version == 1 else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + length + text + data


def zip_members(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED, comment: bytes = b"") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=method) as archive:
        for name, data in members:
            archive.writestr(name, data)
        archive.comment = comment
    return out.getvalue()


@st.composite
def arrays(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """Source arrays, mostly valid, sometimes of a wrong dtype, rank, length or value."""
    n = draw(st.integers(1, 4))
    shape = (n, draw(st.integers(1, 5)), draw(st.integers(1, 5)), *draw(st.sampled_from([(), (1,), (3,), (2,)])))
    size = int(np.prod(shape))
    images: np.ndarray = np.frombuffer(draw(st.binary(min_size=size, max_size=size)), np.uint8).reshape(shape)
    dtype = draw(st.sampled_from(["|u1"] * 6 + ["<f4", "<i4", "|b1", ">u2", "<c8"]))
    if dtype != "|u1":
        images = images.astype(dtype)
        if dtype in ("<f4", "<c8") and draw(st.booleans()):
            images.flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    out = {"images": images}
    if draw(st.booleans()):
        labels = draw(st.lists(st.integers(-3, 2**62), min_size=n, max_size=n + draw(st.integers(0, 1))))
        out["labels"] = np.array(labels, np.int64).astype(draw(st.sampled_from(["<i8", ">i8", "<u4", "<f8"])))
    if draw(st.booleans()):
        ids = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n, unique=draw(st.booleans())))
        out["ids"] = np.array(ids, dtype=np.int64)
    if draw(st.integers(0, 20)) == 0:
        out[draw(st.sampled_from(["secret", "images.npy", "x" * 300]))] = np.zeros(2)
    if draw(st.integers(0, 20)) == 0:
        out.pop("images")
        out.setdefault("labels", np.zeros(n, np.int64))
    if draw(st.integers(0, 30)) == 0:
        out["labels"] = np.array([{"pickled": 1}, None], dtype=object)
    return out


def savez(arrs: dict[str, np.ndarray], compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrs)  # type: ignore[operator]
    return buf.getvalue()


HEADER_SHAPES = st.one_of(
    st.lists(st.integers(0, 2**70), max_size=5).map(tuple),
    st.sampled_from([(2**40, 4, 4), (2**32, 2**32, 16), (2**63,), (0,), (-1, 4), (10**30,), tuple(range(1, 70))]),
)
HEADER_ALPHABET = st.sampled_from(list("{}()[]'\":,. \n\t\x0b\x0c\x00\\0123456789-+_<>|=deschrfotanpTFlu\u2003"))
HEADER_DESCRS = st.one_of(
    st.sampled_from(["|u1", "<i8", ">i8", "<f4", "|O", "<U5", "|V0", "|S0", "<M8[ns]", "|V8", "i4, i4", "(3,)i4"]),
    st.text(max_size=20),
    st.just([("a", "<i4")]),
    st.just(("|u1", (10**9,))),
)


@st.composite
def npy_header_text(draw: st.DrawFn) -> str:
    """A numpy-style header dict, or something that only looks like one."""
    if draw(st.integers(0, 4)) == 0:
        return draw(
            st.one_of(
                st.text(max_size=200),
                st.text(HEADER_ALPHABET, max_size=120),  # near misses of the dict syntax
                st.text(HEADER_ALPHABET, max_size=60).map(lambda t: "{'descr': '|u1', " + t + "}"),
                st.just("{'descr': '|u1', 'fortran_order': False, 'shape': (" + "(" * 150 + ")" * 150 + ",)}"),
                st.just("-" * 5000 + "1"),
                st.just("{'shape': (01,), 'descr': '|u1', 'fortran_order': False}"),
                st.just("{'descr': '|u1', 'fortran_order': False, 'shape': (" + "9" * 5000 + ",)}"),
                st.just("{" * 3000 + "}" * 3000),
                st.just("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 4, 4), 'shape': (99, 4)}"),
            )
        )
    descr = draw(HEADER_DESCRS)
    fortran = draw(st.one_of(st.booleans(), st.just(1)))
    shape = draw(HEADER_SHAPES)
    return repr({"descr": descr, "fortran_order": fortran, "shape": shape}) + " " * draw(st.integers(0, 64)) + "\n"


NPZ_MUTATIONS = st.sampled_from(
    [
        "none", "truncate", "flip", "method", "flags", "sizes", "npy-header", "npy-truncated", "bz2", "lzma",
        "names", "bare-npy", "affix", "directory", "comment", "unseekable", "fortran", "large",
    ]
)  # fmt: skip
METHODS = st.one_of(st.sampled_from([1, 6, 9, 12, 14, 19, 93, 95, 97, 98, 99]), st.integers(0, 65535))
FLAG_BITS = st.one_of(st.sampled_from([0x1, 0x20, 0x40, 0x2000, 0x2, 0x4, 0x8, 0x800]), st.integers(0, 65535))
ZIP_SIZES = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1]))
MEMBER_NAMES = st.sampled_from(["images.npy", "images", "../images.npy", "ïmages.npy", "dir/", "IDS.npy"])
COMMENTS = st.sampled_from([b"PK\x05\x06" + b"\0" * 18, b"x" * 100, b"PK\x06\x07" * 5])


@st.composite
def npz_values(draw: st.DrawFn) -> bytes:
    """A chunk value: a valid .npz, then (usually) one or two mutations."""
    arrs = draw(arrays())
    compressed = draw(st.booleans())
    raw = savez(arrs, compressed)
    for _ in range(draw(st.integers(0, 2))):
        raw = mutate_npz(draw, raw, arrs, compressed)
    return raw


def mutate_npz(draw: st.DrawFn, raw: bytes, arrs: dict[str, np.ndarray], compressed: bool) -> bytes:
    # the members as numpy writes them (object arrays left out; never empty)
    plain = [(k + ".npy", npy_bytes(v)) for k, v in arrs.items() if v.dtype != object]
    plain = plain or [("images.npy", npy_bytes(np.zeros((1, 2, 2), np.uint8)))]
    kind = draw(NPZ_MUTATIONS)
    if kind == "truncate":
        return raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    if kind == "flip":
        out = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            if out:
                out[draw(st.integers(0, len(out) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "method":
        method = draw(METHODS)
        out = patch_all(raw, LOCAL, METHOD[LOCAL], "<H", method)
        return patch_all(out, CENTRAL, METHOD[CENTRAL], "<H", method)
    if kind == "flags":
        flags = draw(FLAG_BITS)
        out = patch_all(raw, LOCAL, FLAGS[LOCAL], "<H", flags)
        return patch_all(out, CENTRAL, FLAGS[CENTRAL], "<H", flags) if draw(st.booleans()) else out
    if kind == "sizes":
        which = draw(st.sampled_from([0, 1]))
        size = draw(ZIP_SIZES)
        return patch_all(raw, CENTRAL, SIZES[CENTRAL][which], "<I", size)
    if kind in ("npy-header", "npy-truncated"):
        name = draw(st.sampled_from(sorted(arrs)))
        data = arrs[name].tobytes() if arrs[name].dtype != object else b""
        if kind == "npy-truncated":
            member = npy_bytes(arrs[name]) if arrs[name].dtype != object else b"\x93NUMPY"
            member = member[: draw(st.integers(0, len(member)))]
        else:
            member = npy_with_header(draw(npy_header_text()), data, draw(st.sampled_from([1, 2, 3, 1, 1])))
        members = [(k + ".npy", member if k == name else npy_bytes(v)) for k, v in arrs.items() if v.dtype != object]
        return zip_members(members, zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED)
    if kind in ("bz2", "lzma"):
        method = zipfile.ZIP_BZIP2 if kind == "bz2" else zipfile.ZIP_LZMA
        return bomb(method) if draw(st.booleans()) else zip_members(list(plain), method)
    if kind == "names":
        members = list(plain)
        new = draw(MEMBER_NAMES)
        if draw(st.booleans()):
            members.append((new, members[0][1]))  # possibly a repeated name
        else:
            members[0] = (new, members[0][1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about a repeated name; the archive is the point
            return zip_members(members)
    if kind == "bare-npy":
        return plain[0][1]
    if kind == "affix":
        garbage = draw(st.binary(max_size=64))
        return garbage + raw if draw(st.booleans()) else raw + garbage
    if kind == "directory":  # many members: a central directory far larger than three entries need
        members = [(f"m{i}.npy", b"") for i in range(draw(st.sampled_from([4, 50, 1500])))]
        return zip_members(members)
    if kind == "comment":
        return zip_members(
            [(k + ".npy", npy_bytes(v)) for k, v in arrs.items() if v.dtype != object],
            comment=draw(COMMENTS),
        )
    if kind == "unseekable":  # what zipfile writes to a pipe: the data descriptor flag 0x0008
        sink = _Unseekable()
        np.savez_compressed(sink, **arrs)  # type: ignore[arg-type]
        return bytes(sink.data)
    if kind == "large":
        return large_npz()
    if kind == "fortran":
        fortran = {k: np.asfortranarray(v) for k, v in arrs.items()}
        return savez(fortran, compressed)
    return raw


@functools.cache
def large_npz() -> bytes:
    """A valid archive of a few KiB whose arrays take more than LIMIT bytes."""
    return savez({"images": np.zeros((LIMIT // 1024 + 1, 32, 32), np.uint8)}, compressed=True)


@functools.cache
def bomb(method: int) -> bytes:
    """A few hundred bytes whose member expands to 4 MiB while declaring 144 (the issue's bz2 bomb)."""
    member = npy_bytes(np.zeros((2, 4, 4), np.uint8))
    out = zip_members([("images.npy", member + b"\0" * (4 << 20))], method)
    return patch_all(out, CENTRAL, SIZES[CENTRAL][1], "<I", len(member))


class _Unseekable(io.RawIOBase):
    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += bytes(b)
        return len(b)


# ------------------------------------------------------------------------------------------------ JSON values

HUGE_INTS = st.one_of(
    st.integers(-5, 20), st.integers(-(2**70), 2**70), st.sampled_from([10**9, 999_999_999, 10**100, -(10**100)])
)
SCALARS = st.one_of(
    st.none(), st.booleans(), HUGE_INTS, st.floats(allow_nan=False), st.text(max_size=40), st.just("x" * 5000)
)
ANY_JSON = st.recursive(
    SCALARS, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=10), c, max_size=5), max_leaves=15
)
SOURCE_IDS = st.one_of(
    st.sampled_from(["shoes", "a.b-c_1", ".tmp-x", ".", "..", "x" * 64, "x" * 65, "a/b", "ü", "", "-x"]),
    st.text(max_size=70),
)
ODD_JSON = st.sampled_from([b"", b"{", b"NaN", b'{"chunks": NaN}', b"\xff\xfe", b'{"uri": "\\ud800"}', b"1e999"])
DEPTHS = st.one_of(st.integers(1, 5), st.sampled_from([100, 900, 1000, 5000, 100_000]))
FIELD_OPS = st.sampled_from(["set", "drop", "add"])


def nested_json(draw: st.DrawFn, field: str) -> bytes:
    """JSON nested ``depth`` levels, alone or as the value of ``field`` in an otherwise valid object."""
    depth = draw(DEPTHS)
    inner = '{"a":' * depth + "1" + "}" * depth if draw(st.booleans()) else "[" * depth + "]" * depth
    if draw(st.booleans()):
        return inner.encode()
    return ('{"version": 1, "op": "forget-samples", "source": "s", "' + field + '": ' + inner + "}").encode()


def json_value(draw: st.DrawFn, obj: dict[str, Any], field: str, *, valid: bool) -> bytes | None:
    """``obj`` as JSON; unless ``valid``, its fields changed, dropped or added, or other (nested, odd) JSON."""
    if not valid:
        form = draw(st.sampled_from(["fields", "fields", "fields", "nested", "any", "odd", "binary", "null"]))
        if form == "nested":
            return nested_json(draw, field)
        if form == "any":
            return json.dumps(draw(ANY_JSON)).encode()
        if form == "odd":
            return draw(ODD_JSON)
        if form == "binary":
            return draw(st.binary(max_size=64))
        if form == "null":
            return None
        for _ in range(draw(st.integers(1, 3))):
            op = draw(FIELD_OPS)
            if op == "set" and obj:
                obj[draw(st.sampled_from(sorted(obj)))] = draw(ANY_JSON)
            elif op == "drop" and obj:
                obj.pop(draw(st.sampled_from(sorted(obj))))
            else:
                obj[draw(st.text(max_size=12))] = draw(ANY_JSON)
    return json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


SEAL_FIELDS = st.fixed_dictionaries(
    {
        "chunks": st.one_of(st.integers(1, 5), HUGE_INTS),
        "fingerprint": st.one_of(st.just("ab" * 32), st.text(max_size=70)),
        "n_samples": st.one_of(st.integers(1, 5), HUGE_INTS),
    }
)
OPS = st.one_of(st.sampled_from(["forget-source", "forget-samples", "retrain-router"]), st.text(max_size=20))
VERSIONS = st.one_of(st.just(1), st.sampled_from([2, True, 1.0, "1", 10**100, None]))
SAMPLE_IDS = st.lists(st.one_of(st.integers(-(2**63), 2**63 - 1), HUGE_INTS), max_size=20)
REQUEST_IDS = st.one_of(st.just("req-1"), st.text(max_size=130))


def control_fields(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(OPS)
    obj: dict[str, Any] = {"version": draw(VERSIONS), "op": op}
    if op != "retrain-router":
        obj["source"] = draw(st.one_of(st.just("shoes"), SOURCE_IDS))
    if op == "forget-samples":
        obj["sample_ids"] = draw(SAMPLE_IDS)
    if draw(st.booleans()):
        obj["request_id"] = draw(REQUEST_IDS)
    return obj


# ------------------------------------------------------------------------------------------------ headers, keys

HEADER_OPS = st.sampled_from(["drop", "duplicate", "replace", "foreign", "dlq"])
HEADER_VALUES = st.one_of(
    st.none(),
    st.binary(max_size=20),
    st.sampled_from([b"1", b"2", b" 1 ", b"chunk", b"seal", b"chunk-ref", b"control", b"9" * 400, b"999999999"]),
    st.integers(-(10**12), 10**12).map(lambda v: str(v).encode()),
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
FOREIGN = st.tuples(st.text(max_size=20), st.one_of(st.none(), st.binary(max_size=40)))
DLQ_NAMES = st.sampled_from(["cdm-dlq-reason", "cdm-dlq-detail", "cdm-other"])
KEYS = st.one_of(
    st.none(),
    SOURCE_IDS.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=80),
    st.just(b"\xff\xfe"),
)


def mutate_headers(draw: st.DrawFn, headers: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Drop, duplicate or replace cdm- headers; add foreign and cdm-dlq- headers."""
    out = list(headers)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(HEADER_OPS)
        if op == "drop" and out:
            out.pop(draw(st.integers(0, len(out) - 1)))
        elif op == "duplicate" and out:
            out.append(out[draw(st.integers(0, len(out) - 1))])
        elif op == "replace" and out:
            i = draw(st.integers(0, len(out) - 1))
            out[i] = (out[i][0], draw(HEADER_VALUES))
        elif op == "foreign":
            out += draw(st.lists(FOREIGN, min_size=1, max_size=4))
        else:
            out.append((draw(DLQ_NAMES), b"x"))
    return out


# ------------------------------------------------------------------------------------------------ records

# Which layer of a record is broken: one at a time mostly, so that the decoder is reached at every depth.
LAYERS = st.sampled_from(["value", "value", "value", "none", "headers", "key", "all"])
SOURCE_KINDS = st.sampled_from(["chunk", "chunk", "chunk-ref", "seal"])
ODD_KINDS = st.sampled_from(["chunk", "chunk-ref", "seal", "control", "blob", "CHUNK"])
SMALL_SEQS = st.integers(0, 5)
ANY_SEQS = st.one_of(st.integers(0, 5), st.sampled_from([9_999, 10_000, 999_999_999]), st.integers(0, 10**12))
SHA_FORMS = st.sampled_from(["right", "wrong", "none", "garbage"])
REF_FIELDS = st.sampled_from(["uri", "uri", "uri", "sha256", "size", "seq", "json"])


class ClaimRoot:
    """Files under a claim-check root that chunk-ref records point at (good, mutated, odd file types)."""

    def __init__(self, root: Path, good: bytes, mutated: list[bytes]) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.files: list[tuple[str, bytes | None]] = []
        for i, payload in enumerate([good, *mutated]):
            path = root / f"c{i}.npz"
            path.write_bytes(payload)
            self.files.append((path.as_uri(), payload))
        (root / "dir.npz").mkdir()
        os.mkfifo(root / "fifo.npz")
        outside = root.parent / "outside.npz"
        outside.write_bytes(good)
        (root / "link.npz").symlink_to(outside)
        for name in ("dir.npz", "fifo.npz", "link.npz", "missing.npz"):
            self.files.append(((root / name).as_uri(), None))
        self.files.append((outside.as_uri(), good))
        odd = st.sampled_from(
            ["file://[::1/x.npz", "file:///\ud800.npz", "http://example.com/c.npz", "file://host/c.npz", "c.npz",
             "file:///" + "a/" * 3000, "file:///%00x", "file:///?q#f", root.as_uri() + "/../c0.npz", ""]
        )  # fmt: skip
        self.good_uris = st.just(self.files[0])
        strings = st.tuples(st.one_of(odd, st.text(max_size=60)), st.none())
        self.any_uris = st.one_of(st.sampled_from(self.files), strings)


@st.composite
def source_records(draw: st.DrawFn, claims: ClaimRoot) -> ConsumerRecord:
    layer = draw(LAYERS)
    broken = {layer} if layer != "all" else {"value", "headers", "key"}
    kind = draw(ODD_KINDS if "headers" in broken else SOURCE_KINDS)
    seq = draw(ANY_SEQS if "headers" in broken else SMALL_SEQS)
    value: bytes | None
    if kind == "chunk":
        value = draw(npz_values()) if "value" in broken else savez(draw(valid_arrays()), draw(st.booleans()))
        if "value" in broken and draw(st.integers(0, 9)) == 0:
            value = draw(st.one_of(st.binary(max_size=200), st.none()))
    elif kind == "chunk-ref":
        field = draw(REF_FIELDS) if "value" in broken else None  # the one pointer field made odd
        uri, payload = draw(claims.any_uris if field == "uri" else claims.good_uris)
        size, sha = (len(payload), sha256_hex(payload)) if payload is not None else (10, "0" * 64)
        ref = {"uri": uri, "sha256": sha, "size": size, "seq": seq}
        if field == "sha256":
            ref["sha256"] = draw(st.one_of(st.just(sha.upper()), st.text(max_size=70)))
        elif field in ("size", "seq"):
            ref[field] = draw(HUGE_INTS)
        value = json_value(draw, ref, "uri", valid=field != "json")
    elif kind == "seal":
        fields = draw(SEAL_FIELDS) if "value" in broken else {"chunks": 2, "fingerprint": "ab" * 32, "n_samples": 5}
        value = json_value(draw, fields, "chunks", valid=draw(st.booleans()) or "value" not in broken)
    else:
        value = json_value(draw, control_fields(draw), "sample_ids", valid="value" not in broken)
    headers: list[tuple[str, Any]] = [("cdm-version", b"1"), ("cdm-kind", kind.encode())]
    if kind in ("chunk", "chunk-ref") or draw(st.integers(0, 10)) == 0:
        headers.append(("cdm-seq", str(seq).encode()))
    sha = draw(SHA_FORMS) if "headers" in broken else "right"
    if sha != "none":
        digest = {"right": sha256_hex(value or b""), "wrong": "0" * 64, "garbage": "xyz"}[sha]
        headers.append(("cdm-sha256", digest.encode()))
    if "headers" in broken:
        headers = mutate_headers(draw, headers)
    key = draw(KEYS) if "key" in broken else b"shoes"
    return make_record("cdm.sources", key, value, headers)


@st.composite
def valid_arrays(draw: st.DrawFn) -> dict[str, np.ndarray]:
    n = draw(st.integers(1, 4))
    shape = (n, draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.sampled_from([1, 3])))
    size = int(np.prod(shape))
    out = {"images": np.frombuffer(draw(st.binary(min_size=size, max_size=size)), np.uint8).reshape(shape)}
    if draw(st.booleans()):
        out["labels"] = np.array(draw(st.lists(st.integers(0, 9), min_size=n, max_size=n)), np.int64)
    out["ids"] = np.arange(n, dtype=np.int64) + draw(st.integers(-(2**40), 2**40))
    return out


CONTROL_HEADERS = st.sampled_from([[], [("cdm-version", b"1"), ("cdm-kind", b"control")], [("cdm-version", b"1")]])


@st.composite
def control_records(draw: st.DrawFn) -> ConsumerRecord:
    layer = draw(LAYERS)
    broken = {layer} if layer != "all" else {"value", "headers", "key"}
    if "value" in broken:
        obj = control_fields(draw)
    else:
        obj = {"version": 1, "op": draw(st.sampled_from(["forget-source", "forget-samples", "retrain-router"]))}
        if obj["op"] != "retrain-router":
            obj["source"] = "shoes"
        if obj["op"] == "forget-samples":
            obj["sample_ids"] = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=5))
    value = json_value(draw, obj, "sample_ids", valid=draw(st.booleans()) or "value" not in broken)
    headers: list[tuple[str, Any]] = draw(CONTROL_HEADERS)
    if "headers" in broken:
        headers = mutate_headers(draw, headers)
    key = draw(KEYS) if "key" in broken else b"shoes"
    return make_record("cdm.control", key, value, headers)


@st.composite
def large_records(draw: st.DrawFn) -> ConsumerRecord:
    """Records whose dead-letter copy cannot keep everything: big keys, values, many or big headers."""
    big = st.integers(0, 40_000)
    key = draw(st.one_of(st.none(), big.map(lambda n: b"k" * n)))
    value = draw(st.one_of(st.none(), big.map(lambda n: b"v" * n)))
    headers: list[tuple[str, Any]] = [("cdm-version", b"1"), ("cdm-kind", b"chunk")]
    for _ in range(draw(st.integers(0, 3))):  # groups of headers: n headers of one name length and size
        n, size, pad = draw(st.integers(0, 500)), draw(st.integers(0, 2000)), draw(st.integers(0, 100))
        prefix = draw(st.sampled_from(["trace-", "cdm-x-", "cdm-dlq-", "ü-"]))
        headers += [(f"{prefix}{i}" + "h" * pad, b"y" * size) for i in range(n)]
    topic = draw(st.sampled_from(["cdm.sources", "cdm.control", "t" * 249]))
    return make_record(topic, key, value, headers)


# ------------------------------------------------------------------------------------------------ properties


def check_dead_letter(rec: ConsumerRecord, error: WireError) -> None:
    """The dead-letter copy fits DLQ_LIMIT and announces what it left out."""
    dlq = encode_dlq(rec, error, max_record_bytes=DLQ_LIMIT)
    assert record_size_bound(dlq.key, dlq.value, dlq.headers) <= DLQ_LIMIT
    headers = dict(dlq.headers)
    assert headers["cdm-dlq-reason"] == error.reason.encode()
    if rec.value is not None and dlq.value is None:
        assert headers["cdm-dlq-value-omitted"] == str(len(rec.value)).encode()
    if rec.key is not None and dlq.key is None:
        assert headers["cdm-dlq-key-omitted"] == str(len(rec.key)).encode()
    original = [h for h in rec.headers if not h[0].startswith("cdm-dlq-")]
    kept = [h for h in dlq.headers if not h[0].startswith("cdm-dlq-")]
    if len(kept) < len(original):
        assert headers["cdm-dlq-headers-omitted"] == str(len(original) - len(kept)).encode()


def decodes_or_refuses(
    decode: Callable[[ConsumerRecord], object], rec: ConsumerRecord, outcomes: dict[str, int]
) -> None:
    try:
        decoded = decode(rec)
    except WireError as exc:  # anything else fails the property
        assert exc.reason in REASONS
        assert len(exc.detail) <= 1000
        outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
        check_dead_letter(rec, exc)
        return
    assert decoded is not None
    outcomes["decoded"] = outcomes.get("decoded", 0) + 1
    check_dead_letter(rec, WireError("control-failed", "a decoded record can still be dead-lettered"))


def test_any_source_record_decodes_or_raises_wire_error(tmp_path: Path) -> None:
    good = savez({"images": np.zeros((2, 4, 4), np.uint8), "ids": np.arange(2)}, True)
    mutated = [good[:-10], patch_all(good, CENTRAL, METHOD[CENTRAL], "<H", 12), zip_members([("images.npy", b"")])]
    claims = ClaimRoot(tmp_path / "claims", good, mutated)
    outcomes: dict[str, int] = {}

    def decode(rec: ConsumerRecord) -> object:
        if rec.value and rec.value[:2] == b"PK":
            # the library entry point reads chunk payloads the same way: its own DataError, or arrays
            with contextlib.suppress(DataError):
                load_npz_bytes(rec.value, max_bytes=LIMIT)
        return decode_source_message(
            rec, max_value_bytes=LIMIT, claim_check_root=claims.root, max_ref_bytes=LIMIT, max_decoded_bytes=LIMIT
        )

    @fuzz_settings(N_SOURCE)
    @given(rec=source_records(claims))
    def check(rec: ConsumerRecord) -> None:
        decodes_or_refuses(decode, rec, outcomes)

    check()
    total = sum(outcomes.values())
    print(f"{total} cdm.sources records: {dict(sorted(outcomes.items()))}")
    assert total >= N_SOURCE
    # the generator reaches deep into the decoder: valid chunks and seals, and the archive-level refusals
    for outcome in ("decoded", "bad-npz", "bad-shape", "nan", "oversized", "too-many-chunks", "bad-ref", "bad-json"):
        assert outcomes.get(outcome, 0) >= 10, (outcome, outcomes)


def test_any_control_record_decodes_or_raises_wire_error() -> None:
    outcomes: dict[str, int] = {}

    @fuzz_settings(N_CONTROL)
    @given(rec=control_records())
    def check(rec: ConsumerRecord) -> None:
        decodes_or_refuses(decode_control, rec, outcomes)

    check()
    total = sum(outcomes.values())
    print(f"{total} cdm.control records: {dict(sorted(outcomes.items()))}")
    assert total >= N_CONTROL
    for outcome in ("decoded", "bad-json", "bad-op", "bad-key", "bad-version"):
        assert outcomes.get(outcome, 0) >= 10, (outcome, outcomes)


def test_dead_letter_copy_of_any_record_fits_the_limit() -> None:
    count = 0

    @fuzz_settings(N_DLQ)
    @given(rec=large_records(), reason=st.sampled_from(REASONS), detail=st.text(max_size=3000))
    def check(rec: ConsumerRecord, reason: Any, detail: str) -> None:
        nonlocal count
        count += 1
        check_dead_letter(rec, WireError(reason, detail))

    check()
    print(f"{count} dead-letter copies of large records")
    assert count >= N_DLQ
