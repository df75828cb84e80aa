"""RobustMedSAM: interactive medical segmentation with a fused MedSAM + RobustSAM model.

Pure Python (torch + numpy); no Qt, no ``slicer.app``. The Slicer module, the
``robustmedsam`` command line and console scripts all call this library.
"""

from RobustMedSAMLib.errors import (
    CancelledError,
    CheckpointError,
    InputError,
    ModelOutOfMemoryError,
    RobustMedSAMError,
)

__version__ = "0.1.0"

__all__ = [
    "CancelledError",
    "CheckpointError",
    "InputError",
    "ModelOutOfMemoryError",
    "RobustMedSAMError",
    "__version__",
]
