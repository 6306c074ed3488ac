"""Kafka message formats of cdm, version 1 (specified in docs/wire-format.md).

Decoders take any record with Kafka's ``ConsumerRecord`` fields and either return a typed message or raise
:class:`WireError` whose ``reason`` is the machine-readable code written to the dead-letter topic.
Encoders return :class:`WireMessage` (key, value, headers) for ``KafkaProducer.send`` to a topic of
the caller's choice.
Nothing here performs network I/O; a claim-check pointer is resolved only inside an allowed local root.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import urllib.parse
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, Protocol, get_args

import numpy as np

from cdm.data import SourceData, npz_bytes, read_npz_arrays, validate_arrays
from cdm.errors import DataError, DataTooLarge
from common.names import SOURCE_NAME_RULE, is_source_name
from common.redact import bound
from daemon.errors import MessageError

WIRE_VERSION: Final = 1

# Header names (values are ASCII bytes).
H_VERSION: Final = "cdm-version"
H_KIND: Final = "cdm-kind"
H_SEQ: Final = "cdm-seq"
H_SHA256: Final = "cdm-sha256"
H_DLQ_REASON: Final = "cdm-dlq-reason"
H_DLQ_DETAIL: Final = "cdm-dlq-detail"
H_DLQ_TOPIC: Final = "cdm-dlq-topic"
H_DLQ_PARTITION: Final = "cdm-dlq-partition"
H_DLQ_OFFSET: Final = "cdm-dlq-offset"
H_DLQ_VALUE_OMITTED: Final = "cdm-dlq-value-omitted"
H_DLQ_HEADERS_OMITTED: Final = "cdm-dlq-headers-omitted"
H_DLQ_KEY_OMITTED: Final = "cdm-dlq-key-omitted"

Kind = Literal["chunk", "chunk-ref", "seal", "control"]
Op = Literal["forget-source", "forget-samples", "retrain-router"]
OPS: Final[tuple[str, ...]] = get_args(Op)

# Dead-letter reason codes (the value of the cdm-dlq-reason header). docs/wire-format.md explains each one.
Reason = Literal[
    "bad-version",  # cdm-version header (or control "version") missing or not 1
    "bad-kind",  # cdm-kind missing, unknown, or not allowed on this topic
    "bad-key",  # record key / control "source" is not a valid source id
    "bad-header",  # cdm-seq or cdm-sha256 missing, malformed or repeated
    "oversized",  # value over max_message_bytes, .npz over max_decoded_bytes, claim-check file over its limit
    "too-many-chunks",  # seal chunks > daemon.max_chunks_per_source, or cdm-seq >= it
    "bad-npz",  # value (or referenced file) is not a readable, pickle-free .npz with an `images` array
    "bad-shape",  # arrays have the wrong dtype, rank, length or range (cdm.data.validate_arrays refused them)
    "nan",  # a floating array holds NaN or infinity
    "hash-mismatch",  # sha256 of the value or of the referenced file differs from the one announced
    "bad-ref",  # claim-check URI not file://, outside the allowed root, missing, or not a regular file
    "bad-json",  # JSON value unparsable, not an object, unknown/missing field or wrongly typed field
    "bad-op",  # control "op" is not one of OPS
    "seq-conflict",  # a chunk with this (source, seq) was staged before with different content
    "sealed",  # chunk with seq >= chunks for an already sealed source, or a different seal for it
    "missing-chunks",  # seal arrived but chunks 0..N-1 are not all staged
    "seal-mismatch",  # staged chunks do not match the seal's n_samples/fingerprint, or extra chunks staged
    "control-failed",  # the daemon could not execute a valid control command
    "decode-failed",
    "limit-exceeded",
    "incompatible",  # decoder crashed; over a spool limit; can never train
    "training-failed",  # the sealed source failed to train daemon.job_max_attempts times; it is dropped
]
REASONS: Final[tuple[str, ...]] = get_args(Reason)

_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_REQUEST_ID_RE: Final = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII without spaces
_DETAIL_MAX: Final = 1000  # characters of a WireError's detail (and so of cdm-dlq-detail and log lines)
_JSON_MAX_DEPTH: Final = 2  # every v1 JSON value is an object of scalars and lists of scalars
# Defaults of the daemon.* limits (daemon/config.py) for callers that pass none.
DEFAULT_MAX_DECODED_BYTES: Final = 1 << 30  # uncompressed size of one chunk's arrays
DEFAULT_MAX_REF_BYTES: Final = 1 << 30  # size of one claim-check file
DEFAULT_MAX_CHUNKS: Final = 10_000  # chunks of one source (a seal's `chunks`; cdm-seq is below it)
MAX_SEQ: Final = 999_999_999  # largest cdm-seq the wire can carry (9 digits)
# A dead-letter copy reduced to its cdm-dlq-* headers fits in this (detail <= 6000 bytes, topic <= 249);
# kafka.max_message_bytes may not be smaller, so that dead-lettering never fails on size.
DLQ_MIN_RECORD_BYTES: Final = 16 * 1024


class WireError(MessageError):
    """A record cannot be accepted: ``reason`` (one of REASONS) is the dead-letter code, ``detail`` why."""

    def __init__(self, reason: Reason, detail: str) -> None:
        assert reason in REASONS, reason
        # details quote record content: keep log lines and dead letters bounded (cut with the original length)
        super().__init__(reason, bound(detail, _DETAIL_MAX))
        self.reason: Reason = reason


class RecordLike(Protocol):
    """The fields of ``kafka.consumer.fetcher.ConsumerRecord`` the decoders use."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]] | None: ...


