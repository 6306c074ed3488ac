"""Access rights of ``cdm serve``, kept in the registry's Redis: ``cdm acl`` (grants and source tags) and
``cdm token`` (bearer tokens). Changes take effect on the next request of every replica (nothing to restart).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.config import Subparsers, app_config

if TYPE_CHECKING:
    from registry.acl import AccessRegistry, Grant


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", default=None, help="registry URL (default: [redis] url / .services/services.json)")
    p.add_argument("--services", type=Path, default=None, help="services.json of deploy/local (Redis address)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _grant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("principal", help="principal name (1-128 of A-Z a-z 0-9 . _ @ -)")
    p.add_argument("--all", action="store_true", help="every source, present and future")
    p.add_argument("--source", action="append", default=[], metavar="NAME", help="one source by name (repeatable)")
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="every source tagged KEY=VALUE, including sources tagged later (repeatable)",
    )


def register(sub: Subparsers) -> None:
    """Add ``acl`` and ``token`` to the ``cdm`` parser."""
    acl = sub.add_parser(
        "acl",
        help="who may see which sources in `cdm serve` (grants by name or tag; source tags)",
        description="Grants give a principal the sources it may use: --all, --source NAME or --tag KEY=VALUE "
        "(sources join a tag grant by their tags, set with `cdm acl tag`). Kept in Redis; effective at once.",
    )
    asub = acl.add_subparsers(dest="acl_command", required=True, metavar="ACTION")
    g = asub.add_parser("grant", help="give a principal access to sources")
    _grant_flags(g)
    _common(g)
    g.set_defaults(func=cmd_acl_grant)
    r = asub.add_parser("revoke", help="take grants away from a principal")
    _grant_flags(r)
    _common(r)
    r.set_defaults(func=cmd_acl_revoke)
    ls = asub.add_parser("ls", help="principals with their grants and tokens, and every source's tags")
    _common(ls)
    ls.set_defaults(func=cmd_acl_ls)
    t = asub.add_parser("tag", help="set tags of a source (KEY=VALUE ...); the source need not exist yet")
    t.add_argument("source")
    t.add_argument("tags", nargs="+", metavar="KEY=VALUE")
    _common(t)
    t.set_defaults(func=cmd_acl_tag)
    u = asub.add_parser("untag", help="remove tags of a source by key")
    u.add_argument("source")
    u.add_argument("keys", nargs="+", metavar="KEY")
    _common(u)
    u.set_defaults(func=cmd_acl_untag)

    tok = sub.add_parser(
        "token",
        help="bearer tokens of `cdm serve` principals (create shows the token once)",
        description="A token identifies a principal: send it as 'Authorization: Bearer <token>'. Only its sha256 "
        "is stored, so it is printed once, at creation; a lost token is revoked and replaced.",
    )
    tsub = tok.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    c = tsub.add_parser("create", help="a new token for a principal (printed once)")
    c.add_argument("principal")
    c.add_argument("--label", default="", help="what the token is for (shown by `cdm token ls`)")
    _common(c)
    c.set_defaults(func=cmd_token_create)
    rv = tsub.add_parser("revoke", help="revoke a token by its id (tok_...)")
    rv.add_argument("token_id")
    _common(rv)
    rv.set_defaults(func=cmd_token_revoke)
    tl = tsub.add_parser("ls", help="tokens (ids, principals, labels; never the token)")
    tl.add_argument("--principal", default=None)
    _common(tl)
    tl.set_defaults(func=cmd_token_ls)


@contextmanager
def _access(args: argparse.Namespace) -> Iterator[AccessRegistry]:
    from registry.acl import AccessRegistry
    from registry.client import connect
    from registry.keys import Keys

    cfg = app_config(args)
    client = connect(cfg.redis, url=args.redis)
    try:
        yield AccessRegistry(client, Keys(cfg.redis.namespace))
    finally:
        client.close()


def _checked(fn: Callable[[], Any]) -> Any:
    """``fn()``, reporting a bad name, tag or grant as the CLI's error (exit 2) instead of a traceback."""
    from cdm.errors import ConfigError

    try:
        return fn()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _grants(args: argparse.Namespace) -> list[Grant]:
    from registry.acl import Grant

    texts = (["all"] if args.all else []) + [f"source:{s}" for s in args.source] + [f"tag:{t}" for t in args.tag]
    return [_checked(functools.partial(Grant.parse, t)) for t in texts]


