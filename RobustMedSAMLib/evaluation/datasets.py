"""Evaluation data: MedSegBench ``.npz`` files, folders of image/label volume pairs,
and the project's synthetic phantoms, as a uniform list of ``Case``.

A data set is named by a spec string ``KIND:WHERE[,key=value...]``:

- ``npz:PATH`` a MedSegBench file ``{name}_{size}.npz`` (``train_images``,
  ``train_label``, ``val_images``, ``val_label``, ``test_images``, ``test_label``;
  images ``NxHxW`` or ``NxHxWx3`` uint8, labels ``NxHxW`` int). Keys: ``split``
  (test|val|train, default test), ``limit`` (images), ``modality``, ``name``,
  ``labels`` (``each``: one case per label value, the default; ``any``: every
  non-zero value is one foreground, for files whose labels are instance ids).
- ``pairs:FOLDER`` image volumes and label maps as ``datasets.volume_pairs`` finds
  them (``images/`` + ``labels/``, nnU-Net's ``imagesTr``/``labelsTr``, or
  ``NAME-label`` beside ``NAME``). Keys: ``limit`` (volumes), ``modality``, ``name``.
- ``phantom:SHAPE`` SHAPE in sphere, ellipsoid, tube, organ, all. Keys: ``count``
  (seeds per shape, default 1), ``modality`` (CT or MR texture, default CT), ``size``
  (voxels per side, default 48).

Each label value present becomes its own binary case. MedSegBench files are read by
``datasets.medsegbench``, shared with training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from RobustMedSAMLib.datasets.medsegbench import read_splits
from RobustMedSAMLib.datasets.volume_pairs import find_pairs
from RobustMedSAMLib.errors import InputError

log = logging.getLogger(__name__)
PHANTOM_SHAPES = ("sphere", "ellipsoid", "tube", "organ")
DATA_KEYS = {
    "npz": ("split", "limit", "modality", "name", "labels"),
    "pairs": ("limit", "modality", "name"),
    "phantom": ("count", "modality", "size", "name"),
}
"""The ``key=value`` options each kind of data spec takes."""


@dataclass
class Case:
    """One object to segment.

    image: ``(rows, cols)`` (2D) or ``(K, J, I)`` (3D) raw intensities; mask: bool,
    same shape; ijk_to_ras: 4x4 for 3D cases (identity-like for 2D); spacing: mm per
    array axis (for corruptions); window: intensity window given to the model (None:
    automatic percentiles).
    """

    dataset: str
    modality: str
    case: str
    image: np.ndarray
    mask: np.ndarray
    ijk_to_ras: np.ndarray
    spacing: tuple[float, ...]
    window: tuple[float, float] | None = None

    @property
    def is_3d(self) -> bool:
        return self.image.ndim == 3


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``KIND:WHERE[,key=value...]`` spec."""

    kind: str
    where: str
    options: dict[str, str]

    @property
    def label(self) -> str:
        return self.options.get("name") or _default_name(self.kind, self.where)


