"""The stop rules' thresholds (likeness, stability), the drawn box's growth and the
slice step are options on every surface: the ``segment`` flags (in-process, batch and
``--server``), the server's segment and propagate bodies (the growth: the segment body
only). 0 turns a rule off.

``BoxBlobPredictor`` behaves as LiteMedSAM does past a structure's end (it still draws a
confident blob in the box it is given): with the rules on, a flat box on a sphere stops
where the sphere ends; with both off, nothing stops it before the volume's end.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from doubles import BoxBlobPredictor
from server_harness import TOKEN, LiveServer, served

from RobustMedSAMLib.cli import main
from RobustMedSAMLib.datasets import phantoms
from RobustMedSAMLib.formats.markups import write_roi
from RobustMedSAMLib.formats.segmentation import read_segmentation
from RobustMedSAMLib.formats.volume import Volume, write_volume
from RobustMedSAMLib.inference.batch import SegmentSettings
from RobustMedSAMLib.inference.propagation import plan_order
from RobustMedSAMLib.inference.slicing import slice_box_roi
from RobustMedSAMLib.server.client import ServerClient
from RobustMedSAMLib.server.sessions import owner_of

N_SLICES = 24
OFF = {"min_likeness": 0.0, "min_stability": 0.0}


@pytest.fixture(scope="module")
def scene():
    """A sphere (CT-like, 150 HU over its surroundings) and a flat box on its centre."""
    phantom = phantoms.sphere((N_SLICES, 48, 48), (1.0, 1.0, 2.0), 10.0, contrast=150.0,
                              noise=10.0)  # fmt: skip
    volume = Volume(phantom.image.astype(np.float32), phantom.ijk_to_ras, "sphere")
    slices = np.flatnonzero(phantom.mask.any(axis=(1, 2)))
    centre = int(slices[len(slices) // 2])
    rows, cols = np.nonzero(phantom.mask[centre])
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()])
    return volume, phantom.mask, centre, slice_box_roi(volume, 0, centre, box)


@pytest.fixture(scope="module")
def blob_server():
    with LiveServer(served(lambda: BoxBlobPredictor(115.0))) as server:
        yield server


def _slices(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask.any(axis=(1, 2))).tolist()


def test_server_segment_and_propagate_bodies_take_the_thresholds(blob_server, scene):
    volume, truth, centre, roi = scene
    client = ServerClient(blob_server.url, TOKEN)
    window = (-160.0, 240.0)
    with client.open_session(volume.array, volume.ijk_to_ras, "axial", window) as session:
        record = session.segment(box=roi, propagate=True)
        assert _slices(session.mask) == _slices(truth)
        assert record["options"]["propagation"]["min_likeness"] == 0.5  # the default
        record = session.segment(box=roi, propagate=True, options=OFF)
        assert len(_slices(session.mask)) == N_SLICES  # nothing stops the blobs
        assert record["options"]["propagation"]["min_stability"] == 0.0

        one_slice = np.zeros(volume.shape, bool)
        one_slice[centre] = truth[centre]
        session.set_mask(one_slice)
        stops = session.propagate([centre])
        assert {s["reason"] for s in stops} == {"likeness"}
        assert _slices(session.mask) == _slices(truth)
        session.set_mask(one_slice)
        stops = session.propagate([centre], OFF)
        assert {s["reason"] for s in stops} == {"volume_end"}
        assert len(_slices(session.mask)) == N_SLICES


@pytest.mark.parametrize("name", ["min_likeness", "min_stability"])
def test_a_threshold_outside_0_1_is_refused_by_the_server(blob_server, scene, name):
    volume, _, _, roi = scene
    client = ServerClient(blob_server.url, TOKEN)
    with client.open_session(volume.array, volume.ijk_to_ras, "axial", (-160.0, 240.0)) as session:
        with pytest.raises(Exception, match=name):
            session.segment(box=roi, propagate=True, options={name: 1.5})
        assert not session.mask.any()


@pytest.fixture
def files(tmp_path, scene):
    volume, _, _, roi = scene
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    return {
        "volume": write_volume(volume, tmp_path / "ct.nrrd"),
        "box": write_roi(tmp_path / "box.mrk.json", roi),
        "token": token,
    }


def _cli(files, out, *extra) -> int:
    return main(["segment", str(files["volume"]), "--box", str(files["box"]), "--out", str(out),
                 "--propagate", "--window=-160,240", *extra])  # fmt: skip


def test_segment_flags_reach_the_server_and_the_record(blob_server, files, scene, tmp_path):
    _, truth, _, _ = scene
    server = ("--server", blob_server.url, "--token-file", str(files["token"]))
    assert _cli(files, tmp_path / "on.seg.nrrd", *server) == 0
    on, _ = read_segmentation(tmp_path / "on.seg.nrrd")
    assert _slices(on) == _slices(truth)
    off = ("--min-likeness", "0", "--min-stability", "0")
    assert _cli(files, tmp_path / "off.seg.nrrd", *server, *off) == 0
    labels, _ = read_segmentation(tmp_path / "off.seg.nrrd")
    assert len(_slices(labels)) == N_SLICES
    record = json.loads((tmp_path / "off.seg.nrrd.json").read_text())
    stored = record["options"]["propagation"]
    assert (stored["min_likeness"], stored["min_stability"]) == (0.0, 0.0)


@pytest.mark.parametrize("flag", ["--min-likeness", "--min-stability"])
def test_a_bad_threshold_flag_is_one_line_and_exit_2(files, tmp_path, capsys, flag):
    out = tmp_path / "bad.seg.nrrd"
    assert _cli(files, out, flag, "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = flag[2:].replace("-", "_")
    assert len(err) == 1 and f"{name}=2.0 must lie in [0, 1]" in err[0]
    assert not out.exists()


def test_batch_settings_carry_the_thresholds():
    options = SegmentSettings(min_likeness=0.3, min_stability=0.0).options().propagation
    assert (options.min_likeness, options.min_stability) == (0.3, 0.0)
    defaults = SegmentSettings().options().propagation
    assert (defaults.min_likeness, defaults.min_stability) == (0.5, 0.2)


def test_refine_steps_reach_the_record_and_a_negative_one_is_refused(
    blob_server, files, tmp_path, capsys
):
    server = ("--server", blob_server.url, "--token-file", str(files["token"]))
    assert _cli(files, tmp_path / "default.seg.nrrd", *server) == 0
    record = json.loads((tmp_path / "default.seg.nrrd.json").read_text())
    assert record["decisions"]["refine_steps"] == 0  # off by default
    assert _cli(files, tmp_path / "refined.seg.nrrd", *server, "--refine-steps", "2") == 0
    record = json.loads((tmp_path / "refined.seg.nrrd.json").read_text())
    assert record["decisions"]["refine_steps"] == 2
    capsys.readouterr()
    out = tmp_path / "bad.seg.nrrd"
    assert _cli(files, out, "--refine-steps", "-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refine_steps=-1" in err[0] and not out.exists()


# --- the drawn box's growth (SegmentOptions.seed_box_growth) -----------------------------


def _record(out) -> dict:
    return json.loads(out.with_name(out.name + ".json").read_text())


def _width(box: list[float]) -> float:
    return box[2] - box[0]


def test_box_growth_flag_reaches_the_server_and_the_record(blob_server, files, tmp_path):
    server = ("--server", blob_server.url, "--token-file", str(files["token"]))
    runs = {"default": (), "grown": ("--box-growth", "0.2"), "off": ("--box-growth", "0")}
    records = {}
    for name, flags in runs.items():
        out = tmp_path / f"{name}.seg.nrrd"
        assert _cli(files, out, *server, *flags) == 0
        records[name] = _record(out)
    assert [records[n]["decisions"]["seed_box_growth"] for n in runs] == [0.05, 0.2, 0.0]
    assert [records[n]["options"]["seed_box_growth"] for n in runs] == [0.05, 0.2, 0.0]
    assert records["off"]["decisions"]["grown"] == []
    # one drawn box of width w, asked as w x (1 + 2 x growth): 1.1 w, then 1.4 w
    (default,), (grown,) = (
        records["default"]["decisions"]["grown"],
        records["grown"]["decisions"]["grown"],
    )
    assert _width(default) / 1.1 == pytest.approx(_width(grown) / 1.4, abs=1e-3)


def _batch_decisions(blob_server, files, tmp_path, *flags: str) -> dict:
    """A one-case ``--cases`` run over the server with ``flags``: its record's decisions."""
    (tmp_path / "cases.csv").write_text("volume,box,out\nct.nrrd,box.mrk.json,ct.seg.nrrd\n")
    server = ("--server", blob_server.url, "--token-file", str(files["token"]))
    batch = ("--cases", str(tmp_path / "cases.csv"), "--out-dir", str(tmp_path / "out"))
    assert main(["segment", *batch, "--propagate", "--window=-160,240", *flags, *server]) == 0
    return _record(tmp_path / "out" / "ct.seg.nrrd")["decisions"]


