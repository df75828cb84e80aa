"""The evaluation scans' preparation (scripts/fetch_eval_scans.py), offline.

Nothing is downloaded: small stand-in sdists (``.tar.gz`` with the real member paths)
hold generated volumes whose labels are known, and their digests replace the pins.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from RobustMedSAMLib.evaluation.datasets import load_cases
from RobustMedSAMLib.formats.atomic import sha256_of
from RobustMedSAMLib.formats.volume import Volume, read_volume, write_volume

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fetch_eval_scans.py"


@pytest.fixture(scope="module")
def fetch():
    sys.path.insert(0, str(SCRIPT.parent))  # as when run: its helper module beside it
    try:
        spec = importlib.util.spec_from_file_location("fetch_eval_scans", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def _volume(array: np.ndarray, spacing: tuple[float, float, float], flip_j: bool) -> Volume:
    """A volume with anisotropic spacing (I, J, K mm), optionally J pointing backwards."""
    ijk_to_ras = np.diag([*spacing, 1.0])
    if flip_j:
        ijk_to_ras[:3, 1] *= -1
    ijk_to_ras[:3, 3] = (-40.5, 12.25, -300.0)
    return Volume(array, ijk_to_ras)


def _standin_sdist(path: Path, root: str, files: dict[str, Volume], tmp: Path) -> Path:
    """A ``.tar.gz`` holding each volume of ``files`` at ``root + name``."""
    with tarfile.open(path, "w:gz") as archive:
        for name, volume in files.items():
            data = write_volume(volume, tmp / name).read_bytes()
            info = tarfile.TarInfo(root + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def standins(fetch, tmp_path):
    """(cases, sources, sdist folder, expected {case: (image, mask)}) for two stand-in sdists."""
    rng = np.random.default_rng(0)
    lung = rng.integers(-1000, 400, (6, 20, 24)).astype(np.int16)
    nodule = np.zeros(lung.shape, np.int16)
    nodule[2:4, 5:9, 6:11] = 1
    abdomen = rng.integers(-200, 300, (5, 16, 18)).astype(np.int16)
    organs = np.zeros(abdomen.shape, np.uint8)
    organs[1:3, 2:6, 2:6] = 3  # left kidney
    organs[1:4, 8:12, 9:15] = 2  # right kidney
    organs[0, 0, 0] = 5  # another organ, never taken
    lung_volume = _volume(lung, (0.57, 0.57, 5.0), flip_j=True)
    abdomen_volume = _volume(abdomen, (3.0, 3.0, 3.0), flip_j=False)
    files = tmp_path / "files"
    files.mkdir()
    sdists = tmp_path / "sdists"
    sdists.mkdir()
    sources = {}
    contents = {
        "pyradiomics": {
            "lung1_image.nrrd": lung_volume,
            "lung1_label.nrrd": Volume(nodule, lung_volume.ijk_to_ras),
        },
        "totalsegmentator": {
            "example_mr_sm.nii.gz": abdomen_volume,
            "example_seg_mr.nii.gz": Volume(organs, abdomen_volume.ijk_to_ras),
        },
    }
    for key, members in contents.items():
        real = fetch.SOURCES[key]
        path = _standin_sdist(sdists / real.filename, real.root, members, files)
        sources[key] = dataclasses.replace(real, sha256=sha256_of(path))
    by_name = {spec.name: spec for spec in fetch.CASES}
    cases = tuple(by_name[n] for n in ("lung1_nodule", "abdmr_kidney_left", "abdmr_kidney_right"))
    expected = {
        "lung1_nodule": (lung_volume, nodule == 1),
        "abdmr_kidney_left": (abdomen_volume, organs == 3),
        "abdmr_kidney_right": (abdomen_volume, organs == 2),
    }
    return cases, sources, sdists, expected


def _prepare(fetch, standins, tmp_path) -> Path:
    cases, sources, sdists, _ = standins
    archives = fetch.sdists(tmp_path, sdists, sources)
    out = tmp_path / "out"
    work = tmp_path / "work"
    work.mkdir()
    fetch.prepare(out, archives, work, cases, sources)
    return out


def test_each_case_is_its_image_and_one_binary_label_on_the_same_grid(fetch, standins, tmp_path):
    out = _prepare(fetch, standins, tmp_path)
    expected = standins[3]
    for name, (source_image, mask) in expected.items():
        image = read_volume(out / "images" / f"{name}.nii.gz")
        label = read_volume(out / "labels" / f"{name}.nii.gz")
        assert np.array_equal(image.array, source_image.array)
        # NIfTI stores the matrix in float32: equal to its rounding, far below a voxel
        assert np.allclose(image.ijk_to_ras, source_image.ijk_to_ras, atol=1e-4)
        assert np.array_equal(label.ijk_to_ras, image.ijk_to_ras)
        assert label.array.dtype == np.uint8
        assert set(np.unique(label.array)) == {0, 1}
        assert np.array_equal(label.array == 1, mask)


def test_the_evaluation_reads_the_pairs_and_the_modality_views(fetch, standins, tmp_path):
    out = _prepare(fetch, standins, tmp_path)
    expected = standins[3]
    everything = load_cases(f"pairs:{out}")
    assert sorted(c.case for c in everything) == sorted(f"{n}_l1" for n in expected)
    ct = load_cases(f"pairs:{out / 'CT'},modality=CT")
    mr = load_cases(f"pairs:{out / 'MR'},modality=MR")
    assert [c.case for c in ct] == ["lung1_nodule_l1"]
    assert sorted(c.case for c in mr) == ["abdmr_kidney_left_l1", "abdmr_kidney_right_l1"]
    for case in ct + mr:
        assert np.array_equal(case.mask, expected[case.case.removesuffix("_l1")][1])


def test_readme_lists_every_case_with_its_source_and_licence(fetch, standins, tmp_path):
    out = _prepare(fetch, standins, tmp_path)
    cases, sources, _, expected = standins
    text = (out / "README.md").read_text()
    assert "EVALUATION ONLY" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line[:2] == "| "}
    for spec in cases:
        row = rows[spec.name]
        assert f"| {spec.modality} |" in row and sources[spec.source].requirement in row
        assert f"| {int(expected[spec.name][1].sum())} |" in row
    for source in sources.values():
        assert source.licence in text and source.sha256 in text


def test_an_sdist_with_another_digest_is_refused(fetch, standins, tmp_path):
    _, sources, sdists, _ = standins
    wrong = {k: dataclasses.replace(s, sha256="0" * 64) for k, s in sources.items()}
    with pytest.raises(SystemExit, match="SHA-256"):
        fetch.sdists(tmp_path, sdists, wrong)


def test_a_missing_sdist_names_the_pip_command(fetch, standins, tmp_path):
    _, sources, sdists, _ = standins
    (sdists / sources["totalsegmentator"].filename).unlink()
    with pytest.raises(SystemExit, match="pip download --no-deps --no-binary=totalsegmentator"):
        fetch.sdists(tmp_path, sdists, sources)


def test_a_label_off_the_image_grid_is_refused(fetch):
    spec = fetch.CASES[0]
    image = _volume(np.zeros((4, 6, 8), np.int16), (1.0, 1.0, 2.0), flip_j=False)
    shifted = image.ijk_to_ras.copy()
    shifted[0, 3] += 0.5  # half a voxel
    labels = Volume(np.ones((4, 6, 8), np.uint8), shifted)
    with pytest.raises(SystemExit, match="not on the grid"):
        fetch.binary_label(image, labels, spec)
    with pytest.raises(SystemExit, match="no voxel of value"):
        fetch.binary_label(image, Volume(np.zeros((4, 6, 8), np.uint8), image.ijk_to_ras), spec)


def test_the_case_table_is_consistent(fetch):
    names = [spec.name for spec in fetch.CASES]
    assert len(names) == len(set(names))
    for spec in fetch.CASES:
        assert spec.source in fetch.SOURCES and spec.modality in ("CT", "MR")
        assert spec.value >= 1


def test_without_symbolic_links_the_modality_views_are_copies(
    fetch, standins, tmp_path, monkeypatch
):
    def refuse(self, target):
        raise OSError("symbolic links not permitted")

    monkeypatch.setattr(Path, "symlink_to", refuse)
    out = _prepare(fetch, standins, tmp_path)
    copy = out / "CT" / "labels" / "lung1_nodule.nii.gz"
    assert not copy.is_symlink()
    assert copy.read_bytes() == (out / "labels" / "lung1_nodule.nii.gz").read_bytes()