def _print(args: argparse.Namespace, doc: dict[str, Any], lines: list[str]) -> None:
    print(json.dumps(doc) if args.json else "\n".join(lines))


def cmd_acl_grant(args: argparse.Namespace) -> int:
    grants = _grants(args)
    with _access(args) as access:
        now = _checked(lambda: access.grant(args.principal, grants))
    names = [str(g) for g in now]
    _print(args, {"principal": args.principal, "grants": names}, [f"{args.principal}: {' '.join(names)}"])
    return 0


def cmd_acl_revoke(args: argparse.Namespace) -> int:
    grants = _grants(args)
    with _access(args) as access:
        now = _checked(lambda: access.revoke(args.principal, grants))
    names = [str(g) for g in now]
    _print(args, {"principal": args.principal, "grants": names}, [f"{args.principal}: {' '.join(names) or '-'}"])
    return 0


def cmd_acl_ls(args: argparse.Namespace) -> int:
    from registry.reader import RegistryClient

    with _access(args) as access:
        tokens = access.tokens()
        principals = [
            {
                "principal": p,
                "grants": [str(g) for g in access.grants_of(p)],
                "tokens": [t.token_id for t in tokens if t.principal == p],
            }
            for p in access.principals()
        ]
        registered = RegistryClient(access.client, access.keys).sources()
        sources = sorted(set(registered) | set(access.tagged_sources()))
        tags = access.tags_of_many(sources)
    doc = {"principals": principals, "sources": [{"source": s, "tags": tags[s]} for s in sources]}
    lines = ["principals:"]
    for p in principals:
        lines.append(f"  {p['principal']:24s} {' '.join(p['grants']) or '-':40s} tokens: {len(p['tokens'])}")
    lines += ["source tags:"]
    lines += [f"  {s:24s} {' '.join(f'{k}={v}' for k, v in sorted(tags[s].items())) or '-'}" for s in sources]
    _print(args, doc, lines)
    return 0


def cmd_acl_tag(args: argparse.Namespace) -> int:
    from registry.acl import parse_tag

    pairs = dict(_checked(lambda: [parse_tag(t) for t in args.tags]))
    with _access(args) as access:
        now = _checked(lambda: access.set_tags(args.source, pairs))
    text = " ".join(f"{k}={v}" for k, v in now.items())
    _print(args, {"source": args.source, "tags": now}, [f"{args.source}: {text}"])
    return 0


def cmd_acl_untag(args: argparse.Namespace) -> int:
    with _access(args) as access:
        now = _checked(lambda: access.remove_tags(args.source, args.keys))
    text = " ".join(f"{k}={v}" for k, v in now.items()) or "-"
    _print(args, {"source": args.source, "tags": now}, [f"{args.source}: {text}"])
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    with _access(args) as access:
        issued = _checked(lambda: access.create_token(args.principal, args.label))
    rec = issued.record
    _print(
        args,
        {"token": issued.token, **rec.to_dict()},
        [
            issued.token,
            f"# token {rec.token_id} of principal {rec.principal!r}: shown only now (only its sha256 is stored);",
            "# send it as 'Authorization: Bearer <token>'; revoke with `cdm token revoke " + rec.token_id + "`",
        ],
    )
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from cdm.errors import ConfigError

    with _access(args) as access:
        rec = access.revoke_token(args.token_id)
    if rec is None:
        raise ConfigError(f"no token with id {args.token_id!r}; `cdm token ls` lists them")
    _print(args, {"revoked": rec.to_dict()}, [f"revoked {rec.token_id} of principal {rec.principal!r}"])
    return 0


def cmd_token_ls(args: argparse.Namespace) -> int:
    with _access(args) as access:
        tokens = access.tokens(args.principal)
    _print(
        args,
        {"tokens": [t.to_dict() for t in tokens]},
        [f"{t.token_id}  {t.principal:24s} {t.label}" for t in tokens] or ["no tokens"],
    )
    return 0
