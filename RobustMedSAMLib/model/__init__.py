"""The network: SAM's image encoder, prompt encoder and (robust) mask decoder.

No files and no downloads here: ``weights`` turns checkpoints into these modules.

    from RobustMedSAMLib.model import SegmentAnythingModel, ModelConfig, VIT_B, TINY, LITE_MEDSAM
"""

from RobustMedSAMLib.model.config import LITE_MEDSAM, TINY, VIT_B, ModelConfig
from RobustMedSAMLib.model.sam import ImageFeatures, SegmentAnythingModel

__all__ = ["LITE_MEDSAM", "TINY", "VIT_B", "ImageFeatures", "ModelConfig", "SegmentAnythingModel"]
