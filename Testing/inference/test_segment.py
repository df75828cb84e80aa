"""The main job end to end: RAS prompts -> slices -> 3D mask -> files Slicer reads.

The Dice tests use ``ThresholdPredictor`` (a test double behind the Predictor interface);
the CLI tests use a tiny real model with random weights for shapes, geometry and errors.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from doubles import RecordsMaskInputs, ThresholdPredictor
from slicer_headless import (
    add_volume,
    segment_on_grid,
    segmentation_node_from_file,
    slicer_scene_fixture,
)
from volumes import centre_ras, oblique

from RobustMedSAMLib.cli import main
from RobustMedSAMLib.datasets.phantoms import ellipsoid, sphere, tube
from RobustMedSAMLib.errors import CancelledError, InputError
from RobustMedSAMLib.formats.markups import write_points, write_roi
from RobustMedSAMLib.formats.segmentation import read_segmentation
from RobustMedSAMLib.formats.volume import Volume, read_volume, write_volume
from RobustMedSAMLib.inference.propagation import PropagationOptions
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import slice_box_roi

slicer_scene = pytest.fixture(slicer_scene_fixture)
THRESHOLD = 80.0  # HU halfway between the phantoms' background (40) and objects (120)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize(
    "make",
    [
        lambda: sphere((40, 48, 56), spacing=(0.8, 0.8, 2.0), radius=14.0),
        lambda: ellipsoid((40, 48, 56), (0.8, 0.8, 2.0), (16.0, 10.0, 20.0), (0.3, 0.0, 0.2)),
        lambda: tube((48, 48, 48), (1.0, 1.0, 1.5)),
    ],
    ids=["sphere", "ellipsoid", "tube"],
)
def test_one_central_point_propagates_to_the_true_3d_mask(make):
    phantom = make()
    volume = oblique(phantom)
    session = SegmentationSession(volume, ThresholdPredictor(THRESHOLD), "axial")
    prompts = VolumePrompts(positive=centre_ras(volume, phantom.mask))
    result = segment_volume(session, prompts, SegmentOptions(propagate=True))
    assert dice(result.mask, phantom.mask) >= 0.9
    assert session.stats.encoder_calls == len(set(session.stats.encoded))  # none twice
    assert all(s.score > 0 for s in result.slices)


def test_without_propagate_only_the_prompted_slice(tmp_path):
    phantom = sphere((30, 40, 40), radius=10.0)
    volume = oblique(phantom)
    session = SegmentationSession(volume, ThresholdPredictor(THRESHOLD))
    result = segment_volume(session, VolumePrompts(positive=centre_ras(volume, phantom.mask)))
    assert result.prompted == [15] and np.flatnonzero(result.mask.any(axis=(1, 2))).tolist() == [15]
    assert dice(result.mask[15], phantom.mask[15]) > 0.95


def test_point_outside_volume_is_a_clear_error():
    phantom = sphere((20, 20, 20), radius=5.0)
    volume = oblique(phantom)
    session = SegmentationSession(volume, ThresholdPredictor(THRESHOLD))
    with pytest.raises(InputError, match="outside volume"):
        segment_volume(session, VolumePrompts(positive=np.array([[500.0, 0.0, 0.0]])))


def test_cancel_returns_nothing():
    phantom = sphere((30, 30, 30), radius=10.0)
    volume = oblique(phantom)
    session = SegmentationSession(volume, ThresholdPredictor(THRESHOLD))
    with pytest.raises(CancelledError):
        segment_volume(
            session,
            VolumePrompts(positive=centre_ras(volume, phantom.mask)),
            SegmentOptions(propagate=True, propagation=PropagationOptions()),
            cancel=lambda: True,
        )


@pytest.fixture
def case(tmp_path, tiny_checkpoints):
    """A small oblique CT-like volume on disk, a point list, and a tiny robust checkpoint."""
    phantom = sphere((12, 40, 48), spacing=(0.9, 0.9, 2.5), radius=9.0)
    volume = oblique(phantom)
    volume_path = write_volume(volume, tmp_path / "ct.nrrd")
    points = write_points(tmp_path / "p.mrk.json", centre_ras(volume, phantom.mask))
    return {"volume": volume_path, "points": points, "checkpoint": tiny_checkpoints["robust"]}


def run_cli(case, out, *extra) -> int:
    return main(
        ["segment", str(case["volume"]), "--points", str(case["points"]), "--out", str(out),
         "--model", "robustsam", "--checkpoint", str(case["checkpoint"]), "--device", "cpu",
         *extra]
    )  # fmt: skip


def test_cli_writes_seg_nrrd_slicer_loads_on_the_volume_grid(tmp_path, case, slicer_scene):
    out = tmp_path / "out.seg.nrrd"
    assert run_cli(case, out, "--propagate", "--segment-name", "tumour") == 0
    volume = read_volume(case["volume"])
    labelmap, segments = read_segmentation(out)
    assert labelmap.shape == volume.shape and segments[0].name == "tumour"
    node = segmentation_node_from_file(slicer_scene, out)
    reference = add_volume(slicer_scene, volume.array, volume.ijk_to_ras)
    segment_id = node.GetSegmentation().GetNthSegmentID(0)
    np.testing.assert_array_equal(
        segment_on_grid(slicer_scene, node, segment_id, reference), labelmap == 1
    )
    record = json.loads((tmp_path / "out.seg.nrrd.json").read_text())
    assert record["model"]["name"] == "robustsam"
    assert len(record["model"]["files"]["checkpoint"]["sha256"]) == 64
    assert record["prompts"]["coordinate_system"] == "RAS"
    assert record["timings"]["encoder_calls"] >= 1


def test_half_where_auto_finds_no_gpu_runs_float32_and_says_so(tmp_path, case, caplog,
                                                                monkeypatch):  # fmt: skip
    """``--device auto --half`` on a machine without CUDA: float32 with one warning, and
    the record names the precision used (before: float32 in silence, none recorded)."""
    cpu = torch.device("cpu")  # what auto finds on a machine without CUDA or MPS
    monkeypatch.setattr("RobustMedSAMLib.inference.loader.select_device", lambda name: cpu)
    out = tmp_path / "out.seg.nrrd"
    with caplog.at_level(logging.WARNING):
        assert run_cli(case, out, "--device", "auto", "--half") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "--half" in warnings[0] and "float32" in warnings[0]
    model = json.loads((tmp_path / "out.seg.nrrd.json").read_text())["model"]
    assert (model["device"], model["precision"]) == ("cpu", "float32")


def test_cli_nifti_label_map(tmp_path, case):
    out = tmp_path / "out.nii.gz"
    assert run_cli(case, out) == 0
    labels = read_volume(out)
    np.testing.assert_allclose(labels.ijk_to_ras, read_volume(case["volume"]).ijk_to_ras, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c, d: c.update(points=d / "missing.mrk.json"), "not found|does not exist|no such"),
        (lambda c, d: c.update(checkpoint=d / "bad.pth"), "not found"),
        (lambda c, d: (d / "junk.mrk.json").write_text("{not json"), None),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_no_output(tmp_path, case, capsys, change, message):
    change(case, tmp_path)
    if message is None:
        case["points"] = tmp_path / "junk.mrk.json"
    out = tmp_path / "out.seg.nrrd"
    assert run_cli(case, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustmedsam segment: error:")
    assert not out.exists() and not (tmp_path / "out.seg.nrrd.json").exists()


def test_cli_sam_checkpoint_as_robustsam_is_refused(tmp_path, case, tiny_checkpoints, capsys):
    case["checkpoint"] = tiny_checkpoints["sam"]
    assert run_cli(case, tmp_path / "out.seg.nrrd") == 2
    assert "expected RobustSAM" in capsys.readouterr().err


def test_cli_box_growth_reaches_the_in_process_record(tmp_path, case):
    volume = read_volume(case["volume"])
    box = write_roi(tmp_path / "box.mrk.json", slice_box_roi(volume, 0, 6, [14, 12, 34, 28]))
    out = tmp_path / "out.seg.nrrd"
    code = main(["segment", str(case["volume"]), "--box", str(box), "--out", str(out),
                 "--model", "robustsam", "--checkpoint", str(case["checkpoint"]),
                 "--device", "cpu", "--no-zoom", "--box-growth", "0.25"])  # fmt: skip
    assert code == 0
    record = json.loads((tmp_path / "out.seg.nrrd.json").read_text())
    decisions = record["decisions"]
    assert decisions["roi"] == "2d" and decisions["seed_box_growth"] == 0.25
    (x0, y0, x1, y1), drawn = decisions["grown"][0], (34 - 14 + 1, 28 - 12 + 1)
    assert (x1 - x0, y1 - y0) == pytest.approx((1.5 * drawn[0], 1.5 * drawn[1]), abs=1e-3)


def test_cli_without_prompt(tmp_path, case, capsys):
    code = main(["segment", str(case["volume"]), "--out", str(tmp_path / "o.seg.nrrd")])
    assert code == 2 and "no prompt" in capsys.readouterr().err
    assert torch.get_num_threads() >= 1


def test_outputs_get_normal_file_permissions(tmp_path, case):
    """Atomic writes go through mkstemp (0600); results must be readable like any file."""
    import os

    out = tmp_path / "out.seg.nrrd"
    assert run_cli(case, out) == 0
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, tmp_path / "out.seg.nrrd.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_replay_a_record_gives_the_same_prompts_and_mask(tmp_path, case):
    first = tmp_path / "first.seg.nrrd"
    assert run_cli(case, first, "--propagate") == 0
    replayed = tmp_path / "replayed.seg.nrrd"
    code = main(
        ["segment", str(case["volume"]), "--replay", str(tmp_path / "first.seg.nrrd.json"),
         "--out", str(replayed), "--model", "robustsam", "--checkpoint", str(case["checkpoint"]),
         "--device", "cpu", "--propagate"]
    )  # fmt: skip
    assert code == 0
    np.testing.assert_array_equal(read_segmentation(replayed)[0], read_segmentation(first)[0])
    records = [
        json.loads((tmp_path / f"{n}.seg.nrrd.json").read_text()) for n in ("first", "replayed")
    ]
    assert records[0]["prompts"] == records[1]["prompts"]


def test_replay_of_a_file_that_is_no_record(tmp_path, case, capsys):
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"hello": 1}')
    code = main(
        [
            "segment",
            str(case["volume"]),
            "--replay",
            str(bogus),
            "--out",
            str(tmp_path / "o.seg.nrrd"),
        ]
    )
    assert code == 2 and "not a robustmedsam run record" in capsys.readouterr().err


def test_a_3d_box_bounds_propagation_to_its_slices():
    from RobustMedSAMLib.formats.markups import Roi

    phantom = sphere((40, 48, 56), spacing=(0.8, 0.8, 2.0), radius=14.0)
    volume = Volume(phantom.image, phantom.ijk_to_ras, "sphere")
    low = volume.ijk_to_ras_points([[10, 10, 15]])[0]
    high = volume.ijk_to_ras_points([[46, 38, 24]])[0]
    roi = Roi(center_ras=(low + high) / 2, size=np.abs(high - low), axes_ras=np.eye(3))
    session = SegmentationSession(volume, ThresholdPredictor(THRESHOLD))
    result = segment_volume(session, VolumePrompts(roi=roi), SegmentOptions(propagate=True))
    kept = np.flatnonzero(result.mask.any(axis=(1, 2)))
    assert kept.min() == 15 and kept.max() == 24  # the object goes on; the box says stop


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--engine", "onnx"], "use --engine eager"),
        (["--engine", "openvino", "--fast-cpu"], "not both"),
    ],
)
def test_cli_engine_a_model_cannot_use_is_refused(tmp_path, case, capsys, flags, message):
    out = tmp_path / "out.seg.nrrd"
    assert run_cli(case, out, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_cli_encode_ahead_reaches_the_run_and_its_record(tmp_path, case, capsys):
    """The flag's wiring (same masks with and without: test_session.py, with real masks)."""
    for depth in ("0", "3"):
        out = tmp_path / f"ahead{depth}.seg.nrrd"
        assert run_cli(case, out, "--propagate", "--encode-ahead", depth) == 0
        record = json.loads(out.with_name(out.name + ".json").read_text())
        assert record["options"]["encode_ahead"] == int(depth)
    capsys.readouterr()
    out = tmp_path / "bad.seg.nrrd"
    assert run_cli(case, out, "--propagate", "--encode-ahead", "-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encode_ahead=-1" in err[0] and not out.exists()


class FeedRecorder(RecordsMaskInputs, ThresholdPredictor):
    """ThresholdPredictor recording which prompts carried a mask input."""


def test_a_correction_click_refines_the_last_mask_of_its_slice():
    """A repeated request on one slice that adds points to the same box (the panel's and
    the Segment Editor effect's correction clicks, each a new ``segment`` on the
    server's session) feeds that slice's last mask back, as SAM tools do; a new box or
    fewer points starts afresh. Before, every request started afresh: on phantoms one
    correction after a box then lowered robustmedsam-lite's Dice (bench_corrections.py)."""
    phantom = sphere((12, 48, 48), spacing=(1.0, 1.0, 2.0), radius=9.0)
    volume = Volume(phantom.image, phantom.ijk_to_ras, "sphere")
    recorder = FeedRecorder(THRESHOLD)
    session = SegmentationSession(volume, recorder, "axial")
    k = int(np.argwhere(phantom.mask)[:, 0].mean().round())
    roi = slice_box_roi(volume, 0, k, np.array([14.0, 14.0, 33.0, 33.0]))
    inside = phantom.ijk_to_ras @ np.array([24.0, 24.0, k, 1.0])
    outside = phantom.ijk_to_ras @ np.array([4.0, 4.0, k, 1.0])
    asks = [
        VolumePrompts(roi=roi),
        VolumePrompts(positive=inside[None, :3], roi=roi),  # a correction
        VolumePrompts(positive=inside[None, :3], negative=outside[None, :3], roi=roi),  # again
        VolumePrompts(negative=outside[None, :3], roi=roi),  # a point removed
    ]
    fed = []
    for prompts in asks:
        recorder.mask_inputs.clear()
        segment_volume(session, prompts, SegmentOptions(propagate=False, zoom=False))
        fed.append(recorder.mask_inputs[0])
    assert fed == [False, True, True, False]
    moved = slice_box_roi(volume, 0, k, np.array([12.0, 12.0, 35.0, 35.0]))
    recorder.mask_inputs.clear()
    segment_volume(
        session,
        VolumePrompts(positive=inside[None, :3], negative=outside[None, :3], roi=moved),
        SegmentOptions(propagate=False, zoom=False),
    )
    assert recorder.mask_inputs[0] is False  # a new box


def test_a_correction_after_a_point_keeps_the_searched_box_and_the_mask():
    """Points added to a slice's earlier points go with the box the point search found
    for them and that slice's last mask, not through a new search: on phantoms a
    search per click lost Dice with each correction (bench_corrections.py --first point)."""
    phantom = sphere((12, 48, 48), spacing=(1.0, 1.0, 2.0), radius=9.0)
    volume = Volume(phantom.image, phantom.ijk_to_ras, "sphere")
    recorder = FeedRecorder(THRESHOLD)
    session = SegmentationSession(volume, recorder, "axial")
    k = int(np.argwhere(phantom.mask)[:, 0].mean().round())
    inside = (phantom.ijk_to_ras @ np.array([24.0, 24.0, k, 1.0]))[None, :3]
    outside = (phantom.ijk_to_ras @ np.array([4.0, 4.0, k, 1.0]))[None, :3]
    options = SegmentOptions(propagate=False, zoom=False)
    first = segment_volume(session, VolumePrompts(positive=inside), options)
    searched = first.decisions.point["box"]
    recorder.mask_inputs.clear()
    again = segment_volume(session, VolumePrompts(inside, outside), options)
    assert again.decisions.point["kept_box"] == searched
    assert recorder.mask_inputs == [True]  # one ask, with the last mask; no candidates searched
    recorder.mask_inputs.clear()
    segment_volume(session, VolumePrompts(positive=outside), options)  # not a correction
    assert len(recorder.mask_inputs) > 1  # a new search
