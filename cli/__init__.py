"""The ``cdm`` command line: offline commands over a local store, and the service commands (daemon, push, ls).

Every command reads ``config.toml`` once (``--config``, default ./config.toml when present); flags override it.

    offline.py   split, train, sample, forget, evaluate, ls --store   (cdm only; sample --redis also reads the registry)
    service.py   daemon, push, control, services, ls (the registry)
    serve.py     serve (the HTTP sampler), attribute (offline or against the registry)
    acl.py       acl grant|revoke|ls|tag|untag, token create|revoke|ls (access rights of `cdm serve`)
    config.py    config.toml and services.json, loaded once per command
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cli import acl, offline, serve, service
from cli.config import CONFIG_HELP, add_config_flag, app_config

EXAMPLES = """\
examples (offline, a local store directory, no services needed):
  cdm split --data fashion-mnist --scheme by-class --n 4 --out sources/
  cdm train --store store/ --source shoes=sources/source-0.npz --source tops=sources/source-1.npz --steps 300
  cdm sample --store store/ --n 64 --png grid.png --out samples.npz
  cdm sample --store store/ --n 16 --sources shoes --labels 7 --top-k 1 --out shoes.npz
  cdm forget --store store/ --source tops
  cdm evaluate --store store/ --n 500

examples (the service: Kafka + Redis; `make services-start` runs local ones):
  cdm daemon --config config.toml          (or CDM_<SECTION>__<KEY> variables, e.g. CDM_REDIS__PASSWORD)
  cdm push --source shoes sources/source-0.npz
  cdm ls --json
  cdm sample --redis redis://127.0.0.1:6379/0 --n 16 --out live.npz

examples (the HTTP sampler with access rights; docs/http-api.md):
  cdm acl tag shoes license=cc-by
  cdm acl grant alice --tag license=cc-by
  cdm token create alice
  cdm serve --port 8000
  cdm attribute image.png --store store/
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cdm",
        description=(
            "cdm: Compartmentalized Diffusion Models. One diffusion model (compartment) per data source, "
            "composed at sampling time as eps = sum_i w_i(x_t,t,c) eps_i(x_t,t,c) with a learnt router w. "
            "Sources can be added without retraining the others and forgotten exactly."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    offline.register(sub)
    ls = sub.add_parser("ls", help="list compartments (local store or live registry)")
    g = ls.add_mutually_exclusive_group()
    g.add_argument("--store", type=Path, help="a local store directory (cdm train --store ...)")
    g.add_argument("--redis", help="registry URL (default: from config / .services/services.json)")
    ls.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    ls.set_defaults(func=cmd_ls)
    service.register(sub)
    serve.register(sub)
    acl.register(sub)
    add_config_flag(sub)
    return p


def cmd_ls(args: argparse.Namespace) -> int:
    """``cdm ls``: a local store with ``--store``, else the live registry."""
    if args.store is not None:
        return offline.cmd_ls_store(args)
    return service.cmd_ls_registry(args, app_config(args))


def main(argv: Sequence[str] | None = None) -> int:
    from cdm.errors import CdmError
    from cli.errors import explain
    from common.redact import safe
    from daemon.errors import DaemonError

    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (CdmError, DaemonError) as exc:
        print(f"cdm {args.command}: error: {safe(exc, 4000)}", file=sys.stderr)
        return 2
    except Exception as exc:
        why = explain(exc)  # a service that cannot be reached: its address and what to do, no traceback
        if why is None:
            raise
        print(f"cdm {args.command}: error: {safe(why, 4000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cdm {args.command}: interrupted", file=sys.stderr)
        return 130
