"""Optional fast CPU mode: dynamic int8 linear layers in the image encoder.

The encoder's time is dominated by its linear layers (qkv, projection, MLP). Dynamic
quantisation stores their weights as int8 and quantises activations on the fly; the
prompt encoder and mask decoder stay in float32. Masks agree with full precision at
the Dice reported by ``Testing/benchmarks/bench_model.py``; use it for interactive
speed on a CPU, not for reference results.
"""

from __future__ import annotations

import warnings

from torch import nn

from RobustMedSAMLib.model.sam import SegmentAnythingModel


def quantize_encoder(model: SegmentAnythingModel) -> SegmentAnythingModel:
    """Replace the image encoder's ``nn.Linear`` layers by dynamic int8 ones, in place."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model.image_encoder = quantize_dynamic(
            model.image_encoder.cpu(), {nn.Linear}, dtype=__import__("torch").qint8
        )
    return model
