"""API keys: created once and shown once; only their sha256 is stored.

A key also carries its client's place in the queue: the priority of the jobs it submits and,
where set, its own limits (images in flight, submissions per minute) instead of the settings'.
"""

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
    priority: int = 0
    max_images_in_flight: int | None = None  # None: CXR_MAX_IMAGES_IN_FLIGHT
    max_submissions_per_minute: int | None = None  # None: CXR_MAX_SUBMISSIONS_PER_MINUTE


#: What ``cxr keys create`` / ``cxr keys set`` may change on a key (None: the setting's value).
LIMIT_FIELDS = ("priority", "max_images_in_flight", "max_submissions_per_minute")
MAX_PRIORITY = 1000


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def check_limits(limits: dict[str, int | None]) -> None:
    """Refuse a priority outside 0..MAX_PRIORITY and a limit below 1 (None: the setting)."""
    unknown = set(limits) - set(LIMIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown key field(s): {', '.join(sorted(unknown))}")
    priority = limits.get("priority")
    if priority is not None and not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be 0 to {MAX_PRIORITY}")
    for name in LIMIT_FIELDS[1:]:
        value = limits.get(name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (or unset: the setting's value)")


def create_key(
    session: Session, client: str, is_admin: bool = False, **limits: int | None
) -> tuple[ApiKey, str]:
    """Store a new key for ``client``, with its priority and limits where given; returns the
    row and the plaintext (never stored)."""
    client = client.strip()
    if not client or len(client) > MAX_CLIENT_NAME:
        raise ValueError(f"client name must be 1 to {MAX_CLIENT_NAME} characters")
    check_limits(limits)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id(),
        client=client,
        key_hash=hash_key(plaintext),
        prefix=plaintext[:12],
        is_admin=is_admin,
        created_at=utcnow(),
        priority=limits.get("priority") or 0,
        max_images_in_flight=limits.get("max_images_in_flight"),
        max_submissions_per_minute=limits.get("max_submissions_per_minute"),
    )
    session.add(row)
    return row, plaintext


def set_limits(session: Session, key_id_or_prefix: str, **limits: int | None) -> int:
    """Change the given fields of the active keys matching an id or prefix (a limit of None
    goes back to the setting's value; priority None to 0); returns how many keys changed."""
    check_limits(limits)
    rows = _active(session, key_id_or_prefix)
    for row in rows:
        for name, value in limits.items():
            setattr(row, name, value if value is not None or name != "priority" else 0)
    return len(rows)


def principal_of(row: ApiKey) -> Principal:
    return Principal(
        client=row.client,
        is_admin=row.is_admin,
        priority=row.priority or 0,
        max_images_in_flight=row.max_images_in_flight,
        max_submissions_per_minute=row.max_submissions_per_minute,
    )


def lookup(session: Session, key: str) -> Principal | None:
    """The principal of an active key, or None."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        return None
    return principal_of(row)


def _active(session: Session, key_id_or_prefix: str) -> list[ApiKey]:
    return list(
        session.scalars(
            select(ApiKey).where(
                (ApiKey.id == key_id_or_prefix) | (ApiKey.prefix == key_id_or_prefix),
                ApiKey.revoked_at.is_(None),
            )
        )
    )


def revoke(session: Session, key_id_or_prefix: str) -> int:
    """Revoke by id or by the displayed prefix; returns how many keys were revoked."""
    rows = _active(session, key_id_or_prefix)
    for row in rows:
        row.revoked_at = utcnow()
    return len(rows)