class Origin(NamedTuple):
    """Where a record was read from; the lineage of everything staged."""

    topic: str
    partition: int
    offset: int

    @classmethod
    def of(cls, record: RecordLike) -> Origin:
        return cls(record.topic, record.partition, record.offset)


@dataclass(frozen=True)
class ClaimCheck:
    """Pointer to a chunk too large to travel inline (value of a ``chunk-ref`` record)."""

    uri: str  # file:///absolute/path.npz, under the daemon's claim-check root
    sha256: str  # of the file's bytes
    size: int  # file size in bytes
    seq: int  # chunk sequence number (equals the cdm-seq header)


@dataclass(frozen=True)
class Chunk:
    """One decoded chunk of a source (inline or fetched through a claim check)."""

    source: str
    seq: int  # 0-based position of the chunk in the source
    data: SourceData
    sha256: str  # of the .npz payload bytes
    ref: ClaimCheck | None = None  # set when the payload came from a claim-check file


@dataclass(frozen=True)
class Seal:
    """End of a source: the chunk count and the fingerprint of the concatenated data in seq order."""

    source: str
    chunks: int
    fingerprint: str  # cdm.data.fingerprint(cdm.data.concat(chunks in seq order))
    n_samples: int


@dataclass(frozen=True)
class ControlCommand:
    """A command on the control topic."""

    op: Op
    source: str | None = None  # required for forget-source and forget-samples
    sample_ids: tuple[int, ...] = ()  # required (non-empty) for forget-samples only
    request_id: str | None = None  # caller's id, echoed in receipts


