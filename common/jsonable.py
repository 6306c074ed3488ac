"""``json_safe``: a nested value as plain JSON types, for records, lineage and config written as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """``obj`` with dicts (keys as str), lists and tuples (as lists) walked; str, int, float, bool and None kept;
    a Path as its string and anything else (an enum, a datetime) as ``str(obj)``."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return str(obj)
