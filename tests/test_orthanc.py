"""The Orthanc harness (tests/orthanc.py) against a real Orthanc with its DICOMweb plugin:
start/stop, REST upload and lookup, QIDO-RS, STOW-RS and WADO-RS with dicomweb-client, and
what Orthanc sends, and which answers it accepts, when it pushes a study with STOW-RS."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from shared.redis_server import port_open
from tests.dicom_factory import pacs_dataset, to_bytes
from tests.orthanc import (
    OrthancError,
    OrthancPushError,
    OrthancServer,
    dicomweb_server,
    orthanc_unavailable_reason,
)

UNAVAILABLE = orthanc_unavailable_reason()


def needs_orthanc(test: Callable) -> Callable:
    """Marks a test that starts or uses a real Orthanc: skipped, with the reason, without one."""
    skip = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))
    return pytest.mark.integration(skip(test))


BEARER = "test-orthanc-key"


# -- a STOW-RS receiver that records what Orthanc sends ----------------------------------------


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    chunked: bool
    parts: list[Part] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


def parse_multipart(content_type: str, body: bytes) -> list[Part]:
    """Strict multipart parsing: every part between ``--boundary`` delimiters."""
    message = Message()
    message["Content-Type"] = content_type
    boundary = message.get_param("boundary")
    assert isinstance(boundary, str), content_type
    delimiter = b"--" + boundary.encode()
    assert body.startswith(delimiter), body[:100]
    chunks = body.split(b"\r\n" + delimiter)
    assert chunks[-1].startswith(b"--"), "no closing delimiter"
    parts = []
    for i, chunk in enumerate(chunks[:-1]):
        if i == 0:
            chunk = chunk[len(delimiter) :]
        assert chunk.startswith(b"\r\n"), chunk[:50]
        head, _, payload = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n") if line)
        parts.append(Part(headers, payload))
    return parts


def referenced_sops(parts: list[Part]) -> list[dict]:
    """ReferencedSOPSequence items (DICOM JSON) for the instances in ``parts``."""
    items = []
    for part in parts:
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(part.body))
        items.append(
            {
                "00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]},
            }
        )
    return items


def stow_ok(request: Received) -> tuple[int, bytes]:
    """What a correct STOW-RS server answers: 200 and every instance in ReferencedSOPSequence."""
    body = {"00081199": {"vr": "SQ", "Value": referenced_sops(request.parts)}}
    return 200, json.dumps(body).encode()


Reply = Callable[[Received], tuple[int, bytes]]


class StowReceiver:
    """A tiny HTTP server in a thread: records each request, answers with ``reply``."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.reply: Reply = stow_ok
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
                if chunked:
                    pieces = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        pieces.append(self.rfile.read(size))
                        self.rfile.readline()
                    body = b"".join(pieces)
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = Received("POST", self.path, dict(self.headers.items()), body, chunked)
                content_type = request.header("Content-Type") or ""
                if content_type.startswith("multipart/"):
                    request.parts = parse_multipart(content_type, body)
                receiver.received.append(request)
                status, answer = receiver.reply(request)
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                if status != 204:
                    self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                if status != 204:
                    self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/dicomweb"

    def start(self) -> StowReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Iterator[StowReceiver]:
    server = StowReceiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory, receiver: StowReceiver
) -> Iterator[OrthancServer]:
    """One Orthanc for the module, with the receiver in its config twice: chunked (Orthanc's
    default) and with ``"ChunkedTransfers": false``."""
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    server = OrthancServer(
        tmp_path_factory.mktemp("orthanc"),
        dicomweb_servers={
            "receiver": dicomweb_server(receiver.url, bearer=BEARER),
            "receiver-whole": dicomweb_server(receiver.url, bearer=BEARER, chunked=False),
        },
    ).start()
    yield server
    server.stop()


@pytest.fixture
def stow_reset(receiver: StowReceiver) -> Iterator[StowReceiver]:
    receiver.received.clear()
    receiver.reply = stow_ok
    yield receiver
    receiver.reply = stow_ok


def stored_study(pacs: OrthancServer, instances: int = 1) -> tuple[str, list[pydicom.Dataset]]:
    """Upload a study of ``instances`` images; return its Orthanc ID and the datasets."""
    first = pacs_dataset()
    datasets = [first] + [
        pacs_dataset(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID, seed=i)
        for i in range(1, instances)
    ]
    for i, ds in enumerate(datasets, 1):
        ds.InstanceNumber = i
        assert pacs.upload(to_bytes(ds))["Status"] == "Success"
    study = pacs.study_id(first.StudyInstanceUID)
    assert study is not None
    return study, datasets