@dataclass(frozen=True)
class WireMessage:
    """What to hand to ``KafkaProducer.send(topic, key=..., value=..., headers=...)``."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- helpers


def validate_source_id(source: object, *, where: str = "key") -> str:
    """Return ``source`` if it follows the source-name rule (``common.names``); else WireError bad-key."""
    if not is_source_name(source):
        raise WireError("bad-key", f"{where} {source!r:.100} is not a source id ({SOURCE_NAME_RULE})")
    return source


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _headers(record: RecordLike) -> dict[str, bytes]:
    """cdm-* headers as a dict; a repeated cdm-* header is refused (it would be ambiguous)."""
    out: dict[str, bytes] = {}
    for name, value in record.headers or ():
        if not name.startswith("cdm-"):
            continue
        if name in out:
            raise WireError("bad-header", f"header {name} appears more than once")
        out[name] = value if value is not None else b""
    return out


def _ascii(headers: dict[str, bytes], name: str) -> str | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return "\ufffd"  # never valid for any cdm header; callers report it


def _check_version(headers: dict[str, bytes]) -> None:
    version = _ascii(headers, H_VERSION)
    if version != str(WIRE_VERSION):
        got = "missing" if version is None else repr(version)
        raise WireError("bad-version", f"header {H_VERSION} is {got}; this daemon reads version {WIRE_VERSION}")


def _seq(headers: dict[str, bytes], max_chunks: int) -> int:
    text = _ascii(headers, H_SEQ)
    if text is None or not text.isdigit() or len(text) > len(str(MAX_SEQ)):
        raise WireError("bad-header", f"header {H_SEQ} must be a chunk number 0..{MAX_SEQ}, got {text!r:.100}")
    seq = int(text)
    if seq >= max_chunks:
        raise WireError(
            "too-many-chunks",
            f"header {H_SEQ} is {seq}; a source has at most {max_chunks} chunks (0..{max_chunks - 1}, "
            "daemon.max_chunks_per_source): send fewer, larger chunks or raise the limit",
        )
    return seq


def _check_sha256(headers: dict[str, bytes], value: bytes, *, required: bool) -> str:
    """Verify the cdm-sha256 header against ``value``; return the value's sha256."""
    got = sha256_hex(value)
    want = _ascii(headers, H_SHA256)
    if want is None:
        if required:
            raise WireError("bad-header", f"header {H_SHA256} (sha256 of the value) is required on chunks")
        return got
    if not _SHA256_RE.fullmatch(want.lower()):
        raise WireError("bad-header", f"header {H_SHA256} must be 64 hex digits, got {want!r:.100}")
    if want.lower() != got:
        raise WireError("hash-mismatch", f"value sha256 is {got}, header {H_SHA256} says {want.lower()}")
    return got


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _json_object(value: bytes | None, what: str) -> dict[str, Any]:
    if value is None:
        raise WireError("bad-json", f"{what} value is empty (null record value)")
    try:
        obj = json.loads(value.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and ints over 4300 digits
        raise WireError("bad-json", f"{what} value is not UTF-8 JSON: {exc}") from exc
    except RecursionError:  # json's documented refusal of nesting deeper than the interpreter's stack
        raise WireError("bad-json", f"{what} value nests too deeply to parse") from None
    if not isinstance(obj, dict):
        raise WireError("bad-json", f"{what} value must be a JSON object, got {type(obj).__name__}")
    if _json_depth(obj) > _JSON_MAX_DEPTH:  # before any repr() of a field could recurse through it
        raise WireError(
            "bad-json", f"{what} value nests deeper than {_JSON_MAX_DEPTH} levels; fields are scalars or flat lists"
        )
    return obj


def _json_depth(obj: object) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, a flat object 1), computed without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > _JSON_MAX_DEPTH:
                break
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _check_fields(
    obj: dict[str, Any], what: str, *, required: AbstractSet[str], optional: AbstractSet[str] = frozenset()
) -> None:
    """WireError bad-json unless ``obj``'s keys are all of ``required`` plus any of ``optional``."""
    unknown = sorted(set(obj) - required - optional)
    if unknown:
        raise WireError("bad-json", f"{what}: unknown field(s) {unknown}; allowed {sorted(required | optional)}")
    missing = sorted(required - set(obj))
    if missing:
        raise WireError("bad-json", f"{what}: missing field(s) {missing}")


def _int(obj: dict[str, Any], name: str, what: str, *, minimum: int) -> int:
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise WireError("bad-json", f"{what}: {name} must be an integer >= {minimum}, got {v!r:.100}")
    return v


