"""Intensity windows: presets named for what they show, the default chosen from the
volume (CT in HU: soft tissue; otherwise MedSAM's MR percentiles), ``--window`` on the
command line with its validation, and the window in the run record."""

from __future__ import annotations

import json

import numpy as np
import pytest
from doubles import ThresholdPredictor
from volumes import centre_ras, oblique

from RobustMedSAMLib.cli import main
from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.markups import write_points
from RobustMedSAMLib.formats.volume import Volume, write_volume
from RobustMedSAMLib.inference.preprocessing import parse_window, resolve_window
from RobustMedSAMLib.inference.session import SegmentationSession


@pytest.mark.parametrize(
    "name, expected",
    [("soft_tissue", (-160, 240)), ("lung", (-1350, 150)), ("bone", (-500, 1300)),
     ("brain", (0, 80)), ("soft-tissue", (-160, 240))],
)  # fmt: skip
def test_a_preset_gives_its_documented_range(name, expected):
    window, source = resolve_window(np.zeros((2, 2, 2)), name)
    assert window == expected and source == f"preset:{name.replace('-', '_')}"


def ct_like(seed: int = 0) -> np.ndarray:
    """Air (-1000 HU) around a body of soft tissue (40 HU) and a bone (700 HU)."""
    rng = np.random.default_rng(seed)
    array = np.full((6, 40, 40), -1000.0)
    array[:, 8:32, 8:32] = 40.0
    array[:, 18:22, 18:22] = 700.0
    return array + rng.normal(0, 5, array.shape)


def test_a_ct_volume_gets_the_soft_tissue_window_by_default():
    # before: the 0.5..99.5 percentiles, about -1010..705 HU, washing out soft tissue
    assert resolve_window(ct_like()) == ((-160.0, 240.0), "preset:soft_tissue")


def test_a_volume_without_air_gets_the_mr_percentiles():
    mr = np.random.default_rng(1).uniform(0, 900, (4, 30, 30))
    window, source = resolve_window(mr)
    np.testing.assert_allclose(window, np.percentile(mr, (0.5, 99.5)), rtol=1e-6)
    assert source == "percentile:0.5..99.5"


def test_the_modality_the_file_states_wins_over_the_intensities():
    assert resolve_window(ct_like(), modality="MR")[1] == "percentile:0.5..99.5"
    assert resolve_window(np.zeros((2, 4, 4)) + 50, modality="CT")[1] == "preset:soft_tissue"


@pytest.mark.parametrize(
    "spec, message",
    [("240,-160", "greater than LO"), ("40,40", "greater than LO"), ("nan,1", "finite"),
     ("1,inf", "finite"), ("liver", "unknown window|preset"), ("1,2,3", "LO,HI"),
     ("a,b", "two numbers")],
)  # fmt: skip
def test_an_unusable_window_is_a_clear_error(spec, message):
    with pytest.raises(InputError, match=message):
        parse_window(spec)


def test_session_takes_a_preset_or_a_range():
    volume = Volume(ct_like(), np.eye(4), "ct")
    session = SegmentationSession(volume, ThresholdPredictor(0.0), window="lung")
    assert session.window == (-1350.0, 150.0) and session.window_source == "preset:lung"
    session = SegmentationSession(volume, ThresholdPredictor(0.0), window="-100,300")
    assert session.window == (-100.0, 300.0) and session.window_source == "explicit"


@pytest.fixture
def cli_case(tmp_path):
    phantom = sphere((8, 32, 32), spacing=(1.0, 1.0, 2.5), radius=7.0)
    volume = oblique(phantom)
    return {
        "volume": write_volume(volume, tmp_path / "ct.nrrd"),
        "points": write_points(tmp_path / "p.mrk.json", centre_ras(volume, phantom.mask)),
    }


def run_window(case, out, *window) -> int:
    return main(["segment", str(case["volume"]), "--points", str(case["points"]),
                 "--out", str(out), "--device", "cpu", *window])  # fmt: skip


@pytest.mark.parametrize(
    "window, expected, source",
    [(["--window", "brain"], [0, 80], "preset:brain"),
     (["--window=-100,200"], [-100, 200], "explicit"),
     (["--window", "-100", "200"], [-100, 200], "explicit"),
     ([], None, "percentile:0.5..99.5")],
)  # fmt: skip
def test_cli_window_is_used_and_recorded(tmp_path, cli_case, window, expected, source):
    out = tmp_path / "out.seg.nrrd"
    assert run_window(cli_case, out, *window) == 0
    inputs = json.loads((tmp_path / "out.seg.nrrd.json").read_text())["inputs"]
    assert inputs["window_source"] == source
    if expected is not None:
        assert inputs["window"] == expected


@pytest.mark.parametrize("window", ["--window=240,-160", "--window=5,5", "--window=nan,3"])
def test_cli_bad_window_exits_2_with_one_line_and_no_output(tmp_path, cli_case, capsys, window):
    out = tmp_path / "out.seg.nrrd"
    assert run_window(cli_case, out, window) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "window" in err[0]
    assert not out.exists() and not (tmp_path / "out.seg.nrrd.json").exists()


def test_a_volume_stating_ct_gets_the_soft_tissue_window_without_air():
    # a cropped CT (no air in view): the intensities alone would call it MR
    body = np.random.default_rng(2).normal(40, 30, (4, 30, 30))
    stated = Volume(body, np.eye(4), "ct crop", modality="CT")
    session = SegmentationSession(stated, ThresholdPredictor(0.0))
    assert session.window == (-160.0, 240.0)
    unstated = SegmentationSession(Volume(body, np.eye(4)), ThresholdPredictor(0.0))
    assert unstated.window_source == "percentile:0.5..99.5"
