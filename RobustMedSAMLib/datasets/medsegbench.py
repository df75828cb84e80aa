"""Reading MedSegBench files as published: ``{name}_{size}.npz`` holding
``train_images``, ``train_label``, ``val_images``, ``val_label``, ``test_images``,
``test_label`` (images ``N x H x W`` or ``N x H x W x 3``, labels ``N x H x W``)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from RobustMedSAMLib.errors import InputError

SPLITS = ("train", "val", "test")
SPLIT_KEYS = {split: (f"{split}_images", f"{split}_label") for split in SPLITS}


def read_splits(
    path: str | Path, splits: tuple[str, ...]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images, labels)}`` for each asked split; InputError for a missing or
    unreadable file, an unknown split or missing arrays."""
    path = Path(path)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise InputError(f"unknown split {unknown[0]!r}: use one of {SPLITS}")
    if not path.is_file():
        raise InputError(f"MedSegBench file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for s in splits for k in SPLIT_KEYS[s] if k not in npz.files]
            if missing:
                raise InputError(
                    f"{path}: missing {missing}; a MedSegBench file holds "
                    f"{', '.join(k for pair in SPLIT_KEYS.values() for k in pair)}"
                )
            return {s: (npz[SPLIT_KEYS[s][0]], npz[SPLIT_KEYS[s][1]]) for s in splits}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise InputError(f"{path}: not a readable .npz file ({error})") from None
