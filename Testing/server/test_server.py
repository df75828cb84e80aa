"""The inference server, over real HTTP on 127.0.0.1: masks equal the in-process API's,
undo and cancel, refusals, and faults (a killed server, a vanished client).

Equality uses the default model, LiteMedSAM (a real network, on few slices); stop rules
and timing use the ThresholdPredictor double (optionally slowed) behind the same server code.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from doubles import ThresholdPredictor
from server_harness import (
    OTHER_TOKEN,
    THRESHOLD,
    TOKEN,
    LiveServer,
    served,
    start_harness,
    threshold_model,
)
from volumes import centre_ras, oblique

from RobustMedSAMLib.cli import main
from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.errors import (
    CancelledError,
    InputError,
    ModelOutOfMemoryError,
    ServerError,
)
from RobustMedSAMLib.formats.markups import write_points, write_roi
from RobustMedSAMLib.formats.segmentation import read_segmentation
from RobustMedSAMLib.formats.volume import write_volume
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.propagation import PropagationOptions
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import ijk_box_roi, ras_to_slice_points
from RobustMedSAMLib.server.client import ServerClient

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lite():
    """The default model, LiteMedSAM (a real network, 256 px input)."""
    return load_named_model("litemedsam", device="cpu")


@pytest.fixture(scope="module")
def lite_server(lite):
    with LiveServer(served(lite.predictor, "litemedsam", lite.model.config.image_size)) as server:
        yield server


@pytest.fixture(scope="module")
def threshold_server():
    with LiveServer(threshold_model()) as server:
        yield server


@pytest.fixture(scope="module")
def phantom():
    phantom = sphere((10, 40, 40), spacing=(1.0, 1.0, 3.0), radius=9.0)  # 7 slices: quick
    return phantom, oblique(phantom)


def dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# --- equality with the in-process API -------------------------------------------------------


def test_clicks_and_undo_equal_in_process(lite_server, lite, phantom):
    _, volume = phantom
    centre = centre_ras(volume, phantom[0].mask)[0]
    local = SegmentationSession(volume, lite.predictor())
    expected = np.zeros(volume.shape, bool)
    clicks = [(centre, True), (centre + [2.0, 1.0, 0.0], True), (centre + [0.0, 7.0, 0.0], False)]
    client = ServerClient(lite_server.url, TOKEN)
    with client.open_session(volume.array, volume.ijk_to_ras, model="litemedsam") as remote:
        for point, positive in clicks:
            answer = remote.click(point, positive)
            index, xy = ras_to_slice_points(volume, 0, point[None])
            prediction = local.click(int(index[0]), tuple(xy[0]), positive)
            expected[index[0]] = prediction.mask
            assert answer.slice == index[0]
            assert answer.score == pytest.approx(prediction.score, abs=1e-6)
            np.testing.assert_array_equal(remote.mask, expected)
        assert expected.any()
        assert remote.undo()
        expected[index[0]] = local.undo_click(int(index[0])).mask
        np.testing.assert_array_equal(remote.mask, expected)
        np.testing.assert_array_equal(remote.fetch_mask(), expected)


def test_box_and_propagation_equal_in_process_ras_and_ijk(lite_server, lite, phantom):
    truth, volume = phantom
    centre = centre_ras(volume, truth.mask)[0]
    low, high = (9.0, 9.0, 4.0), (31.0, 31.0, 20.0)  # IJK corners around the sphere
    roi = ijk_box_roi(volume, low, high)
    prompts = VolumePrompts(positive=centre[None], roi=roi)
    options = SegmentOptions(propagate=True, propagation=PropagationOptions(projection="box"))
    local = segment_volume(SegmentationSession(volume, lite.predictor()), prompts, options)
    client = ServerClient(lite_server.url, TOKEN)
    with client.open_session(volume.array, volume.ijk_to_ras) as remote:
        record = remote.segment(
            centre[None], box=roi, propagate=True, options={"projection": "box"}
        )
        np.testing.assert_array_equal(remote.mask, local.mask)
    assert local.mask.any(axis=(1, 2)).sum() > 3  # it did propagate
    assert record["voxels"] == int(local.mask.sum())
    assert [s["index"] for s in record["slices"]] == [s.index for s in local.slices]
    with client.open_session(volume.array, volume.ijk_to_ras) as remote:
        centre_ijk = volume.ras_to_ijk_points(centre[None])
        remote.segment(
            centre_ijk,
            box={"low": low, "high": high},
            propagate=True,
            options={"projection": "box"},
            frame="ijk",
        )
        np.testing.assert_array_equal(remote.mask, local.mask)
    zoom = SegmentOptions(zoom=True)
    local = segment_volume(SegmentationSession(volume, lite.predictor()), prompts, zoom)
    with client.open_session(volume.array, volume.ijk_to_ras) as remote:
        remote.segment(centre[None], box=roi, options={"zoom": True})
        np.testing.assert_array_equal(remote.mask, local.mask)
    assert local.mask.any()


def test_propagation_from_clicks_finds_the_sphere_and_undo_restores(threshold_server, phantom):
    truth, volume = phantom
    centre = centre_ras(volume, truth.mask)[0]
    client = ServerClient(threshold_server.url, TOKEN)
    with client.open_session(volume.array, volume.ijk_to_ras) as remote:
        answer = remote.click(centre)
        before = remote.mask.copy()
        remote.encode_ahead([answer.slice])
        stops = remote.propagate([answer.slice])
        assert dice(remote.mask, truth.mask) > 0.9
        assert {s["direction"] for s in stops} == {-1, 1}
        assert remote.undo()
        np.testing.assert_array_equal(remote.mask, before)
        np.testing.assert_array_equal(remote.fetch_mask(), before)


def test_mask_prompt_seeds_propagation(threshold_server, phantom):
    truth, volume = phantom
    client = ServerClient(threshold_server.url, TOKEN)
    with client.open_session(volume.array, volume.ijk_to_ras) as remote:
        painted = np.zeros(volume.shape, bool)
        middle = volume.shape[0] // 2
        painted[middle] = truth.mask[middle]
        remote.set_mask(painted)
        np.testing.assert_array_equal(remote.fetch_mask(), painted)
        remote.propagate([middle])
        assert dice(remote.mask, truth.mask) > 0.9


def test_cancel_leaves_the_mask_as_it_was():
    truth = sphere((40, 32, 32), radius=14.0)
    volume = oblique(truth)
    with LiveServer(threshold_model(delay=0.05)) as server:
        remote = ServerClient(server.url, TOKEN).open_session(volume.array, volume.ijk_to_ras)
        answer = remote.click(centre_ras(volume, truth.mask)[0])
        before = remote.mask.copy()
        seen = []
        with pytest.raises(CancelledError, match="cancelled"):
            remote.propagate(
                [answer.slice], progress=lambda d, t: seen.append(d), cancel=lambda: bool(seen)
            )
        np.testing.assert_array_equal(remote.mask, before)
        np.testing.assert_array_equal(remote.fetch_mask(), before)
        remote.click(centre_ras(volume, truth.mask)[0])  # the session goes on


def test_one_job_at_a_time_and_no_click_while_it_runs():
    truth = sphere((40, 32, 32), radius=14.0)
    volume = oblique(truth)
    with LiveServer(threshold_model(delay=0.05)) as server:
        client = ServerClient(server.url, TOKEN)
        remote = client.open_session(volume.array, volume.ijk_to_ras)
        answer = remote.click(centre_ras(volume, truth.mask)[0])
        path = f"/v1/sessions/{remote.id}"
        assert client.request("POST", f"{path}/propagate", {"seeds": [answer.slice]})["state"]
        with pytest.raises(ServerError, match=r"HTTP 409.*propagate is already running"):
            client.request("POST", f"{path}/propagate", {"seeds": [answer.slice]})
        with pytest.raises(ServerError, match=r"HTTP 409.*cancel it"):
            remote.click(centre_ras(volume, truth.mask)[0])
        remote.cancel()
        state = client.request("GET", f"{path}/job?wait=5")
        assert state["state"] == "cancelled"
        np.testing.assert_array_equal(remote.fetch_mask(), remote.mask)


# --- refusals: one clear line, nothing changed ---------------------------------------------


def raw(url: str, method: str, path: str, body: bytes | None = None, headers=None):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    payload = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, payload


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}]
)
def test_missing_or_wrong_token_is_401(threshold_server, headers):
    status, body = raw(threshold_server.url, "GET", "/health", headers=headers)
    assert status == 401 and body["error"] == "auth" and "token" in body["detail"]


def test_refusals_change_nothing(threshold_server, phantom):
    truth, volume = phantom
    client = ServerClient(threshold_server.url, TOKEN)
    remote = client.open_session(volume.array, volume.ijk_to_ras)
    remote.click(centre_ras(volume, truth.mask)[0])
    before = remote.mask.copy()
    other = ServerClient(threshold_server.url, OTHER_TOKEN)
    with pytest.raises(ServerError, match=r"HTTP 404.*no session"):
        other.request("POST", f"/v1/sessions/{remote.id}/undo", {})
    with pytest.raises(ServerError, match="HTTP 404"):
        other.request("DELETE", f"/v1/sessions/{remote.id}")
    with pytest.raises(InputError, match=r"HTTP 422.*malformed request: point"):
        client.request("POST", f"/v1/sessions/{remote.id}/click", {"point": [1.0, 2.0]})
    with pytest.raises(InputError, match="HTTP 422"):
        client.request("POST", f"/v1/sessions/{remote.id}/click", b"{not json")
    with pytest.raises(InputError, match="outside volume"):
        remote.click([500.0, 0.0, 0.0])
    with pytest.raises(InputError, match="does not overlap"):
        remote.segment(box={"center": [900.0, 0, 0], "size": [5.0, 5, 5]})
    np.testing.assert_array_equal(remote.fetch_mask(), before)
    assert remote.undo()  # the click is still the last interaction
    assert not remote.fetch_mask().any()
    remote.close()
    with pytest.raises(ServerError, match="404"):
        remote.click(centre_ras(volume, truth.mask)[0])


def test_unknown_or_unserved_model_is_refused(threshold_server, phantom):
    _, volume = phantom
    client = ServerClient(threshold_server.url, TOKEN)
    open_before = len(threshold_server.store)
    with pytest.raises(InputError, match="unknown model 'nope'"):
        client.open_session(volume.array, volume.ijk_to_ras, model="nope")
    with pytest.raises(InputError, match="'sam' is not served here"):
        client.open_session(volume.array, volume.ijk_to_ras, model="sam")
    assert len(threshold_server.store) == open_before
    models = client.models()
    assert models["served"] == "litemedsam"
    assert {m["name"] for m in models["models"] if m["served"]} == {"litemedsam"}


def test_oversize_upload_is_413_and_opens_nothing():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 2**15, (16, 64, 64), dtype=np.int16)  # incompressible, 128 KiB
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with LiveServer(threshold_model(), max_upload_bytes=64 * 1024) as server:
        client = ServerClient(server.url, TOKEN)
        with pytest.raises(InputError, match="takes at most 0.1 MB"):
            client.open_session(noise, np.eye(4))  # the client asks the limit first
        for path, size in (("/v1/sessions", 2**17), ("/v1/sessions/x/click", 17 * 2**20)):
            headers = {**auth, "Content-Length": str(size)}  # the server stops at the header
            status, body = raw(server.url, "POST", path, b"{}", headers)
            assert status == 413 and body["error"] == "too_large" and "exceeds" in body["detail"]
        assert len(server.store) == 0


def test_expired_session_is_410():
    truth = sphere((10, 24, 24), radius=5.0)
    volume = oblique(truth)
    with LiveServer(threshold_model(), idle_seconds=0.3) as server:
        remote = ServerClient(server.url, TOKEN).open_session(volume.array, volume.ijk_to_ras)
        deadline = time.monotonic() + 10
        while len(server.store) and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(ServerError, match=r"HTTP 410.*expired.*open a new one"):
            remote.click(centre_ras(volume, truth.mask)[0])


class OomOnce(ThresholdPredictor):
    """Its first encoding runs out of (GPU) memory, as torch reports it."""

    failures = 1

    def encode(self, image, window=None):
        if self.failures:
            self.failures -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().encode(image, window)


def test_out_of_memory_is_reported_and_the_server_goes_on(phantom):
    truth, volume = phantom
    with LiveServer(served(lambda: OomOnce(THRESHOLD))) as server:
        remote = ServerClient(server.url, TOKEN).open_session(volume.array, volume.ijk_to_ras)
        with pytest.raises(ModelOutOfMemoryError, match="out of memory"):
            remote.click(centre_ras(volume, truth.mask)[0])
        assert not remote.fetch_mask().any()
        remote.click(centre_ras(volume, truth.mask)[0])
        assert remote.mask.any()


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def case(tmp_path):
    truth = sphere((30, 32, 32), spacing=(1.0, 1.0, 1.5), radius=10.0)
    volume = oblique(truth)
    paths = {
        "volume": write_volume(volume, tmp_path / "ct.nrrd"),
        "points": write_points(tmp_path / "p.mrk.json", centre_ras(volume, truth.mask)),
        "box": write_roi(tmp_path / "b.mrk.json", ijk_box_roi(volume, (4, 4, 3), (28, 28, 26))),
        "token": tmp_path / "token",
    }
    paths["token"].write_text(TOKEN + "\n")
    return paths


def cli(case, out, *extra) -> int:
    return main(
        [
            "segment",
            str(case["volume"]),
            "--points",
            str(case["points"]),
            "--box",
            str(case["box"]),
            "--out",
            str(out),
            "--propagate",
            *extra,
        ]
    )


def test_cli_through_the_server_writes_the_in_process_files(lite_server, case, tmp_path):
    assert cli(case, tmp_path / "local.seg.nrrd", "--device", "cpu", "--model", "litemedsam") == 0
    extra = ("--server", lite_server.url, "--token-file", str(case["token"]))
    assert cli(case, tmp_path / "remote.seg.nrrd", *extra) == 0
    local, _ = read_segmentation(tmp_path / "local.seg.nrrd")
    remote, segments = read_segmentation(tmp_path / "remote.seg.nrrd")
    np.testing.assert_array_equal(remote, local)
    assert remote.any() and segments[0].name == "Segment_1"
    record = json.loads((tmp_path / "remote.seg.nrrd.json").read_text())
    assert record["inputs"]["server"] == lite_server.url
    assert record["inputs"]["volume"] == str(case["volume"])
    assert record["model"]["name"] == "litemedsam"


def test_cli_server_flags_are_checked(case, tmp_path, capsys):
    out = tmp_path / "o.seg.nrrd"
    assert cli(case, out, "--server", "http://127.0.0.1:9", "--checkpoint", "x.pth") == 2
    assert "drop --checkpoint" in capsys.readouterr().err
    assert cli(case, out, "--server", "http://127.0.0.1:9", "--engine", "openvino") == 2
    assert "drop --engine" in capsys.readouterr().err  # the server's engine is used
    assert cli(case, out, "--server", "ftp://host", "--token-file", str(case["token"])) == 2
    assert "not http://HOST:PORT" in capsys.readouterr().err
    assert not out.exists()


# --- faults -----------------------------------------------------------------------------------


def test_server_killed_during_propagation_one_error_nothing_written(case, tmp_path, capsys):
    process, url = start_harness("--delay", "0.3")  # >= 12 slices: several seconds
    out = tmp_path / "o.seg.nrrd"
    killed = threading.Event()

    def kill_once_the_job_runs() -> None:
        watcher = ServerClient(url, TOKEN)
        while not watcher.health()["sessions"]:
            time.sleep(0.02)
        time.sleep(0.5)  # the segment job has started: the upload takes milliseconds
        os.kill(process.pid, signal.SIGKILL)
        killed.set()

    threading.Thread(target=kill_once_the_job_runs, daemon=True).start()
    try:
        code = cli(case, out, "--server", url, "--token-file", str(case["token"]))
    finally:
        process.kill()
        process.wait()
    assert killed.is_set() and process.returncode == -signal.SIGKILL
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "stopped answering" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "b.mrk.json",
        "ct.nrrd",
        "p.mrk.json",
        "token",
    ]


CLIENT = """
import sys
from server_harness import TOKEN
from volumes import centre_ras, oblique
from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.server.client import ServerClient
truth = sphere((40, 32, 32), radius=14.0)
volume = oblique(truth)
remote = ServerClient(sys.argv[1], TOKEN).open_session(volume.array, volume.ijk_to_ras)
remote.segment(centre_ras(volume, truth.mask)[None], propagate=True)
"""


def test_client_killed_mid_request_frees_its_session():
    with LiveServer(threshold_model(delay=0.1), idle_seconds=1.0) as server:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "Testing")])}
        client = subprocess.Popen([sys.executable, "-c", CLIENT, server.url], env=env)
        deadline = time.monotonic() + 60
        while not any(s.busy for s in list(server.store._sessions.values())):
            assert time.monotonic() < deadline and client.poll() is None
            time.sleep(0.05)
        session = next(iter(server.store._sessions.values()))
        client.kill()
        client.wait()
        deadline = time.monotonic() + 15
        while len(server.store) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(server.store) == 0 and session.job.cancel.is_set()
        assert ServerClient(server.url, TOKEN).health()["sessions"] == 0


def test_batch_through_the_server_equals_in_process(lite_server, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        truth = sphere((6, 32, 32), spacing=(1.0, 1.0, 2.0), radius=7.0 + i)
        volume = oblique(truth)
        write_volume(volume, data / f"case{i}.nrrd")
        write_points(data / f"case{i}_points.mrk.json", centre_ras(volume, truth.mask))
        write_roi(data / f"case{i}_box.mrk.json", _box_around(volume, truth.mask))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    base = ["segment", "--cases", str(data), "--propagate", "--out-dir"]
    assert main([*base, str(tmp_path / "local"), "--model", "litemedsam"]) == 0  # as served
    remote = ("--server", lite_server.url, "--token-file", str(token))
    assert main([*base, str(tmp_path / "remote"), *remote]) == 0
    for i in range(3):
        local, _ = read_segmentation(tmp_path / "local" / f"case{i}.seg.nrrd")
        served_mask, _ = read_segmentation(tmp_path / "remote" / f"case{i}.seg.nrrd")
        np.testing.assert_array_equal(served_mask, local)
        assert served_mask.any()
    assert len(lite_server.store) == 0  # every case closed its session


def _box_around(volume, mask, margin: float = 2.0):
    """A 3D ROI around ``mask`` (KJI) with ``margin`` pixels in-plane (LiteMedSAM's prompt)."""
    k, j, i = np.nonzero(mask)
    low = (i.min() - margin, j.min() - margin, k.min() - 0.4)
    return ijk_box_roi(volume, low, (i.max() + margin, j.max() + margin, k.max() + 0.4))


def test_the_catalogue_gives_each_model_its_input_size():
    """robustmedsam-lite runs on LiteMedSAM's 256 px input (it was listed as 1024)."""
    from RobustMedSAMLib.server.app import model_catalogue

    sizes = {m["name"]: m["input_size"] for m in model_catalogue("sam", 1024)}
    assert sizes["litemedsam"] == sizes["robustmedsam-lite"] == 256
    assert sizes["medsam"] == sizes["fused"] == 1024
