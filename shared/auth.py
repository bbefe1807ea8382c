"""API keys: created once and shown once; only their sha256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import utcnow
from shared.models import ApiKey, new_id

KEY_PREFIX = "cxr_"
MAX_CLIENT_NAME = 100


@dataclass(frozen=True)
class Principal:
    """Who is calling: the client that owns the jobs it creates; admins see every job."""

    client: str
    is_admin: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def create_key(session: Session, client: str, is_admin: bool = False) -> tuple[ApiKey, str]:
    """Store a new key for ``client``; returns the row and the plaintext (never stored)."""
    client = client.strip()
    if not client or len(client) > MAX_CLIENT_NAME:
        raise ValueError(f"client name must be 1 to {MAX_CLIENT_NAME} characters")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id(),
        client=client,
        key_hash=hash_key(plaintext),
        prefix=plaintext[:12],
        is_admin=is_admin,
        created_at=utcnow(),
    )
    session.add(row)
    return row, plaintext


def lookup(session: Session, key: str) -> Principal | None:
    """The principal of an active key, or None."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        return None
    return Principal(client=row.client, is_admin=row.is_admin)


def revoke(session: Session, key_id_or_prefix: str) -> int:
    """Revoke by id or by the displayed prefix; returns how many keys were revoked."""
    rows = session.scalars(
        select(ApiKey).where(
            (ApiKey.id == key_id_or_prefix) | (ApiKey.prefix == key_id_or_prefix),
            ApiKey.revoked_at.is_(None),
        )
    ).all()
    for row in rows:
        row.revoked_at = utcnow()
    return len(rows)
