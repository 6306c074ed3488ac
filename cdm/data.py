"""Source data: IDX and .npz readers, validation, splits, fingerprints and model-tensor conversion.

``validate_arrays`` is the single place where image data enters the library; every other entry point
(``load_npz``, ``load_npz_bytes``, the dataset loaders) goes through it. Errors are ``DataError`` and name the
array, the bad value and what is allowed.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Literal

import numpy as np
import torch
import torch.nn.functional as F

from cdm.errors import DataError, DataTooLarge, MalformedArchive
from cdm.fsio import write_atomic

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
NPZ_KEYS = ("images", "labels", "ids")  # the only keys an .npz source may hold; ``images`` is required
ALLOWED_CHANNELS = (1, 3)

# IDX type codes (http://yann.lecun.com/exdb/mnist/): byte 3 of the magic number -> big-endian dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("=").str: code for code, dt in _IDX_DTYPES.items()}

Scheme = Literal["random", "by-class", "dirichlet"]
Index = np.ndarray | Sequence[int] | Sequence[bool] | slice


# ----------------------------------------------------------------------------------------------------
# SourceData


@dataclass(frozen=True, eq=False)
class SourceData:
    """One source's samples. Build it with ``validate_arrays`` (or a loader), which enforces invariants."""

    images: np.ndarray  # uint8 (N,H,W,C), always 4-D, C in (1, 3)
    labels: np.ndarray | None  # int64 (N,) in [0, num_classes), or None for an unlabelled source
    ids: np.ndarray  # int64 (N,) unique sample ids (default arange(N)); used by forget-samples

    def __post_init__(self) -> None:
        # Cheap structural invariants only; value checks (ranges, uniqueness) live in validate_arrays.
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(
                f"SourceData.images must be uint8 (N,H,W,C); got {self.images.dtype} {self.images.shape} "
                "(build SourceData with cdm.data.validate_arrays)"
            )
        n = self.images.shape[0]
        if self.labels is not None and (self.labels.dtype != np.int64 or self.labels.shape != (n,)):
            raise DataError(
                f"SourceData.labels must be int64 ({n},); got {self.labels.dtype} {self.labels.shape} "
                "(build SourceData with cdm.data.validate_arrays)"
            )
        if self.ids.dtype != np.int64 or self.ids.shape != (n,):
            raise DataError(
                f"SourceData.ids must be int64 ({n},); got {self.ids.dtype} {self.ids.shape} "
                "(build SourceData with cdm.data.validate_arrays)"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        n, h, w, c = self.images.shape
        lab = "unlabelled" if self.labels is None else "labelled"
        return f"SourceData(n={n}, image={h}x{w}x{c}, {lab})"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        _, h, w, c = self.images.shape
        return int(h), int(w), int(c)

    def class_counts(self, num_classes: int) -> list[int]:
        """Number of samples of each class 0..num_classes-1."""
        if self.labels is None:
            raise DataError("class_counts needs labels, but this source is unlabelled")
        if len(self.labels) and int(self.labels.max()) >= num_classes:
            raise DataError(
                f"labels contain class {int(self.labels.max())}, but num_classes = {num_classes} "
                f"allows only 0..{num_classes - 1}"
            )
        return [int(c) for c in np.bincount(self.labels, minlength=num_classes)]

    def subset(self, index_or_mask: Index) -> SourceData:
        """Samples selected by a boolean mask (length N), an integer index array or a slice; may be empty."""
        n = len(self)
        if isinstance(index_or_mask, slice):
            idx = np.arange(n)[index_or_mask]
        else:
            sel = np.asarray(index_or_mask)
            if sel.ndim != 1:
                raise DataError(f"subset index must be 1-D; got shape {sel.shape}")
            if sel.dtype == np.bool_:
                if sel.shape[0] != n:
                    raise DataError(f"subset mask has length {sel.shape[0]}, but the source has {n} samples")
                idx = np.flatnonzero(sel)
            elif sel.size == 0:
                idx = np.zeros(0, dtype=np.int64)
            elif np.issubdtype(sel.dtype, np.integer):
                idx = sel.astype(np.int64)
                bad = idx[(idx < -n) | (idx >= n)]
                if bad.size:
                    raise DataError(f"subset index {int(bad[0])} is out of range for a source of {n} samples")
                idx = np.where(idx < 0, idx + n, idx)
                if np.unique(idx).size != idx.size:
                    raise DataError("subset index repeats a sample; ids must stay unique, select each once")
            else:
                raise DataError(f"subset index must be a boolean mask or integers; got dtype {sel.dtype}")
        return SourceData(
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            ids=self.ids[idx],
        )


# ----------------------------------------------------------------------------------------------------
# Validation: the single entry point for arrays


def _is_float(a: np.ndarray) -> bool:
    return bool(np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating))


