"""Run-directory files: the resumable training state and the exported models.

``state.pt``: step, best score, the trained tensors (parameters and buffers of the
trained parts only) and the optimizer state; written atomically. Exported models
(``last`` and ``best``, ``.safetensors`` with the ModelConfig in the metadata, or
``.pth``) hold the full model in the published key layout with SVD changes merged,
so ``checkpoint.load_model`` and ``robustmedsam segment --checkpoint`` load them; SVD
runs also write ``adapter_last/best.safetensors`` holding only the changed singular values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from RobustMedSAMLib.errors import CheckpointError
from RobustMedSAMLib.formats.atomic import atomic_output
from RobustMedSAMLib.training.svd import DELTA_SUFFIX, SvdLinear, adapter_state
from RobustMedSAMLib.weights.checkpoint import save_state_dict

STATE_FILE = "state.pt"


def trained_state(model: torch.nn.Module, trained: set[str]) -> dict[str, torch.Tensor]:
    """Tensors a resume needs: the trained parameters and every persistent buffer
    (BatchNorm running statistics; small)."""
    parameters = {name for name, _ in model.named_parameters()}
    return {
        name: tensor.detach().cpu().clone()
        for name, tensor in model.state_dict().items()
        if name in trained or name not in parameters
    }


def save_training_state(run_dir: Path, payload: dict[str, Any]) -> Path:
    path = run_dir / STATE_FILE
    with atomic_output(path) as temporary:
        torch.save(payload, temporary)
    return path


def load_training_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir}: no {STATE_FILE} to resume from; start the run without --resume"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable state is one failure
        raise CheckpointError(
            f"{path}: unreadable training state ({error}); start a new run"
        ) from None


def inference_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state in the published layout, SVD changes merged into the weights."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(DELTA_SUFFIX)}
    for name, module in model.named_modules():
        if isinstance(module, SvdLinear):
            state[f"{name}.weight"] = module.effective_weight().detach()
    return state


def export_model(model: torch.nn.Module, run_dir: Path, tag: str, fmt: str) -> Path:
    """Write ``{tag}.safetensors`` or ``{tag}.pth`` (and ``adapter_{tag}`` for SVD runs)."""
    adapter = adapter_state(model)
    if adapter:
        save_state_dict(adapter, run_dir / f"adapter_{tag}.safetensors")
    suffix = ".safetensors" if fmt == "safetensors" else ".pth"
    return save_state_dict(inference_state(model), run_dir / f"{tag}{suffix}", model.config)
