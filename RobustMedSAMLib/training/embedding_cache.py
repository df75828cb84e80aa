"""On-disk cache of frozen-encoder outputs for decoder-only training.

With the image encoder frozen, its outputs for an image never change: they are computed
once per (image, corrupted variant) and stored as fp16 ``.npy`` files that are memory-
mapped for training. Stored per variant v (0 = clean, 1..K corrupted):
``embedding_v{v}.npy`` ``N x C x h x w`` and, for the robust decoder,
``early_v{v}.npy`` ``N x h x w x D`` (the first global block's output). The robust
feature modules consume both and are trained, so their output is not cached.
A folder is valid for one key (encoder weights, data, corruptions, preprocessing);
each file appears only once complete (temporary name, then ``os.replace``).
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

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def encoder_digest(encoder: torch.nn.Module) -> str:
    """SHA-256 over the encoder's tensors (names, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class EmbeddingCache:
    """Read access to a complete cache: ``get(indices, variants)`` -> fp32 tensors."""

    def __init__(self, folder: Path, robust: bool, variants: int) -> None:
        self.folder = folder
        self.robust = robust
        self.variants = variants
        self._embedding = [
            np.load(self._file("embedding", v), mmap_mode="r") for v in range(variants + 1)
        ]
        self._early = (
            [np.load(self._file("early", v), mmap_mode="r") for v in range(variants + 1)]
            if robust
            else None
        )

    def _file(self, kind: str, variant: int) -> Path:
        return self.folder / f"{kind}_v{variant}.npy"

    @property
    def nbytes(self) -> int:
        arrays = self._embedding + (self._early or [])
        return sum(a.nbytes for a in arrays)

    def get(
        self, indices: Sequence[int], variants: Sequence[int], device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings ``B x C x h x w`` and early features ``B x h x w x D`` (or None)."""

        def stack(arrays: list[np.ndarray]) -> torch.Tensor:
            rows = [arrays[v][i] for i, v in zip(indices, variants, strict=True)]
            return torch.from_numpy(np.stack(rows)).to(device, torch.float32)

        return stack(self._embedding), stack(self._early) if self._early is not None else None


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def build_cache(
    folder: Path,
    key: str,
    model: torch.nn.Module,
    count: int,
    variants: int,
    model_input: Callable[[int, int], torch.Tensor],
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> EmbeddingCache:
    """Compute (or reuse) the cache for ``count`` images x ``variants + 1`` versions.

    model_input(index, variant) -> ``1 x 3 x S x S`` model input. A folder holding a
    cache for another key is refused; completed variant files of this key are reused.
    """
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / MANIFEST
    robust = bool(getattr(model, "robust", False))
    if manifest.is_file():
        if json.loads(manifest.read_text()).get("key") == key:
            log.info("embedding cache: reusing %s", folder)
            return EmbeddingCache(folder, robust, variants)
        from RobustMedSAMLib.errors import InputError

        raise InputError(
            f"{folder} holds an embedding cache for other data or weights; "
            "remove it or set [cache] dir to another folder"
        )
    encoder = model.image_encoder
    device = next(encoder.parameters()).device
    total, done = count * (variants + 1), 0
    for variant in range(variants + 1):
        targets = {"embedding": folder / f"embedding_v{variant}.npy"}
        if robust:
            targets["early"] = folder / f"early_v{variant}.npy"
        if (
            all(p.is_file() for p in targets.values())
            and (folder / f".key_v{variant}").is_file()
            and (folder / f".key_v{variant}").read_text() == key
        ):
            done += count
            continue
        writers: dict[str, np.ndarray] = {}
        temporaries: dict[str, str] = {}
        try:
            for start in range(0, count, batch_size):
                if cancel is not None and cancel():
                    from RobustMedSAMLib.errors import CancelledError

                    raise CancelledError(
                        "embedding cache build cancelled; completed parts are kept"
                    )
                indices = range(start, min(start + batch_size, count))
                images = torch.cat([model_input(i, variant) for i in indices]).to(device)
                with torch.no_grad():
                    embedding, early = encoder.forward_with_early(images)
                outputs = {"embedding": embedding, "early": early}
                for kind in targets:
                    array = outputs[kind].to(torch.float16).cpu().numpy()
                    if kind not in writers:
                        fd, temporaries[kind] = tempfile.mkstemp(
                            prefix=f".{kind}.", suffix=".npy", dir=folder
                        )
                        os.close(fd)
                        writers[kind] = open_memmap(
                            temporaries[kind],
                            mode="w+",
                            dtype=np.float16,
                            shape=(count, *array.shape[1:]),
                        )
                    writers[kind][start : start + len(indices)] = array
                done += len(indices)
                if progress is not None:
                    progress(done, total)
            for kind, path in targets.items():
                writers[kind].flush()
                del writers[kind]
                os.replace(temporaries.pop(kind), path)
            (folder / f".key_v{variant}").write_text(key)
        finally:
            writers.clear()
            for temporary in temporaries.values():
                Path(temporary).unlink(missing_ok=True)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"key": key, "count": count, "variants": variants, "robust": robust}))
    os.replace(tmp, manifest)
    return EmbeddingCache(folder, robust, variants)
