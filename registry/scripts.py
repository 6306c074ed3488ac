"""The registry's Lua scripts, kept as files under ``registry/lua/`` (package data) and read once."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Literal

import redis
from redis.commands.core import Script

ScriptName = Literal["snapshot", "release", "refresh", "prune", "replace", "acquire_slot"]


@functools.cache
def lua_source(name: ScriptName) -> str:
    """The text of ``registry/lua/<name>.lua``."""
    return resources.files("registry").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def register(client: redis.Redis, name: ScriptName) -> Script:
    """``name`` registered on ``client`` (EVALSHA, loaded on first use; nothing is sent now)."""
    return client.register_script(lua_source(name))
