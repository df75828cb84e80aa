"""An interactive segmentation session: one volume, one model, an embedding cache.

The image encoder is the expensive part (seconds per slice for ViT-B on a CPU), so a
slice is encoded once, on first use, and kept in a memory-bounded LRU cache (and,
optionally, a disk cache keyed by the volume's content, the axis, the window and the
model). Clicks on an encoded slice cost only the decoder. The session is the
``SliceSegmenter`` that 3D propagation drives; ``encoding_ahead`` encodes the slices it
will ask for on a worker thread while it decodes the current one. A session keeps the
sessions of its last few crops (``crop``: small boxes are segmented zoomed), so that a
correction click there finds its encoded slice and last mask too.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from RobustMedSAMLib.errors import CancelledError, InputError
from RobustMedSAMLib.formats.atomic import atomic_output
from RobustMedSAMLib.formats.volume import Volume, check_volume
from RobustMedSAMLib.inference.point_search import answer_points
from RobustMedSAMLib.inference.predictor import EncodedSlice, Predictor
from RobustMedSAMLib.inference.preprocessing import Frame, resolve_window, window_to_unit
from RobustMedSAMLib.inference.slicing import (
    AXIS_NAMES,
    HALF_VOXEL,
    axis_index,
    check_slice_size,
    get_slice,
)
from RobustMedSAMLib.inference.types import Prediction, SlicePrompt
from RobustMedSAMLib.inference.zoom import crop_volume
from RobustMedSAMLib.model.sam import ImageFeatures
from RobustMedSAMLib.progress import Cancel, Progress, cancel_check

log = logging.getLogger(__name__)
DEFAULT_CACHE_BYTES = 1024**3  # ~55 slices of a robust model's features (19 MB each, fp32)
#: For a run that asks each slice once, then re-asks it at once (segment, batch): the
#: slice being asked (a robust model's features are 19 MB, LiteMedSAM's 4 MB); the
#: encode-ahead worker's slices are held apart from the cache until asked for.
ONE_PASS_CACHE_BYTES = 24 * 1024**2
ENCODE_AHEAD = 2  # slices encoded ahead of use (bench_lite.py --lesion measures it)
CROP_SESSIONS = 4  # crop sessions a session keeps (zoomed small boxes; see crop)
Region = tuple[slice, slice, slice]  # K, J, I voxel ranges of a crop


@dataclass
class SessionStats:
    """Counters for benchmarks and the run record."""

    encoder_calls: int = 0
    encoder_seconds: float = 0.0
    decoder_calls: int = 0
    decoder_seconds: float = 0.0
    cache_hits: int = 0
    disk_hits: int = 0
    encoded: list[int] = field(default_factory=list)

    def add(self, other: SessionStats) -> None:
        """Count ``other``'s work too (a session run on a crop of this one's volume)."""
        for counter in fields(self):  # numbers add up; the list of encoded slices extends
            setattr(self, counter.name, getattr(self, counter.name) + getattr(other, counter.name))


@dataclass
class _Clicks:
    """The points placed so far on one slice, and the last mask's logits."""

    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    logits: np.ndarray | None = None


def _corrects(last: SlicePrompt, prompt: SlicePrompt) -> bool:
    """Whether ``prompt`` is ``last`` with points added (same box; any order: the
    prompts list include points before exclude points)."""
    if (last.box is None) != (prompt.box is None):
        return False
    if last.box is not None and not np.allclose(last.box, prompt.box):
        return False
    before, now = _point_set(last), _point_set(prompt)
    return len(prompt.points) > len(last.points) and before <= now


def _point_set(prompt: SlicePrompt) -> set[tuple[float, float, int]]:
    pairs = zip(prompt.points, prompt.labels, strict=True)
    return {(float(x), float(y), int(label)) for (x, y), label in pairs}


