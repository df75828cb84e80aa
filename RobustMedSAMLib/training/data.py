"""Training data: 2D slices with a binary target mask, from three kinds of source.

* MedSegBench files as published (``{name}_{size}.npz`` holding ``train_images``,
  ``train_label``, ``val_images``, ``val_label``, ``test_images``, ``test_label``);
* a folder of image/label volume pairs (NRRD, NIfTI, ... as Slicer exports them),
  sampled into slices that contain foreground along a chosen axis;
* synthetic phantoms (tests and the demo model).

Every sample is a ``(rows, cols)`` uint8 image (windowed) and a ``(rows, cols)`` bool
mask in slice pixels. Corrupted variants are fixed per (image, variant), so the
encoder outputs of every variant can be cached.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.medsegbench import read_splits
from RobustMedSAMLib.training.config import AXES, CorruptionSection, DataSection

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd")
LABEL_TAGS = ("-label", "_label", "-seg", "_seg", ".seg", "_mask", "-mask")


@dataclass
class SliceSet:
    """Parallel lists: images ``(rows, cols)`` uint8, masks ``(rows, cols)`` bool, names."""

    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[index], self.masks[index]

    def add(self, image: np.ndarray, mask: np.ndarray, name: str) -> None:
        self.images.append(image)
        self.masks.append(mask)
        self.names.append(name)

    def subset(self, count: int) -> SliceSet:
        """The first ``count`` samples (all when count is 0)."""
        if count <= 0 or count >= len(self):
            return self
        return SliceSet(self.images[:count], self.masks[:count], self.names[:count])

    def fingerprint(self) -> str:
        """SHA-256 of every image and mask (the embedding cache's key)."""
        digest = hashlib.sha256()
        for image, mask in zip(self.images, self.masks, strict=True):
            digest.update(str(image.shape).encode())
            digest.update(np.ascontiguousarray(image).tobytes())
            digest.update(np.packbits(mask).tobytes())
        return digest.hexdigest()


def load_data(section: DataSection, seed: int = 0) -> tuple[SliceSet, SliceSet]:
    """Training and validation slices for a ``[data]`` section; InputError if unusable."""
    if section.source == "medsegbench":
        train, val = _medsegbench(section)
    elif section.source == "volumes":
        train, val = _split_volumes(_volume_slices(section), section.val_fraction)
    else:
        train, val = _split_volumes(_phantom_slices(section, seed), section.val_fraction)
    train = train.subset(section.max_samples)
    val = val.subset(section.val_samples)
    if len(train) == 0:
        raise InputError(
            f"no training slice with at least {section.min_foreground} foreground pixels"
        )
    log.info("data: %d training and %d validation slices", len(train), len(val))
    return train, val


# MedSegBench ------------------------------------------------------------------------


def _medsegbench(section: DataSection) -> tuple[SliceSet, SliceSet]:
    train, val = SliceSet(), SliceSet()
    for path in map(Path, section.paths):
        arrays = read_splits(path, ("train", "val"))
        for split, target in (("train", train), ("val", val)):
            images, labels = arrays[split]
            _add_labelled_images(target, images, labels, section, f"{path.stem}:{split}")
    return train, val


def _add_labelled_images(
    target: SliceSet, images: np.ndarray, labels: np.ndarray, section: DataSection, name: str
) -> None:
    """images ``N x H x W`` (or ``N x H x W x 1|3``, colour averaged to grey),
    labels ``N x H x W`` (or ``x 1``)."""
    if images.ndim == 4 and images.shape[3] == 3:  # colour (e.g. dermoscopy): grey levels
        grey = images.mean(axis=3)
        images = (grey + 0.5).astype(np.uint8) if images.dtype == np.uint8 else grey
    elif images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if labels.ndim == 4 and labels.shape[3] == 1:
        labels = labels[..., 0]
    if images.ndim != 3 or images.shape != labels.shape:
        raise InputError(
            f"{name}: images {images.shape} and labels {labels.shape} do not match; "
            "expected N x H x W (or N x H x W x 3) images and N x H x W labels"
        )
    if not labels.any():
        raise InputError(f"{name}: every label is empty (all zero); nothing to train on")
    window = _window(images)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        _add_masks(target, _to_uint8(image, window), label, section, f"{name}:{index}")


def _add_masks(
    target: SliceSet, image: np.ndarray, label: np.ndarray, section: DataSection, name: str
) -> None:
    """One sample per foreground class (or only ``label_value`` when set)."""
    values = [section.label_value] if section.label_value else np.unique(label[label > 0])
    for value in values:
        mask = label == value
        if mask.sum() >= section.min_foreground:
            target.add(image, mask, f"{name}:{int(value)}")


def _window(images: np.ndarray) -> tuple[float, float]:
    if images.dtype == np.uint8:
        return 0.0, 255.0
    from RobustMedSAMLib.preprocessing import auto_window

    return auto_window(images)


def _to_uint8(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    from RobustMedSAMLib.preprocessing import window_to_uint8

    return window_to_uint8(image, window)


# Volumes ----------------------------------------------------------------------------


def find_volume_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, label) files: ``images/`` + ``labels/`` subfolders with equal names, or
    pairs in one folder where the label is the image name plus a tag such as ``-label``."""
    if not folder.is_dir():
        raise InputError(f"data folder not found: {folder}")
    if (folder / "images").is_dir() and (folder / "labels").is_dir():
        labels = {_stem(p): p for p in _volume_files(folder / "labels")}
        pairs = [
            (p, labels[_stem(p)]) for p in _volume_files(folder / "images") if _stem(p) in labels
        ]
    else:
        files = {_stem(p): p for p in _volume_files(folder)}
        pairs = []
        for stem, path in sorted(files.items()):
            for tag in LABEL_TAGS:
                if stem + tag in files:
                    pairs.append((path, files[stem + tag]))
                    break
    if not pairs:
        raise InputError(
            f"{folder}: no image/label pairs; use images/ and labels/ subfolders with equal "
            f"file names, or NAME.nrrd beside NAME-label.nrrd ({', '.join(LABEL_TAGS)})"
        )
    return pairs


def _volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(VOLUME_SUFFIXES))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _volume_slices(section: DataSection) -> list[SliceSet]:
    from RobustMedSAMLib.preprocessing import auto_window, window_to_uint8
    from RobustMedSAMLib.volume import read_volume

    sets = []
    for image_path, label_path in find_volume_pairs(Path(section.folder)):
        image, label = read_volume(image_path).array, read_volume(label_path).array
        if label.ndim == 4:  # a multi-layer .seg.nrrd read as a vector image
            label = label.max(axis=-1)
        if image.shape != label.shape:
            raise InputError(
                f"{label_path.name}: label shape {label.shape} differs from image "
                f"{image_path.name} {image.shape}; export the label on the image's grid"
            )
        if not np.any(label):
            raise InputError(f"{label_path}: the label volume is empty (all zero)")
        window = auto_window(image)
        volume_set = SliceSet()
        for index, image2d, label2d in _foreground_slices(image, label, section):
            name = f"{_stem(image_path)}:{section.axis}{index}"
            _add_masks(volume_set, window_to_uint8(image2d, window), label2d, section, name)
        sets.append(volume_set)
    return sets


def _foreground_slices(image: np.ndarray, label: np.ndarray, section: DataSection):
    """(index, image slice, label slice) along ``section.axis`` where the label is not empty."""
    axis = AXES[section.axis]
    counts = np.count_nonzero(label, axis=tuple(a for a in range(3) if a != axis))
    indices = np.flatnonzero(counts >= section.min_foreground)
    if section.max_slices_per_volume and len(indices) > section.max_slices_per_volume:
        keep = np.linspace(0, len(indices) - 1, section.max_slices_per_volume).round().astype(int)
        indices = indices[keep]
    for index in indices:
        yield int(index), np.take(image, index, axis=axis), np.take(label, index, axis=axis)


def _phantom_slices(section: DataSection, seed: int) -> list[SliceSet]:
    """Slices of synthetic CT/MR volumes: abdomen-like organ scenes, or ("mixed") every
    third one and random scenes (objects at random places, sizes and contrasts, some
    darker than the background); each slice's target is one object in it, in turn."""
    from RobustMedSAMLib.phantoms import organ_scene, random_scene
    from RobustMedSAMLib.preprocessing import auto_window, window_to_uint8

    sets = []
    for number in range(section.phantom_volumes):
        texture = "ct" if number % 2 == 0 else "mr"
        mixed = section.phantom_scenes == "mixed"
        make = random_scene if mixed and number % 3 else organ_scene
        phantom = make(
            shape=tuple(section.phantom_shape), texture=texture, seed=seed * 1000 + number
        )
        window = auto_window(phantom.image)
        volume_set = SliceSet()
        body = [v for v, n in phantom.label_names.items() if n == "body"]
        for index, image2d, label2d in _foreground_slices(phantom.image, phantom.labels, section):
            present = [v for v in np.unique(label2d[label2d > 0]) if v not in body]
            sizeable = [v for v in present if (label2d == v).sum() >= section.min_foreground]
            if not sizeable:
                continue
            mask = label2d == sizeable[(number + index) % len(sizeable)]
            volume_set.add(window_to_uint8(image2d, window), mask, f"phantom{number}:{index}")
        sets.append(volume_set)
    return sets


def _split_volumes(sets: list[SliceSet], val_fraction: float) -> tuple[SliceSet, SliceSet]:
    """Whole volumes go to validation (the last ones), so no volume is in both splits;
    with a single volume its slices are split instead."""
    if len(sets) == 1:
        only = sets[0]
        cut = len(only) - int(round(len(only) * val_fraction))
        return _join([only.subset(cut)]), SliceSet(
            only.images[cut:], only.masks[cut:], only.names[cut:]
        )
    n_val = int(round(len(sets) * val_fraction)) if val_fraction > 0 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(sets) - 1)
    return _join(sets[: len(sets) - n_val]), _join(sets[len(sets) - n_val :])


