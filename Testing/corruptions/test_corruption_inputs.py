"""Corruptions on volumes at the edges of their types and units: finite stays finite,
kernels stay bounded, a kernel that cannot fit is refused, wiped-out images are warned."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from RobustMedSAMLib.cli import main
from RobustMedSAMLib.corruptions import blur, corrupt
from RobustMedSAMLib.corruptions.blur import gaussian_kernel, line_kernel
from RobustMedSAMLib.corruptions.registry import CORRUPTIONS
from RobustMedSAMLib.formats.volume import Volume, write_volume

SHAPE = (3, 32, 32)


def extreme(dtype, top: float) -> np.ndarray:
    """Values spread over +-``top``: the range's width overflows ``dtype`` (or float64)."""
    values = np.random.default_rng(1).uniform(-1, 1, SHAPE) * top
    return values.astype(dtype)


EXTREMES = {
    "float32 +-3e38": extreme(np.float32, 3e38),
    "float64 +-1e300": extreme(np.float64, 1e300),
    "float64 +-1.7e308": extreme(np.float64, 1.7e308),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("case", list(EXTREMES))
def test_finite_values_stay_finite(case, name):
    image = EXTREMES[case]
    out = corrupt(image, name, 3, seed=0)
    assert out.dtype == image.dtype
    assert np.isfinite(out).all()


@pytest.mark.parametrize("case", list(EXTREMES))
def test_mild_noise_on_an_extreme_range_keeps_the_image(case):
    image = EXTREMES[case]
    out = corrupt(image, "gaussian_noise", 1, seed=0)
    # sigma is 1% of the range: the correlation with the input is about 1 / sqrt(1 + 3e-4)
    top = float(np.abs(image).max())
    before, after = image.astype(np.float64) / top, out.astype(np.float64) / top
    assert np.corrcoef(before.ravel(), after.ravel())[0, 1] > 0.99


def test_an_outlier_far_beyond_the_range_stays_finite_under_poisson_noise():
    image = np.random.default_rng(0).normal(0, 1, SHAPE).astype(np.float32)
    image[0, 0, 0] = 3e38  # 1e38 range widths out: the Poisson mean is past what numpy draws
    out = corrupt(image, "poisson_noise", 5)
    assert np.isfinite(out).all()
    assert out[0, 0, 0] == pytest.approx(3e38, rel=1e-6)


def test_gaussian_kernel_on_a_micrometre_grid_is_bounded_by_the_slice():
    # sigma 1.5 mm at 0.001 mm pixels: 1500 pixels, a 9001-wide kernel without the bound
    assert gaussian_kernel(1.5, (1e-3, 1e-3), (64, 48)).shape == (129, 97)
    kernel = line_kernel(6.0, 0.3, (1e-3, 1e-3), (64, 64))
    assert max(kernel.shape) <= 2 * (64 + 1) + 1


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_AS is POSIX")
def test_blur_on_a_metres_grid_fits_in_memory_and_warns():
    # Before the bound this process grew to 23.5 GB; here it runs under a 3 GB address space.
    script = textwrap.dedent(
        """
        import logging, resource, sys
        import numpy as np
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        logging.basicConfig(level=logging.WARNING)
        from RobustMedSAMLib.corruptions import corrupt
        image = np.random.default_rng(0).normal(0, 1, (16, 64, 64)).astype(np.float32)
        out = corrupt(image, "gaussian_blur", 3, spacing=(2e-3, 1e-3, 1e-3))
        print(np.isfinite(out).all(), float(out.std() / image.std()) < 0.2)
        """
    )
    env_threads = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env_threads},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True"]  # finite, and blurred to near flat
    assert "check the spacing units" in done.stderr.lower()


def test_a_kernel_that_cannot_fit_is_refused_by_the_cli(tmp_path, monkeypatch, capsys):
    path = write_volume(Volume(np.ones((2, 64, 64), np.int16), np.eye(4), "v"), tmp_path / "v.nrrd")
    monkeypatch.setattr(blur, "available_memory", lambda: 1 << 10)  # 1 KiB at hand
    out = tmp_path / "blurred.nrrd"
    code = main(
        ["corrupt", str(path), "--type", "gaussian_blur", "--severity", "5", "--out", str(out)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "blur kernel" in err and "GiB" in err and "spacing units" in err
    assert not out.exists()


def test_memory_sets_how_many_slices_are_convolved_together(monkeypatch):
    monkeypatch.setattr(blur, "available_memory", lambda: 2 * 3 * blur.BYTES_PER_PADDED_PIXEL * 100)
    assert blur.slices_per_chunk((10, 10), (3, 3)) == 3
    image = np.random.default_rng(0).normal(0, 1, (7, 8, 8)).astype(np.float32)
    chunked = blur.convolve_slices(image, gaussian_kernel(1.0, (1.0, 1.0)))
    monkeypatch.setattr(blur, "available_memory", lambda: 1 << 30)
    whole = blur.convolve_slices(image, gaussian_kernel(1.0, (1.0, 1.0)))
    np.testing.assert_array_equal(chunked, whole)


@pytest.mark.parametrize(("spacing", "warned"), [(1e-3, True), (1.0, False)])
def test_mm_corruption_larger_than_the_slice_is_warned(caplog, spacing, warned):
    image = np.random.default_rng(0).normal(0, 1, (2, 64, 64)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        corrupt(image, "motion_blur", 3, spacing=(spacing, spacing, spacing))
    messages = [r.getMessage() for r in caplog.records if "wiped out" in r.getMessage()]
    assert bool(messages) == warned
    if warned:
        assert "motion_blur 6 mm is 6000 pixels" in messages[0]
