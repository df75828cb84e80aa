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

from RobustMedSAMLib.errors import CancelledError, InputError
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
    """Read access to a complete cache: ``get(indices, variants)`` -> fp32 tensors by kind."""

    def __init__(self, folder: Path, kinds: Sequence[str], variants: int) -> None:
        self.folder = folder
        self.kinds = tuple(kinds)
        self._arrays = {
            kind: [np.load(folder / f"{kind}_v{v}.npy", mmap_mode="r") for v in range(variants + 1)]
            for kind in self.kinds
        }

    @classmethod
    def open(cls, folder: Path) -> EmbeddingCache:
        manifest = json.loads((folder / MANIFEST).read_text())
        return cls(folder, manifest["kinds"], manifest["variants"])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for arrays in self._arrays.values() for a in arrays)

    def get(
        self, indices: Sequence[int], variants: Sequence[int], device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Stored tensors of (image, variant) pairs, stacked: ``B x ...`` float32."""

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
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / MANIFEST
    if manifest.is_file():
        if json.loads(manifest.read_text()).get("key") == key:
            log.info("embedding cache: reusing %s", folder)
            return EmbeddingCache.open(folder)
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
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"key": key, "count": count, "variants": variants, "kinds": kinds}))
    os.replace(tmp, manifest)
    return EmbeddingCache.open(folder)


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
