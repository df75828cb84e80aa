"""Training data: 2D slices with a binary target mask, from four kinds of source.

* MedSegBench files as published (``{name}_{size}.npz`` holding ``train_images``,
  ``train_label``, ``val_images``, ``val_label``, ``test_images``, ``test_label``);
* a folder of image/label volume pairs (NRRD, NIfTI, ... as Slicer exports them;
  ``datasets.volume_pairs`` says which layouts),
  sampled into slices that contain foreground along a chosen axis;
* synthetic phantoms (tests and training examples);
* a folder of unlabelled 2D images with automatic region masks (as SAM's data engine
  made its fully automatic masks): intensity bands, connected components.

Phantom volumes can be mixed into any other source (``phantom_mix``).

Every sample is a ``(rows, cols)`` uint8 image (windowed) and a ``(rows, cols)`` bool
mask in slice pixels. Corrupted variants are fixed per (image, variant), so the
encoder outputs of every variant can be cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from RobustMedSAMLib.datasets.medsegbench import read_splits
from RobustMedSAMLib.datasets.volume_pairs import file_stem, find_pairs
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.volume import VOLUME_SUFFIXES
from RobustMedSAMLib.training.config import AXES, CorruptionSection, DataSection

log = logging.getLogger(__name__)


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

    def image_rows(self) -> tuple[list[int], list[int]]:
        """(first sample of each distinct image, the distinct image of every sample):
        samples that share one image array (regions of one picture) share it, so its
        encoder outputs are computed and cached once."""
        first: dict[int, int] = {}
        rows = [first.setdefault(id(image), len(first)) for image in self.images]
        firsts = [0] * len(first)
        for index in reversed(range(len(rows))):
            firsts[rows[index]] = index
        return firsts, rows

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
    elif section.source == "regions":
        train, val = _split_volumes(_region_slices(section, seed), section.val_fraction)
    else:
        train, val = _split_volumes(_phantom_slices(section, seed), section.val_fraction)
    if section.phantom_mix and section.source != "phantoms":
        mix = dataclasses.replace(section, phantom_volumes=section.phantom_mix)
        more_train, more_val = _split_volumes(_phantom_slices(mix, seed), section.val_fraction)
        train, val = _join([train, more_train]), _interleave(val, more_val)
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
    from RobustMedSAMLib.inference.preprocessing import auto_window

    return auto_window(images)


def _to_uint8(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    from RobustMedSAMLib.inference.preprocessing import window_to_uint8

    return window_to_uint8(image, window)


# Volumes ----------------------------------------------------------------------------


def _volume_slices(section: DataSection) -> list[SliceSet]:
    from RobustMedSAMLib.formats.volume import read_volume
    from RobustMedSAMLib.inference.preprocessing import resolve_window, window_to_uint8

    sets = []
    for image_path, label_path in find_pairs(section.folder):
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
        window, _ = resolve_window(image)  # as inference windows it (CT: soft tissue)
        volume_set = SliceSet()
        for index, image2d, label2d in _foreground_slices(image, label, section):
            name = f"{file_stem(image_path)}:{section.axis}{index}"
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
    from RobustMedSAMLib.datasets.phantoms import organ_scene, random_scene
    from RobustMedSAMLib.inference.preprocessing import resolve_window, window_to_uint8

    sets = []
    for number in range(section.phantom_volumes):
        texture = "ct" if number % 2 == 0 else "mr"
        mixed = section.phantom_scenes == "mixed"
        make = random_scene if mixed and number % 3 else organ_scene
        phantom = make(
            shape=tuple(section.phantom_shape), texture=texture, seed=seed * 1000 + number
        )
        window, _ = resolve_window(phantom.image)  # as inference windows it
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


def _interleave(a: SliceSet, b: SliceSet) -> SliceSet:
    """Samples of ``a`` and ``b`` alternately (so a validation subset holds both)."""
    out = SliceSet()
    for index in range(max(len(a), len(b))):
        for part in (a, b):
            if index < len(part):
                out.add(part.images[index], part.masks[index], part.names[index])
    return out


# Automatic region masks -------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *VOLUME_SUFFIXES)


def region_masks(
    image: np.ndarray,
    min_area: float = 0.005,
    max_area: float = 0.6,
    max_border: float = 0.05,
    limit: int = 8,
) -> list[np.ndarray]:
    """Automatic target masks in a ``(rows, cols)`` grey image, no labels needed.

    The smoothed image is split into 2, 3 and 4 intensity bands (multi-level Otsu);
    each band's connected components (after a one-pixel opening), holes filled, whose
    area is between ``min_area`` and ``max_area`` of the image and of which at most
    ``max_border`` of the image's border pixels lie on the border, are candidates.
    Near-duplicates (IoU > 0.85) are dropped; at most ``limit`` are returned, spread
    over the sizes found. Each is a ``(rows, cols)`` bool mask.
    """
    from scipy import ndimage

    from RobustMedSAMLib.evaluation.metrics import iou

    grey = ndimage.gaussian_filter(image.astype(np.float32), max(1.0, min(image.shape) / 128))
    area = image.size
    border = np.zeros(image.shape, bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    found: list[np.ndarray] = []
    for bands in _intensity_bands(grey):
        for band in bands:
            band = ndimage.binary_opening(band, iterations=1)
            labels, count = ndimage.label(band)
            if count == 0:
                continue
            sizes = np.bincount(labels.ravel(), minlength=count + 1)
            on_border = np.bincount(labels[border], minlength=count + 1)
            for value in np.flatnonzero(sizes >= min_area * area):
                if value == 0 or on_border[value] > max_border * border.sum():
                    continue
                mask = ndimage.binary_fill_holes(labels == value)
                if mask.sum() <= max_area * area and not any(iou(mask, m) > 0.85 for m in found):
                    found.append(mask)
    found.sort(key=lambda m: int(m.sum()))
    if len(found) > limit:
        found = [found[i] for i in np.linspace(0, len(found) - 1, limit).round().astype(int)]
    return found


def _intensity_bands(grey: np.ndarray) -> list[list[np.ndarray]]:
    """Band masks of ``grey`` for 2, 3 and 4 intensity levels (multi-level Otsu)."""
    out = []
    for levels in (2, 3, 4):
        cuts = _multi_otsu(grey, levels)
        index = np.digitize(grey, cuts)
        out.append([index == level for level in range(levels)])
    return out


def _multi_otsu(grey: np.ndarray, levels: int, bins: int = 64) -> np.ndarray:
    """The ``levels - 1`` thresholds that maximise the between-class variance of a
    ``bins``-bin histogram of ``grey`` (exhaustive search; Otsu for 2 levels)."""
    counts, edges = np.histogram(grey, bins=bins)
    weight = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)])
    mass = np.concatenate([[0.0], np.cumsum(counts * (edges[:-1] + edges[1:]) / 2)])
    grids = np.meshgrid(*[np.arange(1, bins)] * (levels - 1), indexing="ij")
    bounds = [np.zeros_like(grids[0]), *grids, np.full_like(grids[0], bins)]
    score = np.zeros(grids[0].shape)
    valid = np.ones(grids[0].shape, bool)
    for low, high in zip(bounds[:-1], bounds[1:], strict=True):
        w = weight[high] - weight[low]
        valid &= (high > low) & (w > 0)
        score += np.where(w > 0, (mass[high] - mass[low]) ** 2 / np.maximum(w, 1), 0.0)
    best = np.unravel_index(int(np.argmax(np.where(valid, score, -np.inf))), score.shape)
    return np.array([edges[i] for i in best])


def _region_slices(section: DataSection, seed: int) -> list[SliceSet]:
    """One SliceSet per image of ``section.folder`` (or its ``images/``), each sample an
    automatic region of it; the images in an order fixed by ``seed`` (so the validation
    images are a seeded draw)."""
    folder = Path(section.folder)
    if (folder / "images").is_dir():
        folder = folder / "images"
    if not folder.is_dir():
        raise InputError(f"data folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise InputError(
            f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}); data.source = 'regions' "
            "needs a folder of 2D grey images"
        )
    sets = []
    for path in files:
        image = _read_grey(path)
        found = region_masks(image, limit=section.regions_per_image)
        volume_set = SliceSet()
        for number, mask in enumerate(found):
            if mask.sum() >= section.min_foreground:
                volume_set.add(image, mask, f"{file_stem(path)}:region{number}")
        log.debug("%s: %d regions", path.name, len(volume_set))
        sets.append(volume_set)
    order = np.random.default_rng([seed, 11]).permutation(len(sets))
    return [sets[i] for i in order]


def _read_grey(path: Path) -> np.ndarray:
    """A 2D image file as ``(rows, cols)`` uint8 (colour averaged, windowed if not uint8);
    a volume gives its central slice."""
    import SimpleITK as sitk  # noqa: N813 - the usual name

    from RobustMedSAMLib.formats.volume import sitk_path

    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(sitk_path(path)))
    except RuntimeError as error:
        raise InputError(f"{path}: not a readable image ({str(error).strip()[-120:]})") from None
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] > 4:
        array = array[..., :3].mean(axis=-1)  # colour (rows, cols, channels)
    if array.ndim == 3:
        array = array[array.shape[0] // 2]
    if array.ndim != 2:
        raise InputError(f"{path}: expected a 2D grey image, got shape {array.shape}")
    return _to_uint8(array, _window(array))


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
