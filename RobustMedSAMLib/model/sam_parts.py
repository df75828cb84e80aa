"""segment-anything's model parts, imported without running its package's ``__init__``.

``import segment_anything.modeling.mask_decoder`` runs ``segment_anything/__init__.py``
first, and that imports the predictor and the automatic mask generator, hence
torchvision: 0.18 GB resident on the CPU (its operator registrations pull in
``torch._dynamo`` and sympy), for nothing the models here use: the parts below need
torch only. So the package is put in ``sys.modules`` unexecuted, its ``modeling``
subpackage is imported as usual, and the package's own ``__init__`` runs the first
time anything else asks for one of its names (``from segment_anything import
SamPredictor`` still works, in the same process, with the same classes).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any


def _modeling() -> ModuleType:
    """``segment_anything.modeling``, without the package's ``__init__`` if it has not
    run yet (it runs on the first attribute the package lacks, PEP 562)."""
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or spec.loader is None:
            raise ImportError("segment-anything is not installed (pip install segment-anything)")
        package = importlib.util.module_from_spec(spec)

        def complete(name: str) -> Any:
            del package.__getattr__  # from now on the package is whole
            spec.loader.exec_module(package)
            return getattr(package, name)

        package.__getattr__ = complete
        sys.modules["segment_anything"] = package
    return importlib.import_module("segment_anything.modeling")


_parts = _modeling()
LayerNorm2d = _parts.common.LayerNorm2d
MLP = _parts.mask_decoder.MLP
MaskDecoder = _parts.MaskDecoder
PromptEncoder = _parts.PromptEncoder
TwoWayTransformer = _parts.TwoWayTransformer
ImageEncoderViT = _parts.ImageEncoderViT
Attention = _parts.image_encoder.Attention
get_rel_pos = _parts.image_encoder.get_rel_pos

__all__ = [
    "MLP",
    "Attention",
    "ImageEncoderViT",
    "LayerNorm2d",
    "MaskDecoder",
    "PromptEncoder",
    "TwoWayTransformer",
    "get_rel_pos",
]
