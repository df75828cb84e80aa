"""Test doubles. ``ThresholdPredictor`` stands in for the model behind the Predictor
interface so that the session, 3D propagation, the main job and the CLI can be tested
for Dice and geometry before a trained model ships. It is never offered as a model."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from RobustMedSAMLib.inference.predictor import EncodedSlice
from RobustMedSAMLib.inference.preprocessing import Frame
from RobustMedSAMLib.inference.types import Prediction, SlicePrompt
from RobustMedSAMLib.model.sam import ImageFeatures


class _Style:
    style = "medsam"

    def grid_cover(self, masks: np.ndarray, frame: Frame, grid: tuple[int, int]) -> torch.Tensor:
        """The masks on the double's "embedding" (the slice itself), as the real one's."""
        tensor = torch.as_tensor(np.asarray(masks, np.float32))[:, None]
        return torch.nn.functional.interpolate(tensor, grid, mode="area")[:, 0]


class ThresholdPredictor:
    """Segments the bright connected component(s) a prompt hits: a positive point inside,
    most of it inside the box, or overlapping the fed-back mask; removes components under
    a negative point. ``encode`` counts calls like the real encoder."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.preprocessor = _Style()
        self.encoded_images: list[np.ndarray] = []
        self.current: EncodedSlice | None = None

    def encode(self, image: np.ndarray, window=None) -> EncodedSlice:
        self.encoded_images.append(np.array(image))
        features = ImageFeatures(torch.as_tensor(np.array(image, np.float32))[None, None])
        return EncodedSlice(features, Frame(image.shape, (64, 64)))

    def encoded_nbytes(self, shape: tuple[int, int]) -> int:
        """The features ``encode`` returns: the slice itself, float32."""
        return int(np.prod(shape)) * 4

    def set_encoded(self, encoded: EncodedSlice) -> None:
        self.current = encoded

    def predict(self, prompt: SlicePrompt) -> Prediction:
        image = self.current.features.embedding[0, 0].numpy()
        components, count = ndimage.label(ndimage.gaussian_filter(image, 1.0) > self.threshold)
        keep = np.zeros(count + 1, bool)
        for (x, y), label in zip(prompt.points, prompt.labels, strict=True):
            value = components[int(round(y)), int(round(x))]
            keep[value] = bool(label) if value else keep[value]
        ids = np.arange(1, count + 1)
        areas = ndimage.sum_labels(np.ones_like(components), components, ids)
        if prompt.box is not None:
            x0, y0, x1, y1 = np.rint(prompt.box).astype(int)
            region = np.zeros(image.shape, bool)
            region[y0 : y1 + 1, x0 : x1 + 1] = True
            keep[1:] |= ndimage.sum_labels(region, components, ids) >= 0.5 * areas
        keep[0] = False
        mask = keep[components]
        logits = np.where(
            ndimage.zoom(mask.astype(np.float32), 64 / np.array(mask.shape), order=0) > 0, 8.0, -8.0
        )
        return Prediction(mask, 0.9 if mask.any() else 0.1, logits[None].astype(np.float32))


class RecordsMaskInputs:
    """Mixed in before a predictor double: ``mask_inputs`` lists, per ``predict`` call,
    whether the prompt carried a mask input (a fed-back mask)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mask_inputs: list[bool] = []

    def predict(self, prompt: SlicePrompt) -> Prediction:
        self.mask_inputs.append(prompt.mask_input is not None)
        return super().predict(prompt)


class KeepsBoxes:
    """Mixed in before a predictor double: ``boxes`` lists the box of each ask (slice
    pixels ``(x0, y0, x1, y1)``, None for none)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.boxes: list[np.ndarray | None] = []

    def predict(self, prompt: SlicePrompt) -> Prediction:
        self.boxes.append(None if prompt.box is None else np.asarray(prompt.box, float))
        return super().predict(prompt)


class BoxBlobPredictor(ThresholdPredictor):
    """A box-only model as LiteMedSAM behaves (measured, docs/propagation.md): a point
    alone gets an empty mask; in a box it draws the bright pixels of the components
    mostly inside the box, cut to the box, and when there are none, a blob anyway (an
    ellipse filling half the box, score 0.9: past a structure's end the real model
    still answers with a confident blob). Fed its own logits back as a mask prompt (it was
    not trained with them) it overflows by 2 px, as LiteMedSAM's masks did on an MR
    sphere (docs/propagation.md, "What is carried to the next slice")."""

    prompts = ("box",)

    def predict(self, prompt: SlicePrompt) -> Prediction:
        image = self.current.features.embedding[0, 0].numpy()
        shape = image.shape
        if prompt.box is None:
            return Prediction(np.zeros(shape, bool), 0.1, np.full((1, 64, 64), -8.0, np.float32))
        mask = super().predict(SlicePrompt(box=prompt.box)).mask
        x0, y0, x1, y1 = np.rint(prompt.box).astype(int)
        inside = np.zeros(shape, bool)
        inside[y0 : y1 + 1, x0 : x1 + 1] = True
        mask &= inside
        if not mask.any():
            rows, cols = np.mgrid[: shape[0], : shape[1]]
            cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
            ry, rx = max((y1 - y0) / 2, 1) * 0.7, max((x1 - x0) / 2, 1) * 0.7
            mask = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
        if prompt.mask_input is not None and "mask" not in self.prompts:
            mask = ndimage.binary_dilation(mask, iterations=2)
        logits = np.where(ndimage.zoom(mask.astype(np.float32), 64 / np.array(shape), order=0) > 0,
                          8.0, -8.0)  # fmt: skip
        return Prediction(mask, 0.9, logits[None].astype(np.float32))

    def candidates(self, prompt: SlicePrompt, multimask: bool = True) -> list[Prediction]:
        return [self.predict(prompt)]