def _as_int64(a: np.ndarray, name: str, where: str) -> np.ndarray:
    """Integer array -> int64, rejecting floats, bools and values that do not fit."""
    if _is_float(a):
        nan = " and contains NaN" if np.isnan(a).any() else ""
        raise DataError(
            f"{where}: {name} has float dtype {a.dtype}{nan}; only integer dtypes are allowed "
            f"(convert with {name}.astype(np.int64))"
        )
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{where}: {name} has dtype {a.dtype}; only integer dtypes (e.g. int64) are allowed")
    if a.dtype == np.uint64 and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise DataError(f"{where}: {name} value {int(a.max())} does not fit in int64")
    return np.ascontiguousarray(a, dtype=np.int64)


def validate_arrays(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    ids: np.ndarray | None = None,
    *,
    num_classes: int | None = None,
    where: str = "source",
) -> SourceData:
    """Check raw arrays against the source format and return them as a SourceData (4-D uint8 images)."""
    # 1. images: uint8 (N,H,W) or (N,H,W,C) with C in (1, 3) and N > 0
    if not isinstance(images, np.ndarray):
        raise DataError(f"{where}: images must be a numpy array; got {type(images).__name__}")
    if images.dtype != np.uint8:
        if _is_float(images):
            nan = " and contains NaN" if np.isnan(images).any() else ""
            raise DataError(
                f"{where}: images have float dtype {images.dtype}{nan}; only uint8 in 0..255 is allowed "
                "(convert with np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for x in [0, 1])"
            )
        raise DataError(f"{where}: images have dtype {images.dtype}; only uint8 (values 0..255) is allowed")
    if images.ndim not in (3, 4):
        raise DataError(
            f"{where}: images have {images.ndim} dimension(s) {images.shape}; allowed are (N,H,W) or (N,H,W,C)"
        )
    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
    if n == 0:
        raise DataError(f"{where}: images hold zero samples {images.shape}; a source needs at least one")
    if h == 0 or w == 0:
        raise DataError(f"{where}: images have an empty side {images.shape}; H and W must be >= 1")
    if c not in ALLOWED_CHANNELS:
        raise DataError(f"{where}: images have {c} channels {images.shape}; allowed are 1 (grayscale) or 3 (RGB)")
    images = np.ascontiguousarray(images)

    # 2. labels: integer (N,) in [0, num_classes)
    labels_out: np.ndarray | None = None
    if labels is not None:
        if not isinstance(labels, np.ndarray):
            raise DataError(f"{where}: labels must be a numpy array; got {type(labels).__name__}")
        if labels.ndim != 1:
            raise DataError(f"{where}: labels must be 1-D (N,); got shape {labels.shape}")
        if labels.shape[0] != n:
            raise DataError(f"{where}: labels have length {labels.shape[0]}, but there are {n} images")
        labels_out = _as_int64(labels, "labels", where)
        neg = np.flatnonzero(labels_out < 0)
        if neg.size:
            raise DataError(
                f"{where}: labels[{int(neg[0])}] = {int(labels_out[neg[0]])} is negative; labels must be >= 0"
            )
        if num_classes is not None:
            big = np.flatnonzero(labels_out >= num_classes)
            if big.size:
                raise DataError(
                    f"{where}: labels[{int(big[0])}] = {int(labels_out[big[0]])} is out of range; "
                    f"allowed are 0..{num_classes - 1} (num_classes = {num_classes})"
                )

    # 3. ids: integer (N,), unique; default arange(N)
    if ids is None:
        ids_out = np.arange(n, dtype=np.int64)
    else:
        if not isinstance(ids, np.ndarray):
            raise DataError(f"{where}: ids must be a numpy array; got {type(ids).__name__}")
        if ids.ndim != 1:
            raise DataError(f"{where}: ids must be 1-D (N,); got shape {ids.shape}")
        if ids.shape[0] != n:
            raise DataError(f"{where}: ids have length {ids.shape[0]}, but there are {n} images")
        ids_out = _as_int64(ids, "ids", where)
        uniq, counts = np.unique(ids_out, return_counts=True)
        if uniq.size != n:
            dup = uniq[counts > 1]
            shown = ", ".join(str(int(d)) for d in dup[:5]) + (", ..." if dup.size > 5 else "")
            raise DataError(f"{where}: ids must be unique; {dup.size} id(s) repeat: {shown}")
    return SourceData(images=images, labels=labels_out, ids=ids_out)


