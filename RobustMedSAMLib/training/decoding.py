"""The decoder's training forward: a batch of different images, one prompt set each.

The inference ``model.decode`` takes one image and many prompts; training needs one
image per prompt. Frames as in ``model.decode``: points/boxes in model-input pixels,
logits on the low-res grid ``B x 1 x L x L``.
"""

from __future__ import annotations

import torch

from RobustMedSAMLib.model.paired_decoding import plain_paired
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.training.simulated_prompts import Prompts


def decode_paired(
    model: SegmentAnythingModel,
    embedding: torch.Tensor,
    robust: torch.Tensor | None,
    prompts: Prompts,
    mask_input: torch.Tensor | None = None,
    multimask: bool = False,
    decoder: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask logits, predicted IoU and the mask features ``B x C/8 x L x L`` (robust: the
    fused robust features) for images ``B x C x h x w``.

    Single-mask (token 0): logits ``B x L x L``, IoU ``B``. ``multimask`` (tokens 1-3, what
    inference uses for a lone point): logits ``B x 3 x L x L``, IoU ``B x 3``.
    """
    sparse, dense = model.prompt_encoder(
        points=prompts.point_pair, boxes=prompts.boxes, masks=mask_input
    )
    image_pe = model.prompt_encoder.get_dense_pe()
    decoder = model.mask_decoder if decoder is None else decoder
    if model.robust:
        masks, iou, features = decoder.predict_paired(embedding, image_pe, sparse, dense, robust)
    else:
        masks, iou, features = plain_paired(decoder, embedding, image_pe, sparse, dense)
    if multimask:
        return masks[:, 1:], iou[:, 1:], features
    return masks[:, 0], iou[:, 0], features