def _sha(obj: dict[str, Any], name: str, what: str) -> str:
    v = obj[name]
    if not isinstance(v, str) or not _SHA256_RE.fullmatch(v.lower()):
        raise WireError("bad-json", f"{what}: {name} must be 64 hex digits (sha256), got {v!r:.100}")
    return v.lower()


def decode_npz(raw: bytes, *, where: str, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> SourceData:
    """Parse and validate a chunk's .npz bytes with cdm.data; map its refusal to a reason code.

    ``cdm.data.read_npz_arrays`` checks the archive's declared sizes (and every .npy header against its
    member) before anything is decompressed or allocated, so a small value cannot expand into more than
    ``max_decoded_bytes`` of memory, and it refuses every zip feature numpy does not write.
    """
    try:
        arrays = read_npz_arrays(raw, where=where, max_bytes=max_decoded_bytes)
    except DataTooLarge as exc:
        raise WireError("oversized", str(exc)) from exc
    except DataError as exc:  # MalformedArchive, and anything else the reader refuses
        raise WireError("bad-npz", str(exc)) from exc
    for name, arr in arrays.items():
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise WireError("nan", f"{where}: '{name}' holds NaN or infinity (and floats are never accepted)")
    try:
        return validate_arrays(arrays["images"], arrays.get("labels"), arrays.get("ids"), where=where)
    except DataError as exc:
        raise WireError("bad-shape", str(exc)) from exc


# ---------------------------------------------------------------------------------------------- decoding


def decode_source_message(
    record: RecordLike,
    *,
    max_value_bytes: int | None = None,
    claim_check_root: Path | None = None,
    max_ref_bytes: int = DEFAULT_MAX_REF_BYTES,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
) -> Chunk | Seal:
    """Decode one ``cdm.sources`` record.

    Args:
        record: a consumed record (key = source id, cdm-* headers, value per kind).
        max_value_bytes: larger values are refused as ``oversized`` before anything is parsed.
        claim_check_root: directory under which ``chunk-ref`` files may live; None refuses every chunk-ref.
        max_ref_bytes: largest claim-check file that is read.
        max_decoded_bytes: largest uncompressed size of a chunk's arrays (guards against zip bombs).
        max_chunks: most chunks of one source: a seal announcing more, or a cdm-seq not below it, is
            ``too-many-chunks``.

    Raises:
        WireError: with the dead-letter reason code.
    """
    where = f"{record.topic}[{record.partition}]@{record.offset}"
    value = record.value
    if max_value_bytes is not None and value is not None and len(value) > max_value_bytes:
        raise WireError("oversized", f"value is {len(value)} bytes, the limit is {max_value_bytes}")
    headers = _headers(record)
    _check_version(headers)
    kind = _ascii(headers, H_KIND)
    if kind not in ("chunk", "chunk-ref", "seal"):
        raise WireError("bad-kind", f"header {H_KIND} is {kind!r}; {record.topic} carries chunk, chunk-ref, seal")
    try:
        key = record.key.decode("utf-8") if record.key is not None else None
    except UnicodeDecodeError:
        key = repr(record.key)
    source = validate_source_id(key, where="record key")

    if kind == "seal":
        _check_sha256(headers, value or b"", required=False)
        what = f"seal of {source}"
        obj = _json_object(value, what)
        _check_fields(obj, what, required={"chunks", "fingerprint", "n_samples"})
        chunks = _int(obj, "chunks", what, minimum=1)
        if chunks > max_chunks:
            raise WireError(
                "too-many-chunks",
                f"{what} announces {chunks} chunks; a source has at most {max_chunks} "
                "(daemon.max_chunks_per_source): send fewer, larger chunks or raise the limit",
            )
        return Seal(
            source=source,
            chunks=chunks,
            fingerprint=_sha(obj, "fingerprint", what),
            n_samples=_int(obj, "n_samples", what, minimum=1),
        )

    seq = _seq(headers, max_chunks)
    if value is None:
        raise WireError("bad-npz" if kind == "chunk" else "bad-json", f"{kind} {source}#{seq} has a null value")
    value_sha = _check_sha256(headers, value, required=True)
    if kind == "chunk":
        data = decode_npz(value, where=f"chunk {source}#{seq} at {where}", max_decoded_bytes=max_decoded_bytes)
        return Chunk(source=source, seq=seq, data=data, sha256=value_sha)

    what = f"chunk-ref {source}#{seq}"
    obj = _json_object(value, what)
    _check_fields(obj, what, required={"uri", "sha256", "size", "seq"})
    if not isinstance(obj["uri"], str):
        raise WireError("bad-json", f"{what}: uri must be a string, got {obj['uri']!r:.100}")
    ref = ClaimCheck(
        uri=obj["uri"],
        sha256=_sha(obj, "sha256", what),
        size=_int(obj, "size", what, minimum=0),
        seq=_int(obj, "seq", what, minimum=0),
    )
    if ref.seq != seq:
        raise WireError("bad-header", f"{what}: pointer seq {ref.seq} differs from header {H_SEQ}={seq}")
    raw = read_claim_check(ref, root=claim_check_root, max_bytes=max_ref_bytes)
    data = decode_npz(raw, where=f"claim-check file of {source}#{seq} ({ref.uri})", max_decoded_bytes=max_decoded_bytes)
    return Chunk(source=source, seq=seq, data=data, sha256=ref.sha256, ref=ref)


def claim_check_path(uri: str, *, root: Path | None) -> Path:
    """The local path a claim-check URI names, if it is a file:// URI resolving inside ``root``."""
    if root is None:
        raise WireError("bad-ref", f"claim checks are disabled on this daemon (no claim-check root); got {uri!r}")
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError as exc:  # e.g. an unbalanced "[" in the host part
        raise WireError("bad-ref", f"claim-check URI {uri!r:.200} is not a URI ({exc})") from exc
    if parts.scheme.lower() != "file":
        raise WireError("bad-ref", f"only file:// claim-check URIs are accepted, got scheme {parts.scheme!r:.100}")
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise WireError("bad-ref", f"claim-check URI {uri!r:.200} must be file:///absolute/path (no host/query)")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise WireError("bad-ref", f"claim-check URI {uri!r:.200} must name an absolute path")
    try:
        os.fsencode(path)
    except UnicodeEncodeError as exc:  # a lone surrogate from a JSON "\ud800" escape
        raise WireError("bad-ref", f"claim-check path {path!r:.200} is not a file name on this system") from exc
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))  # symlinks resolved: no escaping the root through a link
    if not real.is_relative_to(real_root) or real == real_root:
        raise WireError("bad-ref", f"claim-check path {path!r:.200} is outside the allowed root {real_root}")
    return real


