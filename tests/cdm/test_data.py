"""Data entry points: IDX parsing, .npz validation (each kind of bad input), fingerprints, splits, tensors."""

from __future__ import annotations

import gzip
import io
import struct
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from cdm.data import (
    SourceData,
    concat,
    fingerprint,
    from_model_tensor,
    load_digits,
    load_npz,
    load_npz_bytes,
    npz_bytes,
    parse_idx,
    read_idx,
    save_npz,
    split_sources,
    to_model_tensor,
    validate_arrays,
    write_idx,
)
from cdm.errors import DataError, DataTooLarge, MalformedArchive

IMAGES = np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8)
LABELS = np.array([0, 1, 2, 0, 1, 2])


def npz(**arrays: object) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def test_idx_round_trip_and_corrupt_headers(tmp_path: Path) -> None:
    p = write_idx(tmp_path / "x-idx3-ubyte.gz", IMAGES)
    np.testing.assert_array_equal(read_idx(p), IMAGES)
    raw = gzip.decompress(p.read_bytes())
    with pytest.raises(DataError, match="magic"):
        parse_idx(b"\x01\x00" + raw[2:])
    with pytest.raises(DataError, match="too short"):
        parse_idx(b"\x00")
    with pytest.raises(DataError, match="type code"):
        parse_idx(b"\x00\x00\x42\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DataError):
        parse_idx(raw[:-5])  # truncated payload


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": IMAGES.astype(np.float32)}, "uint8"),
        ({"images": IMAGES[0]}, "images"),  # 2-D: a single image without N
        ({"images": IMAGES[:0]}, "zero samples"),
        ({"images": IMAGES, "labels": LABELS[:4]}, "length"),
        ({"images": IMAGES, "labels": np.array([0, 1, 2, 0, 1, -1])}, "label"),
        ({"images": IMAGES, "labels": LABELS.astype(np.float64) + 0.5}, "labels"),
        ({"images": np.full((2, 4, 4), np.nan, dtype=np.float32)}, "uint8"),
        ({"images": IMAGES, "ids": np.array([1, 1, 2, 3, 4, 5])}, "unique"),
        ({"images": np.zeros((2, 4, 4, 2), dtype=np.uint8)}, "channel|C"),
        ({"images": IMAGES, "extra": LABELS}, "extra|unexpected|allowed"),
        ({"labels": LABELS}, "images"),
    ],
)
def test_each_kind_of_bad_npz_is_named(arrays: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_npz_bytes(npz(**arrays), num_classes=3)


def test_labels_out_of_range_for_the_store() -> None:
    with pytest.raises(DataError, match="3"):
        load_npz_bytes(npz(images=IMAGES, labels=np.array([0, 1, 2, 3, 0, 1])), num_classes=3)


def test_pickled_and_corrupt_payloads_are_refused(tmp_path: Path) -> None:
    obj = np.array([{"evil": 1}, None], dtype=object)
    with pytest.raises(DataError):
        load_npz_bytes(npz(images=obj))
    with pytest.raises(DataError, match=r"npz|zip"):
        load_npz_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"npz|zip"):
        load_npz_bytes(b"hello")
    with pytest.raises(DataError, match="no such"):
        load_npz(tmp_path / "missing.npz")


def test_npz_round_trip_and_fingerprint(tmp_path: Path) -> None:
    d = validate_arrays(IMAGES, LABELS)
    assert d.images.shape == (6, 8, 8, 1) and d.ids.tolist() == list(range(6))
    p = save_npz(tmp_path / "s.npz", d)
    back = load_npz(p)
    np.testing.assert_array_equal(back.images, d.images)
    assert fingerprint(back) == fingerprint(d) == fingerprint(load_npz_bytes(npz_bytes(d)))
    changed = validate_arrays(IMAGES, np.array([0, 1, 2, 0, 1, 1]))
    assert fingerprint(changed) != fingerprint(d)
    reordered = d.subset(np.array([1, 0, 2, 3, 4, 5]))
    assert fingerprint(reordered) != fingerprint(d)


def _member_npz(npy: bytes, method: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=method) as archive:
        archive.writestr("images.npy", npy)
    return out.getvalue()


def _npy(arr: np.ndarray, *, shape: tuple[int, ...] | None = None) -> bytes:
    """``arr`` as .npy, its header then claiming ``shape`` (header length unchanged)."""
    buf = io.BytesIO()
    np.save(buf, arr)
    raw = buf.getvalue()
    if shape is None:
        return raw
    length = struct.unpack("<H", raw[8:10])[0]
    header = raw[10 : 10 + length].decode("latin1").replace(repr(arr.shape), repr(shape)).rstrip()
    return raw[:10] + (header + " " * (length - 1 - len(header)) + "\n").encode("latin1") + raw[10 + length :]


