"""``[artifacts]``: where artifacts are stored and how readers cache them (a frozen, range-checked section).

Part of ``AppConfig`` (``daemon.config``); ``url = ""`` means the daemon's ``[daemon] artifact_dir``.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from cdm.errors import ConfigError
from common.settings import section

MIB = 1024 * 1024
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3 bucket naming rules (lowercase, 3-63 chars)
_REGION = re.compile(r"[a-z0-9-]{1,32}")


def _check_url(url: str) -> str:
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/") or parts.query or parts.fragment:
            raise ValueError("is not a local directory URL; use 'file:///absolute/dir'")
        return url
    if parts.scheme == "s3":
        if not _BUCKET.fullmatch(parts.netloc or "") or ".." in parts.netloc:
            raise ValueError(
                f"names bucket {parts.netloc!r}, which is not a valid S3 bucket name "
                "(3-63 characters: lowercase letters, digits, '.', '-'); use 's3://bucket/optional/prefix'"
            )
        if parts.query or parts.fragment or "//" in parts.path or "/../" in f"{parts.path}/":
            raise ValueError("has a query, fragment or empty/'..' path segment; use 's3://bucket/prefix'")
        return url
    raise ValueError(
        f"has scheme {parts.scheme!r}; use 'file:///absolute/dir' or 's3://bucket/prefix' "
        "(S3-compatible stores such as MinIO, Ceph or R2 use s3:// with artifacts.endpoint_url)"
    )


def _check_endpoint(url: str) -> str:
    if url:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(
                "is not an http(s) URL; use e.g. 'http://127.0.0.1:9000' (MinIO, moto) or "
                "'https://<account>.r2.cloudflarestorage.com'"
            )
    return url


def _check_region(region: str) -> str:
    if region and not _REGION.fullmatch(region):
        raise ValueError("is not a region name such as 'us-east-1'")
    return region


@section("artifacts", error=ConfigError)
class ArtifactsConfig:
    """Artifact store (local directory or S3-compatible object store) and the readers' local cache."""

    # "file:///abs/dir" or "s3://bucket/prefix"; "" = the local directory the caller owns ([daemon] artifact_dir)
    url: Annotated[str, AfterValidator(_check_url)] = ""
    # S3-compatible endpoint (MinIO, Ceph, R2, moto); "" = $AWS_ENDPOINT_URL(_S3) or AWS
    endpoint_url: Annotated[str, AfterValidator(_check_endpoint)] = ""
    region: Annotated[str, AfterValidator(_check_region)] = ""  # "" = $AWS_REGION, $AWS_DEFAULT_REGION, else us-east-1
    addressing: Literal["auto", "path", "virtual"] = "auto"  # auto: path-style with an endpoint_url, else virtual
    access_key_id: str = ""  # "" = $AWS_ACCESS_KEY_ID, else the environment's credential chain (IAM role)
    secret_access_key: str = Field(default="", repr=False)  # with access_key_id ("" = $AWS_SECRET_ACCESS_KEY)
    session_token: str = Field(default="", repr=False)  # temporary credentials only ("" = $AWS_SESSION_TOKEN)
    # readers' content-addressed cache (<cache_dir>/blobs/<sha256>)
    cache_dir: Annotated[str, Field(min_length=1)] = ".cache/cdm/artifacts"
    # LRU bound of the cache, 1 MiB to 1 PiB (it must hold every artifact of one composition); pinned files stay
    cache_max_bytes: Annotated[int, Field(ge=MIB, le=1 << 50)] = 2 * 1024 * MIB
    request_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0  # per object-store request
    max_retries: Annotated[int, Field(ge=0, le=20)] = 3  # retries of a failed object-store request (with backoff)

    @model_validator(mode="after")
    def _check(self) -> ArtifactsConfig:
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise ValueError(
                "artifacts.access_key_id and artifacts.secret_access_key must be set together "
                "(or both left empty to use $AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY or an IAM role)"
            )
        if self.session_token and not self.access_key_id:
            raise ValueError("artifacts.session_token needs artifacts.access_key_id and secret_access_key")
        return self

    @property
    def scheme(self) -> Literal["", "file", "s3"]:
        """Which backend ``url`` selects ("" = the caller's local directory)."""
        if not self.url:
            return ""
        return "file" if self.url.startswith("file:") else "s3"
