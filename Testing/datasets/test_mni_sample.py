"""The MNI worked example's preparation (scripts/fetch_mni_sample.py), offline.

The real wheel is not downloaded here: the reference derivation and the prompts are
checked on a small synthetic brain whose ventricle is known, and the wheel check on a
forged wheel.
"""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from RobustMedSAMLib.formats.markups import read_points, read_roi
from RobustMedSAMLib.formats.volume import Volume

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fetch_mni_sample.py"


@pytest.fixture(scope="module")
def sample():
    sys.path.insert(0, str(SCRIPT.parent))  # as when run: its helper module beside it
    try:
        spec = importlib.util.spec_from_file_location("fetch_mni_sample", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def synthetic_brain(sample) -> tuple[Volume, np.ndarray, np.ndarray, np.ndarray]:
    """A tissue ball (grey/white maps 0-255) with a fluid cavity at the ventricle seed."""
    ijk_to_ras = np.diag([1.0, 1.0, 1.0, 1.0])
    ijk_to_ras[:3, 3] = np.asarray(sample.VENTRICLE_SEED_RAS) - (30, 34, 38)
    k, j, i = np.mgrid[:80, :80, :80]
    ball = (i - 40) ** 2 + (j - 40) ** 2 + (k - 40) ** 2 <= 35**2
    cavity = (i - 30) ** 2 + (j - 34) ** 2 + (k - 38) ** 2 <= 5**2  # around the seed
    gm = np.where(ball & ~cavity, 140, 0).astype(np.uint8)
    wm = np.where(ball & ~cavity, 60, 0).astype(np.uint8)
    t1 = Volume(np.where(ball & ~cavity, 200, 0).astype(np.uint8), ijk_to_ras, "t1")
    return t1, gm, wm, cavity


def test_references_find_the_ventricle_cavity_and_the_whole_brain(sample):
    t1, gm, wm, cavity = synthetic_brain(sample)
    brain, ventricles = sample.references(t1, gm, wm)
    assert np.array_equal(ventricles, cavity)
    assert brain[cavity].all()  # holes filled: the brain includes its ventricles


def test_prompts_box_the_ventricles_and_point_into_them(sample, tmp_path):
    t1, gm, wm, cavity = synthetic_brain(sample)
    sample.write_prompts(t1, cavity, tmp_path)
    roi = read_roi(tmp_path / "ventricles_box.mrk.json")
    cavity_ras = t1.ijk_to_ras_points(np.argwhere(cavity)[:, ::-1])
    low, high = roi.center_ras - roi.size / 2, roi.center_ras + roi.size / 2
    assert (cavity_ras >= low).all() and (cavity_ras <= high).all()
    assert np.allclose(high - low, np.ptp(cavity_ras, axis=0) + 2 * sample.BOX_MARGIN_MM)
    point = read_points(tmp_path / "ventricles_point.mrk.json")
    i, j, k = np.round(t1.ras_to_ijk_points(point)[0]).astype(int)
    assert cavity[k, j, i]


def test_a_wheel_with_another_digest_is_refused(sample, tmp_path):
    wheel = tmp_path / "nilearn-0.14.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(sample.MEMBER.format("t1"), b"not a volume")
    with pytest.raises(SystemExit, match="SHA-256"):
        sample.extract_maps(wheel, tmp_path)
