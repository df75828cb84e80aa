"""Training data from Slicer: image/label volume pairs and a fine-tuning config for them.

Layout (what ``datasets.volume_pairs.find_pairs`` reads)::

    FOLDER/images/NAME.nii.gz   the image, with the volume's geometry (LPS NIfTI)
    FOLDER/labels/NAME.nii.gz   its label map on the same grid (0 background)

The config written by :func:`write_finetune_config` trains on such a folder
(``[data] source = "volumes"``), starting from a shipped config (decoder-only by default).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.atomic import atomic_output
from RobustMedSAMLib.formats.segmentation import write_segmentation
from RobustMedSAMLib.formats.volume import Volume, write_volume
from RobustMedSAMLib.training.config import TrainingConfig, read_toml

log = logging.getLogger(__name__)

SUFFIX = ".nii.gz"

DECODER_ONLY: dict[str, dict[str, Any]] = {
    "model": {"checkpoint": "fused", "robust": True, "preprocessing": "medsam"},
    "train": {
        "mode": "decoder",
        "robust_image_blocks": True,
        "steps": 5000,
        "batch_size": 8,
        "lr": 1e-4,
        "warmup_steps": 100,
        "device": "auto",
        "val_every": 250,
        "checkpoint_every": 250,
        "log_every": 10,
    },
    "data": {"val_samples": 200},
    "corruption": {"variants": 3, "clean_fraction": 0.25},
    "prompts": {"box_probability": 0.5, "box_jitter": 0.1, "points": 1, "corrections": 3},
    "loss": {"dice": 1.0, "bce": 1.0, "iou": 1.0, "align": 0.1},
    "cache": {"enabled": True, "dir": ""},
}
"""``configs/decoder_only.toml`` without its data source (a test keeps them equal): the
base when the shipped configs folder is not at hand (an installed extension)."""


def safe_name(text: str) -> str:
    """A file name from a node or segment name (``"CT chest: liver"`` -> ``"CT_chest_liver"``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    if not name:
        raise InputError(f"cannot make a file name from {text!r}; use letters or digits")
    return name


def pair_paths(folder: Path, name: str) -> tuple[Path, Path]:
    """``(folder/images/NAME.nii.gz, folder/labels/NAME.nii.gz)``."""
    folder = Path(folder)
    return folder / "images" / f"{name}{SUFFIX}", folder / "labels" / f"{name}{SUFFIX}"


def export_training_pair(
    image: Volume, labels: np.ndarray, folder: Path, name: str, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``image`` and its label map as a training pair; returns (image, label) paths.

    labels: ``(K, J, I)`` label map on the volume's grid (bool or non-negative integers,
    0 background; uint8/uint16 kept). Both files are complete or neither changes (each
    written to a temporary file, then both renamed). InputError for a bad name or shape,
    an empty label map, or existing files without ``overwrite``.
    """
    if name != safe_name(name):
        raise InputError(f"{name!r} is not a plain file name; try {safe_name(name)!r}")
    labels = np.asarray(labels)
    if labels.shape != image.shape:
        raise InputError(
            f"label map shape {labels.shape} differs from volume '{image.name}' {image.shape} "
            "(KJI); export the labels on the volume's grid"
        )
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"the label map must hold integer labels, not {labels.dtype}")
    if not labels.any():
        raise InputError(f"the label map for '{name}' is empty (all zero); nothing to train on")
    image_path, label_path = pair_paths(folder, name)
    existing = [p for p in (image_path, label_path) if p.exists()]
    if existing and not overwrite:
        raise InputError(f"{existing[0]} already exists; choose another name or allow overwriting")
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(image_path) as image_tmp, atomic_output(label_path) as label_tmp:
        write_volume(image, image_tmp)
        write_segmentation(label_tmp, labels, image)
    log.info("exported training pair %s and %s", image_path, label_path)
    return image_path, label_path


def write_finetune_config(
    path: Path,
    *,
    data_folder: Path,
    base: Path | None = None,
    steps: int | None = None,
    checkpoint: str | Path | None = None,
    encoder: Path | None = None,
    decoder: Path | None = None,
    device: str | None = None,
    axis: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write a fine-tuning config (TOML) that trains on ``data_folder``'s volume pairs.

    base: a config to start from (default: the decoder-only method, as
    ``configs/decoder_only.toml``); its relative paths are kept valid. checkpoint: the
    starting model (a file or registry name such as ``"fused"``), or ``encoder`` +
    ``decoder`` files; steps, device (auto|cpu|cuda|mps), axis (axial|coronal|sagittal);
    overrides: any other ``{section: {key: value}}``. The config is checked (InputError
    naming the bad key) before the file is written, atomically (its folder created).
    Returns ``path``.
    """
    values = _base_values(base)
    data = {**values.get("data", {}), "source": "volumes", "folder": _absolute(data_folder)}
    data.pop("paths", None)
    values["data"] = data
    train, model = values.setdefault("train", {}), values.setdefault("model", {})
    if steps is not None:
        train["steps"] = steps
        for key in ("val_every", "checkpoint_every"):  # at least once, at the end
            train[key] = min(int(train.get(key, steps)), steps)
        train["warmup_steps"] = min(int(train.get("warmup_steps", 0)), steps // 10)
    if device is not None:
        train["device"] = device
    if axis is not None:
        data["axis"] = axis
    if checkpoint is not None:
        model.update(checkpoint=_absolute(checkpoint), encoder="", decoder="")
    if encoder is not None or decoder is not None:
        if encoder is None or decoder is None:
            raise InputError("give both encoder and decoder checkpoints, or a checkpoint")
        model.update(checkpoint="", encoder=_absolute(encoder), decoder=_absolute(decoder))
    for section, keys in (overrides or {}).items():
        values.setdefault(section, {}).update(keys)
    path = Path(path)
    config = TrainingConfig.from_dict(values, base=path.parent.resolve())
    text = "# Fine-tuning on image/label pairs exported from Slicer\n" + config.to_toml()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    log.info("wrote fine-tuning config %s", path)
    return path


def _absolute(value: str | Path) -> str:
    """A Path made absolute (against the working folder); a string (registry name) kept."""
    return str(Path(value).resolve()) if isinstance(value, Path) else value


def _base_values(base: Path | None) -> dict[str, dict[str, Any]]:
    """The base config as a dict, its relative paths made absolute (against its folder)."""
    if base is None:
        return {section: dict(keys) for section, keys in DECODER_ONLY.items()}
    base = Path(base)
    raw = read_toml(base, "base config")
    if raw.get("data", {}).get("source", "") != "volumes":  # no data of its own to check
        raw.setdefault("data", {}).update(source="phantoms", paths=[], folder="")
    return TrainingConfig.from_dict(raw, base=base.parent.resolve()).to_dict()
