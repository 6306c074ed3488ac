"""The one source-name rule (common.names) and every place that checks a source name agreeing with it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from api.schemas import SourceName
from cdm.errors import ConfigError, StoreError
from cdm.lifecycle import compartment_prefix, data_key
from cdm.store import check_source_name as store_check
from common.names import SOURCE_NAME_MAX, check_source_name, is_source_name
from daemon.wire import WireError, validate_source_id
from registry.keys import check_source, compartment_id, parse_compartment_id

GOOD = ["a", "A-z_0.9", "x" * SOURCE_NAME_MAX, "a.", "_x", "-x", "0"]
BAD: list[Any] = ["", "x" * (SOURCE_NAME_MAX + 1), ".", "..", ".hidden", ".tmp-x", "a/b", "a b", "a@v1", "ü", None, 3]


@pytest.mark.parametrize("name", GOOD)
def test_every_check_accepts_a_good_name(name: str) -> None:
    assert is_source_name(name) and check_source_name(name) == name
    assert validate_source_id(name) == name
    assert store_check(name) == name
    assert check_source(name) == name
    assert parse_compartment_id(compartment_id(name, 3)) == (name, 3)
    assert compartment_prefix(f"{name}@v3") == f"compartments/{name}@v3"
    assert data_key(name, "0" * 64).startswith(f"data/{name}/")
    assert TypeAdapter(SourceName).validate_python(name) == name


@pytest.mark.parametrize("name", BAD)
def test_every_check_refuses_a_bad_name(name: Any) -> None:
    assert not is_source_name(name)
    with pytest.raises(ValueError, match=r"source name .* is not allowed; use 1-64 characters"):
        check_source_name(name)
    with pytest.raises(WireError, match="not a source id") as info:
        validate_source_id(name)
    assert info.value.reason == "bad-key"
    with pytest.raises(ValueError):
        check_source(name)
    if isinstance(name, str):
        with pytest.raises(ConfigError, match="invalid source name"):
            store_check(name)
        with pytest.raises(ValueError):
            parse_compartment_id(f"{name}@v1")
        with pytest.raises(StoreError):
            compartment_prefix(f"{name}@v1")
        with pytest.raises(ValidationError):
            TypeAdapter(SourceName).validate_python(name)