# ----------------------------------------------------------------------------------------------------
# IDX files (the MNIST / Fashion-MNIST format)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or raw); the magic, dimensions and payload size are checked."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read IDX file: {exc}") from exc
    return parse_idx(raw, where=str(path))


def parse_idx(raw: bytes, *, where: str = "IDX data") -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file into a native-endian array."""
    if len(raw) < 4:
        raise DataError(f"{where}: {len(raw)} bytes is too short for an IDX header (needs at least 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{where}: bad IDX magic {raw[:4].hex()}; the first two bytes must be 0x0000")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        allowed = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(f"{where}: unknown IDX type code 0x{code:02X}; allowed are {allowed}")
    if ndim == 0:
        raise DataError(f"{where}: IDX header declares 0 dimensions; at least 1 is needed")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{where}: truncated IDX header ({len(raw)} bytes; {ndim} dims need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{where}: IDX payload size mismatch: dims {dims} of {dtype.newbyteorder('=')} need "
            f"{expected} bytes, file has {len(raw)}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # a native-endian, writable copy


def write_idx(path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write an array as an IDX file (gzip when ``compress`` or the name ends in .gz); atomic."""
    path = Path(path)
    arr = np.asarray(array)
    code = _IDX_CODES.get(arr.dtype.newbyteorder("=").str)
    if code is None or arr.ndim == 0 or arr.ndim > 255:
        raise DataError(f"cannot write dtype {arr.dtype} with {arr.ndim} dims as IDX")
    raw = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    raw += np.ascontiguousarray(arr, dtype=_IDX_DTYPES[code]).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        raw = gzip.compress(raw, mtime=0)
    _atomic_write(path, raw)
    return path


# ----------------------------------------------------------------------------------------------------
# Datasets


def _fashion_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}; install the dataset with "
        "`apt-get install dataset-fashion-mnist` (or pass root= pointing at the IDX files)"
    )


def load_fashion_mnist(
    split: Literal["train", "test"], *, root: str | os.PathLike[str] = FASHION_MNIST_DIR
) -> SourceData:
    """Fashion-MNIST (Xiao et al. 2017) from its IDX files: 28x28 grayscale, 10 classes."""
    if split not in ("train", "test"):
        raise DataError(f"Fashion-MNIST split {split!r} is unknown; allowed are 'train' and 'test'")
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_fashion_file(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_fashion_file(root, f"{prefix}-labels-idx1-ubyte"))
    return validate_arrays(images, labels, num_classes=10, where=f"Fashion-MNIST {split} ({root})")


def load_digits(split: Literal["all", "train", "test"] = "all") -> SourceData:
    """scikit-learn's bundled 8x8 digits (1797 samples, 10 classes), 0..16 scaled to uint8 0..255.

    ``split="test"`` holds out every fifth sample (ids = positions in the full set); ``"train"`` is the rest.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = np.clip(np.round(np.asarray(bunch.images) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    data = validate_arrays(images, labels, num_classes=10, where="sklearn digits")
    if split == "all":
        return data
    if split not in ("train", "test"):
        raise DataError(f"digits split {split!r} is unknown; allowed are 'all', 'train' and 'test'")
    test = np.arange(len(data)) % 5 == 4
    return data.subset(test if split == "test" else ~test)


def load_dataset(name: Literal["fashion-mnist", "digits"], split: Literal["train", "test"] = "train") -> SourceData:
    """A built-in dataset by name: ``fashion-mnist`` or ``digits`` (split ``train`` or ``test``)."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split)
    if name == "digits":
        return load_digits(split)
    raise DataError(f"unknown dataset {name!r}; allowed are 'fashion-mnist' and 'digits'")


