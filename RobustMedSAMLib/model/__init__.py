"""The network: SAM's image encoder, prompt encoder and (robust) mask decoder.

No files and no downloads here: ``weights`` turns checkpoints into these modules.

    from RobustMedSAMLib.model import SegmentAnythingModel, ModelConfig, VIT_B, TINY
"""

from RobustMedSAMLib.model.config import TINY, VIT_B, ModelConfig
from RobustMedSAMLib.model.sam import ImageFeatures, SegmentAnythingModel

__all__ = ["TINY", "VIT_B", "ImageFeatures", "ModelConfig", "SegmentAnythingModel"]
