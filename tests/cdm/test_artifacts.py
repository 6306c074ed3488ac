"""cdm/artifacts: artifact URIs recorded in the registry and the local paths they name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdm.artifacts import artifact_path, artifact_uri, confined_path, read_json
from cdm.errors import CdmError, StoreError


def test_uri_round_trip_keeps_odd_characters(tmp_path: Path) -> None:
    directory = tmp_path / "compartments" / "shoes@v2 (copy)"
    uri = artifact_uri(directory)
    assert uri.startswith("file:///") and " " not in uri
    assert artifact_path(uri) == directory.resolve()
    assert artifact_path(str(directory)) == directory  # a plain path is accepted as is


def test_other_schemes_are_refused_by_name() -> None:
    with pytest.raises(CdmError, match="'s3'"):
        artifact_path("s3://bucket/compartments/shoes@v1")


def test_read_json_refuses_a_file_over_its_size_limit_before_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"a": "x" * 100}))
    assert read_json(path)["a"] == "x" * 100
    with pytest.raises(StoreError, match="over the 50-byte limit"):
        read_json(path, max_bytes=50)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(StoreError, match="not valid JSON"):
        read_json(tmp_path / "deep.json")


def test_paths_from_records_are_confined_to_the_store_root(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    (root / "compartments" / "a@v1").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "compartments" / "link").symlink_to(outside)
    inside = (root / "compartments" / "a@v1").as_uri()
    assert confined_path(inside, root) == (root / "compartments" / "a@v1").resolve()
    for uri in (outside.as_uri(), f"{root.as_uri()}/../secret", (root / "compartments" / "link").as_uri()):
        with pytest.raises(StoreError, match="outside the artifact store"):
            confined_path(uri, root)
    with pytest.raises(StoreError, match="not an absolute"):
        confined_path("relative/dir", root)
