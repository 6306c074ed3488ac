"""cdm/artifacts: artifact URIs recorded in the registry and the local paths they name."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdm.artifacts import artifact_path, artifact_uri
from cdm.errors import CdmError


def test_uri_round_trip_keeps_odd_characters(tmp_path: Path) -> None:
    directory = tmp_path / "compartments" / "shoes@v2 (copy)"
    uri = artifact_uri(directory)
    assert uri.startswith("file:///") and " " not in uri
    assert artifact_path(uri) == directory.resolve()
    assert artifact_path(str(directory)) == directory  # a plain path is accepted as is


def test_other_schemes_are_refused_by_name() -> None:
    with pytest.raises(CdmError, match="'s3'"):
        artifact_path("s3://bucket/compartments/shoes@v1")
