"""Signed job callbacks, the parts the API and the workers share: which URLs a callback may go
to, the signature, the per-client secret, and the one moment a job's callback becomes due.

Invariants:

* a callback URL is ``http(s)``, carries no credentials, and its host is allowed by
  ``CXR_CALLBACK_ALLOWED_HOSTS`` (by default: public addresses only) when the job is created
  and again at delivery, where every address its name resolves to is checked and only an
  allowed one is connected to (a name that changed its address since, DNS rebinding, gains
  nothing);
* a job's callback becomes due exactly once: ``callback_due_at`` is set by one conditional
  UPDATE, only once every image is terminal and no pull is pending, and only the caller whose
  UPDATE changed the row enqueues the delivery (the sweeper sends what a crash left behind);
* the signature is HMAC-SHA256 of ``timestamp + "." + body`` under the client's secret; the
  secret is stored (the signer needs it) but never logged, and neither is the URL.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import ColumnElement, and_, exists, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import insert_for, utcnow
from shared.models import (
    TERMINAL_IMAGE,
    CallbackSecret,
    CallbackStatus,
    Chunk,
    Image,
    Job,
    PullStatus,
)

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

#: The event a callback announces: the job reached a terminal status (completed,
#: completed_with_errors or failed: the body's ``status`` says which).
EVENT = "job.finished"
SIGNATURE_HEADER = "X-CXR-Signature"
TIMESTAMP_HEADER = "X-CXR-Timestamp"
DELIVERY_HEADER = "X-CXR-Delivery"
ATTEMPT_HEADER = "X-CXR-Attempt"
EVENT_HEADER = "X-CXR-Event"
SIGNATURE_SCHEME = "sha256="
#: Receivers should refuse a timestamp further than this from their clock (replays).
DEFAULT_TOLERANCE_S = 300

MAX_URL_LENGTH = 2000
INVALID_URL = "invalid_callback_url"
HOST_NOT_ALLOWED = "callback_host_not_allowed"

SECRET_PREFIX = "cxrcb_"
#: The namespace of delivery ids (a fixed random UUID): one id per job, the same on every try.
_DELIVERY_NAMESPACE = uuid.UUID("8d7f3c0e-5b1a-4f6e-9c2d-3a4b5c6d7e8f")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_LOCALHOST = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


# ------------------------------------------------------------------------------ the URL policy


class CallbackUrlError(ValueError):
    """A callback URL that is refused; ``code`` is :data:`INVALID_URL` or
    :data:`HOST_NOT_ALLOWED`.  The message never quotes the URL (it may hold a token)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _host_name(value: str) -> str | None:
    """``value`` as a lower-case ASCII host name (IDNA), or None when it is not one."""
    try:
        name = value.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        return None
    return name


@dataclass(frozen=True)
class AllowList:
    """``CXR_CALLBACK_ALLOWED_HOSTS``: what a callback may reach besides public addresses.

    ``names``: host names allowed whatever they resolve to; ``domains``: ``.example.org`` (or
    ``*.example.org``) entries, the domain and every name under it; ``networks``: addresses or
    CIDRs allowed although private (``10.1.2.0/24``, ``127.0.0.1``)."""

    names: frozenset[str] = frozenset()
    domains: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, raw: str) -> AllowList:
        """Comma-separated entries; raises ValueError naming the first bad one."""
        names: set[str] = set()
        domains: list[str] = []
        networks: list[Network] = []
        for entry in filter(None, (part.strip().lower() for part in raw.split(","))):
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            domain = entry.removeprefix("*").startswith(".")
            name = _host_name(entry.removeprefix("*").removeprefix("."))
            if name is None:
                raise ValueError(f"{entry!r} is neither a host name nor an IP network")
            if domain:
                domains.append(name)
            else:
                names.add(name)
        return cls(frozenset(names), tuple(domains), tuple(networks))

    def allows_name(self, host: str) -> bool:
        return host in self.names or any(
            host == domain or host.endswith("." + domain) for domain in self.domains
        )

    def allows_address(self, address: Address) -> bool:
        address = _embedded_ipv4(address) or address
        if any(address in network for network in self.networks):
            return True
        return is_public(address)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, NAT64, 6to4, Teredo), whose range is
    what counts: ``::ffff:127.0.0.1`` is the loopback."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    teredo = address.teredo
    return address.ipv4_mapped or address.sixtofour or (teredo[1] if teredo else None)