# -- tests ---------------------------------------------------------------------------------------


def test_unavailable_reason_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_ORTHANC_DICOMWEB_PLUGIN", "/nonexistent/libOrthancDicomWeb.so")
    reason = orthanc_unavailable_reason()
    assert reason is not None
    assert "/nonexistent/libOrthancDicomWeb.so" in reason
    assert "orthanc-dicomweb" in reason
    with pytest.raises(OrthancError, match="not available"):
        OrthancServer(Path("/nonexistent")).start()


@needs_orthanc
def test_start_and_stop_free_the_ports(tmp_path: Path) -> None:
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        assert server.running
        assert port_open(server.http_port)
        assert port_open(server.dicom_port)
        system = server.get("/system")
        assert system["HttpPort"] == server.http_port
        assert system["DicomPort"] == server.dicom_port
        assert system["DicomAet"] == "CXRTEST"
        assert "dicom-web" in server.get("/plugins")
        assert (tmp_path / "orthanc" / "config.json").is_file()
        with pytest.raises(OrthancError, match="already in use"):
            OrthancServer(tmp_path / "second", http_port=server.http_port).start()
    finally:
        server.stop()
    assert not server.running
    assert not port_open(server.http_port)
    assert not port_open(server.dicom_port)
    assert "Orthanc has stopped" in server.log_tail()
    server.stop()  # a second stop is harmless


@needs_orthanc
def test_upload_then_qido_finds_the_instance(pacs: OrthancServer) -> None:
    ds = pacs_dataset(modality="CR", patient_id="QIDO-1")
    answer = pacs.upload(to_bytes(ds))
    assert answer["Status"] == "Success"
    assert pacs.study_id(ds.StudyInstanceUID) == answer["ParentStudy"]
    assert pacs.upload(to_bytes(ds))["Status"] == "AlreadyStored"

    client = DICOMwebClient(url=pacs.dicomweb_url)
    found = client.search_for_instances(study_instance_uid=ds.StudyInstanceUID)
    assert [i["00080018"]["Value"] for i in found] == [[ds.SOPInstanceUID]]
    studies = client.search_for_studies(search_filters={"PatientID": "QIDO-1"})
    assert [s["0020000D"]["Value"][0] for s in studies] == [ds.StudyInstanceUID]
    assert pacs.study_id("1.2.3.4.5.6.7.8.9") is None


@needs_orthanc
def test_stow_rs_into_orthanc_then_wado_rs(pacs: OrthancServer) -> None:
    ds = pacs_dataset(seed=7)
    client = DICOMwebClient(url=pacs.dicomweb_url)
    response = client.store_instances(datasets=[ds])
    assert response.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert not response.get("FailedSOPSequence")  # Orthanc sends it, empty
    assert pacs.study_id(ds.StudyInstanceUID) is not None

    metadata = client.retrieve_instance_metadata(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert metadata["00080060"]["Value"] == ["DX"]
    assert metadata["00280010"]["Value"] == [64]
    assert metadata["00280004"]["Value"] == ["MONOCHROME2"]
    study_metadata = client.retrieve_study_metadata(ds.StudyInstanceUID)
    assert [m["00080018"]["Value"] for m in study_metadata] == [[ds.SOPInstanceUID]]

    retrieved = client.retrieve_instance(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    np.testing.assert_array_equal(retrieved.pixel_array, ds.pixel_array)


@needs_orthanc
def test_push_study_sends_stow_rs_multipart(pacs: OrthancServer, stow_reset: StowReceiver) -> None:
    study, datasets = stored_study(pacs, instances=2)
    answer = pacs.push_study("receiver", study)
    assert answer["InstancesCount"] == "2"

    [request] = stow_reset.received
    assert request.path == "/dicomweb/studies"  # Orthanc appends /studies to the Url
    assert request.header("Authorization") == f"Bearer {BEARER}"
    assert request.header("Accept") == "application/dicom+json"
    content_type = Message()
    content_type["Content-Type"] = request.header("Content-Type") or ""
    assert content_type.get_content_type() == "multipart/related"
    assert content_type.get_param("type") == "application/dicom"
    assert content_type.get_param("boundary")
    assert request.chunked  # Transfer-Encoding: chunked ...
    assert request.header("Content-Length") is None  # ... so no Content-Length

    assert len(request.parts) == 2  # the whole study in one request
    for part in request.parts:
        assert part.headers["Content-Type"] == "application/dicom"
        assert int(part.headers["Content-Length"]) == len(part.body)
        assert not any(k.lower() == "content-disposition" for k in part.headers)
    sent = {
        str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(p.body)).SOPInstanceUID)
        for p in request.parts
    }
    assert sent == {ds.SOPInstanceUID for ds in datasets}


