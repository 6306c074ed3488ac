"""How every ``cdm`` command loads its configuration, once, from its sources in order:

    defaults <- config.toml (--config, default ./config.toml when present) <- services.json (--services, default
    .services/services.json when present) <- environment CDM_<SECTION>__<KEY> <- the command's own flags

``--config`` is accepted before and after the command (``cdm --config f.toml daemon``, ``cdm daemon --config
f.toml``); the one after the command wins.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeAlias

from daemon.config import AppConfig, load_config

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
