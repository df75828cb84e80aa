"""The lite path's imports: nothing heavy that the models do not use.

Importing torchvision (by segment-anything's package ``__init__``, or by timm) and torch's
compiler stack cost the default model's process 0.33 GB resident (docs/evidence.md, Memory).
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


HEAVY = ("torchvision", "timm", "torch._dynamo", "sympy")
"""Imported by nothing the lite models use: torchvision and timm (0.18 GB), torch's
compiler stack (0.15 GB; torch's meta-device factories import it)."""


@pytest.mark.parametrize("model", ["litemedsam", "robustmedsam-lite"])
def test_loading_a_lite_model_imports_nothing_heavy_it_does_not_use(model):
    code = (
        "import sys\n"
        "from RobustMedSAMLib.inference.loader import load_named_model\n"
        f"load_named_model({model!r}, device='cpu')\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert _run(code) == "[]"


@pytest.mark.parametrize(
    "later",
    [
        "from segment_anything import SamPredictor, sam_model_registry",
        "import segment_anything; segment_anything.SamAutomaticMaskGenerator",
    ],
)
def test_segment_anything_stays_whole_for_its_users(later):
    """After the model parts came in without the package's ``__init__``, a user's
    ``from segment_anything import ...`` (the Slicer console, a script) still gets the
    package's names, and the same classes the models here are built from."""
    code = (
        "from RobustMedSAMLib.model import sam_parts\n"
        f"{later}\n"
        "import segment_anything\n"
        "print(segment_anything.modeling.MaskDecoder is sam_parts.MaskDecoder,"
        " callable(segment_anything.SamPredictor))"
    )
    assert _run(code) == "True True"