def read_claim_check(ref: ClaimCheck, *, root: Path | None, max_bytes: int) -> bytes:
    """Read a claim-check file and verify its size and sha256 against the pointer."""
    path = claim_check_path(ref.uri, root=root)
    if ref.size > max_bytes:
        raise WireError("oversized", f"claim-check file {path} is {ref.size} bytes, the limit is {max_bytes}")
    try:
        # O_NONBLOCK: opening a FIFO planted under the root must not hang the consumer.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise WireError("bad-ref", f"cannot open claim-check file {path}: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise WireError("bad-ref", f"claim-check path {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size != ref.size:
            raise WireError("hash-mismatch", f"claim-check file {path} is {st.st_size} bytes, pointer says {ref.size}")
        raw = f.read(ref.size + 1)
    if len(raw) != ref.size:
        raise WireError("hash-mismatch", f"claim-check file {path} changed size while read ({len(raw)} bytes)")
    got = sha256_hex(raw)
    if got != ref.sha256:
        raise WireError("hash-mismatch", f"claim-check file {path} has sha256 {got}, pointer says {ref.sha256}")
    return raw


def decode_control(record: RecordLike) -> ControlCommand:
    """Decode one ``cdm.control`` record (JSON value; cdm-* headers optional but checked when present)."""
    headers = _headers(record)
    if H_VERSION in headers:
        _check_version(headers)
    kind = _ascii(headers, H_KIND)
    if kind not in (None, "control"):
        raise WireError("bad-kind", f"header {H_KIND} is {kind!r}; {record.topic} carries control")
    what = "control command"
    obj = _json_object(record.value, what)
    if obj.get("version") != WIRE_VERSION or isinstance(obj.get("version"), bool):
        raise WireError("bad-version", f"{what}: version is {obj.get('version')!r}; expected {WIRE_VERSION}")
    op = obj.get("op")
    if op not in OPS:
        raise WireError("bad-op", f"{what}: op {op!r} is not one of {list(OPS)}")
    what = f"control {op}"
    needs_source = op in ("forget-source", "forget-samples")
    required = {"version", "op"} | ({"source"} if needs_source else set())
    optional = {"request_id"} | ({"sample_ids"} if op == "forget-samples" else set())
    if op == "forget-samples":
        required.add("sample_ids")
    _check_fields(obj, what, required=required, optional=optional)
    source = validate_source_id(obj["source"], where=f"{what}: source") if needs_source else None
    sample_ids: tuple[int, ...] = ()
    if op == "forget-samples":
        raw_ids = obj["sample_ids"]
        if (
            not isinstance(raw_ids, list)
            or not raw_ids
            or any(isinstance(i, bool) or not isinstance(i, int) or not -(2**63) <= i < 2**63 for i in raw_ids)
        ):
            raise WireError("bad-json", f"{what}: sample_ids must be a non-empty list of int64, got {raw_ids!r:.200}")
        sample_ids = tuple(raw_ids)
    request_id = obj.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or not _REQUEST_ID_RE.fullmatch(request_id)):
        raise WireError("bad-json", f"{what}: request_id must be 1-128 printable ASCII characters, got {request_id!r}")
    return ControlCommand(op=op, source=source, sample_ids=sample_ids, request_id=request_id)