@functools.lru_cache(maxsize=8)
def allow_list(raw: str) -> AllowList:
    """:meth:`AllowList.parse`, once per setting's value (validated at start-up)."""
    return AllowList.parse(raw)


def is_public(address: Address) -> bool:
    """Globally routable unicast: no private, loopback, link-local, multicast, reserved,
    shared (CGNAT) or documentation range."""
    return address.is_global and not (
        address.is_multicast
        or address.is_reserved
        or address.is_loopback
        or address.is_link_local
        or address.is_unspecified
    )


@dataclass(frozen=True)
class Target:
    """A checked callback URL, split for a connection pinned to an address."""

    scheme: str
    host: str  # lower-case host name, or the address's text for an IP literal
    port: int
    path: str  # path and query, as sent
    address: Address | None  # set when the URL names an address rather than a host name

    def url_for(self, address: Address) -> str:
        where = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{where}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        host = (
            f"[{self.host}]"
            if self.address is not None and self.address.version == 6
            else self.host
        )
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def _literal_address(host: str) -> Address | None:
    """The address a host names literally: dotted or bracketed IP, and also the shorthand
    forms (``2130706433``, ``0x7f.1``) a resolver would turn into one."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    last = host.rsplit(".", 1)[-1]
    if last.isdigit() or last.startswith("0x"):  # no top-level domain is numeric
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise CallbackUrlError(INVALID_URL, "the callback URL's host is malformed") from None
    return None


def parse_url(url: object) -> Target:
    """Split and validate a callback URL's form (not yet its host's policy)."""
    if not isinstance(url, str) or not 1 <= len(url) <= MAX_URL_LENGTH:
        raise CallbackUrlError(
            INVALID_URL, f"callback_url must be 1 to {MAX_URL_LENGTH} characters"
        )
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise CallbackUrlError(INVALID_URL, "callback_url holds spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise CallbackUrlError(INVALID_URL, "callback_url is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise CallbackUrlError(INVALID_URL, "callback_url must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise CallbackUrlError(
            INVALID_URL, "callback_url may not carry credentials: verify the signature instead"
        )
    raw_host = parts.hostname or ""
    address = _literal_address(raw_host) if raw_host else None
    host = str(address) if address is not None else _host_name(raw_host)
    if not host:
        raise CallbackUrlError(INVALID_URL, "callback_url has no valid host")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default = 443 if scheme == "https" else 80
    return Target(scheme, host, port or default, path, address)


def check_url(url: object, allow: AllowList) -> Target:
    """A callback URL as a job is created: well formed, and its host allowed as far as can be
    told without resolving it (addresses and ``localhost`` names; other names are checked at
    delivery, against what they resolve to then)."""
    target = parse_url(url)
    if allow.allows_name(target.host):
        return target
    if target.address is not None:
        addresses: Sequence[Address] = (target.address,)
    elif target.host == "localhost" or target.host.endswith(".localhost"):
        addresses = _LOCALHOST  # RFC 6761: always the loopback
    else:
        return target
    if not any(allow.allows_address(a) for a in addresses):
        raise CallbackUrlError(
            HOST_NOT_ALLOWED,
            "callback_url points at a private, loopback, link-local or reserved address; "
            "the operator may allow it with CXR_CALLBACK_ALLOWED_HOSTS",
        )
    return target


Resolver = Callable[..., list[tuple[Any, ...]]]


def allowed_addresses(
    target: Target, allow: AllowList, resolve: Resolver = socket.getaddrinfo
) -> list[Address]:
    """The addresses a delivery may connect to, resolved now.  Raises
    :class:`CallbackUrlError` (``callback_host_not_allowed``) when none is allowed and
    ``socket.gaierror`` when the name does not resolve."""
    if target.address is not None:
        found: list[Address] = [target.address]
    else:
        infos = resolve(target.host, target.port, type=socket.SOCK_STREAM)
        found = list(
            dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos)
        )
    if allow.allows_name(target.host):
        return found
    allowed = [a for a in found if allow.allows_address(a)]
    if not allowed:
        raise CallbackUrlError(HOST_NOT_ALLOWED, "the callback host resolves to no allowed address")
    return allowed


# ----------------------------------------------------------------------------- the signature


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``timestamp + "." + body`` under ``secret``."""
    message = str(timestamp).encode("ascii") + b"." + body
    return SIGNATURE_SCHEME + hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str,
    timestamp: str | int,
    body: bytes,
    signature: str,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """What a receiver runs on a callback: True when ``signature`` (the X-CXR-Signature header)
    is the HMAC of ``timestamp`` (X-CXR-Timestamp, as received) and the raw ``body`` under
    ``secret``, and the timestamp is within ``tolerance_s`` of ``now`` (default: the clock)."""
    stamp = str(timestamp)
    # isdigit() takes "²", which int() refuses; bytes, since compare_digest refuses non-ASCII str
    if not (stamp.isascii() and stamp.isdecimal()) or not isinstance(signature, str):
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > tolerance_s:
        return False
    given = signature.strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(sign(secret, stamp, body).encode("ascii"), given)


