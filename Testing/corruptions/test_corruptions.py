"""The corruption library and its two commands: every type at every severity is
deterministic, keeps shape and dtype, and degrades more as severity grows; bad
input gets a clear error; the CLI keeps the volume's geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 - the name every SimpleITK user knows

from RobustMedSAMLib import cli
from RobustMedSAMLib.corruptions import CORRUPTIONS, SEVERITIES, corrupt, corruption_table
from RobustMedSAMLib.corruptions.intensity import robust_range
from RobustMedSAMLib.datasets.phantoms import organ_scene
from RobustMedSAMLib.errors import InputError

NAMES = list(CORRUPTIONS)
# abdomen-like scenes (air, body, liver + lesion, spleen, kidneys, aorta); spacing is (I, J, K)
CT_SLICE = organ_scene((3, 128, 112), (0.7, 0.7, 2.5), texture="ct", seed=3).image[1]  # int16
MR_VOLUME = organ_scene((12, 96, 80), (1.0, 1.2, 3.0), texture="mr", seed=4).image  # float32
CASES = {
    "ct_slice": (CT_SLICE, (0.7, 0.7)),
    "mr_volume": (MR_VOLUME, (3.0, 1.2, 1.0)),
}


def psnr(clean: np.ndarray, degraded: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, the peak being the clean image's robust range."""
    width = robust_range(clean).width
    error = (degraded.astype(np.float64) - clean.astype(np.float64)) / width
    return float(10 * np.log10(1.0 / max(np.mean(error**2), 1e-20)))


def test_twelve_types_with_five_levels_in_the_table():
    table = corruption_table()
    assert len(CORRUPTIONS) == 12
    for name, spec in CORRUPTIONS.items():
        assert spec.name == name and len(spec.levels) == 5
        row = next(line for line in table.splitlines() if line.startswith(name + " "))
        assert row.split()[-5:] == [f"{level:g}" for level in spec.levels]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_degradation_grows_with_severity(name, case):
    image, spacing = CASES[case]
    before = image.copy()
    scores = []
    for severity in SEVERITIES:
        out = corrupt(image, name, severity, seed=7, spacing=spacing)
        assert out.shape == image.shape and out.dtype == image.dtype
        assert np.isfinite(out).all()
        again = corrupt(image, name, severity, seed=7, spacing=spacing)
        np.testing.assert_array_equal(out, again)
        scores.append(psnr(image, out))
    np.testing.assert_array_equal(image, before)  # the input is left untouched
    assert all(np.diff(scores) < 0), f"PSNR {scores} does not fall with severity"
    assert scores[0] > 25, f"severity 1 should be mild, PSNR {scores[0]:.1f} dB"
    assert scores[-1] > 10, f"severity 5 should stay readable, PSNR {scores[-1]:.1f} dB"


@pytest.mark.parametrize("name", NAMES)
def test_seed_changes_only_random_types(name):
    first = corrupt(CT_SLICE, name, 3, seed=0)
    second = corrupt(CT_SLICE, name, 3, seed=1)
    if CORRUPTIONS[name].random:
        assert np.abs(first.astype(float) - second).mean() > 0.5  # HU
    else:
        np.testing.assert_array_equal(first, second)


def test_in_plane_blur_treats_volume_slices_like_single_slices():
    volume = corrupt(MR_VOLUME, "gaussian_blur", 4, spacing=(5.0, 1.2, 1.0))
    single = corrupt(MR_VOLUME[5], "gaussian_blur", 4, spacing=(1.2, 1.0))
    np.testing.assert_allclose(volume[5], single, atol=1e-3 * np.ptp(MR_VOLUME))


def test_blur_sigma_is_in_millimetres_on_anisotropic_pixels():
    impulse = np.zeros((65, 65), np.float32)
    impulse[32, 32] = 1000.0
    blurred = corrupt(impulse, "gaussian_blur", 5, spacing=(2.0, 0.5)).astype(np.float64)
    rows, cols = np.indices(blurred.shape) - 32
    weights = blurred / blurred.sum()
    sigma_mm = CORRUPTIONS["gaussian_blur"].levels[4]
    row_sigma_mm = np.sqrt((weights * rows**2).sum()) * 2.0
    col_sigma_mm = np.sqrt((weights * cols**2).sum()) * 0.5
    assert row_sigma_mm == pytest.approx(sigma_mm, rel=0.15)
    assert col_sigma_mm == pytest.approx(sigma_mm, rel=0.05)


def test_integer_images_are_clipped_not_wrapped():
    image = np.full((64, 64), 250, np.uint8)
    image[:, :32] = 5
    noisy = corrupt(image, "gaussian_noise", 5)
    assert noisy.dtype == np.uint8
    assert noisy[:, 32:].min() > 150 and noisy[:, :32].max() < 100
    assert noisy.max() == 255 and noisy.min() == 0  # saturated, not wrapped around