# ---------------------------------------------------------------------------------------------- encoding


def _base_headers(kind: Kind) -> list[tuple[str, bytes]]:
    return [(H_VERSION, str(WIRE_VERSION).encode()), (H_KIND, kind.encode())]


def encode_chunk(source: str, seq: int, data: SourceData) -> WireMessage:
    """An inline chunk: the .npz bytes of ``data`` with cdm-seq and cdm-sha256 headers."""
    return encode_chunk_bytes(source, seq, npz_bytes(data))


def encode_chunk_bytes(source: str, seq: int, payload: bytes) -> WireMessage:
    """An inline chunk from already serialised .npz bytes."""
    validate_source_id(source)
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")
    headers = [*_base_headers("chunk"), (H_SEQ, str(seq).encode()), (H_SHA256, sha256_hex(payload).encode())]
    return WireMessage(key=source.encode(), value=payload, headers=headers)


def encode_chunk_ref(source: str, ref: ClaimCheck) -> WireMessage:
    """A claim-check chunk: a JSON pointer to an .npz file the daemon can read."""
    validate_source_id(source)
    value = json.dumps(
        {"uri": ref.uri, "sha256": ref.sha256, "size": ref.size, "seq": ref.seq}, sort_keys=True
    ).encode()
    headers = [
        *_base_headers("chunk-ref"),
        (H_SEQ, str(ref.seq).encode()),
        (H_SHA256, sha256_hex(value).encode()),
    ]
    return WireMessage(key=source.encode(), value=value, headers=headers)


def encode_seal(seal: Seal) -> WireMessage:
    """The seal closing a source."""
    validate_source_id(seal.source)
    value = json.dumps(
        {"chunks": seal.chunks, "fingerprint": seal.fingerprint, "n_samples": seal.n_samples}, sort_keys=True
    ).encode()
    headers = [*_base_headers("seal"), (H_SHA256, sha256_hex(value).encode())]
    return WireMessage(key=seal.source.encode(), value=value, headers=headers)


