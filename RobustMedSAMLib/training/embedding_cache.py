"""On-disk cache of frozen-encoder outputs for decoder-only training.

With the image encoder frozen, its outputs for an image never change: they are computed
once per (image, corrupted variant) and stored as fp16 ``.npy`` files, memory-mapped for
training. Files per variant v (0 = clean, 1..K corrupted), one per stored kind:
``embedding_v{v}.npy`` ``N x C x h x w``; for the robust decoder either
``early_v{v}.npy`` ``N x h x w x D`` (first global block output; the robust feature
blocks that consume it are trained) or, when those blocks are frozen,
``robust_v{v}.npy`` ``N x C/8 x 4h x 4w`` (their output). A folder is valid for one key
(weights, data, corruptions, preprocessing); each file appears only once complete
(temporary name, then ``os.replace``); ``manifest.json`` is written last.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from RobustMedSAMLib.errors import CancelledError, InputError, OutputError
from RobustMedSAMLib.formats.atomic import atomic_output, make_folder
from RobustMedSAMLib.progress import Progress

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
Encode = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's tensors (names, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


encoder_digest = module_digest


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


class EmbeddingCache:
    """Read access to a complete cache: ``get(indices, variants)`` -> fp32 tensors by kind.
    ``rows`` maps sample indices to stored rows when samples share an image."""

    def __init__(self, folder: Path, kinds: Sequence[str], variants: int) -> None:
        self.folder = folder
        self.kinds = tuple(kinds)
        self.rows: list[int] | None = None  # sample index -> stored row (None: the same)
        self._arrays = {
            kind: [np.load(folder / f"{kind}_v{v}.npy", mmap_mode="r") for v in range(variants + 1)]
            for kind in self.kinds
        }

    @classmethod
    def open(cls, folder: Path) -> EmbeddingCache:
        """The complete cache in ``folder``; InputError when its manifest or arrays are
        damaged (wrong names, counts, shapes or types): remove the folder to rebuild."""
        manifest = json.loads((folder / MANIFEST).read_text())  # FileNotFoundError: absent
        try:
            kinds, variants, count = manifest["kinds"], manifest["variants"], manifest["count"]
            if not (isinstance(variants, int) and isinstance(count, int) and variants >= 0):
                raise ValueError(f"variants {variants!r}, count {count!r}")
            if not kinds or not all(isinstance(k, str) and k.isidentifier() for k in kinds):
                raise ValueError(f"kinds {kinds!r}")
            cache = cls(folder, kinds, variants)
            cache._check(count)
        except (KeyError, TypeError, ValueError, OSError) as error:
            raise InputError(
                f"{folder} holds a damaged embedding cache ({error}); remove the folder "
                "and the run builds it again"
            ) from None
        return cache

    def _check(self, count: int) -> None:
        """ValueError unless every array is float16 with ``count`` rows and each kind has
        one shape over its variants."""
        for kind, arrays in self._arrays.items():
            shapes = {a.shape for a in arrays}
            if len(shapes) != 1 or next(iter(shapes))[0] != count:
                raise ValueError(f"{kind} arrays of shapes {sorted(shapes)} for {count} images")
            if any(a.dtype != np.float16 for a in arrays):
                raise ValueError(f"{kind} arrays are not float16")

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """The stored shape of one image's tensor, by kind."""
        return {kind: tuple(arrays[0].shape[1:]) for kind, arrays in self._arrays.items()}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for arrays in self._arrays.values() for a in arrays)

    def get(
        self, indices: Sequence[int], variants: Sequence[int], device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Stored tensors of (image, variant) pairs, stacked: ``B x ...`` float32."""

        if self.rows is not None:
            indices = [self.rows[i] for i in indices]

        def stack(arrays: list[np.ndarray]) -> torch.Tensor:
            rows = [arrays[v][i] for i, v in zip(indices, variants, strict=True)]
            return torch.from_numpy(np.stack(rows)).to(device, torch.float32)

        return {kind: stack(arrays) for kind, arrays in self._arrays.items()}


def build_cache(
    folder: Path,
    key: str,
    encode: Encode,
    count: int,
    variants: int,
    model_input: Callable[[int, int], torch.Tensor],
    batch_size: int = 4,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> EmbeddingCache:
    """Compute (or reuse) the cache for ``count`` images x ``variants + 1`` versions.

    encode(images ``B x 3 x S x S``) -> tensors to store by kind (run without grad);
    model_input(index, variant) -> ``1 x 3 x S x S``. A folder holding a cache for another
    key is refused; completed variants of this key are reused after an interruption.
    """
    make_folder(folder, "the embedding cache")
    manifest = folder / MANIFEST
    if manifest.is_file():
        if _manifest_key(manifest) == key:
            log.info("embedding cache: reusing %s", folder)
            return _reused(EmbeddingCache.open(folder), count)
        raise InputError(
            f"{folder} holds an embedding cache for other data or weights; "
            "remove it or set [cache] dir to another folder"
        )
    total, done, kinds = count * (variants + 1), 0, None
    for variant in range(variants + 1):
        marker = folder / f".key_v{variant}"
        if marker.is_file() and marker.read_text() == key:
            kinds = json.loads((folder / f".kinds_v{variant}").read_text())
            done += count
            continue

        def report(n: int, offset: int = done) -> None:
            if progress is not None:
                progress(offset + n, total)

        kinds = _build_variant(
            folder, variant, encode, count, model_input, batch_size, cancel, report
        )
        (folder / f".kinds_v{variant}").write_text(json.dumps(kinds))
        marker.write_text(key)
        done += count
    with atomic_output(manifest) as temporary:
        values = {"key": key, "count": count, "variants": variants, "kinds": kinds}
        temporary.write_text(json.dumps(values))
    return EmbeddingCache.open(folder)


def _manifest_key(manifest: Path) -> str | None:
    try:
        values = json.loads(manifest.read_text())
    except (ValueError, OSError):
        return None  # then refused as a cache for other data
    return values.get("key") if isinstance(values, dict) else None


def _reused(cache: EmbeddingCache, count: int) -> EmbeddingCache:
    """``cache`` when it holds ``count`` images (the key says which); InputError otherwise."""
    rows = {arrays[0].shape[0] for arrays in cache._arrays.values()}
    if rows != {count}:
        raise InputError(
            f"{cache.folder} holds an embedding cache of {sorted(rows)} images, not this run's "
            f"{count}; remove the folder and the run builds it again"
        )
    return cache


def _reserve(path: Path) -> None:
    """Allocate the disk blocks of a new memory-mapped file now: a full disk is then an
    OutputError here, not a SIGBUS when a page of the map is first written."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: the map's writes find out
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, path.stat().st_size)
        except OSError as error:
            if error.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return  # a file system without fallocate
            raise OutputError(
                f"cannot write the embedding cache in {path.parent}: {error.strerror}"
            ) from None


