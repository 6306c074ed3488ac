"""How every ``cdm`` command loads its configuration: ``config.toml`` read once, then local service addresses."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeAlias

from daemon.config import AppConfig, load_config, with_services

DEFAULT_SERVICES = Path(".services/services.json")

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def load_app_config(args: argparse.Namespace) -> AppConfig:
    """``--config`` (default ./config.toml when present; else the defaults)."""
    path = args.config
    if path is None and Path("config.toml").exists():
        path = Path("config.toml")
    return load_config(path)


def app_config(args: argparse.Namespace) -> AppConfig:
    """config.toml, with local service addresses from services.json when there is one."""
    cfg = load_app_config(args)
    services = getattr(args, "services", None) or (DEFAULT_SERVICES if DEFAULT_SERVICES.exists() else None)
    return with_services(cfg, services) if services else cfg