# ----------------------------------------------------------------------------------------------------
# .npz source format
#
# Archives are read by the checked reader below, not by ``np.load``: every size is taken from the zip's
# declared sizes and each .npy header and checked (against each other and against a limit) BEFORE anything is
# decompressed or allocated, and only the zip features that numpy itself writes are accepted. Every refusal
# is a ``MalformedArchive`` or ``DataTooLarge`` (both ``DataError``), never another exception.

# Compression methods accepted: what np.savez (stored) and np.savez_compressed (deflated) write. bzip2 and
# lzma are refused: their decoders expand a whole block before zipfile can cut at the declared size (a
# 554-byte bzip2 member grew to 400 MB), and no numpy writer produces them.
NPZ_COMPRESSION: dict[int, str] = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
# General-purpose flag bits accepted, the ones numpy's writer (zipfile) sets itself: 0x0008 (sizes in a data
# descriptor; zipfile sets it when writing to an unseekable stream) and 0x0800 (UTF-8 member names). All
# others are refused: 0x0001/0x0040 encryption, 0x0020 patched data, 0x2000 encrypted directory, and the
# deflate level hints 0x0002/0x0004 that zipfile never writes.
NPZ_ZIP_FLAGS = 0x0008 | 0x0800
_NPZ_MAX_DIRECTORY = 64 * 1024  # central directory bytes; three members need a few hundred
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand more than 1032:1 (a 258-byte match per 2 bits)
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 10_000  # characters of an .npy header dict (numpy's own limit in np.load)
_NPY_MAX_DIMS = 32
_NPY_INT = r"(?:0|[1-9][0-9]{0,18})"  # below 10**19, no leading zeros (literal_eval refuses those)
_NPY_WS = r"[ \n]*"  # what numpy writes; other "whitespace" (form feed, unicode spaces) is a Python syntax error
_NPY_STR = r"'[\x20-\x26\x28-\x5b\x5d-\x7e]*'"  # printable ASCII without quote and backslash
_NPY_TUPLE = rf"\({_NPY_WS}(?:{_NPY_INT}{_NPY_WS},{_NPY_WS})*(?:{_NPY_INT}{_NPY_WS})?\)"
_NPY_ITEM = rf"'(?:descr|fortran_order|shape)'{_NPY_WS}:{_NPY_WS}(?:{_NPY_STR}|True|False|{_NPY_TUPLE})"
_NPY_HEADER_RE = re.compile(
    rf"\{{{_NPY_WS}(?:{_NPY_ITEM}{_NPY_WS}(?:,{_NPY_WS}|(?=\}})))+\}}{_NPY_WS}"
)  # a flat dict of short strings, booleans and tuples of integers: checked before literal_eval sees it
# a plain dtype as numpy writes it (kind, size, datetime unit), no fields, no deprecated aliases such as 'a'
_NPY_DESCR_RE = re.compile(r"[<>|=]?[biufcSUVOMm][0-9]*(?:\[[0-9]*[a-zA-Z]+\])?")
_READ_BLOCK = 1 << 20
# How zipfile reports corrupt or truncated input (UnicodeDecodeError of a member name is a ValueError;
# NotImplementedError: a zip "version needed to extract" above what zipfile reads).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, struct.error, NotImplementedError)


def _zip_directory_size(fp: BinaryIO) -> int | None:
    """Size of the central directory that ``zipfile`` will read, located the way zipfile locates it.

    zipfile turns every 46 bytes of that directory into a ZipInfo object before anything can be checked, so
    its size is bounded first. Mirrors ``zipfile._EndRecData``: the end record is either the last 22 bytes
    (no archive comment) or the last signature in the final 64 KiB + 22 bytes; a zip64 end record right
    before its locator overrides the size. None when there is no end record (zipfile refuses the file).
    """
    fp.seek(0, os.SEEK_END)
    size = fp.tell()
    end = None
    if size >= 22:
        fp.seek(size - 22)
        tail = fp.read(22)
        if tail[:4] == b"PK\x05\x06" and tail[-2:] == b"\x00\x00":
            end = size - 22
    if end is None:
        start = max(size - (1 << 16) - 22, 0)
        fp.seek(start)
        at = fp.read().rfind(b"PK\x05\x06")
        if at < 0 or start + at + 22 > size:
            return None
        end = start + at
    fp.seek(end)
    directory = struct.unpack("<4s4H2LH", fp.read(22))[5]
    if end >= 20 + 56:
        fp.seek(end - 20 - 56)
        zip64 = fp.read(76)
        if zip64[56:60] == b"PK\x06\x07" and zip64[:4] == b"PK\x06\x06":
            directory = struct.unpack("<4sQ2H2L4Q", zip64[:56])[8]
    return int(directory)


