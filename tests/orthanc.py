"""A private Orthanc PACS (with its DICOMweb plugin) for the tests, modelled on
``shared.redis_server.RedisServer``.

Each ``OrthancServer`` is its own ``Orthanc`` process on free HTTP and DICOM ports, with its
``config.json``, database, storage and ``orthanc.log`` in one directory, so tests never touch
a system Orthanc (8042/4242) and never share state with another test run.

How a test uses it::

    import pytest
    from tests.dicom_factory import pacs_dataset, to_bytes
    from tests.orthanc import OrthancServer, orthanc_unavailable_reason

    pytestmark = pytest.mark.skipif(
        orthanc_unavailable_reason() is not None, reason=str(orthanc_unavailable_reason())
    )

    def test_something(tmp_path):
        with OrthancServer(tmp_path / "orthanc") as pacs:          # start() ... stop()
            answer = pacs.upload(to_bytes(pacs_dataset()))          # POST /instances
            client = DICOMwebClient(url=pacs.dicomweb_url)          # QIDO/WADO/STOW-RS
            client.search_for_instances(study_instance_uid=...)

Pushing a study from Orthanc to our STOW-RS receiver (``POST {Url}/studies``)::

    pacs = OrthancServer(
        tmp_path / "orthanc",
        dicomweb_servers={"cxr": dicomweb_server(api_url + "/dicomweb", bearer="KEY")},
    ).start()
    study = pacs.study_id(study_instance_uid)        # POST /tools/lookup
    pacs.push_study("cxr", study)                    # POST /dicom-web/servers/cxr/stow

or, on a server that is already running (for a session-scoped one), register the receiver at
run time with ``pacs.add_dicomweb_server("cxr", url, bearer="KEY")`` (``PUT
/dicom-web/servers/cxr``; kept in memory only) and ``pacs.remove_dicomweb_server("cxr")``.

What Orthanc 1.10.1 with DICOMweb plugin 1.7 does on a push (checked by tests/test_orthanc.py):

* one ``POST {Url}/studies`` per push with every instance of the study, ``Content-Type:
  multipart/related; type="application/dicom"; boundary=...``, ``Accept:
  application/dicom+json``, the configured ``HttpHeaders`` (e.g. ``Authorization: Bearer``),
  and ``Transfer-Encoding: chunked`` (no ``Content-Length``) unless the server entry says
  ``"ChunkedTransfers": false``;
* each part has ``Content-Type: application/dicom`` and ``Content-Length``, no
  ``Content-Disposition``; the closing ``--boundary--`` has no trailing CRLF;
* the push counts as a success only for a 2xx answer (200, 201 and 202 alike) whose body is
  JSON with a ReferencedSOPSequence ``"00081199"`` holding exactly one item per instance sent,
  and no item in FailedSOPSequence ``"00081198"`` or ``"0008119A"``; an empty body, ``{}``, a
  204, any 3xx/4xx/5xx all fail the push (Orthanc answers 500 to ``/stow``, the reason is only
  in its log, which ``OrthancPushError`` quotes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

from shared.redis_server import free_port, port_open, stop_process

log = logging.getLogger(__name__)

DEFAULT_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
# Debian puts the binary in /usr/sbin, which is not on a normal user's PATH.
_BINARY_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")


class OrthancError(RuntimeError):
    pass


class OrthancPushError(OrthancError):
    """``/dicom-web/servers/{name}/stow`` failed; ``answer`` is Orthanc's HTTP answer and
    ``log_lines`` the lines of its log that say why (Orthanc's answer itself does not)."""

    def __init__(self, message: str, answer: requests.Response, log_lines: list[str]) -> None:
        super().__init__(message + ("\n" + "\n".join(log_lines) if log_lines else ""))
        self.answer = answer
        self.log_lines = log_lines


def orthanc_binary() -> str | None:
    """The ``Orthanc`` executable: ``$CXR_ORTHANC_BINARY``, else ``Orthanc`` on PATH, else
    Debian's /usr/sbin/Orthanc; None when there is none."""
    configured = os.environ.get("CXR_ORTHANC_BINARY")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    found = shutil.which("Orthanc")
    if found:
        return found
    return next((p for p in _BINARY_CANDIDATES if os.access(p, os.X_OK)), None)


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin (``$CXR_ORTHANC_DICOMWEB_PLUGIN`` or Debian's path), None if absent."""
    path = os.environ.get("CXR_ORTHANC_DICOMWEB_PLUGIN", DEFAULT_PLUGIN)
    return path if Path(path).is_file() else None


def orthanc_unavailable_reason() -> str | None:
    """Why Orthanc tests cannot run here, or None when they can."""
    missing = []
    if orthanc_binary() is None:
        missing.append("the Orthanc binary (not on PATH, not in /usr/sbin; $CXR_ORTHANC_BINARY)")
    if dicomweb_plugin() is None:
        missing.append(
            f"the DICOMweb plugin {os.environ.get('CXR_ORTHANC_DICOMWEB_PLUGIN', DEFAULT_PLUGIN)}"
        )
    if not missing:
        return None
    return (
        "Orthanc is not available: missing "
        + " and ".join(missing)
        + "; install the Debian packages `orthanc orthanc-dicomweb` (.ci/run does so as root)"
    )


def dicomweb_server(
    url: str,
    bearer: str | None = None,
    headers: Mapping[str, str] | None = None,
    chunked: bool = True,
) -> dict[str, Any]:
    """One ``DicomWeb.Servers`` entry: Orthanc POSTs STOW-RS to ``{url}/studies``."""
    entry: dict[str, Any] = {"Url": url}
    all_headers = dict(headers or {})
    if bearer is not None:
        all_headers["Authorization"] = f"Bearer {bearer}"
    if all_headers:
        entry["HttpHeaders"] = all_headers
    if not chunked:
        entry["ChunkedTransfers"] = False
    return entry


class OrthancServer:
    """``Orthanc`` with the DICOMweb plugin on 127.0.0.1, its files under ``directory``.

    ``dicomweb_servers`` maps a name to an entry from :func:`dicomweb_server` (or the raw
    ``{"Url": ..., "HttpHeaders": {...}}``); Orthanc can then push studies there with
    :meth:`push_study`. ``extra_config`` is merged last into the generated config.json.
    """

    def __init__(
        self,
        directory: Path,
        http_port: int | None = None,
        dicom_port: int | None = None,
        dicomweb_servers: Mapping[str, Mapping[str, Any]] | None = None,
        aet: str = "CXRTEST",
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.dicomweb_servers = {k: dict(v) for k, v in (dicomweb_servers or {}).items()}
        self.aet = aet
        self.extra_config = dict(extra_config or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.http = requests.Session()
        self.http.trust_env = False  # never through a proxy from the environment

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The REST API's base, without a trailing slash."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS) for ``DICOMwebClient(url=...)``."""
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.directory / "orthanc.log"

    @property
    def config_path(self) -> Path:
        return self.directory / "config.json"

    def config(self) -> dict[str, Any]:
        """The config.json that :meth:`start` writes."""
        plugin = dicomweb_plugin()
        if plugin is None:
            raise OrthancError(orthanc_unavailable_reason() or "no DICOMweb plugin")
        storage = (self.directory / "storage").resolve()
        config: dict[str, Any] = {
            "Name": "cxr-test-orthanc",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            # Orthanc binds 0.0.0.0 regardless; this makes it refuse non-loopback clients.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "Plugins": [plugin],
            "WebDavEnabled": False,
            "SaveJobs": False,
            "HttpTimeout": 30,  # Orthanc's outgoing requests, e.g. a push to a receiver
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "Servers": self.dicomweb_servers,
            },
        }
        config.update(self.extra_config)
        return config

    # -- life cycle --------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> OrthancServer:
        binary = orthanc_binary()
        if binary is None or dicomweb_plugin() is None:
            raise OrthancError(orthanc_unavailable_reason() or "Orthanc is not available")
        for port in (self.http_port, self.dicom_port):
            if port_open(port):
                raise OrthancError(f"port {port} is already in use")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        with self.log_path.open("ab") as logfile:
            self.process = subprocess.Popen(
                [binary, str(self.config_path)],
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise OrthancError(f"Orthanc exited with {code}:\n{self.log_tail()}")
            if port_open(self.http_port) and self._ready():
                log.info("Orthanc running on HTTP %d, DICOM %d", self.http_port, self.dicom_port)
                return self
            time.sleep(0.05)
        self.stop(kill=True)
        raise OrthancError(f"Orthanc did not start on port {self.http_port}:\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            plugins = self.http.get(f"{self.url}/plugins", timeout=2)
        except requests.RequestException:
            return False
        return plugins.ok and "dicom-web" in plugins.json()

    def stop(self, kill: bool = False, timeout: float = 15.0) -> None:
        """SIGTERM (Orthanc then shuts down cleanly, ~3 s), SIGKILL after ``timeout``."""
        self.http.close()
        if self.process is None:
            return
        if stop_process(self.process, kill=kill, timeout=timeout):
            log.warning("Orthanc did not stop within %.0f s; it was killed", timeout)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- REST --------------------------------------------------------------------------------

    def _check(self, answer: requests.Response) -> requests.Response:
        if not answer.ok:
            raise OrthancError(
                f"{answer.request.method} {answer.url} -> {answer.status_code}: {answer.text[:500]}"
            )
        return answer

    def get(self, path: str, **kw: Any) -> Any:
        """GET a REST path (e.g. ``/studies``) and return its JSON."""
        return self._check(self.http.get(self.url + path, timeout=30, **kw)).json()

    def upload(self, dicom_bytes: bytes) -> dict[str, Any]:
        """``POST /instances``: Orthanc's answer, e.g. ``{"ID", "ParentStudy", "Status":
        "Success" | "AlreadyStored", ...}``."""
        answer = self.http.post(
            f"{self.url}/instances",
            data=dicom_bytes,
            headers={"Content-Type": "application/dicom"},
            timeout=30,
        )
        return self._check(answer).json()

    def lookup(self, dicom_uid: str) -> list[dict[str, Any]]:
        """``POST /tools/lookup``: the resources (``{"ID", "Path", "Type"}``) with this
        Patient ID or Study/Series/SOP Instance UID, ``[]`` when none."""
        answer = self.http.post(f"{self.url}/tools/lookup", data=dicom_uid, timeout=30)
        return self._check(answer).json()

    def study_id(self, study_instance_uid: str) -> str | None:
        """Orthanc's ID of the study with this StudyInstanceUID, None if it is not stored."""
        return next(
            (r["ID"] for r in self.lookup(study_instance_uid) if r.get("Type") == "Study"), None
        )

    def studies(self) -> list[str]:
        return self.get("/studies")

    def clear(self) -> None:
        """Delete every patient (and so every study): a clean PACS for the next test."""
        for patient in self.get("/patients"):
            self._check(self.http.delete(f"{self.url}/patients/{patient}", timeout=30))

    def add_dicomweb_server(
        self,
        name: str,
        url: str,
        bearer: str | None = None,
        headers: Mapping[str, str] | None = None,
        chunked: bool = True,
    ) -> None:
        """Register (or replace) a DICOMweb server at run time: ``PUT /dicom-web/servers/{name}``
        (in memory only: a restart forgets it)."""
        entry = dicomweb_server(url, bearer=bearer, headers=headers, chunked=chunked)
        self._check(self.http.put(f"{self.url}/dicom-web/servers/{name}", json=entry, timeout=30))

    def remove_dicomweb_server(self, name: str) -> None:
        self._check(self.http.delete(f"{self.url}/dicom-web/servers/{name}", timeout=30))

    def push_study(
        self,
        server_name: str,
        orthanc_study_id: str,
        http_headers: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """STOW-RS the study to DICOMweb server ``server_name``, synchronously:
        ``POST /dicom-web/servers/{name}/stow`` with ``{"Resources": [id]}``. Returns Orthanc's
        answer (``{"InstancesCount": "1", "NetworkSizeMB": "0"}``); raises
        :class:`OrthancPushError` when the receiver's answer did not satisfy Orthanc.
        ``http_headers`` are added to this one request."""
        body: dict[str, Any] = {"Resources": [orthanc_study_id], "Synchronous": True}
        if http_headers:
            body["HttpHeaders"] = dict(http_headers)
        log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
        answer = self.http.post(
            f"{self.url}/dicom-web/servers/{server_name}/stow", json=body, timeout=timeout
        )
        if answer.ok:
            return answer.json()
        with self.log_path.open("rb") as logfile:
            logfile.seek(log_size)
            new = logfile.read().decode(errors="replace").splitlines()
        reasons = [
            line
            for line in new
            if line.startswith("E") and "Error encountered within the plugin engine" not in line
        ]
        raise OrthancPushError(
            f"push of study {orthanc_study_id} to {server_name!r} failed: "
            f"HTTP {answer.status_code}",
            answer,
            reasons,
        )
