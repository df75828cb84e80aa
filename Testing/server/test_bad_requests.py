"""Bad input to the server's HTTP API, beyond the prompts: every refusal is one
``{"error": kind, "detail": line}`` with a 4xx status, and the session is left as it was
(mask and undo history). The threshold double serves: no model work is needed."""

from __future__ import annotations

import base64
import http.client
import json
import struct
import urllib.parse
import zlib

import numpy as np
import pytest
from server_harness import TOKEN, LiveServer, threshold_model
from volumes import centre_ras, oblique

from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.server.client import ServerClient
from RobustMedSAMLib.server.protocol import VOLUME_MEDIA_TYPE
from RobustMedSAMLib.server.sessions import owner_of

JSON = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server():
    with LiveServer(threshold_model()) as server:
        yield server


@pytest.fixture
def session(server):
    """An open session with one click on the sphere (one undo step)."""
    truth = sphere((10, 40, 40), spacing=(1.0, 1.0, 3.0), radius=9.0)
    volume = oblique(truth)
    remote = ServerClient(server.url, TOKEN).open_session(volume.array, volume.ijk_to_ras)
    remote.click(centre_ras(volume, truth.mask)[0])
    yield remote
    remote.close()


def send(url: str, method: str, path: str, body: bytes | None = None, headers=None):
    """``(status, answer)`` of one request; the answer must be a JSON object."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or JSON)
        response = conn.getresponse()
        payload = response.read()
    finally:
        conn.close()
    return response.status, json.loads(payload)


def assert_refused(answer, status: int, kind: str, words: str) -> None:
    got_status, body = answer
    assert (got_status, body["error"]) == (status, kind), body
    assert set(body) == {"error", "detail"} and "\n" not in body["detail"]
    assert words in body["detail"]


def assert_unchanged(server, remote) -> None:
    """The server's mask is the client's copy and the click is still the one undo step."""
    np.testing.assert_array_equal(remote.fetch_mask(), remote.mask)
    assert len(server.store.get(remote.id, owner_of(TOKEN))._undo) == 1


@pytest.mark.parametrize(
    "method, path, status, kind, words",
    [
        ("GET", "/v1/nothing", 404, "not_found", "no endpoint GET /v1/nothing"),
        ("GET", "/v1/sessions/{id}/click", 405, "method", "is not allowed"),
        ("PUT", "/v1/sessions/{id}", 405, "method", "is not allowed"),
    ],
)
def test_an_unknown_path_or_method_is_a_protocol_error(
    server, session, method, path, status, kind, words
):
    """Before: FastAPI's ``{"detail": "Not Found"}``, without the protocol's ``error``."""
    answer = send(server.url, method, path.format(id=session.id), b"{}")
    assert_refused(answer, status, kind, words)
    assert_unchanged(server, session)


@pytest.mark.parametrize(
    "body, words",
    [
        (b'{"point": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"point": "\xff\xfe"}', "utf-8"),
        (b'{"point": [' + b"9" * 5000 + b", 0, 0]}", "digits"),
        (b'{"point": [1, 2', "at character 15"),
    ],
    ids=["deep", "not-utf8", "huge-int", "truncated"],
)
def test_a_body_that_is_not_json_is_malformed(server, session, body, words):
    """Before: 400 ``{"detail": "There was an error parsing the body"}`` for the first
    three, and ``malformed request: 15: JSON decode error`` for a truncated body."""
    answer = send(server.url, "POST", f"{session.path}/click", body)
    assert_refused(answer, 422, "malformed", "malformed request: the body is not JSON")
    assert words in answer[1]["detail"]
    assert_unchanged(server, session)


def test_an_upload_whose_shape_overflows_opens_nothing(server):
    """A shape of 2**64 voxels was 0 in int64: a 500 (reshape of 0 bytes) before."""
    meta = json.dumps({"shape": [2**21, 2**21, 2**22], "dtype": "uint8",
                       "ijk_to_ras": np.eye(4).tolist()}).encode()  # fmt: skip
    body = struct.pack(">I", len(meta)) + meta + zlib.compress(b"")
    headers = {**JSON, "Content-Type": VOLUME_MEDIA_TYPE}
    opened = len(server.store)
    answer = send(server.url, "POST", "/v1/sessions", body, headers)
    assert_refused(answer, 400, "input", "exceeds this server's limit")
    assert len(server.store) == opened


@pytest.mark.parametrize(
    "offset", ["[Infinity, 0, 0]", "[1.7, 0, 0]", '"000"', "[true, false, false]"]
)
def test_a_mask_patch_offset_that_is_not_three_whole_numbers_is_refused(server, session, offset):
    """Before: Infinity was a 500 (OverflowError); 1.7 was read as 1, the text "000"
    as [0, 0, 0] and booleans as 1 and 0: a voxel was painted where none was meant."""
    bits = base64.b64encode(zlib.compress(bytes([128]))).decode()
    patch = f'{{"offset": {offset}, "shape": [1, 1, 1], "bits": "{bits}"}}'
    body = f'{{"patch": {patch}}}'.encode()
    answer = send(server.url, "POST", f"{session.path}/mask", body)
    assert_refused(answer, 400, "input", "3 non-negative whole offsets and sizes")
    assert_unchanged(server, session)


@pytest.mark.parametrize(
    "path, body, where",
    [
        ("click", '{"point": [NaN, 0, 0]}', "point.0"),
        ("click", '{"point": [0, Infinity, 0], "frame": "ijk"}', "point.1"),
        ("segment", '{"positive": [[0, 0, -Infinity]]}', "positive.0.2"),
        ("segment", '{"box": {"center": [NaN, 0, 0], "size": [5, 5, 5]}}', "box.center.0"),
        ("segment", '{"box": {"center": [0, 0, 0], "size": [Infinity, 5, 5]}}', "box.size.0"),
        ("segment", '{"frame": "ijk", "box": {"low": [NaN, 0, 0], "high": [9, 9, 4]}}', "box.low"),
        ("segment", '{"positive": [[0, 0, 0]], "options": {"box_extension": Infinity}}', "box_ext"),
    ],
)
def test_a_number_that_is_not_finite_is_malformed(server, session, path, body, where):
    """JSON's NaN and Infinity (Python's json reads them). Before: a click at NaN was told
    'slice -9223372036854775808 is outside 0..9'; a NaN or infinite box was accepted and
    its job failed as ``internal`` ("cannot convert float NaN to integer")."""
    answer = send(server.url, "POST", f"{session.path}/{path}", body.encode())
    assert_refused(answer, 422, "malformed", "finite number")
    assert where in answer[1]["detail"]
    assert_unchanged(server, session)


def test_a_cancel_while_a_segment_runs_changes_nothing():
    """A 3D box without propagation has no cancel check between its slices. Before: the
    cancel was answered ``cancelling: true``, then the job ended ``done`` and its mask
    replaced the session's (docs: a cancelled job changes nothing)."""
    truth = sphere((16, 32, 32), radius=6.0)
    volume = oblique(truth)
    with LiveServer(threshold_model(delay=0.5)) as slow:
        client = ServerClient(slow.url, TOKEN)
        remote = client.open_session(volume.array, volume.ijk_to_ras)
        box = {"low": [8, 8, 4], "high": [24, 24, 12]}  # 0.5 s a mask: time to cancel
        client.request("POST", f"{remote.path}/segment", {"frame": "ijk", "box": box})
        assert client.request("POST", f"{remote.path}/cancel", {})["cancelling"]
        job = client.request("GET", f"{remote.path}/job?wait=10")
        assert job["state"] == "cancelled" and "no mask was changed" in job["error"]["detail"]
        assert not remote.fetch_mask().any()
        assert not slow.store.get(remote.id, owner_of(TOKEN))._undo


def test_the_mask_asked_while_a_job_runs_is_busy_not_a_wait():
    """Before: GET .../mask waited on the session lock for the whole job (minutes for a
    long propagation), holding a worker thread; enough of them and no request, cancel
    included, found one."""
    truth = sphere((16, 32, 32), radius=6.0)
    volume = oblique(truth)
    with LiveServer(threshold_model(delay=0.5)) as slow:
        client = ServerClient(slow.url, TOKEN)
        remote = client.open_session(volume.array, volume.ijk_to_ras)
        box = {"low": [8, 8, 4], "high": [24, 24, 12]}  # 0.5 s a mask: seconds
        client.request("POST", f"{remote.path}/segment", {"frame": "ijk", "box": box})
        parts = urllib.parse.urlsplit(slow.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=0.4)
        try:
            conn.request("GET", f"{remote.path}/mask", headers=JSON)
            response = conn.getresponse()
            answer = response.status, json.loads(response.read())
        finally:
            conn.close()
        assert_refused(answer, 409, "busy", "segment is running")
        client.request("POST", f"{remote.path}/cancel", {})
        assert client.request("GET", f"{remote.path}/job?wait=10")["state"] != "running"
        assert not remote.fetch_mask().any()