def _npy_header(member: IO[bytes], where: str, name: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    """Parse an .npy header (format versions 1-3) without evaluating anything but flat literals."""
    magic = member.read(8)
    if len(magic) != 8 or magic[:6] != _NPY_MAGIC:
        raise MalformedArchive(f"{where}: '{name}' is not an .npy array (bad magic {magic[:8]!r})")
    version = (magic[6], magic[7])
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise MalformedArchive(f"{where}: '{name}' has .npy format version {version}; 1.0, 2.0 and 3.0 are read")
    length_format = "<H" if version == (1, 0) else "<I"
    raw_length = member.read(struct.calcsize(length_format))
    if len(raw_length) != struct.calcsize(length_format):
        raise MalformedArchive(f"{where}: '{name}' ends inside its .npy header")
    (length,) = struct.unpack(length_format, raw_length)
    if length > _NPY_MAX_HEADER:
        raise MalformedArchive(f"{where}: '{name}' has a {length}-byte .npy header; at most {_NPY_MAX_HEADER}")
    raw = member.read(length)
    if len(raw) != length:
        raise MalformedArchive(f"{where}: '{name}' ends inside its .npy header")
    text = raw.decode("utf-8" if version == (3, 0) else "latin1")
    if not _NPY_HEADER_RE.fullmatch(text):
        raise MalformedArchive(
            f"{where}: '{name}' has an .npy header that is not a plain array's ({text[:200]!r}); "
            "structured and object arrays are not read"
        )
    try:
        header = ast.literal_eval(text)  # bounded: the regex admits only a flat dict of short literals
    except (SyntaxError, ValueError, TypeError) as exc:  # literal_eval's own refusals
        raise MalformedArchive(f"{where}: '{name}' has an unreadable .npy header ({exc})") from exc
    if set(header) != {"descr", "fortran_order", "shape"}:
        raise MalformedArchive(f"{where}: '{name}' .npy header has keys {sorted(header)}")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str) or not _NPY_DESCR_RE.fullmatch(descr):
        raise MalformedArchive(f"{where}: '{name}' has dtype {descr!r:.100}; only plain numeric dtypes are read")
    if not isinstance(fortran, bool) or not isinstance(shape, tuple) or len(shape) > _NPY_MAX_DIMS:
        raise MalformedArchive(f"{where}: '{name}' .npy header has fortran_order {fortran!r}, shape {shape!r:.100}")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError) as exc:
        raise MalformedArchive(f"{where}: '{name}' has dtype {descr!r}, which numpy does not know ({exc})") from exc
    if dtype.hasobject:
        raise MalformedArchive(
            f"{where}: '{name}' is an object (pickled) array, which is never loaded; store plain numeric arrays"
        )
    if dtype.itemsize == 0 or dtype.fields is not None or dtype.subdtype is not None:
        raise MalformedArchive(f"{where}: '{name}' has dtype {dtype}; only plain numeric dtypes are read")
    return dtype, shape, fortran


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    """One member's array: header checked against the member's declared size, then read into place."""
    name = info.filename[: -len(".npy")]
    with archive.open(info) as member:
        dtype, shape, fortran = _npy_header(member, where, name)
        count = math.prod(shape)  # Python ints: no overflow, unlike np.prod
        header_bytes = member.tell()
        if header_bytes + count * dtype.itemsize != info.file_size:
            raise MalformedArchive(
                f"{where}: '{name}' declares shape {shape} of {dtype} ({count * dtype.itemsize} bytes after a "
                f"{header_bytes}-byte header), but the archive member holds {info.file_size} bytes"
            )
        flat = np.empty(count, dtype=dtype)  # at most the member's declared size, which was checked
        view = flat.view(np.uint8).data  # a writable memoryview of the array's bytes
        done = 0
        while done < view.nbytes:
            block = member.read(min(_READ_BLOCK, view.nbytes - done))
            if not block:
                raise MalformedArchive(f"{where}: '{name}' ends after {done} of {view.nbytes} data bytes")
            view[done : done + len(block)] = block
            done += len(block)
        if member.read(1):  # also makes zipfile verify the member's CRC-32
            raise MalformedArchive(f"{where}: '{name}' holds bytes after its array data")
    return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)