@needs_orthanc
def test_push_without_chunking_and_with_extra_headers(
    pacs: OrthancServer, stow_reset: StowReceiver
) -> None:
    study, _ = stored_study(pacs)
    pacs.push_study("receiver-whole", study, http_headers={"X-Request-Id": "push-1"})
    [request] = stow_reset.received
    assert not request.chunked
    assert int(request.header("Content-Length") or -1) == len(request.body)
    assert request.header("X-Request-Id") == "push-1"
    assert request.header("Authorization") == f"Bearer {BEARER}"
    assert len(request.parts) == 1


@needs_orthanc
def test_push_to_a_server_added_at_run_time(pacs: OrthancServer, stow_reset: StowReceiver) -> None:
    study, _ = stored_study(pacs)
    pacs.add_dicomweb_server("late", stow_reset.url + "/late", bearer="other-key")
    try:
        servers = requests.get(f"{pacs.dicomweb_url}/servers", timeout=10).json()
        assert "late" in servers
        pacs.push_study("late", study)
    finally:
        pacs.remove_dicomweb_server("late")
    [request] = stow_reset.received
    assert request.path == "/dicomweb/late/studies"
    assert request.header("Authorization") == "Bearer other-key"
    with pytest.raises(OrthancError):
        pacs.push_study("late", study)


def _with(status: int, extra: dict | None = None, count_delta: int = 0) -> Reply:
    def reply(request: Received) -> tuple[int, bytes]:
        items = referenced_sops(request.parts)
        items = items + items[:count_delta] if count_delta > 0 else items
        return status, json.dumps(
            {"00081199": {"vr": "SQ", "Value": items}, **(extra or {})}
        ).encode()

    return reply


FAILED_ITEM = {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [272]}}]}}

# What Orthanc 1.10.1 / DICOMweb plugin 1.7 accepts back from a STOW-RS receiver.
ANSWERS: dict[str, tuple[Reply, bool]] = {
    "200 ReferencedSOPSequence": (_with(200), True),
    "201 ReferencedSOPSequence": (_with(201), True),
    "202 ReferencedSOPSequence": (_with(202), True),
    "202 with an empty FailedSOPSequence": (_with(202, {"00081198": {"vr": "SQ"}}), True),
    "202 with a FailedSOPSequence item": (_with(202, FAILED_ITEM), False),
    "200 one reference too many": (_with(200, count_delta=1), False),
    "200 {}": (lambda r: (200, b"{}"), False),
    "200 empty body": (lambda r: (200, b""), False),
    "204 no body": (lambda r: (204, b""), False),
    "401": (_with(401), False),
    "409": (_with(409), False),
    "503": (_with(503), False),
}


@needs_orthanc
@pytest.mark.parametrize("case", list(ANSWERS))
def test_which_stow_answers_orthanc_accepts(
    pacs: OrthancServer, stow_reset: StowReceiver, case: str
) -> None:
    reply, accepted = ANSWERS[case]
    stow_reset.reply = reply
    study, _ = stored_study(pacs)
    if accepted:
        assert pacs.push_study("receiver", study)["InstancesCount"] == "1"
    else:
        with pytest.raises(OrthancPushError) as failure:
            pacs.push_study("receiver", study)
        assert failure.value.answer.status_code == 500
        assert failure.value.log_lines, "Orthanc logged no reason"
    assert len(stow_reset.received) == 1  # Orthanc does not retry


@needs_orthanc
def test_clear_empties_the_pacs(pacs: OrthancServer) -> None:
    pacs.upload(to_bytes(pacs_dataset()))
    assert pacs.studies()
    pacs.clear()
    assert pacs.studies() == []
