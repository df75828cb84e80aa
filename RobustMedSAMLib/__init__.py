"""RobustMedSAM: interactive medical segmentation with a fused MedSAM + RobustSAM model.

Pure Python (torch + numpy); no Qt, no ``slicer.app``. The Slicer module, the
``robustmedsam`` command line and console scripts all call this library.

Modules moved into packages in 0.2 (``RobustMedSAMLib.volume`` is now
``RobustMedSAMLib.formats.volume``, ...) still import under their old names for one
release, with a ``DeprecationWarning``; ``MOVED_MODULES`` lists them.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

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

MOVED_MODULES = {
    "atomic_files": "formats.atomic",
    "batch": "inference.batch",
    "checkpoint": "weights.checkpoint",
    "config": "model.config",
    "download": "weights.download",
    "finetune_process": "training.process",
    "image_encoder": "model.image_encoder",
    "loader": "inference.loader",
    "markups": "formats.markups",
    "mask_prompts": "inference.mask_prompts",
    "medsegbench": "datasets.medsegbench",
    "phantoms": "datasets.phantoms",
    "prediction": "inference.types",
    "predictor": "inference.predictor",
    "preprocessing": "inference.preprocessing",
    "propagation": "inference.propagation",
    "quantization": "model.quantization",
    "registry": "weights.registry",
    "robust_decoder": "model.robust_decoder",
    "segment": "inference.segment_volume",
    "segmentation_io": "formats.segmentation",
    "session": "inference.session",
    "slicing": "inference.slicing",
    "training_export": "training.export",
    "volume": "formats.volume",
    "zoom": "inference.zoom",
    "evaluation.prompts": "evaluation.simulated_clicks",
    "training.prompts_sim": "training.simulated_prompts",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``RobustMedSAMLib.<old>`` as the module that replaced it, with a warning."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(f"{__name__}.")
        if fullname.startswith(f"{__name__}.") and old in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        """A fresh module: the default."""
        return None

    def exec_module(self, module):
        new = f"{__name__}.{MOVED_MODULES[module.__name__.removeprefix(f'{__name__}.')]}"
        warnings.warn(
            f"{module.__name__} moved to {new}; the old name goes away in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        target = importlib.import_module(new)
        module.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("__")})
        module.__doc__ = target.__doc__


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