def read_npz_arrays(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview, *, where: str, max_bytes: int | None = None
) -> dict[str, np.ndarray]:
    """The arrays of an .npz source (``images`` [, ``labels``, ``ids``]), read with every size checked first.

    Accepts what ``np.savez`` / ``np.savez_compressed`` write (see NPZ_COMPRESSION and NPZ_ZIP_FLAGS); never
    unpickles. The arrays are not validated (``validate_arrays`` does that).

    Args:
        source: a path or the archive's bytes.
        where: names the input in error messages.
        max_bytes: largest total uncompressed size of the members; None = no limit beyond the declared sizes.

    Raises:
        MalformedArchive: not an .npz archive of the source format, or one using refused zip features.
        DataTooLarge: the members' declared uncompressed size exceeds ``max_bytes``.
    """
    fp: BinaryIO
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise DataError(f"{where}: cannot open .npz file: {exc.strerror}") from exc
    with fp:
        try:
            return _read_npz_archive(fp, where, max_bytes)
        except _ZIP_ERRORS as exc:
            raise MalformedArchive(f"{where}: not a readable .npz archive ({type(exc).__name__}: {exc})") from exc


def _read_npz_archive(fp: BinaryIO, where: str, max_bytes: int | None) -> dict[str, np.ndarray]:
    directory = _zip_directory_size(fp)
    if directory is None:
        raise MalformedArchive(f"{where}: not an .npz (zip) archive; save with np.savez(images=..., labels=...)")
    if directory > _NPZ_MAX_DIRECTORY:
        raise MalformedArchive(
            f"{where}: zip central directory of {directory} bytes; an .npz source of at most {len(NPZ_KEYS)} "
            f"arrays needs far less than {_NPZ_MAX_DIRECTORY}"
        )
    fp.seek(0, os.SEEK_END)
    archive_bytes = fp.tell()
    fp.seek(0)
    with zipfile.ZipFile(fp) as archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise MalformedArchive(f"{where}: archive members repeat a name ({[n[:80] for n in names[:10]]})")
        keys = [n[: -len(".npy")] if n.endswith(".npy") else n for n in names]
        unknown = sorted(k for k, n in zip(keys, names, strict=True) if k not in NPZ_KEYS or not n.endswith(".npy"))
        if unknown:
            shown = ", ".join(repr(k)[:80] for k in unknown[:5])
            raise MalformedArchive(f"{where}: unknown key(s) {shown}; allowed keys: {', '.join(NPZ_KEYS)}")
        if "images" not in keys:
            raise MalformedArchive(
                f"{where}: missing required key 'images' (found {', '.join(keys) or 'no keys'}); "
                f"allowed keys: {', '.join(NPZ_KEYS)}"
            )
        for info in infos:
            if info.compress_type not in NPZ_COMPRESSION:
                raise MalformedArchive(
                    f"{where}: member {info.filename} uses zip compression method {info.compress_type}; only "
                    "stored (0) and deflated (8) are read (write with np.savez or np.savez_compressed)"
                )
            if info.flag_bits & ~NPZ_ZIP_FLAGS:
                raise MalformedArchive(
                    f"{where}: member {info.filename} has zip flags 0x{info.flag_bits:04x}; only 0x0008 (data "
                    "descriptor) and 0x0800 (UTF-8 name) are read, never encryption or patched data"
                )
            ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _DEFLATE_MAX_RATIO
            if info.compress_size > archive_bytes or info.file_size > ratio * info.compress_size + 1024:
                raise MalformedArchive(
                    f"{where}: member {info.filename} declares {info.compress_size} compressed and "
                    f"{info.file_size} uncompressed bytes, impossible in a {archive_bytes}-byte archive"
                )
        total = sum(info.file_size for info in infos)
        if max_bytes is not None and total > max_bytes:
            raise DataTooLarge(f"{where}: .npz expands to {total} bytes, the limit is {max_bytes}")
        return {key: _read_member(archive, info, where) for key, info in zip(keys, infos, strict=True)}