def test_batch_cases_carry_the_box_growth(blob_server, files, tmp_path):
    decisions = _batch_decisions(blob_server, files, tmp_path, "--box-growth", "0.3")
    assert decisions["seed_box_growth"] == 0.3
    assert SegmentSettings(seed_box_growth=0.3).options().seed_box_growth == 0.3
    assert SegmentSettings().options().seed_box_growth == 0.05


@pytest.mark.parametrize("value", ["-0.1", "abc", "nan"])
def test_a_bad_box_growth_flag_is_one_line_and_exit_2(files, tmp_path, capsys, value):
    out = tmp_path / "bad.seg.nrrd"
    assert _cli(files, out, "--box-growth", value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--box-growth {value}: give a fraction" in err[0]
    assert not out.exists()


def test_the_segment_body_takes_the_growth_and_refuses_a_negative_one(blob_server, scene):
    volume, _, centre, roi = scene
    client = ServerClient(blob_server.url, TOKEN)
    with client.open_session(volume.array, volume.ijk_to_ras, "axial", (-160.0, 240.0)) as session:
        record = session.segment(box=roi, options={"seed_box_growth": 0.3})
        assert record["options"]["seed_box_growth"] == 0.3
        assert record["decisions"]["seed_box_growth"] == 0.3
        assert session.segment(box=roi)["decisions"]["seed_box_growth"] == 0.05
        kept = session.mask.copy()
        with pytest.raises(Exception, match="seed_box_growth"):
            session.segment(box=roi, options={"seed_box_growth": -0.1})
        # propagate starts from the masks, with no drawn box to grow: the field is refused
        with pytest.raises(Exception, match="seed_box_growth"):
            session.propagate([centre], {"seed_box_growth": 0.1})
        assert np.array_equal(session.mask, kept)


# --- the slice step (PropagationOptions.slice_step) --------------------------------------


def test_slice_step_flag_reaches_the_server_and_the_record(blob_server, files, scene, tmp_path):
    """``--server --slice-step 2``: the server asks every other slice and fills the rest;
    the record says so, and the structure's slices are those of the default run."""
    _, truth, _, _ = scene
    server = ("--server", blob_server.url, "--token-file", str(files["token"]))
    out = tmp_path / "step.seg.nrrd"
    assert _cli(files, out, *server, "--slice-step", "2") == 0
    record = _record(out)
    decisions = record["decisions"]
    assert decisions["slice_step"] == 2 and record["options"]["propagation"]["slice_step"] == 2
    assert decisions["filled"] and set(decisions["filled"]).isdisjoint(decisions["asked"])
    labels, _ = read_segmentation(out)
    assert _slices(labels) == _slices(truth)
    assert _cli(files, tmp_path / "plain.seg.nrrd", *server) == 0
    plain = _record(tmp_path / "plain.seg.nrrd")["decisions"]
    assert (plain["slice_step"], plain["filled"]) == (1, [])
    assert len(decisions["asked"]) < len(plain["asked"])


def test_batch_cases_carry_the_slice_step(blob_server, files, tmp_path):
    assert _batch_decisions(blob_server, files, tmp_path, "--slice-step", "3")["slice_step"] == 3


def test_the_bodies_take_a_slice_step_and_refuse_a_bad_one(blob_server, scene):
    volume, truth, centre, roi = scene
    client = ServerClient(blob_server.url, TOKEN)
    with client.open_session(volume.array, volume.ijk_to_ras, "axial", (-160.0, 240.0)) as session:
        record = session.segment(box=roi, propagate=True, options={"slice_step": 2})
        assert record["decisions"]["slice_step"] == 2 and record["decisions"]["filled"]
        assert _slices(session.mask) == _slices(truth)
        kept = session.mask.copy()
        for bad in (0, -1, 1.5, "2", True):  # a whole number of slices, 1 or more: 422
            with pytest.raises(Exception, match="slice_step"):
                session.segment(box=roi, propagate=True, options={"slice_step": bad})
            with pytest.raises(Exception, match="slice_step"):
                session.propagate([centre], {"slice_step": bad})
        assert np.array_equal(session.mask, kept)

        # propagate from one slice: the skipped slices are filled, the mask has no hole
        one_slice = np.zeros(volume.shape, bool)
        one_slice[centre] = truth[centre]
        session.set_mask(one_slice)
        session.propagate([centre], {"slice_step": 2})
        assert _slices(session.mask) == _slices(truth)


def test_the_propagate_reply_names_the_filled_slices(blob_server, scene):
    """The propagate job's result lists the slices interpolated, not asked, as the
    record's ``decisions.filled`` does (before: only the patch, so the Slicer panel could
    not tell a filled slice from an asked one); with no slice step, none."""
    volume, truth, centre, _ = scene
    one_slice = np.zeros(volume.shape, bool)
    one_slice[centre] = truth[centre]
    client = ServerClient(blob_server.url, TOKEN)
    with client.open_session(volume.array, volume.ijk_to_ras, "axial", (-160.0, 240.0)) as session:
        filled = {}
        for step in (2, 1):
            session.set_mask(one_slice)
            session.propagate([centre], {"slice_step": step})
            job = session.client.request("GET", f"{session.path}/job")  # what a client polls
            filled[step] = job["result"]["filled"]
            assert session.filled == filled[step]  # the Python client keeps it
        assert _slices(session.mask) == _slices(truth)
    assert filled[1] == [] and filled[2] == sorted(filled[2])
    assert filled[2] and set(filled[2]) <= set(_slices(truth)) - {centre}
    assert all((z - centre) % 2 == 1 for z in filled[2])  # between slices asked 2 apart


def test_encode_ahead_follows_the_slice_step(blob_server, scene):
    """The encode request with ``slice_step`` N encodes the slices propagation's jumps
    will ask, not those they skip (before: no such field; every slice was encoded)."""
    volume, _, centre, _ = scene
    client = ServerClient(blob_server.url, TOKEN)
    with client.open_session(volume.array, volume.ijk_to_ras, "axial", (-160.0, 240.0)) as session:
        wanted = [centre, *plan_order([centre], N_SLICES, step=2)]
        assert session.encode_ahead([centre], slice_step=2) == len(wanted)
        served = blob_server.store.get(session.id, owner_of(TOKEN)).segmentation
        deadline = time.monotonic() + 30
        while len(served.stats.encoded) < len(wanted) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(served.stats.encoded) == sorted(wanted)
        assert centre + 1 not in served.stats.encoded and centre - 1 not in wanted
        with pytest.raises(Exception, match="slice_step"):
            session.encode_ahead([centre], slice_step=0)
