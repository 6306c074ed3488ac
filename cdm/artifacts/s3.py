"""``s3://bucket/prefix``: artifacts in an S3-compatible object store (AWS S3, MinIO, Ceph, R2, moto).

Through obstore (Python bindings of the Rust ``object_store`` crate that Arrow, DataFusion and Polars use):
one wheel with no botocore/aiobotocore chain, typed, synchronous, and it does multipart uploads of large
files by itself. PUT is atomic on S3 (a multipart upload becomes visible only when completed).
"""

from __future__ import annotations

import builtins
import os
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import NotFoundError
from obstore.store import S3Store

from cdm.artifacts.config import ArtifactsConfig
from cdm.artifacts.store import CHUNK_BYTES, ObjectNotFoundError, check_key, in_prefix
from cdm.errors import StoreError
from cdm.fsio import write_atomic

if TYPE_CHECKING:
    from obstore.store import S3Credential

DEFAULT_REGION = "us-east-1"
_NOT_FOUND = (FileNotFoundError, NotFoundError)


@dataclass(frozen=True)
class S3Settings:
    """Connection settings resolved from ``ArtifactsConfig`` and the standard AWS environment variables."""

    endpoint_url: str  # "" = AWS itself
    region: str
    virtual_hosted: bool  # bucket in the host name (AWS) rather than in the path (MinIO, moto)
    access_key_id: str  # "" = leave credentials to obstore's chain (environment, web identity, instance role)
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    request_timeout_s: float
    max_retries: int


def resolve_settings(config: ArtifactsConfig, environ: Mapping[str, str] | None = None) -> S3Settings:
    """Config values first, then ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` from ``environ`` (default os.environ)."""
    env = os.environ if environ is None else environ
    endpoint = config.endpoint_url or env.get("AWS_ENDPOINT_URL_S3", "") or env.get("AWS_ENDPOINT_URL", "")
    region = config.region or env.get("AWS_REGION", "") or env.get("AWS_DEFAULT_REGION", "") or DEFAULT_REGION
    if config.access_key_id:
        key, secret, token = config.access_key_id, config.secret_access_key, config.session_token
    else:
        key, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
        token = env.get("AWS_SESSION_TOKEN", "")
        if bool(key) != bool(secret):
            raise StoreError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together in the environment")
    virtual = config.addressing == "virtual" or (config.addressing == "auto" and not endpoint)
    return S3Settings(
        endpoint_url=endpoint,
        region=region,
        virtual_hosted=virtual,
        access_key_id=key,
        secret_access_key=secret,
        session_token=token,
        request_timeout_s=config.request_timeout_s,
        max_retries=config.max_retries,
    )


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix`` (prefix without slashes at either end, possibly "")."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise StoreError(f"{url!r} is not an s3://bucket/prefix URL")
    prefix = parts.path.strip("/")
    if prefix:
        check_key(prefix)
    return parts.netloc, prefix


