"""``cxr keys create|set|list|revoke``: per-client API keys, managed on the database directly.

A key carries the priority of the jobs it submits and, where set, its own limits (images in
flight, submissions per minute) instead of the settings'.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from sqlalchemy import select

from shared.auth import create_key, revoke, set_limits
from shared.db import as_utc, database
from shared.models import ApiKey
from shared.settings import get_settings


def add_commands(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser(
        "keys",
        help="create, list and revoke the API keys clients use; set their priority and limits",
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    p = ksub.add_parser("create", help="create a key; it is printed once and never again")
    p.add_argument("--client", required=True, help="the client (hospital, system) that owns it")
    p.add_argument("--admin", action="store_true", help="may read every client's jobs")
    _limit_options(p, unset=None)
    p.set_defaults(func=cmd_create)
    p = ksub.add_parser(
        "set", help="change a key's priority or limits (by id or prefix); 'default' resets one"
    )
    p.add_argument("key")
    _limit_options(p, unset=KEEP)
    p.set_defaults(func=cmd_set)
    p = ksub.add_parser("list", help="list keys (prefixes only)")
    p.set_defaults(func=cmd_list)
    p = ksub.add_parser("revoke", help="revoke a key by id or prefix")
    p.add_argument("key")
    p.set_defaults(func=cmd_revoke)


KEEP = object()  # `cxr keys set`: an option not given leaves the field as it is
OPTIONS = {  # option -> ApiKey field
    "priority": "priority",
    "max_in_flight": "max_images_in_flight",
    "max_per_minute": "max_submissions_per_minute",
}


def _count_or_default(raw: str) -> int | None:
    """A whole number, or 'default' (None: the setting's value; for priority, 0)."""
    if raw.strip().lower() == "default":
        return None
    try:
        return int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number or 'default'") from None


def _limit_options(p: argparse.ArgumentParser, unset: object) -> None:
    p.add_argument(
        "--priority",
        type=_count_or_default,
        default=unset,
        metavar="N",
        help="0-1000: this key's jobs are dispatched before those of lower priority "
        "(default 0; 'default' resets it)",
    )
    p.add_argument(
        "--max-in-flight",
        type=_count_or_default,
        default=unset,
        metavar="N",
        help="unfinished images the client may hold when submitting with this key "
        "(default: CXR_MAX_IMAGES_IN_FLIGHT; 'default' resets it)",
    )
    p.add_argument(
        "--max-per-minute",
        type=_count_or_default,
        default=unset,
        metavar="N",
        help="submissions a minute (default: CXR_MAX_SUBMISSIONS_PER_MINUTE; 'default' resets it)",
    )


def _limits(args: argparse.Namespace) -> dict[str, int | None]:
    return {
        field: getattr(args, option)
        for option, field in OPTIONS.items()
        if getattr(args, option) is not KEEP
    }


def _when(value: dt.datetime | None) -> str:
    value = as_utc(value)
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def cmd_create(args: argparse.Namespace) -> int:
    try:
        with database(get_settings().sqlalchemy_url) as sessions, sessions.begin() as session:
            row, plaintext = create_key(session, args.client, args.admin, **_limits(args))
            key_id = row.id
    except ValueError as exc:
        print(f"cxr keys create: {exc}", file=sys.stderr)
        return 2
    print(plaintext)
    kind = "admin key" if args.admin else "key"
    print(f"{kind} {key_id} for client {args.client!r}; store it now, it is not shown again")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    limits = _limits(args)
    if not limits:
        print("nothing to change: give --priority, --max-in-flight or --max-per-minute")
        return 2
    try:
        with database(get_settings().sqlalchemy_url) as sessions, sessions.begin() as session:
            n = set_limits(session, args.key, **limits)
    except ValueError as exc:
        print(f"cxr keys set: {exc}", file=sys.stderr)
        return 2
    if n == 0:
        print(f"no active key matches {args.key!r}")
        return 1
    print(f"changed {n} key(s); running jobs keep their priority, new submissions see the rest")
    return 0


def _limit(value: int | None) -> str:
    return "default" if value is None else str(value)


def cmd_list(args: argparse.Namespace) -> int:
    with database(get_settings().sqlalchemy_url) as sessions, sessions() as session:
        rows = session.scalars(select(ApiKey).order_by(ApiKey.client, ApiKey.created_at)).all()
    print(
        f"{'id':36}  {'prefix':12}  {'client':20}  admin  prio  in-flight  per-min  "
        "created              revoked"
    )
    for r in rows:
        created, revoked = (_when(r.created_at), _when(r.revoked_at))
        admin = "yes" if r.is_admin else "no"
        in_flight, per_minute = _limit(r.max_images_in_flight), _limit(r.max_submissions_per_minute)
        print(
            f"{r.id:36}  {r.prefix:12}  {r.client[:20]:20}  {admin:5}  {r.priority:4}  "
            f"{in_flight:>9}  {per_minute:>7}  {created}  {revoked}"
        )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with database(get_settings().sqlalchemy_url) as sessions, sessions.begin() as session:
        n = revoke(session, args.key)
    if n == 0:
        print(f"no active key matches {args.key!r}")
        return 1
    print(f"revoked {n} key(s)")
    return 0
