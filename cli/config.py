"""How every ``cdm`` command loads its configuration, once, from its sources in order:

    defaults <- config.toml (--config, default ./config.toml when present) <- services.json (--services, default
    .services/services.json when present) <- environment CDM_<SECTION>__<KEY> <- the command's own flags

and how a program writes one (``render_config``: the demo and the test harness).

``--config`` is accepted before and after the command (``cdm --config f.toml daemon``, ``cdm daemon --config
f.toml``); the one after the command wins.
"""

from __future__ import annotations

import argparse
import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias

from cdm.errors import ConfigError
from daemon.config import AppConfig, load_config, parse_config

DEFAULT_CONFIG = Path("config.toml")
DEFAULT_SERVICES = Path(".services/services.json")
CONFIG_HELP = "config.toml (default: ./config.toml if present); CDM_<SECTION>__<KEY> variables override it"

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_config_flag(sub: Subparsers) -> None:
    """Let every command take ``--config`` after its name too (unless it declares its own)."""
    for parser in sub.choices.values():
        if "--config" not in parser._option_string_actions:
            # SUPPRESS: when not given after the command, the value given before it (or None) stays
            parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=CONFIG_HELP)


def config_path(args: argparse.Namespace) -> Path | None:
    path: Path | None = getattr(args, "config", None)
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    return path


def load_app_config(args: argparse.Namespace) -> AppConfig:
    """defaults <- config.toml <- environment (no local services: the offline commands need none)."""
    return load_config(config_path(args))


def app_config(args: argparse.Namespace) -> AppConfig:
    """defaults <- config.toml <- services.json (when there is one) <- environment."""
    services = getattr(args, "services", None) or (DEFAULT_SERVICES if DEFAULT_SERVICES.exists() else None)
    return load_config(config_path(args), services=services)


def registry_composition(cfg: AppConfig, redis_url: str | None, device: str) -> tuple[Any, Any]:
    """``(Composed, ModelConfig)`` of the registry's current epoch (``cdm sample --redis``, ``cdm attribute``):
    artifacts fetched through the ``[artifacts]`` store (url "" = ``[daemon] artifact_dir``) into the readers'
    cache and verified."""
    from sampler.loader import load_live_composition

    return load_live_composition(
        cfg.redis,
        cfg.artifacts,
        url=redis_url,
        default_dir=Path(cfg.daemon.artifact_dir),
        base_dir=cfg.cache_base_dir,
        device=device,
        vectorize=cfg.library.sample.vectorize,
    )


def render_config(doc: Mapping[str, Mapping[str, Any]], *, comment: str = "") -> str:
    """config.toml text for ``doc`` ({section: {key: value}}; values str, Path, bool, int, float or lists of them),
    after ``comment`` (one ``# `` line each). The text is read back and parsed as a config, so ConfigError names an
    unknown section or key or a bad value here, not when a daemon started on the file fails."""
    lines = [f"# {line}" for line in comment.splitlines()]
    for section, table in doc.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value, f'{section}.{key}')}" for key, value in table.items())
    text = "\n".join(lines) + "\n"
    parse_config(tomllib.loads(text), where="render_config")
    return text


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where} = {value}: config values must be finite")
        return repr(value)
    if isinstance(value, str | Path):
        # a JSON string is a TOML basic string once DEL, which TOML wants escaped and JSON does not, is escaped
        return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    raise ConfigError(f"{where} = {value!r}: a config value is a string, number, bool or list of them")