class S3ObjectStore:
    """An ArtifactStore over ``s3://bucket/prefix``; keys are relative to the prefix."""

    def __init__(self, url: str, settings: S3Settings) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self._root_url = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.settings = settings
        config: dict[str, Any] = {"region": settings.region, "virtual_hosted_style_request": settings.virtual_hosted}
        if settings.endpoint_url:
            config["endpoint"] = settings.endpoint_url
        client: dict[str, Any] = {
            "timeout": timedelta(seconds=settings.request_timeout_s),
            "connect_timeout": timedelta(seconds=min(10.0, settings.request_timeout_s)),
            "allow_http": settings.endpoint_url.startswith("http://"),
        }
        retry: dict[str, Any] = {
            "max_retries": settings.max_retries,
            "retry_timeout": timedelta(seconds=settings.request_timeout_s * (settings.max_retries + 1)),
        }
        provider = None
        if settings.access_key_id:
            credential: S3Credential = {
                "access_key_id": settings.access_key_id,
                "secret_access_key": settings.secret_access_key,
                "token": settings.session_token or None,
                "expires_at": None,
            }

            def provider() -> S3Credential:  # explicit keys: no stray token from the environment mixes in
                return credential

        self._store = S3Store(
            self.bucket,
            prefix=self.prefix or None,
            config=config,  # type: ignore[arg-type]  # the TypedDict is only importable for type checking
            client_options=client,  # type: ignore[arg-type]
            retry_config=retry,  # type: ignore[arg-type]
            credential_provider=provider,
        )

    def __repr__(self) -> str:
        endpoint = self.settings.endpoint_url or "AWS"
        return f"S3ObjectStore({self._root_url!r}, endpoint={endpoint!r}, region={self.settings.region!r})"

    @property
    def root_url(self) -> str:
        return self._root_url

    # ------------------------------------------------------------------------------------------- keys

    def url(self, key: str) -> str:
        return f"{self._root_url}/{check_key(key)}"

    def key_of(self, uri: str) -> str:
        if not uri.startswith(self._root_url + "/"):
            raise StoreError(f"{uri!r} is outside this store ({self._root_url}); check [artifacts] url")
        return check_key(uri[len(self._root_url) + 1 :])

    def _error(self, action: str, key: str, exc: Exception) -> StoreError:
        if isinstance(exc, _NOT_FOUND):
            return ObjectNotFoundError(f"no artifact {self.url(key)}")
        endpoint = self.settings.endpoint_url or "AWS S3"
        return StoreError(
            f"cannot {action} {self.url(key)} at {endpoint}: {exc}; check [artifacts] endpoint_url, region and "
            "credentials, and that the bucket exists"
        )

    # ------------------------------------------------------------------------------------------- writes

    def put_bytes(self, key: str, data: bytes) -> str:
        try:
            obstore.put(self._store, check_key(key), data)
        except (ObstoreError, OSError) as exc:
            raise self._error("write", key, exc) from exc
        return self.url(key)

    def put_file(self, key: str, path: Path) -> str:
        if not Path(path).is_file():
            raise StoreError(f"cannot upload {path}: no such file")
        try:
            obstore.put(self._store, check_key(key), Path(path))  # multipart above 5 MiB
        except (ObstoreError, OSError) as exc:
            raise self._error("upload", key, exc) from exc
        return self.url(key)

    # ------------------------------------------------------------------------------------------- reads

    def get_bytes(self, key: str) -> bytes:
        try:
            return obstore.get(self._store, check_key(key)).bytes().to_bytes()
        except (ObstoreError, OSError) as exc:
            raise self._error("read", key, exc) from exc

    def stream(self, key: str) -> Iterator[bytes]:
        try:
            result = obstore.get(self._store, check_key(key))
        except (ObstoreError, OSError) as exc:
            raise self._error("read", key, exc) from exc
        return self._chunks(key, result.stream(min_chunk_size=CHUNK_BYTES))

    def _chunks(self, key: str, chunks: Iterator[Any]) -> Iterator[bytes]:
        try:
            for chunk in chunks:
                yield bytes(chunk)
        except (ObstoreError, OSError) as exc:
            raise self._error("read", key, exc) from exc

    def get_file(self, key: str, dest: Path) -> int:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        size = 0

        def copy(f: BinaryIO) -> None:
            nonlocal size
            for chunk in self.stream(key):
                f.write(chunk)
                size += len(chunk)

        write_atomic(dest, copy)
        return size

    def exists(self, key: str) -> bool:
        try:
            obstore.head(self._store, check_key(key))
        except _NOT_FOUND:
            return False
        except (ObstoreError, OSError) as exc:
            raise self._error("look up", key, exc) from exc
        return True

    def list(self, prefix: str = "") -> list[str]:
        prefix = check_key(prefix.rstrip("/"), allow_empty=True)
        keys: list[str] = []
        try:
            for batch in obstore.list(self._store, prefix=prefix or None, chunk_size=1000):
                keys.extend(meta["path"] for meta in batch)
        except (ObstoreError, OSError) as exc:
            raise self._error("list", prefix or ".", exc) from exc
        return sorted(k for k in keys if in_prefix(k, prefix))

    # ------------------------------------------------------------------------------------------- deletes

    def delete(self, key: str, *, recursive: bool = False) -> builtins.list[str]:
        keys = ([key] if self.exists(key) else []) + (self.list(key) if recursive else [])
        for start in range(0, len(keys), 1000):  # DeleteObjects takes up to 1,000 keys
            batch = keys[start : start + 1000]
            try:
                obstore.delete(self._store, batch)
            except (ObstoreError, OSError) as exc:
                raise self._error("delete", batch[0], exc) from exc
        return [self.url(k) for k in keys]