def load_npz(
    path: str | os.PathLike[str], *, num_classes: int | None = None, max_bytes: int | None = None
) -> SourceData:
    """Load and validate an .npz source (keys ``images`` [, ``labels``, ``ids``]); never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such .npz file")
    arrays = read_npz_arrays(path, where=str(path), max_bytes=max_bytes)
    return _validate_npz(arrays, str(path), num_classes)


def load_npz_bytes(
    raw: bytes, *, where: str = "message", num_classes: int | None = None, max_bytes: int | None = None
) -> SourceData:
    """Load and validate an .npz source from bytes (e.g. a Kafka message value); see ``read_npz_arrays``."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise DataError(f"{where}: expected .npz bytes, got {type(raw).__name__}")
    return _validate_npz(read_npz_arrays(raw, where=where, max_bytes=max_bytes), where, num_classes)


def _validate_npz(arrays: dict[str, np.ndarray], where: str, num_classes: int | None) -> SourceData:
    return validate_arrays(
        arrays["images"], arrays.get("labels"), arrays.get("ids"), num_classes=num_classes, where=where
    )


def npz_bytes(data: SourceData, *, compress: bool = True) -> bytes:
    """The .npz encoding of a source (what ``load_npz_bytes`` reads)."""
    buf = io.BytesIO()
    arrays = {"images": data.images, "ids": data.ids}
    if data.labels is not None:
        arrays["labels"] = data.labels
    if compress:
        np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    else:
        np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def save_npz(path: str | os.PathLike[str], data: SourceData, *, compress: bool = True) -> Path:
    """Write a source as .npz atomically (``cdm.fsio.write_atomic``)."""
    path = Path(path)
    _atomic_write(path, npz_bytes(data, compress=compress))
    return path


def _atomic_write(path: Path, raw: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, raw)


# ----------------------------------------------------------------------------------------------------
# Fingerprints, concatenation, splits


def fingerprint(data: SourceData) -> str:
    """sha256 hex over a canonical encoding (name, dtype, shape, little-endian C-order bytes) of each array."""
    h = hashlib.sha256(b"cdm-source-v1\n")
    arrays: list[tuple[str, np.ndarray | None]] = [
        ("images", data.images),
        ("labels", data.labels),
        ("ids", data.ids),
    ]
    for name, arr in arrays:
        if arr is None:
            h.update(f"{name}:none\n".encode())
            continue
        canon = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        h.update(f"{name}:{canon.dtype.str}:{','.join(map(str, canon.shape))}\n".encode())
        h.update(canon.tobytes())
    return h.hexdigest()


def concat(parts: Sequence[SourceData], *, renumber: bool = False) -> SourceData:
    """All parts' samples in order; ids are kept (DataError if they collide) or, with ``renumber``, arange(N)."""
    if not parts:
        raise DataError("concat needs at least one source")
    shapes = {p.image_shape for p in parts}
    if len(shapes) > 1:
        raise DataError(f"concat: image shapes differ {sorted(shapes)}; all sources must have one (H,W,C)")
    labelled = {p.labels is not None for p in parts}
    if len(labelled) > 1:
        raise DataError("concat: some sources have labels and some do not; all or none must be labelled")
    images = np.concatenate([p.images for p in parts])
    labels = None
    if parts[0].labels is not None:
        labels = np.concatenate([p.labels for p in parts if p.labels is not None])
    ids = None if renumber else np.concatenate([p.ids for p in parts])
    try:
        return validate_arrays(images, labels, ids, where="concat")
    except DataError as exc:
        raise DataError(f"{exc} (pass renumber=True to assign fresh ids)") from exc


def _classes(data: SourceData, scheme: str) -> np.ndarray:
    if data.labels is None:
        raise DataError(f"split scheme {scheme!r} needs labels, but the data is unlabelled; use 'random'")
    return data.labels