class SegmentationSession:
    """Segment slices of ``volume`` along ``axis`` with a predictor, caching embeddings."""

    def __init__(
        self,
        volume: Volume,
        predictor: Predictor,
        axis: str | int = "axial",
        window: tuple[float, float] | str | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        disk_cache: str | Path | None = None,
        model_id: str = "",
    ) -> None:
        check_volume(volume)
        if not callable(getattr(predictor, "encode", None)):
            raise InputError(
                f"predictor must be a Predictor, not {type(predictor).__name__}: give "
                "load_named_model(...).predictor()"
            )
        self._volume = volume
        self.predictor = predictor
        self.axis = axis if isinstance(axis, int) else axis_index(volume, axis)
        if self.axis not in (0, 1, 2):
            raise InputError(f"axis must be one of {AXIS_NAMES} or 0, 1, 2; got {axis!r}")
        check_slice_size(volume, self.axis)
        # window: (low, high), a preset name or "LO,HI"; None: chosen from the volume
        self.window, self.window_source = resolve_window(
            volume.array, window, getattr(volume, "modality", None)
        )
        self.cache_bytes = cache_bytes
        self.disk_cache = Path(disk_cache) if disk_cache else None
        if self.disk_cache is not None and self.disk_cache.exists():
            if not self.disk_cache.is_dir():
                raise InputError(f"embedding cache {self.disk_cache} is a file: give a folder")
        self.model_id = model_id
        self._shapes: dict[str, tuple[int, ...]] | None = None  # of the features seen
        self.stats = SessionStats()
        self._cache: OrderedDict[int, EncodedSlice] = OrderedDict()
        self._clicks: dict[int, _Clicks] = {}
        self._answered: dict[int, tuple[SlicePrompt, np.ndarray]] = {}  # see correcting
        self._searched: dict[int, tuple[SlicePrompt, np.ndarray]] = {}  # see kept_box
        self._key: str | None = None
        self._ahead: _EncodeAhead | None = None
        self.region: Region | None = None  # of a crop session: where it lies in its parent's
        self.asked: object = None  # of a crop session: the last request on it (see crop)
        self._parent: SegmentationSession | None = None
        self._crops: OrderedDict[tuple, SegmentationSession] = OrderedDict()
        self._crops_of: tuple[Volume, tuple[float, float]] | None = None

    @property
    def volume(self) -> Volume:
        """The volume segmented; fixed: its encoded slices, clicks and window belong to it."""
        return self._volume

    @volume.setter
    def volume(self, volume: Volume) -> None:
        raise InputError(
            "a session's volume cannot be replaced (its encoded slices, clicks and window "
            "are the old volume's): start a new SegmentationSession on the new one"
        )

    @property
    def n_slices(self) -> int:
        return self.volume.shape[self.axis]

    @property
    def style(self) -> str:
        """The predictor's preprocessing (``"sam"``, ``"medsam"``, ``"litemedsam"``)."""
        return self.predictor.preprocessor.style

    def slice_image(self, index: int) -> np.ndarray:
        """Slice ``index`` along the session's axis, ``(rows, cols)`` raw intensities."""
        if not isinstance(index, int | np.integer) or isinstance(index, bool):
            raise InputError(
                f"slice index {index!r} is not an int: give a slice number, e.g. round(k)"
            )
        if not 0 <= index < self.n_slices:
            raise InputError(f"slice {index} is outside 0..{self.n_slices - 1}")
        return get_slice(self.volume.array, self.axis, index)

    def windowed(self, index: int) -> np.ndarray:
        """Slice ``index`` as the model sees it: ``(rows, cols)`` float32, the session's
        window mapped to 0..1 (clipped)."""
        return window_to_unit(self.slice_image(index), self.window)

    @property
    def takes_points(self) -> bool:
        """Whether the model was trained with point prompts (``ModelSource.prompts``)."""
        return "point" in getattr(self.predictor, "prompts", ("point",))

    def encoded(self, index: int) -> EncodedSlice:
        """Features of slice ``index``: from memory, from the encode-ahead worker, from
        disk, or by running the encoder."""
        if index in self._cache:
            self._cache.move_to_end(index)
            self.stats.cache_hits += 1
            return self._cache[index]
        ahead = self._ahead.take(index) if self._ahead is not None else None
        encoded, seconds = ahead.result() if ahead is not None else self._produce(index)
        if seconds is None:
            self.stats.disk_hits += 1
        else:
            self.stats.encoder_seconds += seconds
            self.stats.encoder_calls += 1
            self.stats.encoded.append(index)
            self._shapes = {"embedding": tuple(encoded.features.embedding.shape)}
            if encoded.features.robust is not None:
                self._shapes["robust"] = tuple(encoded.features.robust.shape)
            self._save_to_disk(index, encoded)
        self._remember(index, encoded)
        return encoded

    def mask_features(self, index: int, masks: Sequence[np.ndarray]) -> np.ndarray:
        """``N x C`` float32: the mean of slice ``index``'s image embedding under each of
        ``masks`` (``(rows, cols)`` bool), each embedding cell weighted by the part of it
        the mask covers (``Preprocessor.grid_cover``); a row of NaN for a mask that covers
        no cell. What the encoder made of a region: the feature likeness of propagation's
        stop rules (``propagation.seed_reference``). The slice is encoded if it is not
        held (a propagated slice always is: the decoder has just used it)."""
        encoded = self.encoded(index)
        embedding = encoded.features.embedding[0].detach().float()  # C x h x w, its device
        cover = self.predictor.preprocessor.grid_cover(
            np.stack(masks), encoded.frame, tuple(embedding.shape[-2:])
        ).to(embedding.device)
        total = cover.sum(dim=(1, 2), keepdim=True)
        weights = torch.where(total > 0, cover / total.clamp(min=1e-8), torch.nan)
        return torch.einsum("nhw,chw->nc", weights, embedding).cpu().numpy()

    def _produce(self, index: int) -> tuple[EncodedSlice, float | None]:
        """Slice ``index``'s features from disk (seconds None) or the encoder (its
        seconds); changes no counter, so the encode-ahead worker may call it."""
        encoded = self._load_from_disk(index)
        if encoded is not None:
            return encoded, None
        start = time.perf_counter()
        encoded = self.predictor.encode(self.slice_image(index), self.window)
        return encoded, time.perf_counter() - start

    @contextmanager
    def encoding_ahead(self, order: Iterable[int], depth: int = ENCODE_AHEAD) -> Iterator[None]:
        """Within the block, a worker thread encodes the slices of ``order`` (the order
        they will be asked for, e.g. ``propagation.plan_order``) at most ``depth`` places
        ahead of the furthest one asked for, so the encoder runs while the decoder works
        on the slice before; it starts running ahead once the first slice is segmented,
        so that the first mask comes as soon as without it. ``depth`` 0: nothing ahead;
        on MPS neither (its backend is not safe to use from two threads). Leaving the
        block drops what was queued (an encode in progress finishes first)."""
        device = getattr(self.predictor, "device", None)
        if depth <= 0 or self._ahead is not None or getattr(device, "type", "") == "mps":
            yield
            return
        self._ahead = _EncodeAhead(self, [i for i in order if i not in self._cache], depth)
        try:
            yield
        finally:
            self._ahead.close()
            self._ahead = None

    def encode_slices(
        self,
        indices: Iterable[int],
        progress: Progress | None = None,
        cancel: Cancel | None = None,
    ) -> None:
        """Encode slices ahead of use, in the given order (nearest the prompt first).

        The slices of ``indices`` already held are marked used first, the first needed
        last, so that the slices this pass encodes push out others (then those it needs
        last), not the ones it is about to ask for: in plain LRU order a full cache lost
        each held slice just before the pass reached it, and every one was encoded again."""
        order = list(indices)
        is_cancelled = cancel_check(cancel)
        for index in reversed(order):
            if index in self._cache:
                self._cache.move_to_end(index)
        for done, index in enumerate(order, start=1):
            if is_cancelled():
                raise CancelledError("encoding cancelled")
            self.encoded(index)
            if progress is not None:
                progress(done, len(order))

    def segment_slice(self, index: int, prompt: SlicePrompt) -> Prediction:
        """The model's mask for slice ``index`` (the ``SliceSegmenter`` protocol)."""
        self.predictor.set_encoded(self.encoded(index))
        start = time.perf_counter()
        prediction = self.predictor.predict(prompt)
        self.stats.decoder_seconds += time.perf_counter() - start
        self.stats.decoder_calls += 1
        if self._ahead is not None:
            self._ahead.start()  # the first mask is out: encode ahead from now on
        return prediction

    def correcting(self, index: int, prompt: SlicePrompt) -> SlicePrompt:
        """``prompt`` with slice ``index``'s last mask fed back when it corrects the last
        prompt answered there through :meth:`answered` (the same box, the same points
        and more: a correction click), as SAM tools refine a mask; else
        ``prompt`` as it is. On phantoms one correction click after a box took
        robustmedsam-lite's Dice from 0.78 to 0.90 this way, and to 0.77 without the
        mask (``Testing/benchmarks/bench_corrections.py``, docs/slicer.md)."""
        last = self._answered.get(index)
        if last is None or prompt.mask_input is not None or not _corrects(last[0], prompt):
            return prompt
        return SlicePrompt(prompt.points, prompt.labels, prompt.box, last[1])

    def crop(self, region: Region) -> SegmentationSession:
        """The session on the crop ``region`` (``K, J, I`` slices) of this volume, with the
        same predictor, axis, window and disk cache: kept, so that a later request on the
        same crop (a correction click on a zoomed small box) finds its encoded slices and
        its last answers (:meth:`correcting`, :meth:`kept_box`). At most
        :data:`CROP_SESSIONS` are kept, the least recently used dropped first; all are
        dropped when this session's volume or window changes. Their encoded slices but
        the newest count against this session's ``cache_bytes`` (see :meth:`_fit` and
        :meth:`max_cached_bytes`).
        ``asked`` is the caller's note of the last request answered on a crop
        (``segment_volume`` keeps its RAS prompts there)."""
        if self._crops_of is None or not (
            self._crops_of[0] is self.volume and self._crops_of[1] == self.window
        ):
            self._crops.clear()
            self._crops_of = (self.volume, self.window)
        key = tuple((r.start, r.stop) for r in region)
        crop = self._crops.get(key)
        if crop is None:
            crop = SegmentationSession(
                crop_volume(self.volume, region),
                self.predictor,
                self.axis,
                window=self.window,
                cache_bytes=self.cache_bytes,
                disk_cache=self.disk_cache,
                model_id=self.model_id,
            )
            crop.window_source, crop.region, crop._parent = self.window_source, region, self
            self._crops[key] = crop
            while len(self._crops) > CROP_SESSIONS:
                self._crops.popitem(last=False)
        self._crops.move_to_end(key)
        return crop

    def crop_sessions(self) -> list[SegmentationSession]:
        """The crop sessions kept (see :meth:`crop`), the most recently used first."""
        return list(reversed(self._crops.values()))

    def cached_bytes(self) -> int:
        """Bytes of the encoded slices held in memory by this session and its crops."""
        sessions = [self, *self._crops.values()]
        return sum(e.features.nbytes for s in sessions for e in s._cache.values())

    def max_cached_bytes(self) -> int:
        """The most :meth:`cached_bytes` can reach, known before a slice is encoded:
        ``cache_bytes`` (one slice when it holds less: a session keeps its newest) and
        the newest slice of each of :data:`CROP_SESSIONS` crops (see :meth:`_fit`); a
        crop's slices are no larger than this session's. What a server reserves for a
        session's embeddings (``server.sessions.reserved_bytes``)."""
        rows_cols = self.slice_image(0).shape
        per_slice = self.predictor.encoded_nbytes(rows_cols)
        return max(self.cache_bytes, per_slice) + CROP_SESSIONS * per_slice

    def answered(self, index: int, prompt: SlicePrompt, prediction: Prediction) -> None:
        """Remember the answer to a user's prompt on slice ``index`` (see
        :meth:`correcting`); the mask fed back is not part of the prompt kept."""
        kept = SlicePrompt(prompt.points, prompt.labels, prompt.box)
        self._answered[index] = (kept, prediction.low_res_logits)

    def slice_candidates(
        self, index: int, prompt: SlicePrompt, multimask: bool = True
    ) -> list[Prediction]:
        """All the model's candidate masks for slice ``index`` (see
        ``Predictor.candidates``); a predictor without it gives its one prediction."""
        self.predictor.set_encoded(self.encoded(index))
        start = time.perf_counter()
        candidates = getattr(self.predictor, "candidates", None)
        if candidates is None:
            answers = [self.predictor.predict(prompt)]
        else:
            answers = candidates(prompt, multimask)
        self.stats.decoder_seconds += time.perf_counter() - start
        self.stats.decoder_calls += 1
        return answers

    def click(self, index: int, xy: tuple[float, float], positive: bool = True) -> Prediction:
        """Add an include/exclude point on slice ``index`` and refine that slice's mask:
        all points so far plus the previous mask's logits, as SAM tools do. A model
        trained without points (:attr:`takes_points` False: LiteMedSAM) gets the first
        click's points through the point search (:meth:`searched_points`), as ``segment``
        does; later clicks there go with the box it found and the previous mask.
        A click off the slice is refused (InputError) and not remembered."""
        last = self._clicks.get(index, _Clicks())
        points = [*last.points, self._click_xy(index, xy)]
        labels = [*last.labels, 1 if positive else 0]
        asked = SlicePrompt(points, labels)
        box = None if self.takes_points else self.kept_box(index, asked)
        if self.takes_points or box is not None:
            prompt = SlicePrompt(points, labels, box, last.logits)
            prediction = self.segment_slice(index, prompt)
        else:
            prediction = self._search_and_keep(index, asked)
        self._clicks[index] = _Clicks(points, labels, prediction.low_res_logits)
        return prediction

    def _click_xy(self, index: int, xy: tuple[float, float]) -> tuple[float, float]:
        """``xy`` as floats clipped to slice ``index``; InputError when it lies more than
        half a pixel outside it (the rule for markups points)."""
        rows, cols = self.slice_image(index).shape
        try:
            x, y = (float(v) for v in np.asarray(xy, dtype=np.float64).reshape(2))
        except (TypeError, ValueError):
            raise InputError(f"click {xy!r:.80} is not (x, y): two numbers, slice pixels") from None
        if not (
            -HALF_VOXEL <= x <= cols - 1 + HALF_VOXEL and -HALF_VOXEL <= y <= rows - 1 + HALF_VOXEL
        ):
            raise InputError(
                f"click (x {x:g}, y {y:g}) is outside slice {index}, which is {cols} x {rows} "
                f"pixels (x 0..{cols - 1}, y 0..{rows - 1})"
            )
        return min(max(x, 0.0), cols - 1.0), min(max(y, 0.0), rows - 1.0)

    def searched_points(self, index: int, prompt: SlicePrompt) -> Prediction:
        """The points of ``prompt`` (slice pixels ``(x, y)``) on slice ``index`` through the
        point search (``point_search.answer_points``): the model's answer to the chosen
        candidate's box (+10 %), which is what ``segment`` segments on that slice without
        zoom; the points as they are when no candidate holds them."""
        return self._search(index, prompt)[0]

    def _search(self, index: int, prompt: SlicePrompt) -> tuple[Prediction, np.ndarray | None]:
        return answer_points(
            lambda tried, multimask: self.slice_candidates(index, tried, multimask),
            lambda asked: self.segment_slice(index, asked),
            prompt,
            self.windowed(index),
            self.takes_points,
        )

    def _search_and_keep(self, index: int, prompt: SlicePrompt) -> Prediction:
        """:meth:`searched_points`, the box it found kept for later clicks (forgotten
        when it found none)."""
        prediction, box = self._search(index, prompt)
        if box is None:
            self._searched.pop(index, None)
        else:
            self.keep_box(index, prompt, box)
        return prediction

    def kept_box(self, index: int, prompt: SlicePrompt) -> np.ndarray | None:
        """The box the point search found on slice ``index`` for points that ``prompt``
        keeps and adds to (a correction click: ``segment`` and :meth:`click` then ask
        with that box, all the points and the last mask rather than searching again),
        else None."""
        kept = self._searched.get(index)
        return kept[1] if kept is not None and _corrects(kept[0], prompt) else None

    def keep_box(self, index: int, prompt: SlicePrompt, box: np.ndarray) -> None:
        """Remember the box the point search found for the points of ``prompt``."""
        self._searched[index] = (SlicePrompt(prompt.points, prompt.labels), np.asarray(box))

    def undo_click(self, index: int) -> Prediction | None:
        """Remove the last point on slice ``index``; re-predict from the points left
        (None when none is left)."""
        clicks = self._clicks.get(index)
        if not clicks or not clicks.points:
            return None
        clicks.points.pop()
        clicks.labels.pop()
        clicks.logits = None
        if not clicks.points:
            return None
        prompt = SlicePrompt(clicks.points, clicks.labels)
        if self.takes_points:
            prediction = self.segment_slice(index, prompt)
        else:
            prediction = self._search_and_keep(index, prompt)
        clicks.logits = prediction.low_res_logits
        return prediction

    def click_logits(self, index: int) -> np.ndarray | None:
        """The low-res logits of the last click's mask on slice ``index`` (None if none):
        the mask input for propagating from that slice."""
        clicks = self._clicks.get(index)
        return None if clicks is None else clicks.logits

    def clear_clicks(self, index: int | None = None) -> None:
        """Forget the points of one slice (or of all)."""
        if index is None:
            self._clicks.clear()
        else:
            self._clicks.pop(index, None)

    def _remember(self, index: int, encoded: EncodedSlice) -> None:
        self._cache[index] = encoded
        (self._parent or self)._fit(self)

    def _fit(self, using: SegmentationSession) -> None:
        """Drop encoded slices, oldest first, until this session's and its crops' fit in
        ``cache_bytes`` besides the newest slice of each crop (kept for a correction
        click; at most :data:`CROP_SESSIONS` slices more): the crops' go first (the
        least recently used crop first, ``using`` last), then this session's when it is
        ``using``. A crop never takes this session's slices, nor does its newest slice
        take their room: the server and the panel encode ahead as many slices as
        ``cache_bytes`` holds after every click, and one taken from them would be
        encoded again, pushing out the next (an LRU cache under a scan)."""
        crops = [c for c in self._crops.values() if c._cache]
        newest = sum(next(reversed(c._cache.values())).features.nbytes for c in crops)
        order = [c for c in self._crops.values() if c is not using] + [using]
        total = self.cached_bytes()
        for session in order:
            while total > self.cache_bytes + newest and len(session._cache) > 1:
                _, dropped = session._cache.popitem(last=False)
                total -= dropped.features.nbytes

    def cache_key(self) -> str:
        """Content key of this volume + axis + window + model (for the disk cache)."""
        if self._key is None:
            digest = hashlib.sha256()
            array = np.ascontiguousarray(self.volume.array)
            digest.update(f"{array.shape}{array.dtype}{self.axis}{self.window}".encode())
            digest.update(f"{self.model_id}{self.style}".encode())
            digest.update(memoryview(array).cast("B"))  # the voxels, not a copy of them
            self._key = digest.hexdigest()[:32]
        return self._key

    def _disk_path(self, index: int) -> Path | None:
        if self.disk_cache is None:
            return None
        return self.disk_cache / self.cache_key() / f"slice_{index:05d}.safetensors"

    def _load_from_disk(self, index: int) -> EncodedSlice | None:
        path = self._disk_path(index)
        if path is None or not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            log.warning("ignoring unreadable cache file %s: %s", path, error)
            return None
        problem = self._cache_file_problem(index, tensors)
        if problem:
            log.warning("ignoring cache file %s (%s); encoding the slice again", path, problem)
            return None
        frame = tensors.pop("frame").tolist()
        features = ImageFeatures(tensors["embedding"], tensors.get("robust"))
        return EncodedSlice(features, Frame(tuple(frame[:2]), tuple(frame[2:])))

    def _cache_file_problem(self, index: int, tensors: dict[str, torch.Tensor]) -> str:
        """What makes a cache file unusable for slice ``index`` ('' when nothing): the
        names, a frame ``(rows, cols, input rows, input cols)`` of this slice, finite
        float features of the shapes this session has seen."""
        if not {"embedding", "frame"} <= set(tensors) <= {"embedding", "frame", "robust"}:
            return f"tensors {sorted(tensors)}"
        frame = tensors["frame"]
        rows_cols = tuple(self.slice_image(index).shape)
        if (
            frame.shape != (4,)
            or frame.is_floating_point()
            or tuple(frame[:2].tolist()) != (rows_cols)
        ):
            return f"frame {frame.tolist()} is not that of a {rows_cols} slice"
        features = {k: v for k, v in tensors.items() if k != "frame"}
        for name, tensor in features.items():
            if not tensor.is_floating_point() or tensor.ndim != 4 or not tensor.isfinite().all():
                return f"{name} is not finite 4-D features"
        shapes = {k: tuple(v.shape) for k, v in features.items()}
        config = getattr(getattr(self.predictor, "model", None), "config", None)
        if config is not None:  # a SAM-family model: 1 x C x E x E embeddings
            size = config.embedding_size
            if shapes["embedding"] != (1, config.prompt_embed_dim, size, size):
                return f"embedding of shape {shapes['embedding']} is not this model's"
        if self._shapes is not None and shapes != self._shapes:
            return f"shapes {shapes} differ from {self._shapes}"
        self._shapes = shapes
        return ""

    def _save_to_disk(self, index: int, encoded: EncodedSlice) -> None:
        path = self._disk_path(index)
        if path is None:
            return
        from safetensors.torch import save_file

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(
                f"cannot write the embedding cache {self.disk_cache}: {error.strerror}"
            ) from None
        frame = torch.tensor([*encoded.frame.original_size, *encoded.frame.input_size])
        tensors = {"embedding": encoded.features.embedding.cpu().contiguous(), "frame": frame}
        if encoded.features.robust is not None:
            tensors["robust"] = encoded.features.robust.cpu().contiguous()
        with atomic_output(path) as temporary:
            save_file(tensors, str(temporary))