def _peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _refuses(kind: type[DataError], raw: bytes, match: str, **kwargs: int) -> None:
    with pytest.raises(kind, match=match):
        load_npz_bytes(raw, **kwargs)  # type: ignore[arg-type]


def test_npy_header_shapes_are_checked_before_allocating() -> None:
    # main allocated the declared shape (1 GiB here, traced by tracemalloc) before finding the data short
    raw = _member_npz(_npy(np.zeros((2, 4, 4), np.uint8), shape=(2**26, 4, 4)))
    assert _peak(lambda: _refuses(MalformedArchive, raw, "declares shape")) < 1 << 20
    _refuses(MalformedArchive, _member_npz(_npy(np.zeros((2, 4, 4), np.uint8), shape=(2**40, 4, 4))), "declares")
    _refuses(MalformedArchive, _member_npz(_npy(np.zeros((2, 4, 4), np.uint8))[:-3]), "declares")  # data short


def test_bzip2_members_are_never_decompressed() -> None:
    # main decompressed the whole bzip2 block (32 MiB here) before zipfile cut it at the declared size
    npy = _npy(np.zeros((2, 4, 4), np.uint8))
    bomb = bytearray(_member_npz(npy + b"\0" * (32 << 20), zipfile.ZIP_BZIP2))
    cd = bomb.find(b"PK\x01\x02")
    struct.pack_into("<I", bomb, cd + 24, len(npy))  # declare the honest-looking size
    assert _peak(lambda: _refuses(MalformedArchive, bytes(bomb), "compression method 12")) < 1 << 20


def test_size_limit_and_archive_refusals_are_data_errors(tmp_path: Path) -> None:
    raw = npz(images=IMAGES, labels=LABELS)
    _refuses(DataTooLarge, raw, "limit is 100", max_bytes=100)
    assert len(load_npz_bytes(raw, max_bytes=len(raw) * 2)) == 6
    encrypted = bytearray(raw)
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = encrypted.find(signature)
        while at >= 0:
            struct.pack_into("<H", encrypted, at + offset, 1)
            at = encrypted.find(signature, at + 4)
    path = tmp_path / "encrypted.npz"
    path.write_bytes(bytes(encrypted))
    with pytest.raises(MalformedArchive, match="zip flags 0x0001"):
        load_npz(path)  # main: DataError only by a blanket `except Exception` around np.load
    _refuses(MalformedArchive, _npy(IMAGES), "not an .npz")  # a bare .npy


@pytest.mark.parametrize("scheme", ["random", "by-class", "dirichlet"])
def test_splits_are_deterministic_and_partition_the_data(scheme: str) -> None:
    data = load_digits()
    a = split_sources(data, scheme, 4, seed=3)
    b = split_sources(data, scheme, 4, seed=3)
    assert [fingerprint(x) for x in a] == [fingerprint(x) for x in b]
    ids = np.concatenate([x.ids for x in a])
    assert sorted(ids.tolist()) == sorted(data.ids.tolist()), "every sample exactly once"
    assert all(len(x) > 0 for x in a)
    if scheme == "by-class":
        classes = [set(x.labels.tolist()) for x in a]  # type: ignore[union-attr]
        assert all(not (classes[i] & classes[j]) for i in range(4) for j in range(i + 1, 4))
    c = split_sources(data, scheme, 4, seed=4)
    if scheme != "by-class":
        assert [fingerprint(x) for x in c] != [fingerprint(x) for x in a]


def test_by_class_needs_enough_classes() -> None:
    with pytest.raises(DataError):
        split_sources(load_digits(), "by-class", 11, seed=0)


def test_model_tensor_round_trip() -> None:
    x = to_model_tensor(IMAGES, 8)
    assert x.shape == (6, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    np.testing.assert_array_equal(from_model_tensor(x)[..., 0], IMAGES)
    assert to_model_tensor(IMAGES, 4).shape == (6, 1, 4, 4)


def test_concat_keeps_ids_and_refuses_duplicates() -> None:
    d = validate_arrays(IMAGES, LABELS)
    with pytest.raises(DataError):
        concat([d, d])
    both = concat([d.subset(slice(0, 3)), d.subset(slice(3, 6))])
    assert isinstance(both, SourceData) and both.ids.tolist() == list(range(6))