def _join(sets: list[SliceSet]) -> SliceSet:
    out = SliceSet()
    for s in sets:
        out.images += s.images
        out.masks += s.masks
        out.names += s.names
    return out


# Corrupted variants -----------------------------------------------------------------


def variant_spec(
    section: CorruptionSection, seed: int, index: int, variant: int
) -> tuple[str, int, int] | None:
    """The corruption (name, severity, seed) of variant ``variant`` (1..) of image ``index``;
    None for variant 0 (clean). Fixed by its arguments, so caches stay valid."""
    if variant == 0:
        return None
    from RobustMedSAMLib.corruptions import CORRUPTIONS

    names = sorted(section.names or CORRUPTIONS)
    rng = np.random.default_rng([seed, index, variant, 7])
    name = names[int(rng.integers(len(names)))]
    severity = int(section.severities[int(rng.integers(len(section.severities)))])
    return name, severity, int(rng.integers(2**31))


def variant_image(image: np.ndarray, spec: tuple[str, int, int] | None) -> np.ndarray:
    """``(rows, cols)`` uint8 image degraded as ``spec`` says (itself for None)."""
    if spec is None:
        return image
    from RobustMedSAMLib.corruptions import corrupt

    name, severity, seed = spec
    return corrupt(image, name, severity, seed=seed)
