"""``cxr keys create|list|revoke``: per-client API keys, managed on the database directly."""

from __future__ import annotations

import argparse
import datetime as dt

from sqlalchemy import select

from shared.auth import create_key, revoke
from shared.db import as_utc, database
from shared.models import ApiKey
from shared.settings import get_settings


def add_commands(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke the API keys clients use")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    p = ksub.add_parser("create", help="create a key; it is printed once and never again")
    p.add_argument("--client", required=True, help="the client (hospital, system) that owns it")
    p.add_argument("--admin", action="store_true", help="may read every client's jobs")
    p.set_defaults(func=cmd_create)
    p = ksub.add_parser("list", help="list keys (prefixes only)")
    p.set_defaults(func=cmd_list)
    p = ksub.add_parser("revoke", help="revoke a key by id or prefix")
    p.add_argument("key")
    p.set_defaults(func=cmd_revoke)


def _when(value: dt.datetime | None) -> str:
    value = as_utc(value)
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def cmd_create(args: argparse.Namespace) -> int:
    with database(get_settings().sqlalchemy_url) as sessions, sessions.begin() as session:
        row, plaintext = create_key(session, args.client, args.admin)
        key_id = row.id
    print(plaintext)
    kind = "admin key" if args.admin else "key"
    print(f"{kind} {key_id} for client {args.client!r}; store it now, it is not shown again")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with database(get_settings().sqlalchemy_url) as sessions, sessions() as session:
        rows = session.scalars(select(ApiKey).order_by(ApiKey.client, ApiKey.created_at)).all()
    print(f"{'id':36}  {'prefix':12}  {'client':20}  admin  created              revoked")
    for r in rows:
        created, revoked = (_when(r.created_at), _when(r.revoked_at))
        admin = "yes" if r.is_admin else "no"
        print(f"{r.id:36}  {r.prefix:12}  {r.client[:20]:20}  {admin:5}  {created}  {revoked}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with database(get_settings().sqlalchemy_url) as sessions, sessions.begin() as session:
        n = revoke(session, args.key)
    if n == 0:
        print(f"no active key matches {args.key!r}")
        return 1
    print(f"revoked {n} key(s)")
    return 0
