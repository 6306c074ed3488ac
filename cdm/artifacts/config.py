"""``[artifacts]``: where artifacts are stored and how readers cache them (a frozen, range-checked section)."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

from cdm.errors import ConfigError

MIB = 1024 * 1024
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3 bucket naming rules (lowercase, 3-63 chars)
_REGION = re.compile(r"[a-z0-9-]{1,32}")


@dataclass(frozen=True)
class ArtifactsConfig:
    """Artifact store (local directory or S3-compatible object store) and the readers' local cache."""

    url: str = ""  # "file:///abs/dir" or "s3://bucket/prefix"; "" = the local artifact directory the caller owns
    endpoint_url: str = ""  # S3-compatible endpoint (MinIO, Ceph, R2, moto); "" = $AWS_ENDPOINT_URL(_S3) or AWS
    region: str = ""  # "" = $AWS_REGION, $AWS_DEFAULT_REGION, else "us-east-1"
    addressing: Literal["auto", "path", "virtual"] = "auto"  # auto: path-style with an endpoint_url, else virtual
    access_key_id: str = ""  # "" = $AWS_ACCESS_KEY_ID, else the environment's credential chain (IAM role)
    secret_access_key: str = field(default="", repr=False)  # with access_key_id ("" = $AWS_SECRET_ACCESS_KEY)
    session_token: str = field(default="", repr=False)  # temporary credentials only ("" = $AWS_SESSION_TOKEN)
    cache_dir: str = ".cache/cdm/artifacts"  # readers' content-addressed cache (<cache_dir>/blobs/<sha256>)
    cache_max_bytes: int = 2 * 1024 * MIB  # LRU bound of the cache; pinned (in use) files are never evicted
    request_timeout_s: float = 60.0  # per object-store request
    max_retries: int = 3  # retries of a failed object-store request (with backoff)

    def __post_init__(self) -> None:
        _check_url(self.url)
        if self.endpoint_url:
            parts = urllib.parse.urlsplit(self.endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
                raise ConfigError(
                    f"artifacts.endpoint_url = {self.endpoint_url!r} is not an http(s) URL; "
                    "use e.g. 'http://127.0.0.1:9000' (MinIO, moto) or 'https://<account>.r2.cloudflarestorage.com'"
                )
        if self.region and not _REGION.fullmatch(self.region):
            raise ConfigError(f"artifacts.region = {self.region!r} is not a region name such as 'us-east-1'")
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise ConfigError(
                "artifacts.access_key_id and artifacts.secret_access_key must be set together "
                "(or both left empty to use $AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY or an IAM role)"
            )
        if self.session_token and not self.access_key_id:
            raise ConfigError("artifacts.session_token needs artifacts.access_key_id and secret_access_key")
        if not self.cache_dir:
            raise ConfigError("artifacts.cache_dir is empty; give a directory such as '.cache/cdm/artifacts'")
        if not MIB <= self.cache_max_bytes <= 1 << 50:
            raise ConfigError(
                f"artifacts.cache_max_bytes = {self.cache_max_bytes} is out of range; use 1 MiB ({MIB}) to 1 PiB "
                "(it must hold every artifact of one composition)"
            )
        if not 0 < self.request_timeout_s <= 3600:
            raise ConfigError(f"artifacts.request_timeout_s = {self.request_timeout_s} must be in (0, 3600]")
        if not 0 <= self.max_retries <= 20:
            raise ConfigError(f"artifacts.max_retries = {self.max_retries} must be in [0, 20]")

    @property
    def scheme(self) -> Literal["", "file", "s3"]:
        """Which backend ``url`` selects ("" = the caller's local directory)."""
        if not self.url:
            return ""
        return "file" if self.url.startswith("file:") else "s3"


def _check_url(url: str) -> None:
    if not url:
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/") or parts.query or parts.fragment:
            raise ConfigError(f"artifacts.url = {url!r} is not a local directory URL; use 'file:///absolute/dir'")
        return
    if parts.scheme == "s3":
        if not _BUCKET.fullmatch(parts.netloc or "") or ".." in parts.netloc:
            raise ConfigError(
                f"artifacts.url = {url!r}: bucket {parts.netloc!r} is not a valid S3 bucket name "
                "(3-63 characters: lowercase letters, digits, '.', '-'); use 's3://bucket/optional/prefix'"
            )
        if parts.query or parts.fragment or "//" in parts.path or "/../" in f"{parts.path}/":
            raise ConfigError(f"artifacts.url = {url!r} has a query, fragment or empty/'..' path segment")
        return
    raise ConfigError(
        f"artifacts.url = {url!r} has scheme {parts.scheme!r}; use 'file:///absolute/dir' or 's3://bucket/prefix' "
        "(S3-compatible stores such as MinIO, Ceph or R2 use s3:// with artifacts.endpoint_url)"
    )