def delivery_id(job_id: str) -> str:
    """The job's callback delivery id (X-CXR-Delivery): the same on every attempt."""
    return str(uuid.uuid5(_DELIVERY_NAMESPACE, f"{job_id}/{EVENT}"))


# ------------------------------------------------------------------------------- the secrets


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def client_secret(session: Session, client: str) -> CallbackSecret:
    """The client's signing secret, made on first use (concurrent first uses agree: the
    insert does nothing when another one won)."""
    insert = insert_for(session, CallbackSecret.__table__).values(
        client=client, secret=new_secret(), created_at=utcnow()
    )
    session.execute(insert.on_conflict_do_nothing(index_elements=["client"]))
    return session.scalars(
        select(CallbackSecret)
        .where(CallbackSecret.client == client)
        .execution_options(populate_existing=True)
    ).one()


def rotate_secret(session: Session, client: str) -> CallbackSecret:
    """A new secret for the client; every signature from now on uses it."""
    values = {"secret": new_secret(), "created_at": utcnow()}
    insert = insert_for(session, CallbackSecret.__table__).values(client=client, **values)
    session.execute(insert.on_conflict_do_update(index_elements=["client"], set_=values))
    return session.scalars(
        select(CallbackSecret)
        .where(CallbackSecret.client == client)
        .execution_options(populate_existing=True)
    ).one()


# ------------------------------------------------------------------- when a callback is due


#: A callback still waiting for its job to end.
WAITING = and_(Job.callback_status == CallbackStatus.PENDING, Job.callback_due_at.is_(None))


def job_has_ended() -> ColumnElement[bool]:
    """SQL for :func:`shared.models.job_status` being terminal, correlated to ``jobs``: no
    image left unfinished, and no pull pending (a job with neither images nor a pull is
    still ``queued``)."""
    unfinished = exists().where(Image.job_id == Job.id, Image.status.not_in(TERMINAL_IMAGE))
    any_image = exists().where(Image.job_id == Job.id)
    pull_over = Job.pull_status.in_([PullStatus.DONE, PullStatus.FAILED])
    return and_(~unfinished, or_(pull_over, and_(Job.pull_status.is_(None), any_image)))


def mark_due(session: Session, job_id: str) -> bool:
    """Waiting -> due, if the job has ended; True only for the one caller that changed it."""
    now = utcnow()
    return bool(
        session.execute(
            update(Job)
            .where(Job.id == job_id, WAITING, job_has_ended())
            .values(callback_due_at=now, callback_next_at=now)
        ).rowcount
    )


def _make_due(celery: Celery, sessions: sessionmaker[Session], job_id: str | None) -> bool:
    if job_id is None:
        return False
    with sessions.begin() as session:
        won = mark_due(session, job_id)
    if won:
        from shared.queue import enqueue_callbacks  # here: settings validation imports us

        enqueue_callbacks(celery, [job_id])
    return won


def callback_if_ended(
    celery: Celery,
    sessions: sessionmaker[Session],
    job_id: str | None = None,
    chunk_id: str | None = None,
) -> bool:
    """Call after a commit that may have ended a job (named, or by one of its chunks): makes
    its callback due and enqueues it, once.  A job without a waiting callback costs one read.
    Never raises: what it could not do, the sweeper does (it logs the exception's type)."""
    try:
        with sessions() as session:
            query = select(Job.id).where(WAITING)
            if chunk_id is not None:
                query = query.join(Chunk, Chunk.job_id == Job.id).where(Chunk.id == chunk_id)
            else:
                query = query.where(Job.id == job_id)
            waiting = session.scalar(query)
        return _make_due(celery, sessions, waiting)
    except Exception as exc:
        log.warning("callback check failed (%s); the sweeper will retry", type(exc).__name__)
        return False