@pytest.mark.parametrize("name", NAMES)
def test_constant_empty_and_tiny_images(name):
    for image in (
        np.full((16, 16), -1000, np.int16),
        np.zeros((3, 8, 8), np.float32),
        np.ones((1, 1), np.float64),
        np.arange(6, dtype=np.uint16).reshape(2, 3),
    ):
        out = corrupt(image, name, 5, seed=1)
        assert out.shape == image.shape and out.dtype == image.dtype
        assert np.isfinite(out).all()
    for empty in (np.zeros((0, 4), np.int16), np.zeros((0, 4, 4), np.float32)):
        out = corrupt(empty, name, 2)
        assert out.shape == empty.shape and out.dtype == empty.dtype


def test_unknown_type_lists_the_valid_names():
    with pytest.raises(InputError) as error:
        corrupt(CT_SLICE, "snow", 1)
    for name in NAMES:
        assert name in str(error.value)


@pytest.mark.parametrize("severity", [0, 6, 2.5, True, "3"])
def test_severity_outside_one_to_five(severity):
    with pytest.raises(InputError, match="severity must be an integer from 1 to 5"):
        corrupt(CT_SLICE, "gaussian_noise", severity)


@pytest.mark.parametrize(
    ("image", "kwargs", "message"),
    [
        (np.zeros(10), {}, "2D slice"),
        (np.zeros((2, 2, 4, 4)), {}, "2D slice"),
        (np.zeros((4, 4), bool), {}, "dtype bool"),
        (np.full((4, 4), np.nan), {}, "NaN"),
        (np.zeros((4, 4)), {"spacing": (1.0, 1.0, 1.0)}, "spacing"),
        (np.zeros((4, 4)), {"spacing": (1.0, 0.0)}, "spacing"),
        (np.zeros((4, 4)), {"seed": -1}, "seed"),
    ],
)
def test_bad_input_is_refused_clearly(image, kwargs, message):
    with pytest.raises(InputError, match=message):
        corrupt(image, "gaussian_noise", 1, **kwargs)


# --- command line -------------------------------------------------------------


@pytest.fixture
def only_our_commands(monkeypatch):
    """Build the CLI with only these commands (others are tested on their own)."""
    monkeypatch.setattr(cli, "COMMANDS", ("corrupt", "corruptions"))


@pytest.fixture
def oblique_nrrd(tmp_path):
    image = sitk.GetImageFromArray(organ_scene((6, 40, 48), texture="ct", seed=5).image)
    image.SetSpacing((0.8, 1.1, 3.0))
    image.SetOrigin((-12.5, 30.25, 101.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, 0.0, s * 0.8, c * 0.8, -0.6, s * 0.6, c * 0.6, 0.8))
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def test_corrupt_command_keeps_geometry_and_voxel_type(oblique_nrrd, only_our_commands, capsys):
    out = oblique_nrrd.parent / "ct_noisy.nrrd"
    code = cli.main(
        [
            "corrupt",
            str(oblique_nrrd),
            "--type",
            "motion_blur",
            "--severity",
            "3",
            "--seed",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    source, result = sitk.ReadImage(str(oblique_nrrd)), sitk.ReadImage(str(out))
    assert result.GetSize() == source.GetSize()
    assert result.GetPixelID() == source.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(result.GetSpacing(), source.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(result.GetOrigin(), source.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(result.GetDirection(), source.GetDirection(), atol=1e-9)
    expected = corrupt(
        sitk.GetArrayFromImage(source), "motion_blur", 3, seed=2, spacing=(3.0, 1.1, 0.8)
    )
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result), expected)
    assert {p.name for p in out.parent.iterdir()} == {"ct.nrrd", "ct_noisy.nrrd"}  # no temp left


def test_corrupt_command_bad_type_exits_2_with_one_line(oblique_nrrd, only_our_commands, capsys):
    out = oblique_nrrd.parent / "never.nrrd"
    args = ["corrupt", str(oblique_nrrd), "--type", "fog", "--severity", "2", "--out", str(out)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "unknown corruption type 'fog'" in err and "gaussian_noise" in err
    assert not out.exists()
    assert {p.name for p in oblique_nrrd.parent.iterdir()} == {"ct.nrrd"}


def test_corruptions_command_prints_the_table(only_our_commands, capsys):
    assert cli.main(["corruptions"]) == 0
    assert capsys.readouterr().out.strip() == corruption_table().strip()


def test_corrupt_into_a_segmentation_name_is_refused(oblique_nrrd, only_our_commands, capsys):
    """A corrupted image under a .seg.nrrd name would open in Slicer as a broken
    segmentation (it was written, exit 0)."""
    out = oblique_nrrd.parent / "noisy.seg.nrrd"
    args = ["corrupt", str(oblique_nrrd), "--type", "gaussian_noise", "--severity", "2"]
    assert cli.main([*args, "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert ".seg.nrrd names a Slicer segmentation" in line and line.startswith("robustmedsam")
    assert {p.name for p in oblique_nrrd.parent.iterdir()} == {"ct.nrrd"}
