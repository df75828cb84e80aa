"""Shared fixtures: tiny checkpoints with the published key layouts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from reference_models import random_state_dict  # noqa: E402

from RobustMedSAMLib.model.config import TINY  # noqa: E402

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sam_state() -> dict:
    """Tiny SAM-layout weights (as SAM, MedSAM, MedicoSAM publish them)."""
    return random_state_dict(TINY, robust=False, seed=1)


@pytest.fixture(scope="session")
def tiny_robust_state() -> dict:
    """Tiny RobustSAM-layout weights (SAM layout + robust decoder modules)."""
    return random_state_dict(TINY, robust=True, seed=2)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_sam_state, tiny_robust_state) -> dict[str, Path]:
    """Files: ``sam.pth`` (SAM layout), ``robust.pth`` (``module.``-prefixed, as RobustSAM
    training saves it), ``robust.safetensors``."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.save(tiny_sam_state, folder / "sam.pth")
    torch.save({f"module.{k}": v for k, v in tiny_robust_state.items()}, folder / "robust.pth")
    from safetensors.torch import save_file

    save_file(tiny_robust_state, str(folder / "robust.safetensors"))
    return {
        "sam": folder / "sam.pth",
        "robust": folder / "robust.pth",
        "robust_safetensors": folder / "robust.safetensors",
    }