def split_sources(data: SourceData, scheme: Scheme, n: int, *, seed: int, alpha: float = 0.5) -> list[SourceData]:
    """Partition ``data`` into ``n`` non-empty sources (each sample in exactly one); seeded.

    ``random``: a shuffled equal-size split. ``by-class``: the sorted classes cut into ``n`` contiguous groups
    as evenly as possible (class-disjoint sources). ``dirichlet``: each class spread over the sources with
    proportions drawn from Dirichlet(alpha) (Hsu et al. 2019); small ``alpha`` = more skew.
    Parent ids are kept.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise DataError(f"number of sources must be an integer >= 1; got {n!r}")
    if n > len(data):
        raise DataError(f"cannot split {len(data)} samples into {n} non-empty sources")
    n = int(n)
    rng = np.random.default_rng(seed)
    assign = np.empty(len(data), dtype=np.int64)  # sample -> source
    if scheme == "random":
        for k, part in enumerate(np.array_split(rng.permutation(len(data)), n)):
            assign[part] = k
    elif scheme == "by-class":
        labels = _classes(data, scheme)
        classes = np.unique(labels)
        if n > classes.size:
            raise DataError(f"by-class split into {n} sources needs at least {n} classes; the data has {classes.size}")
        for k, group in enumerate(np.array_split(classes, n)):
            assign[np.isin(labels, group)] = k
    elif scheme == "dirichlet":
        labels = _classes(data, scheme)
        if not alpha > 0 or not np.isfinite(alpha):
            raise DataError(f"dirichlet alpha must be a finite number > 0; got {alpha!r}")
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(n, float(alpha)))
            cuts = np.round(np.cumsum(p)[:-1] * members.size).astype(np.int64)
            for k, part in enumerate(np.split(members, cuts)):
                assign[part] = k
        # Every source must be non-empty: move a random sample from the largest source into each empty one.
        counts = np.bincount(assign, minlength=n)
        for empty in np.flatnonzero(counts == 0):
            donor = int(np.argmax(counts))
            assign[rng.choice(np.flatnonzero(assign == donor))] = empty
            counts[donor] -= 1
            counts[empty] += 1
    else:
        raise DataError(f"unknown split scheme {scheme!r}; allowed are 'random', 'by-class' and 'dirichlet'")
    return [data.subset(assign == k) for k in range(n)]


# ----------------------------------------------------------------------------------------------------
# Model tensors and batches


def to_model_tensor(images: np.ndarray, sample_size: int) -> torch.Tensor:
    """uint8 (N,H,W[,C]) -> float32 (N,C,S,S) in [-1,1]; area interpolation down, antialiased bilinear up."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"to_model_tensor expects uint8 images; got {got}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in ALLOWED_CHANNELS:
        raise DataError(f"to_model_tensor expects (N,H,W) or (N,H,W,C) with C in (1, 3); got {images.shape}")
    if sample_size < 1:
        raise DataError(f"sample_size must be >= 1; got {sample_size}")
    # torch.tensor copies: the input may be a read-only view (np.frombuffer)
    x = torch.tensor(images).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    _, _, h, w = x.shape
    if (h, w) != (sample_size, sample_size) and x.shape[0] > 0:
        if sample_size <= h and sample_size <= w:
            x = F.interpolate(x, size=(sample_size, sample_size), mode="area")
        else:
            x = F.interpolate(x, size=(sample_size, sample_size), mode="bilinear", antialias=True, align_corners=False)
    elif (h, w) != (sample_size, sample_size):
        x = x.new_zeros((0, x.shape[1], sample_size, sample_size))
    return x.mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0).contiguous()


def from_model_tensor(x: torch.Tensor) -> np.ndarray:
    """float (N,C,S,S) in [-1,1] -> uint8 (N,S,S,C), clamped and rounded."""
    if x.ndim != 4 or x.shape[1] not in ALLOWED_CHANNELS:
        raise DataError(f"from_model_tensor expects (N,C,H,W) with C in (1, 3); got {tuple(x.shape)}")
    u = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def batches(
    x: torch.Tensor, labels: torch.Tensor | None, batch_size: int, *, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Endless (x, labels) batches of exactly ``batch_size``; a fresh seeded permutation every epoch."""
    n = int(x.shape[0])
    if n == 0:
        raise DataError("batches: no samples to draw from")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1; got {batch_size}")
    if labels is not None and int(labels.shape[0]) != n:
        raise DataError(f"batches: {labels.shape[0]} labels for {n} samples")
    gen = torch.Generator().manual_seed(seed)
    order = torch.zeros(0, dtype=torch.long)
    while True:
        # 1. top up the index stream with whole epochs so every batch is full
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        # 2. take the next batch
        idx, order = order[:batch_size], order[batch_size:]
        xi = idx.to(x.device)
        yield x[xi], None if labels is None else labels[idx.to(labels.device)]
