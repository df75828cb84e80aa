"""Segment one 2D slice from prompts: encode once, then any number of clicks.

    predictor = Predictor(model, preprocessing="medsam")
    predictor.set_image(slice_2d, window=(-160, 240))   # encoder runs here (cached)
    result = predictor.predict(SlicePrompt(points=[[120, 88]], labels=[1]))
    refined = SlicePrompt(points=..., labels=..., mask_input=result.low_res_logits)
    result = predictor.predict(refined)

Frames: slices are ``(rows, cols)``; prompts are (x, y) slice pixels (see prediction.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from RobustMedSAMLib.device import autocast_dtype, prepare_device, release_free_memory
from RobustMedSAMLib.errors import InputError, ModelOutOfMemoryError
from RobustMedSAMLib.inference.preprocessing import (
    Frame,
    Preprocessor,
    Style,
    auto_window,
    window_to_uint8,
)
from RobustMedSAMLib.inference.types import Prediction, SlicePrompt
from RobustMedSAMLib.model.sam import ImageFeatures, SegmentAnythingModel


@dataclass
class EncodedSlice:
    """A slice's image features and frame: what the embedding cache stores."""

    features: ImageFeatures
    frame: Frame


class Predictor:
    """Holds one model and the current slice's features; ``predict`` costs only the decoder.

    ``prompts``: the prompt kinds the weights were trained with (``ModelSource.prompts``);
    a point search skips point prompts for a model trained without them."""

    def __init__(
        self,
        model: SegmentAnythingModel,
        preprocessing: Style = "sam",
        half: bool = False,
        prompts: tuple[str, ...] = ("point", "box", "mask"),
    ) -> None:
        self.model = model.eval()
        self.prompts = tuple(prompts)  # what the weights were trained with (registry)
        prepare_device(model.device)
        config = model.config
        self.preprocessor = Preprocessor(
            preprocessing, config.image_size, config.pixel_mean, config.pixel_std
        )
        self.autocast = autocast_dtype(model.device, half)
        self.current: EncodedSlice | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def encode(self, image: np.ndarray, window: tuple[float, float] | None = None) -> EncodedSlice:
        """Run the image encoder on a ``(rows, cols)`` slice of raw intensities."""
        image = np.asarray(image)
        if image.ndim != 2:
            raise InputError(f"expected a 2D slice (rows, cols), got shape {image.shape}")
        window = window or auto_window(image)
        tensor, frame = self.preprocessor.image(window_to_uint8(image, window))
        try:
            with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
                features = self.model.encode(tensor.to(self.device))
        except torch.OutOfMemoryError as error:
            raise ModelOutOfMemoryError(
                f"out of memory encoding a slice on {self.device}: use --device cpu, "
                "close other GPU programs, or enable half precision"
            ) from error
        encoded = EncodedSlice(features.to(self.device, torch.float32), frame)
        release_free_memory(self.device)
        return encoded

    def encoded_nbytes(self, shape: tuple[int, int]) -> int:
        """Bytes of the features :meth:`encode` returns for a ``(rows, cols)`` slice of
        ``shape`` (float32), known before encoding one; every slice's are the same size
        (it is resized to the model's input)."""
        return self.model.features_numel() * torch.float32.itemsize

    def set_image(self, image: np.ndarray, window: tuple[float, float] | None = None) -> None:
        """Encode a slice and make it current (see ``encode``)."""
        self.current = self.encode(image, window)

    def set_encoded(self, encoded: EncodedSlice) -> None:
        """Make an already encoded (cached) slice current; no encoder work."""
        self.current = EncodedSlice(encoded.features.to(self.device), encoded.frame)

    @torch.inference_mode()
    def predict(self, prompt: SlicePrompt, multimask: bool | None = None) -> Prediction:
        """Mask for the current slice. ``multimask`` None: three candidates when the prompt is
        a single point (SAM's ambiguity rule), else one. Of several candidates, those
        holding every positive point are preferred (a point on a structure's edge), and
        among them the best by predicted IoU x stability (:func:`choose_candidate`)."""
        if self.current is None:
            raise InputError("no slice set: call set_image() before predict()")
        if prompt.is_empty and prompt.mask_input is None:
            raise InputError("empty prompt: give at least one point or a box")
        multimask = prompt.is_ambiguous if multimask is None else multimask
        logits, scores = self._decode(prompt, multimask)
        full = self.preprocessor.mask_logits(logits.float(), self.current.frame)[0]
        stability = stability_scores(logits[0].float())
        positive = prompt.points[prompt.labels == 1]
        best = choose_candidate(full > 0, scores[0].float(), stability, positive)
        return Prediction(
            mask=(full[best] > 0).cpu().numpy(),
            score=float(scores[0, best]),
            low_res_logits=logits[0, best : best + 1].float().cpu().numpy(),
            stability=float(stability[best]),
        )

    @torch.inference_mode()
    def candidates(self, prompt: SlicePrompt, multimask: bool = True) -> list[Prediction]:
        """Every mask the model gives for ``prompt`` on the current slice (three with
        ``multimask``, else one), unranked: for a caller that chooses itself."""
        if self.current is None:
            raise InputError("no slice set: call set_image() before candidates()")
        if prompt.is_empty and prompt.mask_input is None:
            raise InputError("empty prompt: give at least one point or a box")
        logits, scores = self._decode(prompt, multimask)
        full = self.preprocessor.mask_logits(logits.float(), self.current.frame)[0]
        stability = stability_scores(logits[0].float())
        return [
            Prediction(
                mask=(full[m] > 0).cpu().numpy(),
                score=float(scores[0, m]),
                low_res_logits=logits[0, m : m + 1].float().cpu().numpy(),
                stability=float(stability[m]),
            )
            for m in range(logits.shape[1])
        ]

    def _decode(self, prompt: SlicePrompt, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        frame, dev = self.current.frame, self.device
        points = boxes = masks = None
        if len(prompt.points):
            xy = torch.as_tensor(self.preprocessor.coords(prompt.points, frame), device=dev)
            points = (xy[None], torch.as_tensor(prompt.labels, device=dev)[None])
        if prompt.box is not None:
            boxes = torch.as_tensor(self.preprocessor.coords(prompt.box, frame), device=dev)
            boxes = boxes.reshape(1, 4)
        if prompt.mask_input is not None:
            masks = self._mask_input(prompt.mask_input)
        return self.model.decode(self.current.features, points, boxes, masks, multimask)

    def _mask_input(self, mask_input: np.ndarray) -> torch.Tensor:
        size = self.model.config.low_res_size
        tensor = torch.as_tensor(np.asarray(mask_input, dtype=np.float32), device=self.device)
        if tensor.shape[-2:] != (size, size):
            raise InputError(
                f"mask_input must be 1x{size}x{size} low-res logits, got {tuple(tensor.shape)}"
            )
        return tensor.reshape(1, 1, size, size)


STABILITY_OFFSET = 1.0  # SAM's automatic mask generator's default


def stability_scores(logits: torch.Tensor, offset: float = STABILITY_OFFSET) -> torch.Tensor:
    """``M x L x L`` logits -> ``M`` stability scores: IoU of the masks at logit
    ``+offset`` and ``-offset`` (1 for a mask whose edge is sharp, as in SAM)."""
    high = (logits > offset).flatten(1).sum(1)
    low = (logits > -offset).flatten(1).sum(1)
    return torch.where(low > 0, high / low.clamp(min=1), torch.zeros_like(high, dtype=torch.float))


def choose_candidate(
    masks: torch.Tensor, scores: torch.Tensor, stability: torch.Tensor, positive: np.ndarray
) -> int:
    """Index of the best of ``M`` candidate masks ``M x rows x cols`` (bool, slice pixels):
    among those holding every positive point ``N x 2`` (x, y) (all, if none does), the
    highest predicted IoU x stability."""
    rank = scores * stability
    if len(positive):
        rows, cols = masks.shape[-2:]
        x = np.clip(np.rint(positive[:, 0]).astype(int), 0, cols - 1)
        y = np.clip(np.rint(positive[:, 1]).astype(int), 0, rows - 1)
        index = torch.as_tensor(y, device=masks.device), torch.as_tensor(x, device=masks.device)
        holds = masks[:, index[0], index[1]].all(dim=1)
        if holds.any():
            rank = torch.where(holds.to(rank.device), rank, torch.full_like(rank, -1.0))
    return int(torch.argmax(rank))
