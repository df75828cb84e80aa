"""Synthetic phantoms: known shapes, textures a user would recognise, seeded."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from RobustMedSAMLib.datasets import phantoms
from RobustMedSAMLib.errors import InputError


def extent(mask: np.ndarray, axis: int) -> int:
    """Number of slices along KJI ``axis`` that hold any of the mask."""
    others = tuple(a for a in range(3) if a != axis)
    return int(mask.any(axis=others).sum())


def test_sphere_has_its_analytic_volume_on_an_anisotropic_grid() -> None:
    phantom = phantoms.sphere(shape=(40, 64, 64), spacing=(0.8, 0.8, 2.0), radius=15.0)
    voxel = 0.8 * 0.8 * 2.0
    volume = phantom.mask.sum() * voxel
    assert volume == pytest.approx(4 / 3 * math.pi * 15.0**3, rel=0.03)
    assert extent(phantom.mask, 0) == pytest.approx(30 / 2.0, abs=1)  # K: 2 mm slices
    assert extent(phantom.mask, 2) == pytest.approx(30 / 0.8, abs=1)  # I: 0.8 mm
    assert phantom.spacing == (0.8, 0.8, 2.0)
    assert np.allclose(np.diag(phantom.ijk_to_ras), [-0.8, -0.8, 2.0, 1.0])


def test_ct_texture_is_int16_hounsfield_with_known_contrast_and_noise() -> None:
    phantom = phantoms.sphere(contrast=100.0, noise=10.0, seed=3)
    assert phantom.image.dtype == np.int16 and phantom.image.shape == (64, 64, 64)
    assert phantom.mask.dtype == bool and phantom.labels.dtype == np.uint8
    core = np.zeros_like(phantom.mask)
    core[28:36, 28:36, 28:36] = True
    corner = np.zeros_like(phantom.mask)
    corner[:8, :8, :8] = True
    assert phantom.image[core].mean() == pytest.approx(140.0, abs=3)
    assert phantom.image[corner].mean() == pytest.approx(phantoms.CT_BACKGROUND_HU, abs=3)
    assert phantom.image[corner].std() == pytest.approx(10.0, rel=0.15)


def test_mr_texture_is_float_positive_with_a_bias_field() -> None:
    phantom = phantoms.sphere(texture="mr", noise=2.0, seed=1)
    image = phantom.image
    assert image.dtype == np.float32 and (image >= 0).all()
    background = ~phantom.mask
    low, high = np.percentile(image[background], [5, 95])
    assert high / low > 1.2  # the bias field varies the background well beyond the noise
    assert image[phantom.mask].mean() > 1.5 * image[background].mean()


def test_same_seed_same_image_other_seed_other_noise() -> None:
    a = phantoms.tube(seed=7)
    b = phantoms.tube(seed=7)
    c = phantoms.tube(seed=8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, c.mask)
    assert not np.array_equal(a.image, c.image)


def test_rotating_an_ellipsoid_turns_its_axes() -> None:
    flat = phantoms.ellipsoid(semi_axes=(25.0, 10.0, 10.0))
    turned = phantoms.ellipsoid(semi_axes=(25.0, 10.0, 10.0), rotation_deg=(0.0, 0.0, 90.0))
    assert extent(flat.mask, 2) == pytest.approx(50, abs=1) and extent(flat.mask, 1) <= 21
    assert extent(turned.mask, 1) == pytest.approx(50, abs=1) and extent(turned.mask, 2) <= 21
    assert turned.mask.sum() == pytest.approx(flat.mask.sum(), rel=0.02)


def test_tube_runs_along_k_on_its_slice_range_and_curves() -> None:
    phantom = phantoms.tube(radius=6.0, slice_range=(10, 50))
    on = np.flatnonzero(phantom.mask.any(axis=(1, 2)))
    assert (on[0], on[-1]) == (10, 50)
    areas = phantom.mask[10:51].sum(axis=(1, 2))
    assert np.all(np.abs(areas - math.pi * 36) < 0.15 * math.pi * 36)
    centres_x = [np.argwhere(s)[:, 1].mean() for s in phantom.mask[10:51]]
    assert max(centres_x) - min(centres_x) > 10  # it curves by about twice the amplitude
    assert np.max(np.abs(np.diff(centres_x))) < 1.5  # smoothly: it can be followed


def test_organ_scene_has_every_organ_and_picks_the_target() -> None:
    phantom = phantoms.organ_scene(target="spleen")
    names = set(phantom.label_names.values())
    assert names == set(phantoms.ORGAN_INTENSITIES)
    for value in phantom.label_names:
        assert (phantom.labels == value).sum() > 100
    spleen = next(v for v, n in phantom.label_names.items() if n == "spleen")
    assert np.array_equal(phantom.mask, phantom.labels == spleen)
    air = phantom.labels == 0
    assert np.median(phantom.image[air]) < -900
    lesion = next(v for v, n in phantom.label_names.items() if n == "lesion")
    liver = next(v for v, n in phantom.label_names.items() if n == "liver")
    assert np.median(phantom.image[phantom.labels == lesion]) < np.median(
        phantom.image[phantom.labels == liver]
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: phantoms.organ_scene(target="pancreas"),
        lambda: phantoms.sphere(texture="pet"),
        lambda: phantoms.tube(slice_range=(10, 80)),
        lambda: phantoms.sphere(spacing=(1.0, 0.0, 1.0)),
        lambda: phantoms.ellipsoid(semi_axes=(10.0, -1.0, 5.0)),
    ],
)
def test_bad_arguments_are_input_errors(make) -> None:
    with pytest.raises(InputError):
        make()


def test_64_cubed_phantoms_are_quick() -> None:
    start = time.perf_counter()
    for make in (phantoms.sphere, phantoms.ellipsoid, phantoms.tube):
        for texture in ("ct", "mr"):
            make(texture=texture)
    assert (time.perf_counter() - start) / 6 < 0.5