class _EncodeAhead:
    """One worker thread encoding a session's slices in a planned order, ``depth`` of them
    past the furthest planned slice taken so far (none before ``start``). A planned slice
    whose turn passed untaken ends its direction (a stop rule fired): the slices beyond it
    are skipped."""

    def __init__(self, session: SegmentationSession, order: list[int], depth: int) -> None:
        self.session, self.depth = session, depth
        self.order = list(dict.fromkeys(order))
        self.place = {index: place for place, index in enumerate(self.order)}
        self.submitted = 0  # places of ``order`` looked at so far
        self.reached = -1  # the furthest place taken
        self.taken: set[int] = set()
        self.skipped: set[int] = set()
        self.futures: dict[int, Future] = {}
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="encode-ahead")
        self.started = False

    def start(self) -> None:
        """Run ahead from now on (after the first mask)."""
        if not self.started:
            self.started = True
            self._fill()

    def take(self, index: int) -> Future | None:
        """The worker's result for slice ``index`` (None when not planned); queues more."""
        place = self.place.get(index)
        if place is not None:
            self.taken.add(index)
            self.reached = max(self.reached, place)
            if index not in self.futures and place >= self.submitted:  # asked early
                self.futures[index] = self.worker.submit(self.session._produce, index)
                self.submitted = place + 1
        self._fill()
        return self.futures.pop(index, None)

    def _fill(self) -> None:
        ahead = sum(self.place[i] > self.reached for i in self.futures)
        while self.started and ahead < self.depth and self.submitted < len(self.order):
            index = self.order[self.submitted]
            self.submitted += 1
            if self._ended(index):
                self.skipped.add(index)
                continue
            self.futures[index] = self.worker.submit(self.session._produce, index)
            ahead += 1

    def _ended(self, index: int) -> bool:
        """Whether the slice before ``index`` in its direction was skipped, or passed
        untaken."""
        for before in (index - 1, index + 1):
            place = self.place.get(before, len(self.order))
            if place < self.place[index] and (
                before in self.skipped or (place < self.reached and before not in self.taken)
            ):
                return True
        return False

    def close(self) -> None:
        for future in self.futures.values():
            future.cancel()
        self.worker.shutdown(wait=True)