def parse_data_spec(text: str) -> DataSpec:
    """Parse a data spec (see the module docstring); InputError when malformed."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in ("npz", "pairs", "phantom") or not rest:
        raise InputError(
            f"bad data spec {text!r}: use npz:FILE, pairs:FOLDER or phantom:SHAPE "
            "(optionally followed by ,key=value)"
        )
    where, *pairs = rest.split(",")
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise InputError(f"bad option {pair!r} in data spec {text!r}: use key=value")
        key = key.strip()
        if key not in DATA_KEYS[kind] or key in options:
            raise InputError(
                f"option {key!r} in data spec {text!r} is unknown or repeated: {kind} takes "
                f"{', '.join(DATA_KEYS[kind])}, each once"
            )
        options[key] = value.strip()
    return DataSpec(kind, where, options)


def _default_name(kind: str, where: str) -> str:
    if kind == "phantom":
        return f"phantom_{where}"
    stem = Path(where).name.removesuffix(".npz")
    head, _, size = stem.rpartition("_")
    return head if head and size.isdigit() else stem


def load_cases(spec: DataSpec | str) -> list[Case]:
    """All cases of one data spec, in a fixed order."""
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    limit = _int_option(spec, "limit", None)
    if spec.kind == "npz":
        split = spec.options.get("split", "test")
        labels = spec.options.get("labels", "each")
        if labels not in ("each", "any"):
            raise InputError(f"data option labels={labels!r}: use each or any")
        cases = read_medsegbench(spec.where, split, limit, spec.label, _modality(spec), labels)
        return list(cases)
    if spec.kind == "pairs":
        return list(read_pairs(spec.where, limit, spec.label, _modality(spec)))
    count = _int_option(spec, "count", 1)
    size = _int_option(spec, "size", 48)
    return phantom_cases(spec.where, count, _modality(spec, "CT"), size, spec.label)


def _modality(spec: DataSpec, default: str = "unknown") -> str:
    return spec.options.get("modality", default)


def _int_option(spec: DataSpec, key: str, default: int | None) -> int | None:
    value = spec.options.get(key)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise InputError(f"data option {key}={value!r} must be an integer") from None
    if number < 1:
        raise InputError(f"data option {key}={number} must be >= 1")
    return number


def read_medsegbench(
    path: str | Path,
    split: str = "test",
    limit: int | None = None,
    name: str | None = None,
    modality: str = "unknown",
    labels: str = "each",
) -> Iterator[Case]:
    """2D cases of one split of a MedSegBench ``.npz``: one per image and label value
    (``labels="any"``: one per image, foreground = any non-zero label). RGB images
    become grey (mean of the channels); the window is the full 0..255."""
    path = Path(path)
    images, label_maps = read_splits(path, (split,))[split]
    if images.shape[:3] != label_maps.shape[:3] or images.ndim not in (3, 4):
        raise InputError(
            f"{path}: images {images.shape} and labels {label_maps.shape} do not match"
        )
    name = name or _default_name("npz", str(path))
    count = len(images) if limit is None else min(limit, len(images))
    for i in range(count):
        image = images[i].astype(np.float32)
        image = image.mean(axis=-1) if image.ndim == 3 else image
        label = label_maps[i]
        if labels == "any":
            masks = {"any": label != 0}
        else:
            masks = {v: label == v for v in _label_values(label)}
        for value, mask in masks.items():
            if mask.any():
                yield Case(
                    name, modality, f"{split}{i:05d}_l{value}", image, mask,
                    np.eye(4), (1.0, 1.0), (0.0, 255.0),
                )  # fmt: skip


def _label_values(label: np.ndarray) -> list[int]:
    return [int(v) for v in np.unique(label) if v != 0]


def read_pairs(
    folder: str | Path, limit: int | None = None, name: str | None = None, modality: str = "unknown"
) -> Iterator[Case]:
    """3D cases from a folder of image / label volume pairs (see the module docstring)."""
    from RobustMedSAMLib.formats.volume import read_volume, volume_name

    folder = Path(folder)
    pairs = find_pairs(folder)
    name = name or folder.name
    for image_path, label_path in pairs[:limit]:
        volume, labels = read_volume(image_path), read_volume(label_path)
        if volume.shape != labels.shape:
            raise InputError(f"{label_path} {labels.shape} is not on the grid of {image_path}")
        spacing = tuple(float(s) for s in volume.spacing[::-1])
        stem = volume_name(label_path)
        for value in _label_values(labels.array.astype(np.int64)):
            mask = labels.array == value
            yield Case(name, modality, f"{stem}_l{value}", volume.array, mask,
                       volume.ijk_to_ras, spacing)  # fmt: skip


def phantom_cases(
    shape: str = "all",
    count: int = 1,
    modality: str = "CT",
    size: int = 48,
    name: str | None = None,
) -> list[Case]:
    """Synthetic 3D cases (``count`` seeds of each shape) with known masks."""
    shapes = PHANTOM_SHAPES if shape == "all" else (shape,)
    if any(s not in PHANTOM_SHAPES for s in shapes):
        raise InputError(f"unknown phantom {shape!r}: use one of {PHANTOM_SHAPES} or all")
    if modality.upper() not in ("CT", "MR"):
        raise InputError(f"phantom modality {modality!r}: use CT or MR")
    texture = modality.lower()
    grid = (max(8, size * 2 // 3), size, size)
    cases = []
    for kind in shapes:
        for seed in range(count):
            phantom = _make_phantom(kind, grid, size, texture, seed)
            spacing = tuple(float(s) for s in phantom.spacing[::-1])
            cases.append(
                Case(name or f"phantom_{shape}", modality.upper(), f"{kind}{seed}",
                     phantom.image, phantom.mask, phantom.ijk_to_ras, spacing)
            )  # fmt: skip
    return cases


def _make_phantom(kind: str, grid: tuple[int, int, int], size: int, texture: str, seed: int):
    from RobustMedSAMLib.datasets import phantoms

    mm = size * 0.25
    if kind == "organ":
        return phantoms.organ_scene(grid, (1.5, 1.5, 2.0), texture=texture, seed=seed)
    if kind == "sphere":
        return phantoms.sphere(grid, radius=mm, texture=texture, seed=seed)
    if kind == "ellipsoid":
        semi_axes = (mm * 1.2, mm * 0.8, mm)
        return phantoms.ellipsoid(grid, semi_axes=semi_axes, texture=texture, seed=seed)
    amplitude = (size * 0.1, size * 0.06)  # gentle enough to follow slice by slice
    return phantoms.tube(grid, radius=mm * 0.6, amplitude=amplitude, texture=texture, seed=seed)
