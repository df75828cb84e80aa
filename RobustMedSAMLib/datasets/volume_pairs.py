"""Image/label volume pairs in a folder: one finder for training and evaluation.

Two layouts are recognised, in this order:

- subfolders ``images/`` + ``labels/`` (or nnU-Net's ``imagesTr``/``labelsTr``,
  ``imagesTs``/``labelsTs``): an image pairs with the label of the same name; an
  nnU-Net channel suffix ``_0000`` on the image and a ``.seg`` before the label's
  extension (``case.seg.nrrd``) are ignored;
- one folder: ``NAME.nrrd`` beside ``NAME-label.nrrd`` (any tag of ``LABEL_TAGS``).

Files are volumes by their extension (``formats.volume.VOLUME_SUFFIXES``); an image
without a label is skipped with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.volume import VOLUME_SUFFIXES

log = logging.getLogger(__name__)

SUBFOLDERS = (("images", "labels"), ("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"))
LABEL_TAGS = ("-label", "_label", "-seg", "_seg", ".seg", "_mask", "-mask")
NNUNET_CHANNEL = "_0000"


def file_stem(path: Path) -> str:
    """The name without its volume extension: ``a.nii.gz`` -> ``a``, ``a.seg.nrrd`` -> ``a.seg``."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def volume_files(folder: Path) -> list[Path]:
    """Volume files directly in ``folder``, sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)
    )


def find_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    """(image, label) paths in ``folder`` (see the module docstring); InputError if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"data folder not found: {folder}")
    for image_dir, label_dir in SUBFOLDERS:
        if (folder / image_dir).is_dir() and (folder / label_dir).is_dir():
            pairs = _subfolder_pairs(folder / image_dir, folder / label_dir)
            break
    else:
        pairs = _tagged_pairs(folder)
    if not pairs:
        raise InputError(
            f"{folder}: no image/label pairs; use images/ and labels/ subfolders with equal "
            f"file names (or imagesTr/labelsTr), or NAME.nrrd beside NAME-label.nrrd "
            f"(tags {', '.join(LABEL_TAGS)})"
        )
    return pairs


def _subfolder_pairs(images: Path, labels: Path) -> list[tuple[Path, Path]]:
    by_stem = {file_stem(p).removesuffix(".seg"): p for p in volume_files(labels)}
    pairs = []
    for image in volume_files(images):
        stem = file_stem(image).removesuffix(NNUNET_CHANNEL)
        if stem in by_stem:
            pairs.append((image, by_stem[stem]))
        else:
            log.warning("no label for %s in %s; skipped", image.name, labels)
    return pairs


def _tagged_pairs(folder: Path) -> list[tuple[Path, Path]]:
    files = {file_stem(p): p for p in volume_files(folder)}
    pairs = []
    for stem, path in sorted(files.items()):
        if any(stem.endswith(tag) for tag in LABEL_TAGS):
            continue
        label = next((files[stem + tag] for tag in LABEL_TAGS if stem + tag in files), None)
        if label is not None:
            pairs.append((path, label))
    return pairs
