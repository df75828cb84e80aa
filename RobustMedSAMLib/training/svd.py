"""SVD-based parameter-efficient fine-tuning of the image encoder's linear layers.

Each chosen ``nn.Linear`` weight is factored ``W = U diag(s) V^T``; only a change of
the singular values is trained (all of them, or the top ``rank``), so the layer
computes with ``W + U_r diag(delta) V_r^T``. With delta = 0 the layer is exactly the
original. ``merge_svd`` writes the change back into plain weights for inference, and
``adapter_state`` holds only what changed (the ``delta`` vectors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DELTA_SUFFIX = ".svd_delta"


class SvdLinear(nn.Module):
    """A frozen linear layer whose singular values (top ``rank``) are trainable."""

    def __init__(self, linear: nn.Linear, rank: int = 0) -> None:
        super().__init__()
        weight = linear.weight.detach()
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        r = len(s) if rank <= 0 else min(rank, len(s))
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.register_buffer("u", u[:, :r].to(weight.dtype).contiguous(), persistent=False)
        self.register_buffer("vh", vh[:r].to(weight.dtype).contiguous(), persistent=False)
        self.svd_delta = nn.Parameter(torch.zeros(r, dtype=weight.dtype))

    def effective_weight(self) -> torch.Tensor:
        return self.weight + (self.u * self.svd_delta) @ self.vh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


def apply_svd(module: nn.Module, targets: tuple[str, ...], rank: int = 0) -> list[str]:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` by an SvdLinear;
    returns the qualified names replaced. Everything else in ``module`` is left as it is."""
    replaced = []
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.Linear) and attr in targets:
                setattr(child, attr, SvdLinear(sub, rank))
                replaced.append(f"{name}.{attr}" if name else attr)
    return replaced


def merge_svd(module: nn.Module) -> int:
    """Turn every SvdLinear back into a plain ``nn.Linear`` carrying the trained weight
    (parameter names as before ``apply_svd``); returns how many were merged."""
    merged = 0
    for _, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, SvdLinear):
                out_features, in_features = sub.weight.shape
                plain = nn.Linear(in_features, out_features, bias=sub.bias is not None)
                plain = plain.to(sub.weight.device, sub.weight.dtype)
                with torch.no_grad():
                    plain.weight.copy_(sub.effective_weight())
                    if sub.bias is not None:
                        plain.bias.copy_(sub.bias)
                setattr(child, attr, plain)
                merged += 1
    return merged


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trained singular-value changes, ``<layer>.svd_delta`` -> ``r`` vector."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k.endswith(DELTA_SUFFIX)}
