"""Producer side of the wire format: push a source as chunks + seal, send control commands.

The ``cdm push`` CLI wraps these; any ``KafkaProducer`` (bytes key/value, no serializers) works.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from kafka import KafkaProducer
from tqdm import tqdm

from cdm.data import SourceData, fingerprint, npz_bytes
from cdm.fsio import write_atomic
from daemon.wire import (
    ClaimCheck,
    ControlCommand,
    Origin,
    Seal,
    WireError,
    WireMessage,
    encode_chunk_bytes,
    encode_chunk_ref,
    encode_control,
    encode_seal,
    sha256_hex,
    validate_source_id,
)

# Largest inline chunk value: under Kafka's default 1 MiB message.max.bytes with room for key and headers.
DEFAULT_INLINE_LIMIT: Final = 900_000


@dataclass(frozen=True)
class PushReport:
    """What :func:`push_source` sent."""

    source: str
    topic: str
    partition: int  # all records of a source share it (same key)
    first_offset: int  # offset of chunk #0
    seal_offset: int  # offset of the seal
    chunks: int
    inline_chunks: int
    ref_chunks: int  # chunks sent as claim-check pointers
    n_samples: int
    fingerprint: str  # the seal's fingerprint
    value_bytes: int  # bytes of record values sent (pointers count as their JSON)
    seconds: float


def _send(producer: KafkaProducer, topic: str, message: WireMessage) -> Any:
    return producer.send(topic, key=message.key, value=message.value, headers=message.headers)


def _claim_check(directory: Path, source: str, seq: int, payload: bytes) -> ClaimCheck:
    """Write ``payload`` under ``directory`` and return the pointer the daemon will resolve."""
    digest = sha256_hex(payload)
    path = (directory / source / f"{seq:09d}-{digest[:16]}.npz").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, payload)
    return ClaimCheck(uri=path.as_uri(), sha256=digest, size=len(payload), seq=seq)


def push_source(
    producer: KafkaProducer,
    topic: str,
    source: str,
    data: SourceData,
    *,
    chunk_size: int,
    claim_check_dir: Path | None = None,
    inline_limit: int = DEFAULT_INLINE_LIMIT,
    progress: bool | None = None,
    timeout_s: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> PushReport:
    """Send ``data`` as source ``source``: chunks ``0..N-1``, then, once all are acknowledged, the seal.

    Args:
        producer: a KafkaProducer without serializers (bytes key/value).
        topic: the sources topic (``KafkaConfig.sources_topic``).
        source: source id, 1-64 characters of ``[A-Za-z0-9._-]``, not starting with ``.``.
        data: the source; its ``ids`` travel with every chunk, so the daemon reassembles them exactly.
        chunk_size: samples per chunk.
        claim_check_dir: where chunks larger than ``inline_limit`` are written, to be referenced by a
            file:// URI; it must lie under the daemon's claim-check root. None: such chunks are an error.
        inline_limit: largest .npz value sent inline, in bytes.
        progress: show a tqdm bar; None shows it when stderr is a terminal.
        timeout_s: how long to wait for the broker to acknowledge each batch.

    Raises:
        ValueError: bad source id, chunk size, or a chunk over ``inline_limit`` without ``claim_check_dir``.
        kafka.errors.KafkaError: the broker did not acknowledge a record (nothing is sealed then).
    """
    try:
        validate_source_id(source, where="source")
    except WireError as exc:
        raise ValueError(exc.detail) from None
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 sample, got {chunk_size}")
    n = len(data)
    if n == 0:
        raise ValueError(f"source {source!r} is empty; nothing to push")
    start = clock()
    n_chunks = -(-n // chunk_size)
    show = sys.stderr.isatty() if progress is None else progress
    futures = []
    inline = refs = value_bytes = 0
    with tqdm(total=n, unit="sample", desc=f"push {source}", disable=not show) as bar:
        # 1. chunks, each inline or as a claim check
        for seq in range(n_chunks):
            lo, hi = seq * chunk_size, min(n, (seq + 1) * chunk_size)
            payload = npz_bytes(data.subset(np.arange(lo, hi)))
            if len(payload) <= inline_limit:
                message = encode_chunk_bytes(source, seq, payload)
                inline += 1
            elif claim_check_dir is not None:
                message = encode_chunk_ref(source, _claim_check(Path(claim_check_dir), source, seq, payload))
                refs += 1
            else:
                raise ValueError(
                    f"chunk #{seq} of {source!r} is {len(payload)} bytes, over inline_limit={inline_limit}; "
                    f"lower chunk_size (now {chunk_size}) or pass claim_check_dir"
                    + (f" ({seq} chunk(s) were already sent; push again to complete the source)" if seq else "")
                )
            value_bytes += len(message.value or b"")
            futures.append(_send(producer, topic, message))
            bar.update(hi - lo)
        # 2. wait for every chunk: the seal must not overtake a chunk that is retried
        producer.flush(timeout=timeout_s)
        metadata = [f.get(timeout=timeout_s) for f in futures]
        # 3. the seal
        seal = Seal(source=source, chunks=n_chunks, fingerprint=fingerprint(data), n_samples=n)
        seal_message = encode_seal(seal)
        value_bytes += len(seal_message.value or b"")
        seal_md = _send(producer, topic, seal_message).get(timeout=timeout_s)
    return PushReport(
        source=source,
        topic=topic,
        partition=seal_md.partition,
        first_offset=metadata[0].offset,
        seal_offset=seal_md.offset,
        chunks=n_chunks,
        inline_chunks=inline,
        ref_chunks=refs,
        n_samples=n,
        fingerprint=seal.fingerprint,
        value_bytes=value_bytes,
        seconds=clock() - start,
    )


def send_control(producer: KafkaProducer, topic: str, command: ControlCommand, *, timeout_s: float = 30.0) -> Origin:
    """Send one control command and wait for the broker; returns where it was written."""
    md = _send(producer, topic, encode_control(command)).get(timeout=timeout_s)
    return Origin(md.topic, md.partition, md.offset)
