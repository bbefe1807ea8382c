"""Client commands: ``submit``, ``wait``, ``results``.  Talk HTTP only; no TensorFlow here."""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from shared.models import TERMINAL_IMAGE, TERMINAL_JOB
from shared.settings import get_settings, local_key_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".zip"}
DICOMDIR = "DICOMDIR"  # PS3.10 fixes the index file's name
#: Answers that mean "not now": a quota (429) or an overloaded or absent dependency (503).
RETRY_STATUSES = frozenset({429, 503})
#: Seconds of waiting after which `cxr submit` / `cxr wait` give up on a server that keeps
#: answering 429 or 503 (--retry-for overrides it).
DEFAULT_RETRY_FOR = 600.0
MAX_BACKOFF = 60.0
RETRY_HELP = (
    "on 429 or 503 answers, wait as the server's Retry-After says (at least 1 s, doubling with "
    "each refusal in a row, up to 60 s) and try again, for at most this many seconds of waiting "
    "in all (default %(default)s; 0: never retry)"
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url", default=None, help="server (default CXR_URL or http://127.0.0.1:8000)"
        )
        p.add_argument(
            "--api-key",
            default=None,
            help="default: CXR_API_KEY, else the key `cxr serve` saved in CXR_DATA_DIR",
        )

    p = sub.add_parser(
        "submit", help="send films (files, folders or zips) as one job and print the job id"
    )
    p.add_argument("paths", nargs="*", type=Path, help="files, folders or zips")
    p.add_argument("--client-ref", default=None, help="your own label for the job")
    p.add_argument(
        "--retry-for", type=float, default=DEFAULT_RETRY_FOR, metavar="SECONDS", help=RETRY_HELP
    )
    p.add_argument(
        "--pacs-study",
        action="append",
        metavar="UID",
        help="instead of files: have the server pull this study from its PACS (repeatable)",
    )
    p.add_argument(
        "--pacs-query",
        action="append",
        metavar="KEY=VALUE",
        help="instead of files: have the server pull the studies matching this QIDO-RS "
        "filter, e.g. StudyDate=20260101-20260107 (repeatable)",
    )
    common(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "wait", help="show a job's progress until every film has an answer, then the results"
    )
    p.add_argument("job_id")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    p.add_argument("--timeout", type=float, default=0, help="seconds; 0 waits forever")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no results table")
    p.add_argument(
        "--retry-for", type=float, default=DEFAULT_RETRY_FOR, metavar="SECONDS", help=RETRY_HELP
    )
    common(p)
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser(
        "results", help="print a job's result for each film (a table, or CSV with --csv)"
    )
    p.add_argument("job_id")
    p.add_argument("--csv", action="store_true")
    common(p)
    p.set_defaults(func=cmd_results)


class ClientError(RuntimeError):
    pass


def base_url(args: argparse.Namespace) -> str:
    return (args.url or get_settings().url).rstrip("/")


def http_session(args: argparse.Namespace) -> requests.Session:
    """A session that sends the API key: --api-key, CXR_API_KEY, or the one-machine key file."""
    key = args.api_key or get_settings().api_key
    if not key:
        path = local_key_file(get_settings())
        if path.is_file():
            key = path.read_text().strip()
    session = requests.Session()
    if key:
        session.headers["Authorization"] = f"Bearer {key}"
    return session


def _pause(resp: requests.Response, refusals: int) -> float:
    """Seconds to wait after the ``refusals``-th refusal in a row: the server's Retry-After,
    but at least a backoff that doubles from 1 s (capped), with a little jitter so that many
    clients refused together do not come back together."""
    raw = resp.headers.get("Retry-After", "").strip()
    asked = float(raw) if raw.isdigit() else 0.0
    backoff = min(2.0 ** (refusals - 1), MAX_BACKOFF)
    return max(asked, backoff) * random.uniform(1.0, 1.1)


def _error_code(resp: requests.Response) -> str:
    try:
        return str(resp.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "error"


def with_retries(send: Callable[[], requests.Response], retry_for: float) -> requests.Response:
    """``send()`` again while the answer is 429 or 503, honouring Retry-After, for at most
    ``retry_for`` seconds of waiting; returns the last answer (the caller checks it)."""
    waited, refusals = 0.0, 0
    while True:
        resp = send()
        if resp.status_code not in RETRY_STATUSES:
            return resp
        refusals += 1
        pause = _pause(resp, refusals)
        if waited + pause > retry_for:
            return resp
        print(
            f"server busy ({resp.status_code} {_error_code(resp)}): retrying in {pause:.0f} s",
            file=sys.stderr,
        )
        time.sleep(pause)
        waited += pause


def _check(resp: requests.Response) -> requests.Response:
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            raise ClientError(f"{resp.status_code} {err['code']}: {err['message']}")
        except (ValueError, KeyError, TypeError):
            raise ClientError(f"{resp.status_code}: {resp.text[:200]}") from None
    return resp


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file, whatever its name (PACS exports and DICOMDIR trees have no
    extensions); reads only its first 132 bytes."""
    from shared.dicom import MAGIC, PREAMBLE, is_dicom  # pydicom: only when a folder needs it

    try:
        with open(path, "rb") as fh:
            return is_dicom(fh.read(PREAMBLE + len(MAGIC)))
    except OSError:
        return False


def wanted(path: Path) -> bool:
    """A file a folder walk submits: an image by its extension, or DICOM by its content; never
    a DICOMDIR index (the files it references are in the tree, and the walk finds them)."""
    if path.name.upper() == DICOMDIR:
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(path)


def collect_paths(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and wanted(p)))
        elif path.is_file():
            files.append(path)
        else:
            raise ClientError(f"{path}: no such file or folder")
    if not files:
        raise ClientError("no image files found")
    return files


def _post_files(
    http: requests.Session, url: str, files: list[Path], data: dict | None, headers: dict
) -> requests.Response:
    handles = [open(f, "rb") for f in files]  # noqa: SIM115 - closed below
    try:
        parts = [
            ("files", (f.name, h, "application/octet-stream"))
            for f, h in zip(files, handles, strict=True)
        ]
        return http.post(f"{url}/v1/jobs", files=parts, data=data, headers=headers, timeout=600)
    finally:
        for h in handles:
            h.close()


def submit(
    http: requests.Session,
    url: str,
    files: list[Path],
    client_ref: str | None = None,
    retry_for: float = DEFAULT_RETRY_FOR,
) -> dict[str, Any]:
    """One job; refusals for now (429, 503) are retried, each retry with the same
    Idempotency-Key, so that a retry of a submission the server did take cannot make two."""
    data = {"client_ref": client_ref} if client_ref else None
    headers = {"Idempotency-Key": f"cxr-submit-{uuid.uuid4()}"}
    resp = with_retries(lambda: _post_files(http, url, files, data, headers), retry_for)
    return _check(resp).json()


def get_job(
    http: requests.Session,
    url: str,
    job_id: str,
    page: int = 1,
    per_page: int = 0,
    retry_for: float = DEFAULT_RETRY_FOR,
) -> dict[str, Any]:
    """The job; by default its summary alone (``per_page=0``: the server skips the images)."""
    params = {"page": page, "per_page": per_page}
    resp = with_retries(
        lambda: http.get(f"{url}/v1/jobs/{job_id}", params=params, timeout=60), retry_for
    )
    return _check(resp).json()


def all_images(http: requests.Session, url: str, job_id: str) -> list[dict[str, Any]]:
    images: list[dict[str, Any]] = []
    page = 1
    while True:
        body = get_job(http, url, job_id, page=page, per_page=500)
        images.extend(body["images"])
        if page >= body["pagination"]["pages"]:
            return images
        page += 1


def format_table(images: list[dict[str, Any]]) -> str:
    width = max([8, *(len(i["filename"]) for i in images)])
    width = min(width, 60)
    # ``error`` holds the reason of failed images and of skipped ones (out of the model's scope)
    lines = [f"{'filename':{width}}  {'status':9}  {'prob':>6}  {'label':9}  error"]
    for i in images:
        prob = "" if i["probability"] is None else f"{i['probability']:.3f}"
        err = f"{i['error']['code']}: {i['error']['message']}" if i["error"] else ""
        name, label = i["filename"][:width], i["label"] or ""
        lines.append(f"{name:{width}}  {i['status']:9}  {prob:>6}  {label:9}  {err}")
    return "\n".join(lines)


def summary(counts: dict[str, int]) -> str:
    """'8 completed, 1 failed, 2 skipped (out of scope)'; skipped only when there are some
    (servers before the status existed do not report it)."""
    parts = [f"{counts.get('completed', 0)} completed", f"{counts.get('failed', 0)} failed"]
    if counts.get("skipped"):
        parts.append(f"{counts['skipped']} skipped (out of scope)")
    return ", ".join(parts)


def pull_body(studies: list[str] | None, query: list[str] | None) -> dict[str, Any]:
    """The JSON of a pull job, from --pacs-study / --pacs-query."""
    if studies and query:
        raise ClientError("give --pacs-study or --pacs-query, not both")
    if studies:
        return {"dicomweb": {"study_uids": studies}}
    filters = {}
    for item in query or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClientError(f"--pacs-query takes KEY=VALUE, not {item!r}")
        filters[key.strip()] = value.strip()
    return {"dicomweb": {"query": filters}}


def cmd_submit(args: argparse.Namespace) -> int:
    http, url = http_session(args), base_url(args)
    if args.pacs_study or args.pacs_query:
        if args.paths:
            raise ClientError("give files or a PACS pull, not both")
        payload = pull_body(args.pacs_study, args.pacs_query)
        if args.client_ref:
            payload["client_ref"] = args.client_ref
        headers = {"Idempotency-Key": f"cxr-submit-{uuid.uuid4()}"}
        resp = with_retries(
            lambda: http.post(f"{url}/v1/jobs", json=payload, headers=headers, timeout=60),
            args.retry_for,
        )
        body = _check(resp).json()
        print(body["id"])
        print("the server is pulling the images from its PACS", file=sys.stderr)
        return 0
    if not args.paths:
        raise ClientError("give files, folders or zips to send (or --pacs-study / --pacs-query)")
    body = submit(http, url, collect_paths(args.paths), args.client_ref, args.retry_for)
    print(body["id"])
    print(f"{body['image_count']} image(s) accepted", file=sys.stderr)
    return 0


def finished(body: dict[str, Any]) -> int:
    """Films with their answer: a result, or a recorded reason (failed, skipped)."""
    return sum(body["counts"].get(s, 0) for s in TERMINAL_IMAGE)


def progress_bar(total: int, already: int, tqdm: Any) -> Any:
    """Films per second counted from when we started watching: films finished before (or while
    another client watched) do not inflate the rate, and it is the average over the watch,
    not a jumpy estimate from the last poll."""
    return tqdm(total=total, initial=already, unit="film", smoothing=0, desc="waiting")


def cmd_wait(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    url, http = base_url(args), http_session(args)
    started = time.monotonic()
    body = get_job(http, url, args.job_id, retry_for=args.retry_for)
    bar = None if args.quiet else progress_bar(body["image_count"], finished(body), tqdm)
    try:
        while True:
            done = finished(body)
            if bar is not None:
                bar.set_description(body["status"])
                bar.update(done - bar.n)
            if body["status"] in TERMINAL_JOB:
                break
            if args.timeout and time.monotonic() - started > args.timeout:
                print(f"timed out; job is {body['status']}", file=sys.stderr)
                return 1
            time.sleep(args.interval)
            body = get_job(http, url, args.job_id, retry_for=args.retry_for)
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print(format_table(all_images(http, url, args.job_id)))
    print(f"job {args.job_id}: {body['status']} ({summary(body['counts'])})")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    url, http = base_url(args), http_session(args)
    if args.csv:
        resp = _check(http.get(f"{url}/v1/jobs/{args.job_id}/results.csv", timeout=300))
        sys.stdout.write(resp.text)
        return 0
    print(format_table(all_images(http, url, args.job_id)))
    return 0