def encode_control(command: ControlCommand) -> WireMessage:
    """A control command; keyed by source (so commands on one source stay ordered) or request id."""
    obj: dict[str, Any] = {"version": WIRE_VERSION, "op": command.op}
    if command.source is not None:
        obj["source"] = validate_source_id(command.source, where="source")
    if command.op == "forget-samples":
        obj["sample_ids"] = [int(i) for i in command.sample_ids]
    if command.request_id is not None:
        obj["request_id"] = command.request_id
    key = command.source or command.request_id
    return WireMessage(
        key=key.encode() if key else None,
        value=json.dumps(obj, sort_keys=True).encode(),
        headers=_base_headers("control"),
    )


def record_size_bound(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> int:
    """Upper bound of a record's size in a v2 record batch (what a producer's max_request_size limits)."""
    varints = 5 * (2 + 2 * len(headers))  # length prefixes, at most 5 bytes each
    body = len(key or b"") + len(value or b"") + sum(len(k.encode()) + len(v or b"") for k, v in headers)
    return 61 + 21 + varints + body  # batch header + largest per-record overhead


def encode_dlq(record: RecordLike, error: WireError, *, max_record_bytes: int | None = None) -> WireMessage:
    """The dead-letter copy of ``record``: original key, value and headers plus cdm-dlq-* headers.

    When the copy would exceed ``max_record_bytes`` (the dead-letter producer's ``max_request_size``), parts
    of the original are left out, as few as needed, in this order: the headers not starting with ``cdm-``
    (cdm-dlq-headers-omitted gives their count), the value (cdm-dlq-value-omitted gives its size), then the
    remaining original headers and the key (cdm-dlq-key-omitted gives its size). The cdm-dlq-* headers alone
    are at most DLQ_MIN_RECORD_BYTES, so with a limit at least that large dead-lettering cannot fail on size;
    the original stays in its topic until retention deletes it.
    """
    original = [(k, v) for k, v in (record.headers or ()) if not k.startswith("cdm-dlq-")]
    foreign = [(k, v) for k, v in original if not k.startswith("cdm-")]
    ours = [(k, v) for k, v in original if k.startswith("cdm-")]
    dlq = [
        (H_DLQ_REASON, error.reason.encode()),
        # at most _DETAIL_MAX characters (WireError cuts it); a lone surrogate quoted from a record is escaped
        (H_DLQ_DETAIL, error.detail[:_DETAIL_MAX].encode("utf-8", "backslashreplace")),
        (H_DLQ_TOPIC, record.topic.encode()),
        (H_DLQ_PARTITION, str(record.partition).encode()),
        (H_DLQ_OFFSET, str(record.offset).encode()),
    ]
    key, value = record.key, record.value
    # (drop foreign headers, drop value, drop all original headers and the key), least loss first
    plans = [(False, False, False), (True, False, False), (False, True, False), (True, True, False), (True, True, True)]
    for drop_foreign, drop_value, drop_rest in plans:
        kept = [] if drop_rest else [*(() if drop_foreign else foreign), *ours]
        headers = [*kept, *dlq]
        dropped = len(original) - len(kept)
        if dropped:
            headers.append((H_DLQ_HEADERS_OMITTED, str(dropped).encode()))
        if drop_value and value is not None:
            headers.append((H_DLQ_VALUE_OMITTED, str(len(value)).encode()))
        if drop_rest and key is not None:
            headers.append((H_DLQ_KEY_OMITTED, str(len(key)).encode()))
        copy = WireMessage(key=None if drop_rest else key, value=None if drop_value else value, headers=headers)
        if max_record_bytes is None or record_size_bound(copy.key, copy.value, copy.headers) <= max_record_bytes:
            break
    return copy