def _build_variant(folder, variant, encode, count, model_input, batch_size, cancel, report):
    """Write ``{kind}_v{variant}.npy`` for every kind ``encode`` returns; returns the kinds."""
    writers: dict[str, np.ndarray] = {}
    temporaries: dict[str, str] = {}
    try:
        for start in range(0, count, batch_size):
            if cancel is not None and cancel():
                raise CancelledError("embedding cache build cancelled; finished variants are kept")
            indices = range(start, min(start + batch_size, count))
            with torch.no_grad():
                outputs = encode(torch.cat([model_input(i, variant) for i in indices]))
            for kind, tensor in outputs.items():
                array = tensor.to(torch.float16).cpu().numpy()
                if kind not in writers:
                    fd, temporaries[kind] = tempfile.mkstemp(prefix=f".{kind}.", dir=folder)
                    os.close(fd)
                    shape = (count, *array.shape[1:])
                    writers[kind] = open_memmap(temporaries[kind], "w+", np.float16, shape)
                    _reserve(Path(temporaries[kind]))
                writers[kind][start : start + len(indices)] = array
            if report is not None:
                report(start + len(indices))
        for kind in list(writers):
            writers.pop(kind).flush()
            os.replace(temporaries.pop(kind), folder / f"{kind}_v{variant}.npy")
        return sorted(outputs)
    finally:
        writers.clear()
        for temporary in temporaries.values():
            Path(temporary).unlink(missing_ok=True)
